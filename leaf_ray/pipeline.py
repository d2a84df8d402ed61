"""The whole LeaF run on Ray, stage by stage (what ``make demo`` and jobs/pipeline.py run).

    prepare -> score (Ray Data) -> verify (optional, vLLM) -> distill each variant (Ray Train)
    -> evaluate -> serve the LeaF student and query it (Ray Serve + vLLM) -> report

Every stage writes into ``run_dir`` and is skipped when its output is already complete, so
rerunning the same config after a failure resumes at the stage that failed (and the
scoring and distillation stages resume inside themselves too).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from leaf_ray.config import DistillationConfig, PipelineConfig
from leaf_ray.data import iter_records
from leaf_ray.detection import ScoredRecord

class StageClock:
    """Wall time (and whether it was skipped) of each stage, for the report."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    @contextmanager
    def stage(self, name: str):
        entry: dict[str, Any] = {"skipped": False}
        self.stages[name] = entry
        started = time.perf_counter()
        print(f"[leaf-ray] stage {name}", flush=True)
        try:
            yield entry
        finally:
            entry["wall_s"] = round(time.perf_counter() - started, 2)


# --------------------------------------------------------------------------- distillation data

def variant_data(config: PipelineConfig, variant: str) -> str:
    """The folder a variant trains from: the scoring (or verification) output for KD and
    LeaF; for the random and oracle controls, counterfactuals cut from other spans."""
    source = config.verification.output_dir if config.verification else config.scoring.output_dir
    if variant not in ("random", "oracle"):
        return source
    from leaf_ray.benchmark.reproduce import variant_pairs
    from leaf_ray.score_store import is_training_set, read_scores, write_training_set

    folder = Path(config.run_dir) / "variants" / variant
    if is_training_set(folder):
        return str(folder)
    records = {r.id: r for r in iter_records(config.scoring.corpus)}
    scored = [ScoredRecord.from_row(row, records[row["id"]])
              for row in read_scores(Path(config.scoring.output_dir)) if row["level"] == "instruction"]
    pairs = variant_pairs(variant, scored, config.pruning, seed=config.distillation.seed)
    write_training_set(folder, [p.original for p in pairs],
                       [{**c.to_dict(), "source_id": p.original.id} for p in pairs for c in p.counterfactuals],
                       {"variant": variant, "pairs": len(pairs)})
    return str(folder)


def variant_config(config: PipelineConfig, variant: str) -> DistillationConfig:
    from leaf_ray.benchmark.reproduce import variant_config as bench_variant

    base = config.distillation.model_copy(update={
        "data_dir": variant_data(config, variant),
        "output_dir": str(Path(config.run_dir) / "distill" / variant)})
    return bench_variant(base, variant, base.seed)


# --------------------------------------------------------------------------- evaluation

def evaluate(config: PipelineConfig, variants: list[str]) -> dict[str, Any]:
    """Accuracy of every model on every test file; detection, attention, report samples."""
    from leaf_ray.demo import accuracy_table
    from leaf_ray.detection import load_model
    from leaf_ray.evaluation import attention_mass, confounder_spans, grade_detection
    from leaf_ray.score_store import read_scores

    evaluation = config.evaluation
    run = Path(config.run_dir)
    models = {"teacher": load_model(config.scoring.teacher), "student": load_model(config.scoring.student)}
    for variant in variants:
        models[variant] = load_model(run / "distill" / variant / "model")
    result: dict[str, Any] = {"accuracy": accuracy_table(models, evaluation.data)}

    records = {r.id: r for r in iter_records(config.scoring.corpus)}
    rows = read_scores(Path(config.scoring.output_dir))
    if any(confounder_spans(r.meta) for r in records.values()):
        result["detection"] = {"records": len(rows), **grade_detection(rows, {i: r.meta for i, r in records.items()})}
        pruning = config.pruning
        result["detection"]["threshold"] = (f"quantile {pruning.quantile} (cap {pruning.quantile_cap})"
                                            if pruning.threshold == "quantile" else f"absolute tau {pruning.tau}")
    first = [r.to_dict() for r in iter_records(evaluation.data[0])]
    if evaluation.attention and any(confounder_spans(r["meta"] or {}) for r in first):
        result["attention"] = {name: attention_mass(model, tokenizer, first)
                               for name, (model, tokenizer) in models.items() if name != "teacher"}
    result["samples"] = [{**row, "true_spans": [list(s) for s in confounder_spans(records[row["id"]].meta)]}
                         for row in rows if row["level"] == "instruction"][: evaluation.samples]
    return result


# --------------------------------------------------------------------------- serving

