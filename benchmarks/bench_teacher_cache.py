"""Distillation with a teacher-logit cache against the online teacher, one process.

    python benchmarks/bench_teacher_cache.py [--k 32] [--steps 10] [--accuracy-steps 500]

Both run the one training step (`leaf_ray.distillation.loop.accumulate_gradients` and the
AdamW step) on the same LeaF batches of the embedded simple family (the 2,000-record
distillation corpus scored and pruned in process, 64 pairs a step, lam 0.5, float32):
online, the teacher's forward runs in every step; from the cache, the step reads the
teacher's top-k log-probs and tail mass, built once beforehand (`cache_build_s`: the
teacher's forward over every original and counterfactual, top-k, and writing the Parquet).
Repeats alternate the two so both see the same machine; medians.

- `speedup`: distillation tokens/s (real tokens of both branches), cache over online.
- `worker_peak_rss_gib`: peak RSS of a fresh process that loads what a Ray Train worker loads
  (the student, and the teacher or the cache) and runs the same steps; one each, in turn.
- `breakeven_epochs`: `cache_build_s` over the time the cache saves per epoch
  (training pairs / batch size steps).
- `k_tradeoff`: per k, bytes stored per position, the step's speed, and how much of the dense
  forward KL the bucketed loss keeps (on the same batches, with the untrained student).
- `accuracy`: LeaF conflict accuracy (`leaf-ray bench reproduce`'s harness, the first 300 held-out
  conflict prompts) on the simple and hard families, 3 seeds, the same steps,
  online vs from the cache at `--k`.

Writes benchmarks/results/teacher_cache.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from leaf_ray.config import DistillationConfig, PruningConfig, ScoringConfig
from leaf_ray.data import Record, encode_for_training, iter_records
from leaf_ray.detection.scorer import PairScorer, detect
from leaf_ray.distillation.loop import accumulate_gradients, encode_branch, make_optimizer, sample_batch
from leaf_ray.distillation.losses import distill_loss, sparse_distill_loss, teacher_top_k
from leaf_ray.distillation.teacher_cache import TeacherCache, cache_rows, training_set_records, write_cache
from leaf_ray.distillation.variants import variant_pairs
from leaf_ray.models import load_model

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded"
CONFIG = DistillationConfig(batch_size=64, lam=0.5, bf16_autocast=False)


def real_tokens(tokenizer, records) -> int:
    return int(encode_for_training(tokenizer, records)["attention_mask"].sum())


def timed_steps(student, teacher, tokenizer, batches, vocab) -> float:
    """Seconds for the batches' optimizer steps (gradients and the AdamW step)."""
    optimizer, _ = make_optimizer(student, CONFIG)
    start = time.perf_counter()
    for originals, cfs in batches:
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(student, teacher, tokenizer, originals, cfs, CONFIG, vocab)
        optimizer.step()
    return time.perf_counter() - start


def build_cache(teacher, tokenizer, pairs, k: int, vocab: int, folder: Path) -> tuple[TeacherCache, float]:
    start = time.perf_counter()
    rows = cache_rows(teacher, tokenizer, list(training_set_records(pairs).values()), k, CONFIG.temperature, vocab)
    write_cache(folder, rows, {"k": k, "vocab": vocab})
    return TeacherCache(folder), time.perf_counter() - start


