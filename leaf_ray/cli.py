"""The ``leaf-ray`` command line. Each subcommand takes a YAML config (see ``configs/``).

An expected refusal (:class:`~leaf_ray.errors.RunRefused`: a config that does not validate, an
impossible resource request, a folder another run holds or wrote, tokenizers that cannot be
compared, ...) is printed as ``error: <what to change>`` and exits with status 2, here and in
the Ray jobs (``jobs/*.py``), instead of a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from leaf_ray.config import (
    BenchmarkConfig,
    ConfigError,
    DistillationConfig,
    EvaluationConfig,
    PipelineConfig,
    PruningConfig,
    ScoringConfig,
    ServingConfig,
    load_config,
)
from leaf_ray.errors import RunRefused

app = typer.Typer(help="LeaF causal attention distillation on Ray.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def main() -> None:
    """LeaF: find the tokens a student leans on and the teacher ignores, and distill around them."""

bench_app = typer.Typer(help="The embedded benchmark: synthetic data with known confounders, tiny models.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

STAGES = {
    "benchmark": BenchmarkConfig,
    "pipeline": PipelineConfig,
    "scoring": ScoringConfig,
    "pruning": PruningConfig,
    "distillation": DistillationConfig,
    "serving": ServingConfig,
    "evaluation": EvaluationConfig,
}


@contextmanager
def refusals_exit_2() -> Iterator[None]:
    """Turn a :class:`RunRefused` into its message on stderr and exit status 2."""
    try:
        yield
    except RunRefused as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def console() -> None:
    """The ``leaf-ray`` console script."""
    with refusals_exit_2():
        app()


def _load(path: Path, model):
    try:
        return load_config(path, model)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _check_corpus(cfg: PipelineConfig) -> None:
    """The corpus pre-flight, before Ray starts: a missing dataset or column is a one-line error."""
    from leaf_ray.corpus import check_corpus

    try:
        check_corpus(cfg.scoring)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    stage: Annotated[str, typer.Option(help=f"Which model the file holds: {', '.join(STAGES)}.")] = "pipeline",
) -> None:
    """Check a config file; print the resolved settings or each bad field."""
    if stage not in STAGES:
        raise typer.BadParameter(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}", param_hint="--stage")
    loaded = _load(config, STAGES[stage])
    if isinstance(loaded, PipelineConfig) and loaded.distillation is not None:
        from leaf_ray.distillation.variants import variant_config

        for variant in loaded.variants:
            try:
                variant_config(loaded.distillation, variant)
            except ValueError as exc:
                typer.echo(f"{config}: {exc}", err=True)
                raise typer.Exit(2) from None
    typer.echo(loaded.model_dump_json(indent=2))


@app.command()
def score(config: Annotated[Path, typer.Option(help="Pipeline config with 'scoring' and 'pruning' sections.")]) -> None:
    """Score and prune a corpus with Ray Data (resumable), then verify if configured; as jobs/score.py."""
    import ray

    from leaf_ray.distributed.scoring import run_scoring

    cfg = _load(config, PipelineConfig)
    _check_corpus(cfg)
    ray.init()
    typer.echo(json.dumps(run_scoring(cfg), indent=2))
    if cfg.verification is not None:
        from leaf_ray.distributed.verify import run_verification

        typer.echo(json.dumps(run_verification(cfg), indent=2))


@app.command()
def run(config: Annotated[Path, typer.Option(help="Pipeline config.")] = Path("configs/demo.yaml"),
        run_dir: Annotated[str | None, typer.Option(help="Override the config's run_dir.")] = None) -> None:
    """The whole pipeline on Ray (resumable): score, distil, evaluate, serve, report; as jobs/pipeline.py."""
    import ray

    from leaf_ray.distributed.pipeline import closing_message, run_pipeline

    cfg = _load(config, PipelineConfig)
    if run_dir:
        cfg = cfg.model_copy(update={"run_dir": run_dir})
    if cfg.benchmark is None:  # else the prepare stage builds the corpus first
        _check_corpus(cfg)
    ray.init()
    typer.echo(closing_message(cfg, run_pipeline(cfg, str(config))))


@app.command()
def distill(config: Annotated[Path, typer.Option(help="Pipeline config with a 'distillation' section.")],
            variant: Annotated[str | None, typer.Option(help="Which student; default: distillation.variant.")] = None,
            ) -> None:
    """Distil one variant of the student with Ray Train (resumable); the same as jobs/distill.py."""
    import ray

    from leaf_ray.distillation.variants import VARIANTS
    from leaf_ray.distributed.distill import DistillationRun, run_distillation
    from leaf_ray.distributed.pipeline import training_set

    cfg = _load(config, PipelineConfig)
    if cfg.distillation is None:
        raise typer.BadParameter(f"{config} has no 'distillation' section", param_hint="--config")
    variant = variant or cfg.distillation.variant
    if variant not in VARIANTS:
        raise typer.BadParameter(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}",
                                 param_hint="--variant")
    try:
        run = DistillationRun.for_variant(cfg, variant, training_set(cfg, variant))  # before any Ray work
    except ValueError as exc:
        typer.echo(f"{config}: {exc}", err=True)
        raise typer.Exit(2) from None
    ray.init()
    typer.echo(json.dumps(run_distillation(run), indent=2, default=str))


@app.command("teacher-cache")
def teacher_cache(config: Annotated[Path, typer.Option(help="Pipeline config with a 'distillation' section.")],
                  variant: Annotated[str | None,
                                     typer.Option(help="Whose training set; default: distillation.variant.")] = None,
                  ) -> None:
    """Cache the teacher's top-k log-probs with Ray Data (resumable); the same as jobs/teacher_cache.py."""
    import ray

    from leaf_ray.distributed.pipeline import training_set
    from leaf_ray.distributed.teacher_cache import run_teacher_cache

    cfg = _load(config, PipelineConfig)
    if cfg.distillation is None:
        raise typer.BadParameter(f"{config} has no 'distillation' section", param_hint="--config")
    folder = training_set(cfg, variant or cfg.distillation.variant)
    ray.init()
    typer.echo(json.dumps(run_teacher_cache(cfg, folder), indent=2))


