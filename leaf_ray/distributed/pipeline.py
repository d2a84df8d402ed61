"""The whole LeaF run on Ray, stage by stage (what ``make demo`` and jobs/pipeline.py run).

    prepare -> score (Ray Data) -> [score_response] -> verify (optional, vLLM) -> [teacher_cache (Ray Data)]
    -> distill each variant (Ray Train) -> evaluate -> serve the LeaF student and query it (Ray Serve + vLLM)
    -> report

``score_response`` runs when a variant trains on reasoning-prefix pairs (leaf_instr_resp);
``teacher_cache`` when distillation reads the teacher's cached top-k (``distillation.teacher: cache``).

Every stage reads and writes the run folder (:class:`leaf_ray.config.RunLayout`) and is
skipped when its output is already complete, so rerunning the same config after a failure
resumes at the stage that failed (scoring and distillation also resume inside themselves).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from leaf_ray.config import PipelineConfig
from leaf_ray.data import Record, iter_records
from leaf_ray.detection.store import is_training_set, read_store_part, store_parts
from leaf_ray.distillation.variants import VARIANTS
from leaf_ray.evaluation import confounder_spans
from leaf_ray.files import write_text_atomically


def run_pipeline(config: PipelineConfig, config_path: str | None = None) -> dict[str, Any]:
    from leaf_ray.report import write_report

    layout = config.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    report: dict[str, Any] = {"name": config.name, "config": config_path, "seeds": 1}

    with clock.stage("prepare") as entry:
        benchmark = config.benchmark
        entry["skipped"] = benchmark is None or (Path(benchmark.output_dir) / "provenance.json").exists()
        if not entry["skipped"]:
            from leaf_ray.synthetic.build import build

            build(benchmark)

    with clock.stage("score") as entry:
        from leaf_ray.distributed.scoring import run_scoring

        summary = run_scoring(config)
        entry.update(records=summary["scored"], tokens_per_s=summary["this_run"]["tokens_per_s"],
                     skipped=summary["this_run"]["records"] == 0)
        report["scoring"] = summary

    response_level = config.distillation is not None and any(VARIANTS[v].response_level for v in config.variants)
    if response_level:
        with clock.stage("score_response") as entry:
            summary = run_scoring(config, response_pass=True)
            entry.update(records=summary["scored"], tokens_per_s=summary["this_run"]["tokens_per_s"],
                         skipped=summary["this_run"]["records"] == 0)
            report["scoring_response"] = summary

    if config.verification is not None:
        from leaf_ray.distributed.verify import run_verification

        for name, response_pass, folder in (("verify", False, layout.verify),
                                            ("verify_response", True, layout.verify_response)):
            if response_pass and not response_level:
                continue
            with clock.stage(name) as entry:
                entry["skipped"] = (folder / "summary.json").exists()
                report[name.replace("verify", "verification")] = run_verification(config, response_pass)

    variants = config.variants
    if config.distillation is not None and config.distillation.teacher == "cache":
        from leaf_ray.distributed.teacher_cache import run_teacher_cache

        with clock.stage("teacher_cache") as entry:
            folders = sorted({training_set(config, variant) for variant in variants})
            report["teacher_cache"] = {str(folder.relative_to(layout.root)): run_teacher_cache(config, folder)
                                       for folder in folders}
            entry["skipped"] = all(s["this_run"]["records"] == 0 for s in report["teacher_cache"].values())

    if config.distillation is not None:
        from leaf_ray.distributed.distill import DistillationRun, run_distillation

        for variant in variants:
            with clock.stage(f"distill_{variant}") as entry:
                run = DistillationRun.for_variant(config, variant, training_set(config, variant))
                entry["skipped"] = (Path(run.output_dir) / "export.json").exists()
                result = run_distillation(run)
                steps_s = result["metrics"].get("step_s")
                entry.update(steps=result["metrics"]["step"], **({"step_s": round(steps_s, 4)} if steps_s else {}))

    if config.evaluation is not None and config.distillation is not None:
        with clock.stage("evaluate") as entry:
            entry["skipped"] = layout.evaluation.exists()
            if not entry["skipped"]:
                write_text_atomically(layout.evaluation, json.dumps(evaluate(config, variants), indent=2) + "\n")
            report.update(json.loads(layout.evaluation.read_text()))

    if config.serving is not None:
        with clock.stage("serve"):
            report["serving"] = serve_and_query(config, report.get("question"))

    report["stages"] = clock.stages
    write_report(layout.root, report)
    return report


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


def training_set(config: PipelineConfig, variant: str) -> Path:
    """The training set a variant trains on: the scoring (or verification) output for KD and
    LeaF; for the controls, counterfactuals cut from other spans; for the ``*_instr_resp``
    variants, those pairs and the response-level pass's, whose counterfactuals also lose the
    instruction's cuts. Both are built on Ray Data (:mod:`leaf_ray.distributed.store_passes`),
    once."""
    layout = config.layout
    rules = VARIANTS[variant]
    instruction = layout.verify if config.verification else layout.score
    if rules.spans not in ("random", "oracle") and not rules.response_level:
        return instruction
    folder = layout.variant_data(variant)
    if is_training_set(folder):
        return folder
    from leaf_ray.distributed.store_passes import write_control_set, write_response_level_set

    seed, pruning = config.distillation.seed, config.pruning
    if rules.response_level:
        write_response_level_set(layout, config.verification is not None, folder, variant, pruning, seed)
    else:
        write_control_set(layout.score, folder, variant, pruning, seed)
    return folder


def evaluate(config: PipelineConfig, variants: list[str]) -> dict[str, Any]:
    """Accuracy of every model on every test file; detection, attention, report samples."""
    from leaf_ray.distributed.store_passes import grade_store
    from leaf_ray.evaluation import attention_mass, evaluate_models, paired_difference
    from leaf_ray.models import load_model

    evaluation = config.evaluation
    models = {"teacher": load_model(config.teacher), "student": load_model(config.student)}
    for variant in variants:
        models[variant] = load_model(config.layout.model(variant))
    answers = evaluate_models(models, evaluation.data, evaluation.checker, evaluation.max_new_tokens,
                              evaluation.batch_size)
    result: dict[str, Any] = {"accuracy": {name: {stem: report.accuracy for stem, report in by_file.items()}
                                           for name, by_file in answers.items()}}
    if "kd" in answers:
        result["versus_kd"] = {name: {stem: paired_difference(report, answers["kd"][stem])
                                      for stem, report in by_file.items()}
                               for name, by_file in answers.items() if name in variants and name != "kd"}
    first = list(iter_records(evaluation.data[0]))
    result["question"] = contrast_question(first, {name: by_file[Path(evaluation.data[0]).stem]
                                                   for name, by_file in answers.items()})

    graded = grade_store(config.layout.score)  # part by part on Ray Data: the store may hold millions
    if graded.pop("with_truth"):
        result["detection"] = graded
        pruning = config.pruning
        result["detection"]["threshold"] = {
            "quantile": f"quantile {pruning.quantile} (cap {pruning.quantile_cap})",
            "absolute": f"absolute tau {pruning.tau}",
            "iterative": f"iterative clause pruning (min_gap {pruning.min_gap}, strong_gap {pruning.strong_gap}, "
                         f"entropy_margin {pruning.entropy_margin})"}[pruning.threshold]
    if evaluation.attention and any(confounder_spans(r.meta) for r in first):
        result["attention"] = {name: attention_mass(model, tokenizer, first)
                               for name, (model, tokenizer) in models.items() if name != "teacher"}
    result["samples"] = store_samples(config.layout.score, evaluation.samples)
    return result


def store_samples(store: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` instruction-level scores rows of ``store`` (parts in name order), each
    with its record's ground-truth spans: only the parts that hold them are read."""
    samples: list[dict[str, Any]] = []
    for part in store_parts(store):
        if len(samples) >= count:
            break
        rows, originals = read_store_part(store, part)
        meta = {record.id: record.meta for record in map(Record.from_dict, originals)}
        samples += [{**row, "true_spans": [list(s) for s in confounder_spans(meta[row["id"]])]}
                    for row in rows if row["level"] == "instruction"]
    return samples[:count]