def worker_rss(mode: str, batches_file: Path, cache_dir: Path) -> float:
    """Peak RSS (GiB) of a fresh process doing what a Ray Train worker does in ``mode``."""
    out = subprocess.run([sys.executable, __file__, "--worker", mode, "--batches-file", str(batches_file),
                          "--cache-dir", str(cache_dir)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def worker(mode: str, batches_file: Path, cache_dir: Path) -> None:
    student, tokenizer = load_model(EMBEDDED / "student")
    teacher = TeacherCache(cache_dir) if mode == "cache" else load_model(EMBEDDED / "teacher")[0]
    vocab = teacher.vocab if mode == "cache" else min(teacher.config.vocab_size, student.config.vocab_size)
    batches = [([Record.from_dict(r) for r in o], [Record.from_dict(r) for r in c])
               for o, c in json.loads(batches_file.read_text())]
    timed_steps(student.requires_grad_(True).train(), teacher, tokenizer, batches, vocab)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child started by a large
    # parent reports the parent's peak.
    peak_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:"))
    print(peak_kib / 2**20)


def kept_fraction(student, teacher, tokenizer, batches, k: int, vocab: int) -> float:
    """Bucketed forward KL over dense forward KL, summed over the batches' original branches."""
    sparse = dense = 0.0
    with torch.no_grad():
        for originals, _ in batches:
            batch = encode_branch(tokenizer, originals)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            t, s = teacher(**inputs).logits[..., :vocab], student(**inputs).logits[..., :vocab]
            dense += distill_loss(s, t, batch["target_mask"]).item()
            sparse += sparse_distill_loss(s, teacher_top_k(t, batch["target_mask"], k), batch["target_mask"]).item()
    return sparse / dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=32, help="top-k of the cache measured against online")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accuracy-steps", type=int, default=500, help="steps of each accuracy run (0: skip)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "teacher_cache.json")
    parser.add_argument("--worker", choices=["online", "cache"], help=argparse.SUPPRESS)
    parser.add_argument("--batches-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.batches_file, args.cache_dir)

    teacher, tokenizer = load_model(EMBEDDED / "teacher")
    student, _ = load_model(EMBEDDED / "student")
    vocab = min(teacher.config.vocab_size, student.config.vocab_size)
    corpus = list(iter_records(EMBEDDED / "data" / "simple" / "distill.jsonl"))
    scorer = PairScorer(teacher, tokenizer, student, tokenizer, ScoringConfig(corpus="c"))
    scored, masks, _, _ = detect(scorer, PruningConfig(), corpus)
    pairs = variant_pairs("leaf", scored, PruningConfig(), 0, masks)
    rng = random.Random(0)
    batches = [sample_batch(pairs, CONFIG, CONFIG.batch_size, rng) for _ in range(args.steps)]
    tokens = sum(real_tokens(tokenizer, o) + real_tokens(tokenizer, c) for o, c in batches)
    work = Path(tempfile.mkdtemp())
    cache, build_s = build_cache(teacher, tokenizer, pairs, args.k, vocab, work / "cache")
    print(f"cache of {len(cache)} records built in {build_s:.1f} s", flush=True)

    student.requires_grad_(True).train()
    walls: dict[str, list[float]] = {"online": [], "cache": []}
    for _ in range(args.repeats):
        walls["online"].append(timed_steps(student, teacher, tokenizer, batches, vocab))
        walls["cache"].append(timed_steps(student, cache, tokenizer, batches, vocab))
    median = {mode: statistics.median(values) for mode, values in walls.items()}
    per_s = {mode: tokens / seconds for mode, seconds in median.items()}
    epoch_steps = len(pairs) / CONFIG.batch_size
    saved_per_epoch = (median["online"] - median["cache"]) / args.steps * epoch_steps
    print(f"tokens/s online {per_s['online']:.0f}, cache {per_s['cache']:.0f}", flush=True)

    batches_file = work / "batches.json"
    batches_file.write_text(json.dumps([[[r.to_dict() for r in o], [r.to_dict() for r in c]] for o, c in batches]))
    rss = {mode: round(worker_rss(mode, batches_file, work / "cache"), 3) for mode in ("online", "cache")}

    pristine, _ = load_model(EMBEDDED / "student")
    k_tradeoff = []
    for k in sorted({4, 16, args.k, 128, vocab}):
        trial, trial_s = build_cache(teacher, tokenizer, pairs, k, vocab, work / f"cache-{k}")
        step_s = statistics.median(timed_steps(student, trial, tokenizer, batches, vocab) for _ in range(args.repeats))
        stored = sum(p.stat().st_size for p in (work / f"cache-{k}" / "logits").glob("*.parquet"))
        positions = sum(entry[0].shape[0] for entry in trial.read_all().values())
        k_tradeoff.append({"k": k, "bytes_per_position": round(stored / positions, 1), "build_s": round(trial_s, 2),
                           "tokens_per_s": round(tokens / step_s, 1),
                           "forward_kl_kept": round(kept_fraction(pristine, teacher, tokenizer, batches, k, vocab), 4)})
        print(k_tradeoff[-1], flush=True)

    result = {
        "what": "LeaF distillation steps from a top-k teacher cache vs the online teacher, embedded simple family, "
                f"{args.steps} steps of {CONFIG.batch_size} pairs, float32, median of {args.repeats}",
        "k": args.k,
        "speedup": round(per_s["cache"] / per_s["online"], 3),
        "tokens_per_s": {mode: round(value, 1) for mode, value in per_s.items()},
        "teacher_in_workers": False,  # with the cache; online, every worker loads it
        "worker_peak_rss_gib": rss,
        "cache_build_s": round(build_s, 2),
        "cache_records": len(cache),
        "training_pairs": len(pairs),
        "breakeven_epochs": round(build_s / saved_per_epoch, 3) if saved_per_epoch > 0 else None,
        "k_tradeoff": k_tradeoff,
        "step_s": {mode: [round(w / args.steps, 4) for w in values] for mode, values in walls.items()},
    }
    if args.accuracy_steps:
        from leaf_ray.synthetic.reproduce import reproduce

        accuracy = {}
        for mode in ("online", "cache"):
            base = DistillationConfig(max_steps=args.accuracy_steps, batch_size=64, lam=0.5, teacher=mode)
            table = reproduce(EMBEDDED, ["simple", "hard"], ["leaf"], [0, 1, 2], base, PruningConfig(), cache_k=args.k)
            for family, variants in table.items():
                row = variants["leaf"]
                accuracy.setdefault(family, {})[mode] = round(row["conflict_acc_mean"], 4)
                accuracy[family][f"{mode}_runs"] = [round(r["conflict_acc"], 4) for r in row["runs"]]
                accuracy[family][f"{mode}_clean"] = round(row["clean_acc_mean"], 4)
            print(accuracy, flush=True)
        result["accuracy"] = accuracy
        result["accuracy_steps"] = args.accuracy_steps
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in ("speedup", "worker_peak_rss_gib", "cache_build_s",
                                                    "breakeven_epochs")}, indent=2))


if __name__ == "__main__":
    main()