@app.command("serve")
def serve_model(
    model: Annotated[Path, typer.Option(help="Model directory to serve (a distillation export, or assets/embedded/student).")],
    config: Annotated[Path | None, typer.Option(
        help="Ray Serve config; its first application's args are ServingConfig fields. "
             "Default: serve/config.yaml when it exists, else ServingConfig's defaults.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port; default: the config's http_options.port.")] = None,
) -> None:
    """Serve a model locally over the OpenAI API (Ray Serve LLM + vLLM) with /v1/focus; Ctrl-C stops it."""
    import os
    import signal
    import time

    import ray
    import yaml
    from ray import serve

    config = config or Path("serve/config.yaml")
    deploy = (yaml.safe_load(config.read_text(encoding="utf-8")) if config.exists()
              else {"applications": [{"args": {}}]})  # outside the repository: ServingConfig's defaults
    application = deploy["applications"][0]
    args = {**application.get("args", {}), "model": str(model.resolve())}
    # Replicas need not run in this directory: relative local paths become absolute.
    if args.get("teacher") and Path(args["teacher"]).exists():
        args["teacher"] = str(Path(args["teacher"]).resolve())
    try:
        cfg = ServingConfig.model_validate(args)
    except ValueError as exc:
        typer.echo(f"invalid serving args: {exc}", err=True)
        raise typer.Exit(2) from None
    http = {**deploy.get("http_options", {}), **({"port": port} if port else {})}

    from leaf_ray.serving.app import build_app

    if os.environ.get("RAY_ADDRESS", "local") != "local":
        ray.init()  # a running cluster (`make cluster`, KubeRay): its nodes set the resources
    else:
        # The engine replica, the ingress and /v1/focus each reserve logical CPUs; a 2-core box has
        # too few, so a local Ray gets at least 8 (only the engine and /v1/focus do real work).
        ray.init(num_cpus=max(os.cpu_count() or 1, 8))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a supervisor's stop shuts down cleanly too
    try:
        serve.start(http_options=http)
        serve.run(build_app(cfg.model_dump()), name=application.get("name", "leaf"),
                  route_prefix=application.get("route_prefix", "/"))
        url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
        auth = " -H \"Authorization: Bearer $KEY\"" if cfg.api_key_env or cfg.api_key_file else ""
        body = json.dumps({"model": cfg.model_id, "max_tokens": 8, "messages": [
            {"role": "user", "content": "ann has 3 . ann gets 4 more . how many does ann have ?"}]})
        typer.echo(f"\nserving {cfg.model} as {cfg.model_id!r} at {url}/v1 (Ctrl-C stops)\n"
                   f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()


@bench_app.command("build")
def bench_build(
    config: Annotated[Path | None, typer.Option(help="BenchmarkConfig YAML; defaults build the committed artifacts.")] = None,
    results: Annotated[Path, typer.Option(help="Where to write the figures (embedded.json shape).")] = Path(
        "benchmarks/results/embedded.json"),
) -> None:
    """Generate the data and train tokenizer, teacher and student, deterministically from seeds."""
    from leaf_ray.synthetic.build import build, embedded_results

    cfg = _load(config, BenchmarkConfig) if config else BenchmarkConfig()
    provenance = build(cfg)
    summary = embedded_results(provenance)
    if results.exists():  # keep other builds' families, and variants measured earlier for this one
        previous = json.loads(results.read_text())
        for family, figures in summary["families"].items():
            figures["variants"] = previous.get("families", {}).get(family, {}).get("variants", {})
        summary["families"] = {**previous.get("families", {}), **summary["families"]}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=2) + "\n")
    for family in cfg.families:
        fig = summary["families"][family]
        typer.echo(f"{family:>9}: teacher conflict {fig['teacher_conflict_acc']:.3f} | student conflict "
                   f"{fig['student_conflict_acc']:.3f}, copy {fig['student_copy_rate']:.3f} | "
                   f"detection F1 (clause) {fig['detection_f1']:.3f}")
    typer.echo(f"artifacts in {cfg.output_dir} ({provenance['timings_s']['total']} s); figures in {results}")


