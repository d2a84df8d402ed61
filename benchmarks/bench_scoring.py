"""Scoring throughput: the official loop vs our batched scorer vs the Ray Data job, one process.

    python benchmarks/bench_scoring.py [--records 20000] [--baseline-records 300]

Baseline: a faithful re-implementation of the official gradient loop (batch 1, the teacher
and student each in its own forward+backward, parameters requiring grad, HF label loss,
a JSON file written per sample). Ours: `PairScorer` (padded batches grouped by length, one
forward+backward per model per batch, no parameter grads). Both are timed in float32 and
under bf16 autocast; `speedup_vs_official` compares ours with bf16 autocast against the
faster of the two baselines.

Ray vs in-process: the same job (load models, score, prune, write the resumable store) run
in this process and as the Ray Data job on a local cluster with one 2-CPU actor, on a
generated corpus of `--records` records. The Ray wall time includes starting the actor
process (importing torch) and loading the models. Tokens counted: the student's rendered
tokens of each record. Writes benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from leaf_ray.config import PipelineConfig, PruningConfig, ResourcesConfig, ScoringConfig
from leaf_ray.data import iter_records, render_sample, write_jsonl
from leaf_ray.detection.scorer import PairScorer, ScoringBatchProcessor
from leaf_ray.detection.sensitivity import ScoringItem
from leaf_ray.models import load_model
from leaf_ray.synthetic.tasks import make_split

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
        input_ids = torch.tensor([rendered.input_ids], device=teacher.device)
        labels = torch.full_like(input_ids, -100)
        labels[0, item.target_tokens] = input_ids[0, item.target_tokens]
        norms = []
        for model in (teacher, student):
            model.zero_grad()
            embeds = model.get_input_embeddings()(input_ids)
            embeds.retain_grad()
            loss = model(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), labels=labels).loss
            loss.backward()
            grad = embeds.grad[0, item.context_tokens].norm(dim=-1).float().cpu().numpy()
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


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bf16(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000, help="corpus size of the Ray vs in-process job")
    parser.add_argument("--scorer-records", type=int, default=2000, help="records for the scorer-only timing")
    parser.add_argument("--baseline-records", type=int, default=300, help="the baseline is slow; a subset suffices")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "scoring.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    corpus = work / "corpus.jsonl"
    write_jsonl(corpus, make_split("simple", "distill", args.records, seed=7))
    records = list(iter_records(corpus))
    teacher, tokenizer = load_model(EMBEDDED / "teacher")
    student, _ = load_model(EMBEDDED / "student")
    config = ScoringConfig(corpus=str(corpus), max_length=512)

    baseline = {}
    for autocast in (False, True):
        with tempfile.TemporaryDirectory() as tmp, bf16(autocast):
            wall, tokens = timed(lambda: official_loop(teacher, student, tokenizer,
                                                       records[: args.baseline_records], Path(tmp)), args.repeats)
        baseline["bf16" if autocast else "fp32"] = tokens / wall
    baseline_rss = peak_rss_gib()

    batched = {}
    for autocast in (False, True):
        scorer = PairScorer(teacher, tokenizer, student, tokenizer, config.model_copy(update={"bf16_autocast": autocast}))

        def score_only() -> int:
            scored, _ = scorer.score(records[: args.scorer_records])
            return sum(s.num_tokens for s in scored)

        wall, tokens = timed(score_only, args.repeats)
        batched["bf16" if autocast else "fp32"] = tokens / wall
    batched_rss = peak_rss_gib()

    job = PipelineConfig(teacher=str(EMBEDDED / "teacher"), student=str(EMBEDDED / "student"),
                         scoring=config.model_copy(update={"bf16_autocast": True, "batch_size": 512, "num_actors": 1,
                                                           "resources": ResourcesConfig(num_cpus=2)}),
                         pruning=PruningConfig())

    def in_process_job() -> int:
        """The same batch processor the Ray actor runs, called in a loop here."""
        with tempfile.TemporaryDirectory() as tmp:
            process = ScoringBatchProcessor(PairScorer.from_paths(job.teacher, job.student, job.scoring),
                                            job.pruning, tmp)
            size = job.scoring.batch_size
            return sum(process([r.id for r in records[lo:lo + size]], records[lo:lo + size])["tokens"]
                       for lo in range(0, len(records), size))

    in_process_wall, job_tokens = timed(in_process_job, args.repeats)

    import ray

    from leaf_ray.distributed.scoring import run_scoring

    # More logical CPUs than cores: the actor reserves 2 (its torch threads) and the light read
    # stage needs a share too, or Ray Data backpressures it forever.
    ray.init(num_cpus=4, include_dashboard=False)

    def ray_job() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            return run_scoring(job.model_copy(update={"run_dir": tmp}))["tokens"]

    ray_wall, ray_tokens = timed(ray_job, args.repeats)
    ray.shutdown()
    assert ray_tokens == job_tokens, (ray_tokens, job_tokens)

    result = {
        "records": len(records),
        "scorer_records": args.scorer_records,
        "baseline_records": args.baseline_records,
        "device": f"cpu: {torch.get_num_threads()} threads",
        "repeats": args.repeats,
        "statistic": "median wall time of the repeats",
        "baseline_tokens_per_s": max(baseline.values()),
        "baseline_tokens_per_s_by_precision": baseline,
        "batched_tokens_per_s": batched["bf16"],
        "batched_tokens_per_s_by_precision": batched,
        "speedup_vs_official": batched["bf16"] / max(baseline.values()),
        "speedup_vs_official_fp32": batched["fp32"] / baseline["fp32"],
        "in_process_job_tokens_per_s": job_tokens / in_process_wall,
        "ray_tokens_per_s": ray_tokens / ray_wall,
        "ray_vs_inprocess": in_process_wall / ray_wall,
        "in_process_job_wall_s": in_process_wall,
        "ray_wall_s": ray_wall,
        "job_includes": "loading both models, scoring, pruning, writing the store; Ray adds starting the actor process",
        "peak_rss_gib_after_baseline": baseline_rss,
        "peak_rss_gib_after_batched": batched_rss,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