def serve_and_query(config: PipelineConfig) -> dict[str, Any]:
    """Deploy the Serve app (left running) and ask it one test question over HTTP."""
    import requests
    from ray import serve

    # serve/ lives in the working directory (repository root, Ray job working_dir, or the
    # image's WORKDIR), where `serve run serve/config.yaml` finds it too.
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    from serve.app import build_app

    serving = config.serving
    serve.start(http_options={"host": "127.0.0.1", "port": serving.port})
    serve.run(build_app(serving.model_dump()), name=config.name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{serving.port}/v1"
    question = next(iter(iter_records(config.evaluation.data[0]))).instruction if config.evaluation else "Hello"
    started = time.perf_counter()
    reply = requests.post(f"{url}/chat/completions", timeout=120, json={
        "model": serving.model_id, "max_tokens": 16, "temperature": 0.0,
        "messages": [{"role": "user", "content": question}]})
    reply.raise_for_status()
    return {"url": url, "model_id": serving.model_id, "latency_s": round(time.perf_counter() - started, 3),
            "sample": {"prompt": question, "answer": reply.json()["choices"][0]["message"]["content"]}}


# --------------------------------------------------------------------------- the pipeline

def relocate(config: PipelineConfig, run_dir: str) -> PipelineConfig:
    """The same config with ``run_dir`` moved: every stage output under the old run_dir moves along."""
    old = Path(config.run_dir)

    def moved(path: str) -> str:
        p = Path(path)
        return str(Path(run_dir) / p.relative_to(old)) if p.is_relative_to(old) else path

    data = config.model_dump()
    data["run_dir"] = run_dir
    for section, key in (("scoring", "output_dir"), ("verification", "data_dir"), ("verification", "output_dir"),
                         ("distillation", "data_dir"), ("distillation", "output_dir"), ("serving", "model")):
        if data.get(section):
            data[section][key] = moved(data[section][key])
    return PipelineConfig.model_validate(data)


def run_pipeline(config: PipelineConfig, config_path: str | None = None) -> dict[str, Any]:
    from leaf_ray.report import write_report

    run = Path(config.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    report: dict[str, Any] = {"name": config.name, "config": config_path, "seeds": 1}

    with clock.stage("prepare") as entry:
        benchmark = config.benchmark
        entry["skipped"] = benchmark is None or (Path(benchmark.output_dir) / "provenance.json").exists()
        if not entry["skipped"]:
            from leaf_ray.benchmark.build import build

            build(benchmark)

    with clock.stage("score") as entry:
        from leaf_ray.distributed.scoring import run_scoring

        summary = run_scoring(config)
        entry.update(records=summary["scored"], tokens_per_s=summary["this_run"]["tokens_per_s"],
                     skipped=summary["this_run"]["records"] == 0)
        report["scoring"] = summary

    if config.verification is not None:
        with clock.stage("verify") as entry:
            from leaf_ray.distributed.verify import run_verification

            entry["skipped"] = (Path(config.verification.output_dir) / "summary.json").exists()
            report["verification"] = run_verification(config)

    # The instruction + response variant needs a second, response-level scoring pass over
    # multi-step responses; the pipeline does not run one (the embedded benchmark's responses
    # are single answers), so it reports the row as skipped.
    variants = [v for v in config.variants if v != "leaf_instr_resp"]
    if config.distillation is not None:
        from leaf_ray.distributed.distill import run_distillation

        for variant in variants:
            with clock.stage(f"distill_{variant}") as entry:
                distill = variant_config(config, variant)
                entry["skipped"] = (Path(distill.output_dir) / "export.json").exists()
                result = run_distillation(distill, name=f"{config.name}-{variant}")
                steps_s = result["metrics"].get("step_s")
                entry.update(steps=result["metrics"]["step"], **({"step_s": round(steps_s, 4)} if steps_s else {}))

    if config.evaluation is not None and config.distillation is not None:
        with clock.stage("evaluate") as entry:
            done = run / "evaluation.json"
            entry["skipped"] = done.exists()
            if not entry["skipped"]:
                done.write_text(json.dumps(evaluate(config, variants), indent=2) + "\n")
            report.update(json.loads(done.read_text()))
            for variant in config.variants:
                if variant not in variants:
                    report["accuracy"][variant] = {"skipped": "needs a response-level scoring pass over multi-step "
                                                                      "responses, which this pipeline does not run"}

    if config.serving is not None:
        with clock.stage("serve"):
            report["serving"] = serve_and_query(config)

    report["stages"] = clock.stages
    write_report(run, report)
    return report


def closing_message(config: PipelineConfig, report: dict[str, Any]) -> str:
    """Where the report is, the accuracy table, and a curl line for the served student."""
    lines = [f"\nreport: {Path(config.run_dir).resolve() / 'report.html'}"]
    accuracy = report.get("accuracy") or {}
    for name, row in accuracy.items():
        values = "  ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
        lines.append(f"  {name:>20}  " + (f"skipped: {row['skipped']}" if "skipped" in row else values))
    serving = report.get("serving")
    if serving:
        body = json.dumps({"model": serving["model_id"], "max_tokens": 16,
                           "messages": [{"role": "user", "content": serving["sample"]["prompt"]}]})
        lines.append(f"served: curl {serving['url']}/chat/completions -H 'Content-Type: application/json' -d '{body}'")
    return "\n".join(lines)
