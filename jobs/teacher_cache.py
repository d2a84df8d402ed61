"""Stage 1d as a Ray job: cache the teacher's top-k log-probs for a variant's training set, so
that distillation with ``distillation.teacher: cache`` never loads the teacher.

    ray job submit --working-dir . -- python jobs/teacher_cache.py --config C --variant leaf

Writes ``<training set>/teacher_cache/`` (leaf_ray/distillation/teacher_cache.py). Rerunning the
same command after a failure caches only the records not done yet; on a finished cache it does
nothing.
"""

from __future__ import annotations

import argparse
import json

import ray

from leaf_ray.cli import refusals_exit_2
from leaf_ray.config import PipelineConfig, load_config
from leaf_ray.distributed.pipeline import training_set
from leaf_ray.distributed.teacher_cache import run_teacher_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML with a 'distillation' section")
    parser.add_argument("--variant", help="whose training set (default: distillation.variant)")
    args = parser.parse_args()
    config = load_config(args.config, PipelineConfig)
    if config.distillation is None:
        parser.error(f"{args.config} has no 'distillation' section (the cache is built at its temperature)")
    try:
        folder = training_set(config, args.variant or config.distillation.variant)  # before any Ray work
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    ray.init()  # joins the cluster of `ray job submit` (RAY_ADDRESS), else starts a local one
    print(json.dumps(run_teacher_cache(config, folder), indent=2))


if __name__ == "__main__":
    with refusals_exit_2():  # an expected refusal: one line and exit status 2
        main()
