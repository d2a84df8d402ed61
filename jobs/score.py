"""Stage 1 as a Ray job: score a corpus with teacher and student, prune, write counterfactuals,
and, when the config has a 'verification' section, answer and filter them with vLLM.

    ray job submit --working-dir . -- python jobs/score.py --config configs/demo.yaml

Rerunning the same command after a failure (or after appending data) scores only what is
not done yet. Outputs: see leaf_ray/detection/store.py and leaf_ray/distributed/verify.py.
"""

from __future__ import annotations

import argparse
import json
import sys

import ray

from leaf_ray.cli import refusals_exit_2
from leaf_ray.config import PipelineConfig, load_config
from leaf_ray.corpus import check_corpus
from leaf_ray.distributed.scoring import run_scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML with 'scoring' and 'pruning' sections")
    args = parser.parse_args()
    config = load_config(args.config, PipelineConfig)
    try:  # the corpus and its columns, before any Ray work: a one-line error naming the field
        check_corpus(config.scoring)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    ray.init()  # joins the cluster of `ray job submit` (RAY_ADDRESS), else starts a local one
    print(json.dumps(run_scoring(config), indent=2))
    if config.verification is not None:
        from leaf_ray.distributed.verify import run_verification

        print(json.dumps(run_verification(config), indent=2))


if __name__ == "__main__":
    with refusals_exit_2():  # an expected refusal: one line and exit status 2
        main()
