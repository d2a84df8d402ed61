"""Scoring throughput against the limit, the official loop and in-process, in one process.

    python benchmarks/bench_scoring.py [--records 20000] [--scorer-records 2000] [--baseline-records 300]

All in float32, the default (`scoring.dtype`, no bf16 autocast; bf16 is emulated on a CPU
without AVX512-BF16 and slower than float32 there), embedded models, median of `--repeats`:

- **limit**: the bare model passes: a forward+backward of teacher and student on the same
  padded batches the scorer runs, input-embedding gradients only, the batches built
  beforehand; no rendering, no pruning, no I/O.
- **ours**: `ScoringBatchProcessor`, the stage's unit of work (render and tokenize, model
  passes, projection onto units, pruning, writing the store), with the wall time of each
  phase (`PairScorer.seconds`) as the breakdown of the gap to the limit. Timed alternately
  with the limit, so that both see the same machine.
- **official**: a faithful re-implementation of the official gradient loop (batch 1, the
  teacher and student each in its own forward+backward, parameters requiring grad, HF label
  loss, a JSON file per sample), on a subset.
- **Ray vs in-process**: the same job (load models, score, prune, write the resumable store)
  in this process, and as the Ray Data job with 1 actor of 2 CPUs and with 2 actors of 1
  CPU each, on `--records` generated records. The Ray wall time includes starting the actor
  processes (importing torch) and loading the models.

Tokens counted: the student's rendered tokens of each record. Writes
benchmarks/results/scoring.json.

Each detection method (``scoring.method``) is also timed on the same hard-family records
(``detection_methods``: tokens/s, ratio to the gradient norm, sequences per record);
``--methods-only`` measures only that table and merges it into an existing scoring.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from leaf_ray.config import (
    PipelineConfig,
    PruningConfig,
    ResourcesConfig,
    ScoringConfig,
)
from leaf_ray.data import Record, iter_records, length_batches, render_sample, write_jsonl
from leaf_ray.detection.detectors import METHODS
from leaf_ray.detection.scorer import PairScorer, ScoringBatchProcessor
from leaf_ray.detection.sensitivity import ScoringItem, collate, embedding_attributions
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


def model_passes_only(scorer: PairScorer, records) -> tuple[callable, int]:
    """The limit: a function running only the model passes the scorer runs on ``records``
    (the same padded batches, built here beforehand), and the tokens it covers."""
    prepared = [scorer.prepare(r) for r in records]
    batches = [(model, collate([prepared[i].items[m] for i in batch], scorer.config.padding_side))
               for m, model in enumerate(scorer.models)
               for batch in length_batches([len(p.items[m].input_ids) for p in prepared],
                                           scorer.config.max_tokens_per_batch)]

    def run() -> None:
        for model, batch in batches:
            embedding_attributions(model, batch)

    return run, sum(len(p.items[1].input_ids) for p in prepared)


def ours_against_limit(scorer: PairScorer, pruning: PruningConfig, sample, repeats: int) -> dict:
    """``ScoringBatchProcessor`` on ``sample`` and the bare model passes of the same batches,
    alternately: tokens/s of each, their ratio, and the median seconds of each phase."""
    limit, limit_tokens = model_passes_only(scorer, sample)
    limit()  # warm-up: first calls on new shapes pay for kernel selection
    ours_walls, limit_walls, phases = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            scorer.seconds.clear()
            start = time.perf_counter()
            ours_tokens = ScoringBatchProcessor(scorer, pruning, tmp)([r.id for r in sample], sample)["tokens"]
            ours_walls.append(time.perf_counter() - start)
            phases.append(dict(scorer.seconds))
        start = time.perf_counter()
        limit()
        limit_walls.append(time.perf_counter() - start)
    assert ours_tokens == limit_tokens, (ours_tokens, limit_tokens)
    ours_wall, limit_wall = statistics.median(ours_walls), statistics.median(limit_walls)
    breakdown = {phase: statistics.median(p[phase] for p in phases) for phase in phases[0]}
    return {"limit_tokens_per_s": limit_tokens / limit_wall, "ours_tokens_per_s": ours_tokens / ours_wall,
            "limit_ratio": limit_wall / ours_wall,
            "breakdown_s": {"limit_model_passes": limit_wall, "ours_total": ours_wall, **breakdown,
                            "unaccounted": ours_wall - sum(breakdown.values())}}


def hard_records(count: int) -> list[Record]:
    return [Record.from_dict(r) for r in make_split("hard", "distill", count, seed=7)]


def detection_methods(teacher, student, tokenizer, records, repeats: int) -> dict:
    """Per detection method, ``ScoringBatchProcessor`` tokens/s on the same records (median of
    ``repeats``, float32), its ratio to the gradient norm's, and the sequences each model runs
    per record (counted by a forward hook: a batch of B rows counts B)."""
    rows = {"teacher": 0, "student": 0}

    def counter(who: str):
        def count(_module, _args, kwargs) -> None:  # every scoring pass hands the model an attention mask
            rows[who] += kwargs["attention_mask"].shape[0]
        return count

    hooks = [model.register_forward_pre_hook(counter(who), with_kwargs=True)
             for who, model in (("teacher", teacher), ("student", student))]
    table = {}
    try:
        for method in METHODS:
            scorer = PairScorer(teacher, tokenizer, student, tokenizer,
                                ScoringConfig(corpus="-", max_length=512, method=method))
            walls = []
            for _ in range(repeats):
                rows.update(teacher=0, student=0)
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    tokens = ScoringBatchProcessor(scorer, PruningConfig(), tmp)([r.id for r in records],
                                                                                 records)["tokens"]
                    walls.append(time.perf_counter() - start)
            table[method] = {"tokens_per_s": tokens / statistics.median(walls),
                             "sequences_per_record": {who: n / len(records) for who, n in rows.items()},
                             "backward": method != "occlusion"}
    finally:
        for hook in hooks:
            hook.remove()
    for row in table.values():
        row["speed_vs_grad_norm"] = row["tokens_per_s"] / table["grad_norm"]["tokens_per_s"]
    return {"family": "hard", "records": len(records), "repeats": repeats, "statistic": "median wall time",
            "dtype": "float32", "methods": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000, help="corpus size of the Ray vs in-process job")
    parser.add_argument("--scorer-records", type=int, default=2000, help="records for the limit and the scorer")
    parser.add_argument("--baseline-records", type=int, default=300, help="the baseline is slow; a subset suffices")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "scoring.json")
    parser.add_argument("--methods-only", action="store_true",
                        help="only the detection methods' table, merged into an existing --output")
    parser.add_argument("--method-records", type=int, default=500, help="hard-family records per method")
    args = parser.parse_args()
    if args.methods_only:
        teacher, tokenizer = load_model(EMBEDDED / "teacher")
        student, _ = load_model(EMBEDDED / "student")
        result = json.loads(args.output.read_text()) if args.output.exists() else {}
        result["detection_methods"] = detection_methods(teacher, student, tokenizer,
                                                        hard_records(args.method_records), args.repeats)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["detection_methods"], indent=2))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    corpus = work / "corpus.jsonl"
    write_jsonl(corpus, make_split("simple", "distill", args.records, seed=7))
    records = list(iter_records(corpus))
    teacher, tokenizer = load_model(EMBEDDED / "teacher")
    student, _ = load_model(EMBEDDED / "student")
    config = ScoringConfig(corpus=str(corpus), max_length=512)  # float32, no autocast: the default
    job = PipelineConfig(teacher=str(EMBEDDED / "teacher"), student=str(EMBEDDED / "student"),
                         scoring=config.model_copy(update={"batch_size": 512}), pruning=PruningConfig())

    with tempfile.TemporaryDirectory() as tmp:
        official_wall, official_tokens = timed(
            lambda: official_loop(teacher, student, tokenizer, records[: args.baseline_records], Path(tmp)),
            args.repeats)

    scorer = PairScorer(teacher, tokenizer, student, tokenizer, config)
    against_limit = ours_against_limit(scorer, job.pruning, records[: args.scorer_records], args.repeats)
    scorer_rss = peak_rss_gib()

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

    # 4 logical CPUs on 2 cores: the actors reserve 2 (their torch threads) and the light read
    # stage needs a share too, or Ray Data backpressures it forever.
    ray.init(num_cpus=4, include_dashboard=False)
    ray_walls = {}
    for actors, cpus in ((1, 2), (2, 1)):
        scoring = job.scoring.model_copy(update={"num_actors": actors, "resources": ResourcesConfig(num_cpus=cpus)})

        def ray_job() -> int:
            with tempfile.TemporaryDirectory() as tmp:
                return run_scoring(job.model_copy(update={"run_dir": tmp, "scoring": scoring}))["tokens"]  # noqa: B023

        ray_walls[actors], ray_tokens = timed(ray_job, args.repeats)
        assert ray_tokens == job_tokens, (ray_tokens, job_tokens)
    ray.shutdown()

    official_rate = official_tokens / official_wall
    result = {
        "device": f"cpu: {torch.get_num_threads()} threads",
        "dtype": "float32 (no autocast), both sides",
        "records": len(records),
        "scorer_records": args.scorer_records,
        "baseline_records": args.baseline_records,
        "repeats": args.repeats,
        "statistic": "median wall time of the repeats",
        **against_limit,
        "official_tokens_per_s": official_rate,
        "speedup_vs_official_same_dtype": against_limit["ours_tokens_per_s"] / official_rate,
        "breakdown_note": "ours_total = render_and_tokenize + model_passes + projection + pruning + writing "
                          "(+ unaccounted); model_passes also collates the batches, which the limit has built "
                          "beforehand",
        "in_process_job_tokens_per_s": job_tokens / in_process_wall,
        "ray_tokens_per_s": {f"{n}_actors": job_tokens / wall for n, wall in ray_walls.items()},
        "ray_vs_inprocess": {f"{n}_actors": in_process_wall / wall for n, wall in ray_walls.items()},
        "ray_actor_cpus": {"1_actors": 2, "2_actors": 1},
        "in_process_job_wall_s": in_process_wall,
        "ray_wall_s": {f"{n}_actors": wall for n, wall in ray_walls.items()},
        "job_includes": "loading both models, scoring, pruning, writing the store; Ray adds starting the actor "
                        "processes",
        "peak_rss_gib_after_scorer": scorer_rss,
        "detection_methods": detection_methods(teacher, student, tokenizer, hard_records(args.method_records),
                                               args.repeats),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