@bench_app.command("detect")
def bench_detect(
    embedded: Annotated[Path, typer.Option(help="Built benchmark directory.")] = Path("assets/embedded"),
    families: Annotated[str, typer.Option(help="Comma-separated families.")] = "simple,hard",
    records: Annotated[int, typer.Option(help="Distillation records scored per family.")] = 500,
    results: Annotated[Path, typer.Option(help="embedded.json to fill in.")] = Path("benchmarks/results/embedded.json"),
    report_dir: Annotated[Path, typer.Option(help="Where report.json / report.html show the leaderboard of every "
                                                  "family in the results.")] = Path("benchmarks/results/detection"),
) -> None:
    """Score every detector against the ground truth; fill in families.<family>.detection_methods."""
    from leaf_ray.report import write_report
    from leaf_ray.synthetic.leaderboard import leaderboard

    board = leaderboard(embedded, families.split(","), records)
    summary = json.loads(results.read_text()) if results.exists() else {"families": {}}
    for family, by_level in board.items():
        summary["families"].setdefault(family, {}).update(by_level)
        for key, by_detector in by_level.items():
            for name, row in by_detector.items():
                typer.echo(f"{family:>9} {key:>26} {name:>34}: clause F1 {row['clause']['f1']:.3f} | number F1 "
                           f"{row['number']['f1']:.3f} | flagged/record {row['flagged_per_record']:.1f}")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=2) + "\n")
    boards = {f"{family}{suffix}": figures[key] for family, figures in summary["families"].items()
              for key, suffix in (("detection_methods", ""), ("response_detection_methods", " (response level)"))
              if key in figures}
    typer.echo(str(write_report(report_dir, {"name": "detection leaderboard", "detection_methods": boards})))