def contrast_question(records: list, answers: dict[str, Any], shown: str = "leaf", against: str = "kd") -> dict[str, Any]:
    """The question the run asks its served student: the first test record that ``shown`` answers
    right and ``against`` wrong (else the first record), with every model's answer to it."""
    from leaf_ray.evaluation import shortcut_numbers

    contrast = shown in answers and against in answers
    index = next((i for i in range(len(records)) if contrast and answers[shown].correct[i]
                  and not answers[against].correct[i]), None)
    chosen = (f"the first test prompt {shown} answers right and {against} wrong" if index is not None
              else "the first test prompt")
    record = records[index or 0]
    return {"id": record.id, "prompt": record.instruction, "answer": record.answer, "chosen": chosen,
            "shortcuts": shortcut_numbers(record.meta),
            "answers": {name: report.predictions[index or 0] for name, report in answers.items()}}


def serve_and_query(config: PipelineConfig, question: dict[str, Any] | None) -> dict[str, Any]:
    """Deploy the Serve app (left running) and ask it the run's question over HTTP."""
    import requests
    from ray import serve

    from leaf_ray.checkers import resolve_checker
    from leaf_ray.serving.app import build_app

    serving = config.serving
    model = serving.model or str(config.layout.model("leaf").resolve())
    serve.start(http_options={"host": "127.0.0.1", "port": serving.port})
    serve.run(build_app({**serving.model_dump(), "model": model}), name=config.name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{serving.port}/v1"
    prompt = question["prompt"] if question else "Hello"
    started = time.perf_counter()
    reply = requests.post(f"{url}/chat/completions", timeout=120, json={
        "model": serving.model_id, "max_tokens": config.evaluation.max_new_tokens if config.evaluation else 16,
        "temperature": 0.0, "messages": [{"role": "user", "content": prompt}]})
    reply.raise_for_status()
    answer = reply.json()["choices"][0]["message"]["content"]
    sample = {"prompt": prompt, "answer": answer}
    if question:
        sample["right"] = resolve_checker(config.evaluation.checker)(answer, question["answer"])
    return {"url": url, "model_id": serving.model_id, "latency_s": round(time.perf_counter() - started, 3),
            "sample": sample}


def closing_message(config: PipelineConfig, report: dict[str, Any]) -> str:
    """Where the report is, the accuracy table, LeaF against KD, the question asked of the served
    student beside the KD student's answer, and a curl line for the served student."""
    lines = [f"\nreport: {config.layout.root.resolve() / 'report.html'}"]
    accuracy = report.get("accuracy") or {}
    for name, row in accuracy.items():
        values = "  ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
        lines.append(f"  {name:>20}  " + (f"skipped: {row['skipped']}" if "skipped" in row else values))
    for name, by_split in (report.get("versus_kd") or {}).items():
        for split, effect in by_split.items():
            lines.append(f"  {name} - kd on {split}: {effect['difference']:+.3f} (standard error "
                         f"{effect['standard_error']:.3f}, paired over the same prompts)")
    question, serving = report.get("question"), report.get("serving")
    if question and serving and serving["sample"]["prompt"] == question["prompt"]:
        shortcut = f"; the shortcut says {', '.join(question['shortcuts'])}" if question["shortcuts"] else ""
        lines += [f"question ({question['chosen']}): {question['prompt']}",
                  f"  served LeaF student: {serving['sample']['answer']!r}"
                  f"  ({'right' if serving['sample'].get('right') else 'wrong'}: {question['answer']}{shortcut})"]
        if "kd" in question["answers"]:
            lines.append(f"  KD student:          {question['answers']['kd']!r}")
    if serving:
        body = json.dumps({"model": serving["model_id"], "max_tokens": 16,
                           "messages": [{"role": "user", "content": serving["sample"]["prompt"]}]})
        lines.append(f"served: curl {serving['url']}/chat/completions -H 'Content-Type: application/json' -d '{body}'")
    return "\n".join(lines)
