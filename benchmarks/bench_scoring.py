"""Scoring throughput: the official loop vs our batched scorer vs the Ray Data job, one process.

    python benchmarks/bench_scoring.py [--records 2000] [--baseline-records 300]

Baseline: a faithful re-implementation of the official gradient loop (batch 1, the teacher
and student each in its own forward+backward, parameters requiring grad, HF label loss,
a JSON file written per sample). Ours: `PairScorer` (padded batches grouped by length, one
forward+backward per model per batch, no parameter grads), and the Ray Data job on a local
cluster with one actor. Tokens counted: the student's rendered tokens of each record.
Writes benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from leaf_ray.config import PipelineConfig, PruningConfig, ResourcesConfig, ScoringConfig
from leaf_ray.data import iter_records, render_sample
from leaf_ray.detection import PairScorer, load_model
from leaf_ray.scoring import ScoringItem

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded"


def official_loop(teacher, student, tokenizer, records, out_dir: Path) -> int:
    """Batch 1, two separate passes, parameter grads on, per-sample JSON writes."""
    for model in (teacher, student):
        model.requires_grad_(True)
    tokens = 0
    for index, record in enumerate(records):
        rendered = render_sample(tokenizer, record.instruction, record.response)
        item = ScoringItem.instruction_level(rendered)
        input_ids = torch.tensor([rendered.input_ids])
        labels = torch.full_like(input_ids, -100)
        labels[0, item.target_tokens] = input_ids[0, item.target_tokens]
        norms = []
        for model in (teacher, student):
            model.zero_grad()
            embeds = model.get_input_embeddings()(input_ids)
            embeds.retain_grad()
            loss = model(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), labels=labels).loss
            loss.backward()
            grad = embeds.grad[0, item.context_tokens].norm(dim=-1).numpy()
            norms.append((grad - grad.min()) / (grad.max() - grad.min()))
        diff = norms[1] - norms[0]
        (out_dir / f"sample_{index}.json").write_text(json.dumps({"id": record.id, "grad_diff": diff.tolist()}))
        tokens += len(rendered.input_ids)
    for model in (teacher, student):
        model.requires_grad_(False)
    return tokens


def timed(fn, repeats: int) -> tuple[float, int]:
    walls, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--baseline-records", type=int, default=300, help="the baseline is slow; a subset suffices")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "scoring.json")
    args = parser.parse_args()

    corpus = EMBEDDED / "data" / "simple" / "distill.jsonl"
    records = list(iter_records(corpus))[: args.records]
    teacher, tokenizer = load_model(EMBEDDED / "teacher")
    student, _ = load_model(EMBEDDED / "student")
    config = ScoringConfig(teacher=str(EMBEDDED / "teacher"), student=str(EMBEDDED / "student"), corpus=str(corpus),
                           max_length=512)

    with tempfile.TemporaryDirectory() as tmp:
        baseline_s, baseline_tokens = timed(
            lambda: official_loop(teacher, student, tokenizer, records[: args.baseline_records], Path(tmp)), args.repeats)

    scorer = PairScorer(teacher, tokenizer, student, tokenizer, config)

    def batched() -> int:
        scored, _ = scorer.score(records)
        return sum(s.num_tokens for s in scored)

    batched_s, batched_tokens = timed(batched, args.repeats)
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    import ray

    from leaf_ray.distributed.scoring import run_scoring

    # More logical CPUs than cores: the actor reserves 2 (its torch threads) and the light read
    # stage needs a share too, or Ray Data backpressures it forever.
    ray.init(num_cpus=4, include_dashboard=False)
    ray_walls = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            pipeline = PipelineConfig(scoring=config.model_copy(update={
                "output_dir": tmp, "batch_size": 512, "num_actors": 1,
                "resources": ResourcesConfig(num_cpus=2)}), pruning=PruningConfig())
            summary = run_scoring(pipeline)
            ray_walls.append(summary["this_run"]["wall_s"])
    ray_s = statistics.median(ray_walls)
    ray.shutdown()

    result = {
        "records": len(records),
        "baseline_records": args.baseline_records,
        "device": "cpu: " + f"{torch.get_num_threads()} threads",
        "repeats": args.repeats,
        "baseline_tokens_per_s": baseline_tokens / baseline_s,
        "batched_tokens_per_s": batched_tokens / batched_s,
        "ray_tokens_per_s": batched_tokens / ray_s,
        "speedup_vs_official": (batched_tokens / batched_s) / (baseline_tokens / baseline_s),
        "ray_vs_inprocess": batched_s / ray_s,
        "batched_wall_s": batched_s,
        "ray_wall_s": ray_s,
        "ray_wall_s_includes": "job setup, actor start and model load, scoring, pruning, writing outputs",
        "peak_rss_gib_in_process": peak_rss_gib,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
