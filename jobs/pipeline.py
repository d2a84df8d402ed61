"""The whole LeaF run as one Ray job: prepare, score, (verify), distil each variant,
evaluate, serve the LeaF student, and write report.html / report.json.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo.yaml

Rerunning the same command resumes: finished stages are skipped. ``--run-dir`` overrides
the config's run_dir, and with it every stage's folder (handy when the job's working
directory is a temporary copy).
"""

from __future__ import annotations

import argparse

import ray

from leaf_ray.cli import refusals_exit_2
from leaf_ray.config import PipelineConfig, load_config
from leaf_ray.distributed.pipeline import closing_message, run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML (see configs/demo.yaml)")
    parser.add_argument("--run-dir", help="write the run here instead of the config's run_dir")
    args = parser.parse_args()
    config = load_config(args.config, PipelineConfig)
    if args.run_dir:
        config = config.model_copy(update={"run_dir": args.run_dir})
    ray.init()  # joins the cluster of `ray job submit` (RAY_ADDRESS), else starts a local one
    print(closing_message(config, run_pipeline(config, args.config)))


if __name__ == "__main__":
    with refusals_exit_2():  # an expected refusal: one line and exit status 2
        main()
