"""The GPU check: every stage's CUDA path on one GPU, with its figures in one JSON.

    bash benchmarks/gpu_check.sh          # installs the gpu extra, then runs this
    python benchmarks/gpu_check.py [--output benchmarks/results/gpu.json]

Each section runs in its own process under a time limit, so that one failure is recorded
and does not hide the others:

- ``scoring``: the scoring benchmark on CUDA, the official loop (batch 1) against
  ``PairScorer``, in float32 and under bf16 autocast; the stage's unit of work against its
  bare model passes (``limit_ratio``, with the per-phase breakdown); and the teacher loaded
  with ``device_map="auto"``, whose scores must equal the single-device ones.
- ``ray``: on a local Ray cluster with the GPU, the Ray Data scoring job with one GPU actor,
  then a short LeaF distillation on Ray Train with one GPU worker, DDP then FSDP (bf16
  autocast), their per-step losses compared, and the FSDP export loaded and run on CUDA.
- ``serve``: ``bench_serve.py --gpu``: the Serve app on CUDA vLLM with the load test, when
  vLLM is installed.

Writes benchmarks/results/gpu.json: the device, the versions, and each section's figures
or its error.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded"
SECTION_TIMEOUT_S = {"scoring": 180, "ray": 400, "serve": 420}
PARTIAL: Path | None = None  # a section writes what it has measured so far here


def save_partial(result: dict) -> None:
    """Keep a section's figures so far: a section stopped at its time limit still reports them."""
    if PARTIAL is not None:
        PARTIAL.write_text(json.dumps({"ok": False, "error": "stopped before the end", **result}, default=str))


def environment() -> dict:
    import torch

    versions = {}
    for name in ("torch", "transformers", "ray", "vllm", "pydantic"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, the sections say what it costs
            versions[name] = f"not importable: {type(exc).__name__}: {exc}"
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "versions": versions}


def scoring() -> dict:
    import numpy as np
    import torch
    from bench_scoring import official_loop, ours_against_limit, timed

    from leaf_ray.config import PruningConfig, ScoringConfig
    from leaf_ray.data import Record
    from leaf_ray.detection.scorer import PairScorer, detect
    from leaf_ray.models import load_model
    from leaf_ray.synthetic.tasks import make_split

    records = [Record.from_dict(row) for row in make_split("simple", "distill", 4000, seed=7)]
    teacher, tokenizer = load_model(EMBEDDED / "teacher", device="cuda")
    student, _ = load_model(EMBEDDED / "student", device="cuda")
    baseline, ours = {}, {}
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
        with tempfile.TemporaryDirectory() as tmp, autocast:
            wall, tokens = timed(lambda: official_loop(teacher, student, tokenizer, records[:300], Path(tmp)), 3)
        baseline[precision] = tokens / wall
        scorer = PairScorer(teacher, tokenizer, student, tokenizer,
                            ScoringConfig(corpus="-", max_length=512, bf16_autocast=precision == "bf16"))
        wall, tokens = timed(lambda: sum(s.num_tokens for s in scorer.score(records)[0]), 3)  # noqa: B023
        ours[precision] = tokens / wall
        save_partial({"baseline_tokens_per_s": baseline, "batched_tokens_per_s": ours})

    # The stage's unit of work against its bare model passes (float32), as on CPU in scoring.json.
    scorer = PairScorer(teacher, tokenizer, student, tokenizer, ScoringConfig(corpus="-", max_length=512))
    against_limit = ours_against_limit(scorer, PruningConfig(), records[:2000], 3)
    save_partial({"baseline_tokens_per_s": baseline, "batched_tokens_per_s": ours, "against_limit_fp32": against_limit})

    # device_map="auto" (how a teacher too big for one GPU is spread) gives the same scores.
    config = ScoringConfig(corpus="-", max_length=512)
    single, _ = PairScorer(teacher, tokenizer, student, tokenizer, config).score(records[:64])
    mapped_teacher, _ = load_model(EMBEDDED / "teacher", device_map="auto")
    mapped, _ = PairScorer(mapped_teacher, tokenizer, student, tokenizer, config).score(records[:64])
    worst = max(float(np.nanmax(np.abs(a.scores.diff - b.scores.diff))) for a, b in zip(single, mapped))
    save_partial({"baseline_tokens_per_s": baseline, "batched_tokens_per_s": ours, "against_limit_fp32": against_limit,
                  "device_map_auto_max_abs_score_diff": worst})

    # Iterative pruning (it scores the texts it cuts again) on CUDA decides as on the CPU.
    hard = [Record.from_dict(row) for row in make_split("hard", "distill", 512, seed=7)]
    iterative = PruningConfig(threshold="iterative", grow_spans="clause")
    masks = {}
    for device in ("cuda", "cpu"):
        models = [load_model(EMBEDDED / name, device=device)[0] for name in ("teacher", "student")]
        scorer = PairScorer(models[0], tokenizer, models[1], tokenizer, config)
        started = time.perf_counter()
        masks[device] = detect(scorer, iterative, hard)[1]
        wall = time.perf_counter() - started
    same = sum(np.array_equal(a, b) for a, b in zip(masks["cuda"], masks["cpu"]))
    return {"records": len(records), "baseline_records": 300, "repeats": 3, "statistic": "median wall time",
            "baseline_tokens_per_s": baseline, "batched_tokens_per_s": ours,
            "speedup_vs_official_bf16": ours["bf16"] / max(baseline.values()),
            "bf16_vs_fp32": ours["bf16"] / ours["fp32"],
            "against_limit_fp32": against_limit,
            "device_map_auto_max_abs_score_diff": worst,
            "iterative_pruning": {"records": len(hard), "same_mask_cuda_and_cpu": same,
                                  "records_cut": int(sum(m.any() for m in masks["cuda"])), "cpu_wall_s": round(wall, 2)}}


