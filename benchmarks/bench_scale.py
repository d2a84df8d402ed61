"""Distillation at growing data sizes: does what the driver and the workers hold stay flat?

    python benchmarks/bench_scale.py [--sizes 10000,100000,1000000] [--steps 20]

The data, not the models, grows. For each size a training set is written directly in the
training-set format (`leaf_ray.detection.store.write_training_set`): the embedded simple
family's 2,000 distillation records, repeated, each made distinct by a record number in its
prompt, each with the counterfactual that cuts its distractor clauses. Beside it, a teacher
cache (top-32) is written directly in the cache format: every record's rows are the embedded
teacher's rows for its template (the learned positions are the response's, the same for
every copy), under the record's own key. Then, in a fresh driver process on a fresh local Ray
cluster (4 CPUs), `run_distillation` trains the embedded student for `--steps` steps with 2
Ray Train workers, once from the embedded teacher (`online`) and once from the cache
(`cache`), and the driver records:

- `driver_peak_rss_mb`: its own VmHWM (the driver process, not its children);
- `worker_peak_rss_mb`: each Ray Train worker's VmHWM, polled every 0.5 s from /proc (the
  processes titled `ray::RayTrainWorker`; VmHWM only grows, so the last poll before a worker
  exits holds its peak);
- `object_store_peak_mb`: the cluster's object store use, polled the same way;
- `first_step_s`: from the call to the first line of the run's metrics log;
- `training_set_files` / `training_set_mb`: what the writer produced.

Each size's measurement is one child process (`--one SIZE`), so nothing carries over.
Writes benchmarks/results/scale.json with each size and the ratios to the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded"
GOALS = {"driver_peak_rss_mb": 1.5, "worker_peak_rss_mb": 1.5, "first_step_s": 3.0}


def templates() -> list:
    """The embedded simple family's distillation pairs: each record with the counterfactual that
    cuts its distractor clauses."""
    from leaf_ray.data import Record, TrainingPair

    pairs = []
    for line in (EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines():
        row = json.loads(line)
        instruction = row["instruction"]
        for distractor in sorted(row["meta"]["distractors"], key=lambda d: -d["clause_span"][0]):
            start, end = distractor["clause_span"]
            instruction = (instruction[:start] + instruction[end:]).replace("  ", " ")
        pairs.append(TrainingPair(Record(row["id"], row["instruction"], row["response"], row["answer"]),
                                  [Record(row["id"] + "#cf0", instruction.strip(), row["response"], row["answer"])]))
    return pairs


def numbered(template, index: int):
    """Pair ``index``: its template under its own id, with a record number in both prompts."""
    from leaf_ray.data import Record, TrainingPair

    tag = "record " + " ".join(f"{index:08d}") + " . "

    def copy(record, suffix: str):
        return Record(f"scale-{index:08d}{suffix}", tag + record.instruction, record.response, record.answer)

    return TrainingPair(copy(template.original, ""), [copy(template.counterfactuals[0], "#cf0")])


def build(folder: Path, size: int) -> dict:
    """The training set and its teacher cache, unless already there; what they take on disk."""
    from leaf_ray.detection.store import write_training_set

    if not (folder / "summary.json").exists():
        started = time.perf_counter()
        base = templates()
        write_training_set(folder, (numbered(base[i % len(base)], i) for i in range(size)), {"pairs": size})
        write_teacher_cache(folder, base, size)
        print(f"[bench_scale] wrote {size} pairs and their cache in {time.perf_counter() - started:.1f} s", flush=True)

    def files(root: Path) -> list[Path]:
        return [path for path in root.rglob("*") if path.is_file()]

    data = [path for path in files(folder) if "teacher_cache" not in path.parts]
    return {"training_set_files": len(data), "training_set_mb": round(sum(p.stat().st_size for p in data) / 2**20, 1),
            "teacher_cache_files": len(files(folder / "teacher_cache")),
            "teacher_cache_mb": round(sum(p.stat().st_size for p in files(folder / "teacher_cache")) / 2**20, 1)}


def write_teacher_cache(folder: Path, base: list, size: int, k: int = 32, part_records: int = 10_000) -> None:
    """The cache of every record of the set, in parts of ``part_records``, with the embedded
    teacher's rows for each template under each copy's key (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from leaf_ray.distillation.teacher_cache import (PART_SCHEMA, cache_folder, cache_rows, record_key,
                                                     tokenizer_fingerprint)
    from leaf_ray.models import load_model, model_fingerprint

    teacher, tokenizer = load_model(EMBEDDED / "teacher")
    vocab = teacher.config.vocab_size
    records = [record for pair in base for record in (pair.original, *pair.counterfactuals)]
    rows = cache_rows(teacher, tokenizer, records, k, 1.0, vocab)  # in records' order
    cache = cache_folder(folder)
    (cache / "logits").mkdir(parents=True, exist_ok=True)
    for part, lo in enumerate(range(0, size, part_records)):
        columns: dict[str, list] = {name: [] for name in PART_SCHEMA.names}
        for index in range(lo, min(size, lo + part_records)):
            pair = numbered(base[index % len(base)], index)
            for record, row in zip((pair.original, pair.counterfactuals[0]), rows[2 * (index % len(base)):]):
                columns["key"].append(record_key(record))
                for name in ("positions", "ids", "logprobs", "tail"):
                    columns[name].append(row[name])
        pq.write_table(pa.table(columns, schema=PART_SCHEMA.with_metadata({"k": str(k)})),
                       cache / "logits" / f"part-{part:05d}.parquet")
    student = AutoTokenizer.from_pretrained(EMBEDDED / "student")
    fingerprint = {"teacher": model_fingerprint(EMBEDDED / "teacher"), "tokenizer": tokenizer_fingerprint(student),
                   "k": k, "temperature": 1.0, "vocab": vocab}
    (cache / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
    (cache / "summary.json").write_text(json.dumps({"records": 2 * size}) + "\n")


def vm_hwm_mb(pid: int | str) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024


def train_worker_pids() -> list[str]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(entry.name)
        except OSError:  # gone meanwhile
            continue
    return pids


class Poller(threading.Thread):
    """Keeps the peak VmHWM of every Ray Train worker and the peak object store use."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.workers: dict[str, float] = {}
        self.store_peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        while not self.done.wait(0.5):
            for pid in train_worker_pids():
                try:
                    self.workers[pid] = max(self.workers.get(pid, 0.0), vm_hwm_mb(pid))
                except (OSError, AttributeError):
                    continue
            try:
                self.store_peak = max(self.store_peak, get_memory_info_reply(state).store_stats.object_store_bytes_used)
            except Exception:  # the raylet busy or shutting down: the next poll counts
                continue


def measure_one(size: int, teacher: str, work: Path, steps: int) -> dict:
    """One size in this (fresh) process: the driver of a run on its own local cluster."""
    import ray

    from leaf_ray.config import DistillationConfig, ResourcesConfig
    from leaf_ray.distillation.teacher_cache import cache_folder
    from leaf_ray.distributed.distill import DistillationRun, run_distillation

    data = work / f"set-{size}"
    output = work / f"run-{size}-{teacher}"
    config = DistillationConfig(lam=0.5, batch_size=16, max_steps=steps, checkpoint_every=steps, eval_every=steps,
                                num_workers=2, bf16_autocast=False, validation_fraction=0.01, teacher=teacher,
                                validation_max_records=32, resources=ResourcesConfig(num_cpus=1))
    run = DistillationRun(config, str(EMBEDDED / "teacher"), str(EMBEDDED / "student"), str(data), str(output),
                          f"scale-{size}-{teacher}", str(cache_folder(data)) if teacher == "cache" else None)
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=2 * 2**30)
    poller = Poller()
    poller.start()
    first_step: list[float] = []

    def watch_first_step(started: float) -> None:
        log = output / "metrics.jsonl"
        while not first_step:
            if log.exists() and log.read_text().strip():
                first_step.append(time.perf_counter() - started)
            time.sleep(0.1)

    started = time.perf_counter()
    threading.Thread(target=watch_first_step, args=(started,), daemon=True).start()
    result = run_distillation(run)
    wall = time.perf_counter() - started
    poller.done.set()
    poller.join()
    ray.shutdown()
    return {"pairs": size, "teacher": teacher, "steps": result["metrics"]["step"], "train_pairs": result["train_pairs"],
            "driver_peak_rss_mb": round(vm_hwm_mb("self"), 1),
            "worker_peak_rss_mb": sorted(round(v, 1) for v in poller.workers.values()),
            "object_store_peak_mb": round(poller.store_peak / 2**20, 1),
            "first_step_s": round(first_step[0], 2) if first_step else None, "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work-dir", default="/tmp/leaf-ray-bench-scale")
    parser.add_argument("--one", type=int, help="measure this size in this process and print its JSON")
    parser.add_argument("--teacher", choices=["online", "cache"], default="online", help="with --one")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = parser.parse_args()
    work = Path(args.work_dir)
    if args.one is not None:
        print("RESULT " + json.dumps(measure_one(args.one, args.teacher, work, args.steps)), flush=True)
        return

    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        written = build(work / f"set-{size}", size)
        for teacher in ("online", "cache"):
            subprocess.run(["rm", "-rf", str(work / f"run-{size}-{teacher}")], check=True)
            child = subprocess.run([sys.executable, __file__, "--one", str(size), "--teacher", teacher,
                                    "--steps", str(args.steps), "--work-dir", str(work)], capture_output=True,
                                   text=True, env={**os.environ, "RAY_ADDRESS": "local"})
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode or not lines:
                sys.exit(f"size {size}, {teacher} failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
            results.append({**json.loads(lines[-1].removeprefix("RESULT ")), **written})
            print(f"[bench_scale] {results[-1]}", flush=True)

    def ratio(row: dict, key: str) -> float:
        base = next(r for r in results if r["teacher"] == row["teacher"])  # the smallest size's run
        value, reference = row[key], base[key]
        if isinstance(value, list):  # workers: the largest of each run
            value, reference = max(value), max(reference)
        return round(value / reference, 3)

    largest = [row for row in results if row["pairs"] == results[-1]["pairs"]]
    report = {
        "benchmark": "distillation driver and worker memory, object store and time to the first step, by data size",
        "setup": {"workers": 2, "steps": args.steps, "batch_size": 16, "teacher": "online (embedded teacher) and "
                  "cache (top-32)", "student": "embedded student", "cluster": "local, 4 CPUs",
                  "machine_cpus": os.cpu_count()},
        "sizes": results,
        "ratios_to_smallest": {f"{row['pairs']} {row['teacher']}": {key: ratio(row, key) for key in GOALS}
                               for row in results if row["pairs"] != results[0]["pairs"]},
        "goals": {f"{key} at the largest size / at the smallest": f"<= {limit}" for key, limit in GOALS.items()},
        "goals_met": {f"{key} {row['teacher']}": ratio(row, key) <= limit
                      for key, limit in GOALS.items() for row in largest},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios_to_smallest"], indent=2))


if __name__ == "__main__":
    main()
