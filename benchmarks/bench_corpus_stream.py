"""Does a large ``datasets`` corpus stream past the driver? One scoring run, the driver's memory.

    python benchmarks/bench_corpus_stream.py [--rows 20000] [--notes-bytes 2048]

Builds a GSM8K-shaped dataset (question/answer, no id column) of ``--rows`` rows with an
unused ``notes`` column of ``--notes-bytes`` characters (so that the dataset outweighs the
driver's own growth), writes it with ``save_to_disk``, and scores it with the Ray Data job
(embedded teacher and student, one actor) on a local cluster. The driver resolves the Arrow
files and collects one small stats row per batch; the rows are read and parsed in Ray tasks.
Reports the dataset's size on disk and the driver's peak RSS before and after the run.
Writes benchmarks/results/corpus_stream.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--notes-bytes", type=int, default=2048)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "corpus_stream.json")
    args = parser.parse_args()

    import datasets
    import ray

    from leaf_ray.config import ColumnMapping, PipelineConfig, ResourcesConfig, ScoringConfig
    from leaf_ray.distributed.scoring import run_scoring

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    folder = work / "gsm8k-like"

    def rows():
        for i in range(args.rows):
            a, b = i % 97, (i * 7) % 89
            yield {"question": f"ann has {a} . gets {b} .", "answer": f"{a} + {b} = {a + b}\n#### {a + b}",
                   "notes": ("n" * args.notes_bytes)}

    datasets.Dataset.from_generator(rows).save_to_disk(folder)  # written in chunks, never held whole here
    dataset_mib = sum(f.stat().st_size for f in folder.glob("*.arrow")) / 2**20

    ray.init(num_cpus=4, include_dashboard=False)
    before = peak_rss_mib()
    config = PipelineConfig(
        run_dir=str(work / "run"), teacher=str(EMBEDDED / "teacher"), student=str(EMBEDDED / "student"),
        scoring=ScoringConfig(corpus=str(folder), max_length=256, batch_size=512, bf16_autocast=False,
                              columns=ColumnMapping(instruction="question", response="answer", answer="answer"),
                              resources=ResourcesConfig(num_cpus=2)))
    started = time.perf_counter()
    summary = run_scoring(config)
    wall = time.perf_counter() - started
    after = peak_rss_mib()
    ray.shutdown()

    result = {
        "rows": args.rows, "scored": summary["scored"], "errors": summary["errors"],
        "dataset_arrow_mib": round(dataset_mib, 1),
        "driver_peak_rss_mib_before_run": round(before, 1), "driver_peak_rss_mib_after_run": round(after, 1),
        "driver_peak_growth_mib": round(after - before, 1),
        "wall_s": round(wall, 1),
        "what": "run_scoring over a save_to_disk dataset (GSM8K-shaped, hashed ids, an unused notes column); "
                "peak RSS of the driver process (getrusage), before and after the run",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