def ray_jobs() -> dict:
    import ray
    import torch

    from leaf_ray.config import (
        DistillationConfig,
        PipelineConfig,
        PruningConfig,
        ResourcesConfig,
        ScoringConfig,
        TeacherCacheConfig,
    )
    from leaf_ray.distillation.teacher_cache import cache_folder
    from leaf_ray.distributed.distill import DistillationRun, run_distillation
    from leaf_ray.distributed.scoring import run_scoring
    from leaf_ray.distributed.teacher_cache import run_teacher_cache
    from leaf_ray.evaluation import greedy_generate
    from leaf_ray.models import load_model

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    gpu = ResourcesConfig(num_cpus=4, num_gpus=1)
    pipeline = PipelineConfig(
        run_dir=str(work), teacher=str(EMBEDDED / "teacher"), student=str(EMBEDDED / "student"),
        scoring=ScoringConfig(corpus=str(EMBEDDED / "data" / "simple" / "distill.jsonl"), max_length=256,
                              bf16_autocast=True, num_actors=1, resources=gpu),
        pruning=PruningConfig(threshold="iterative", grow_spans="clause"))
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False)
    try:
        started = time.perf_counter()
        summary = run_scoring(pipeline)
        result = {"scoring_job": {"records": summary.get("scored"), "tokens": summary.get("tokens"),
                                  "wall_s": round(time.perf_counter() - started, 1),
                                  "includes": "actor start, model load, scoring, pruning, writing the store",
                                  "model_stage": summary["this_run"].get("model_stage")}}
        save_partial(result)
        config = DistillationConfig(lam=0.5, batch_size=64, max_steps=60, checkpoint_every=30, eval_every=30,
                                    validation_max_records=64, use_gpu=True, bf16_autocast=True, resources=gpu)
        runs = {}
        for strategy in ("ddp", "fsdp"):
            run = DistillationRun(config.model_copy(update={"strategy": strategy}), pipeline.teacher,
                                  pipeline.student, str(pipeline.layout.score), str(work / strategy), strategy)
            final = run_distillation(run)
            history = final["history"]
            runs[strategy] = {"wall_s": final["wall_s"], "steps": len(history),
                              "median_step_s": statistics.median(h["step_s"] for h in history),
                              "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
                              "val_loss": final["metrics"].get("val_loss"),
                              "val_accuracy": final["metrics"].get("val_accuracy"), "history": history}
            save_partial({**result, "distillation": {k: {key: v for key, v in r.items() if key != "history"}
                                                     for k, r in runs.items()}})
        # The teacher's top-k log-probs cached by a GPU actor, then read by a bf16 GPU worker.
        cached = config.model_copy(update={"teacher": "cache"})
        cache = run_teacher_cache(pipeline.model_copy(update={
            "distillation": cached, "teacher_cache": TeacherCacheConfig(num_actors=1, resources=gpu)}),
            pipeline.layout.score)
        final = run_distillation(DistillationRun(cached, pipeline.teacher, pipeline.student, str(pipeline.layout.score),
                                                 str(work / "cache"), "cache",
                                                 str(cache_folder(pipeline.layout.score))))
        runs["ddp_teacher_cache"] = {"cache_records": cache["records"], "cache_wall_s": cache["this_run"]["wall_s"],
                                     "wall_s": final["wall_s"], "steps": len(final["history"]),
                                     "median_step_s": statistics.median(h["step_s"] for h in final["history"]),
                                     "first_loss": final["history"][0]["loss"], "last_loss": final["history"][-1]["loss"],
                                     "val_accuracy": final["metrics"].get("val_accuracy"), "history": []}
        ddp, fsdp = runs["ddp"]["history"], runs["fsdp"]["history"]
        result["distillation"] = {
            "settings": {"variant": "leaf", "lam": 0.5, "batch_size": 64, "steps": 60, "workers": 1,
                         "bf16_autocast": True},
            **{k: {key: v for key, v in run.items() if key != "history"} for k, run in runs.items()},
            "fsdp_vs_ddp_max_rel_loss_diff": max(abs(a["loss"] - b["loss"]) / abs(a["loss"])
                                                 for a, b in zip(ddp, fsdp)),
        }
        model, tokenizer = load_model(work / "fsdp" / "model", device="cuda")
        answer = greedy_generate(model, tokenizer, ["ann has 3 . gets 4 . how many ?"], max_new_tokens=6)[0]
        result["fsdp_export"] = {"loads_on": str(next(model.parameters()).device), "generated": answer,
                                 "parameters": sum(p.numel() for p in model.parameters())}
        del model
        torch.cuda.empty_cache()
        return result
    finally:
        ray.shutdown()


