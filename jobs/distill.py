"""Stage 2 as a Ray job: distil the student on originals and counterfactuals with Ray Train.

    ray job submit --working-dir . -- python jobs/distill.py --config configs/demo.yaml

Reads the scoring job's output (``distillation.data_dir``) and the corpus, trains with
``distillation.num_workers`` DDP workers, checkpoints every ``checkpoint_every`` steps and
exports a Hugging Face model directory to ``distillation.output_dir/model``. Rerunning the
same command resumes from the latest checkpoint; a finished export is left as it is.
"""

from __future__ import annotations

import argparse
import json

import ray

from leaf_ray.config import PipelineConfig, load_config
from leaf_ray.distributed.distill import run_distillation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML with a 'distillation' section")
    args = parser.parse_args()
    config = load_config(args.config, PipelineConfig)
    if config.distillation is None:
        parser.error(f"{args.config} has no 'distillation' section")
    ray.init()  # joins the cluster of `ray job submit` (RAY_ADDRESS), else starts a local one
    result = run_distillation(config.distillation, name=f"{config.name}-{config.distillation.variant}")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
