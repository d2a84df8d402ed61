"""How busy the scoring job's model stage is: its seconds inside model passes over its wall time.

    python benchmarks/bench_scoring_pipeline.py [--records 2000]

Runs the Ray scoring job (prepare actors -> model-stage actors -> prune actors -> store sink)
on ``--records`` generated records with the embedded models, float32, batch 64, for each model
stage shape (actors x CPUs), on a local cluster of 4 logical CPUs over this machine's cores,
and writes ``this_run.model_stage`` of each run's summary (``busy_share``: pass seconds over
each actor's span from its first batch to its last) to benchmarks/results/scoring_pipeline.json.
On 2 cores the CPU stages share the cores with the passes: the share says the model stage
never waits on them, not that their work is free.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import ray

from leaf_ray.config import PipelineConfig, PruningConfig, ResourcesConfig, ScoringConfig
from leaf_ray.data import write_jsonl
from leaf_ray.distributed.scoring import run_scoring
from leaf_ray.synthetic.tasks import make_split

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded"
SHAPES = ((1, 1), (1, 2), (2, 1))  # model-stage actors, CPUs each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "scoring_pipeline.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    write_jsonl(work / "corpus.jsonl", make_split("simple", "distill", args.records, seed=7))
    ray.init(num_cpus=4, include_dashboard=False)
    runs = []
    for actors, cpus in SHAPES:
        scoring = ScoringConfig(corpus=str(work / "corpus.jsonl"), max_length=512, num_actors=actors,
                                resources=ResourcesConfig(num_cpus=cpus))
        config = PipelineConfig(teacher=str(EMBEDDED / "teacher"), student=str(EMBEDDED / "student"),
                                run_dir=str(work / f"run-{actors}x{cpus}"), scoring=scoring, pruning=PruningConfig())
        this_run = run_scoring(config)["this_run"]
        stage = this_run["model_stage"]
        runs.append({"model_actors": actors, "cpus_per_model_actor": cpus, "job_wall_s": this_run["wall_s"],
                     "tokens_per_s": this_run["tokens_per_s"], "batches": stage["batches"],
                     "model_pass_s": stage["model_pass_s"], "model_stage_wall_s": stage["wall_s"],
                     "busy_share": stage["busy_share"]})
    ray.shutdown()
    build = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "scoring job: the model stage's busy share (model pass seconds / its wall time)",
              "build": build,
              "records": args.records, "batch_size": 64, "dtype": "float32", "cluster": "local, 4 logical CPUs",
              "machine_cpus": os.cpu_count(), "cpu_stages": "1 prepare actor, 1 prune actor, 0.25 CPU each",
              "goal": "busy_share >= 0.9", "runs": runs,
              "goal_met": all(run["busy_share"] >= 0.9 for run in runs)}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