def serve() -> dict:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the reason is the section's result
        return {"skipped": f"vLLM is not importable here ({type(exc).__name__}: {exc}); "
                           "`pip install -e .[gpu]` brings the CUDA build"}
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "serve.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--gpu", "--output", str(output)],
                       check=True, timeout=SECTION_TIMEOUT_S["serve"] - 20)
        return json.loads(output.read_text())


SECTIONS = {"scoring": scoring, "ray": ray_jobs, "serve": serve}


def run_section(name: str) -> dict:
    """One section in a child process under its time limit: its result, or its error."""
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.json"
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--section", name, "--output", str(part)], check=False,
                                  timeout=SECTION_TIMEOUT_S[name])
        except subprocess.TimeoutExpired:
            done = None
        wall = round(time.perf_counter() - started, 1)
        if done is None:
            partial = json.loads(part.read_text()) if part.exists() else {}
            return {**partial, "ok": False, "error": f"no result within {SECTION_TIMEOUT_S[name]} s"}
        if part.exists():
            return {"section_wall_s": wall, **json.loads(part.read_text())}
        return {"ok": False, "error": f"exited with {done.returncode} and no result; see the log above"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="which sections to run (default: all)")
    parser.add_argument("--section", choices=sorted(SECTIONS), help="run one section in this process")
    args = parser.parse_args()

    if args.section:
        global PARTIAL
        PARTIAL = args.output
        try:
            result = {"ok": True, **SECTIONS[args.section]()}
        except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
            traceback.print_exc()
            partial = json.loads(args.output.read_text()) if args.output.exists() else {}
            result = {**partial, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return

    started = time.perf_counter()
    report = {"when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **environment()}
    if not report["gpu"]:
        sys.exit("no CUDA device: the GPU check needs one")
    report["sections"] = {}
    for name in args.sections:
        print(f"[gpu-check] {name} ...", flush=True)
        report["sections"][name] = run_section(name)
        print(f"[gpu-check] {name}: {json.dumps(report['sections'][name], default=str)[:2000]}", flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[gpu-check] wrote {args.output} in {report['wall_s']} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