@bench_app.command("reproduce")
def bench_reproduce(
    embedded: Annotated[Path, typer.Option(help="Built benchmark directory.")] = Path("assets/embedded"),
    families: Annotated[str, typer.Option(help="Comma-separated families.")] = "simple,hard",
    variants: Annotated[str, typer.Option(help="Comma-separated variants (leaf_instr_resp: reasoning family only).")] = (
        "kd,kd_compute_matched,leaf,random,oracle"),
    seeds: Annotated[int, typer.Option(help="Seeds per variant (0..N-1).")] = 3,
    distill_config: Annotated[Path | None, typer.Option(
        "--config", help="DistillationConfig YAML for the shared settings (steps, lr, batch, loss).")] = None,
    detector: Annotated[str, typer.Option(help="Detector of the variants named without @<detector> "
                                               "(leaf_ray/detection/detectors.py).")] = "grad_norm+iterative",
    corpus: Annotated[str, typer.Option(help="Distillation corpus: 'distill', or 'distill_confounded' (every record "
                                             "carries a shortcut; simple and hard); its rows go to "
                                             "<corpus>_variants.")] = "distill",
    results: Annotated[Path, typer.Option(help="embedded.json to fill in.")] = Path("benchmarks/results/embedded.json"),
) -> None:
    """Run the distillation variants and controls on the embedded benchmark; fill in the results table."""
    from leaf_ray.synthetic.reproduce import reproduce

    base = (_load(distill_config, DistillationConfig) if distill_config else
            DistillationConfig(max_steps=500, eval_every=100, bf16_autocast=False))
    key = "variants" if corpus == "distill" else f"{corpus.removeprefix('distill_')}_variants"
    provenance = json.loads((embedded / "provenance.json").read_text())
    build = {name: provenance[name] for name in ("config_hash", "code_hash")}  # which models each row measured

    def save(family: str, variant: str, row: dict[str, Any]) -> None:
        """Write each row as it is finished, into the results as they are on disk now."""
        summary = json.loads(results.read_text()) if results.exists() else {"families": {}}
        summary["families"].setdefault(family, {}).setdefault(key, {})[variant] = {**row, "build": build}
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(summary, indent=2) + "\n")
        heldout = f" | held-out wordings {row['heldout_acc_mean']:.3f}" if "heldout_acc_mean" in row else ""
        typer.echo(f"{family:>9} {variant:>32}: conflict {row['conflict_acc_mean']:.3f} +/- "
                   f"{row['conflict_acc_std']:.3f} | clean {row['clean_acc_mean']:.3f}{heldout} | "
                   f"attention on clause {row['attention_mass_mean']:.3f}")

    reproduce(embedded, families.split(","), variants.split(","), list(range(seeds)), base, PruningConfig(),
              detector=detector, corpus=corpus, on_row=save)


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="Hugging Face model directory.")],
    data: Annotated[list[Path], typer.Option(help="JSONL test file(s) in the corpus schema, with 'answer'.")],
    checker: Annotated[str, typer.Option(help="Answer checker: number, exact, gsm8k, boxed, or python:module:function.")] = "number",
    engine: Annotated[str, typer.Option(help="Greedy decoding with 'transformers' or 'vllm'.")] = "transformers",
    scores: Annotated[Path | None, typer.Option(help="Scores file (Parquet/JSONL) to grade against meta spans.")] = None,
    attention: Annotated[bool, typer.Option(help="Also report attention mass on the confounder clause.")] = False,
    max_new_tokens: int = 8,
    batch_size: int = 64,
    output: Annotated[Path | None, typer.Option(help="Write the report as JSON here too.")] = None,
) -> None:
    """Greedy answer accuracy and copy rate; detection P/R/F1 and attention mass given ground truth."""
    from leaf_ray.data import iter_records
    from leaf_ray.checkers import resolve_checker
    from leaf_ray.evaluation import answer_accuracy, attention_mass, grade_detection, greedy_generate
    from leaf_ray.models import load_model

    try:
        resolve_checker(checker)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--checker") from exc
    if engine not in ("transformers", "vllm"):
        raise typer.BadParameter(f"unknown engine {engine!r}; choose transformers or vllm", param_hint="--engine")
    lm, tokenizer = load_model(model)
    report: dict = {"model": str(model), "files": {}}
    for path in data:
        records = list(iter_records(path))
        if any(r.answer is None for r in records):
            raise typer.BadParameter(f"{path}: every record needs an 'answer' to be evaluated", param_hint="--data")
        if engine == "vllm":
            import ray

            from leaf_ray.distributed.generate import vllm_generate

            ray.init(ignore_reinit_error=True)
            answers = vllm_generate(str(model), {r.id: (r.instruction, "") for r in records},
                                    max_tokens=max_new_tokens, dtype="float32", batch_size=batch_size)
            predictions = [answers[r.id] for r in records]
        else:
            predictions = greedy_generate(lm, tokenizer, [r.instruction for r in records], max_new_tokens,
                                          batch_size, progress=True)
        answers_report = answer_accuracy(predictions, records, checker)
        entry = {"n": answers_report.n, "accuracy": answers_report.accuracy, "copy_rate": answers_report.copy_rate,
                 "predictions": dict(zip((r.id for r in records), predictions))}
        if attention:
            entry["attention_mass"] = attention_mass(lm, tokenizer, records)
        if scores is not None:
            import pyarrow.parquet as pq

            rows = (pq.read_table(scores).to_pylist() if scores.suffix == ".parquet"
                    else [json.loads(line) for line in scores.read_text().splitlines() if line.strip()])
            entry["detection"] = grade_detection(rows, {r.id: r.meta for r in records})
        report["files"][str(path)] = entry
    if output:  # the full report, with every prediction
        output.write_text(json.dumps(report, indent=2) + "\n")
    for entry in report["files"].values():
        entry.pop("predictions")
    typer.echo(json.dumps(report, indent=2))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="Run directory holding report.json.")]) -> None:
    """Re-render RUN_DIR/report.html from RUN_DIR/report.json."""
    from leaf_ray.report import render_html

    source = run_dir / "report.json"
    if not source.is_file():
        typer.echo(f"{source}: no such file; run the pipeline first", err=True)
        raise typer.Exit(2)
    target = run_dir / "report.html"
    target.write_text(render_html(json.loads(source.read_text())), encoding="utf-8")
    typer.echo(str(target))


if __name__ == "__main__":
    app()
