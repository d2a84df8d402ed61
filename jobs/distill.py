"""Stage 2 as a Ray job: distil one variant of the student with Ray Train.

    ray job submit --working-dir . -- python jobs/distill.py --config configs/demo.yaml --variant leaf

Trains on the run's scoring (or verification) output, with ``distillation.num_workers``
DDP workers, checkpoints every ``checkpoint_every`` steps and exports a Hugging Face model
directory to ``<run_dir>/distill/<variant>/model``. Rerunning the same command resumes
from the latest checkpoint; a finished export is left as it is.
"""

from __future__ import annotations

import argparse
import json

import ray

from leaf_ray.cli import refusals_exit_2
from leaf_ray.config import PipelineConfig, load_config
from leaf_ray.distributed.distill import DistillationRun, run_distillation
from leaf_ray.distributed.pipeline import training_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML with a 'distillation' section")
    parser.add_argument("--variant", help="which student (default: distillation.variant)")
    args = parser.parse_args()
    config = load_config(args.config, PipelineConfig)
    if config.distillation is None:
        parser.error(f"{args.config} has no 'distillation' section")
    variant = args.variant or config.distillation.variant
    try:
        run = DistillationRun.for_variant(config, variant, training_set(config, variant))  # before any Ray work
    except ValueError as exc:
        parser.error(str(exc))
    ray.init()  # joins the cluster of `ray job submit` (RAY_ADDRESS), else starts a local one
    print(json.dumps(run_distillation(run), indent=2, default=str))


if __name__ == "__main__":
    with refusals_exit_2():  # an expected refusal: one line and exit status 2
        main()
