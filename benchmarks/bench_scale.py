"""Distillation at growing data sizes: does what the driver and the workers hold stay flat?

    python benchmarks/bench_scale.py [--sizes 10000,100000,1000000] [--steps 20]

The data, not the models, grows. For each size a training set is written directly in the
training-set format (`leaf_ray.detection.store.write_training_set`): the embedded simple
family's 2,000 distillation records, repeated, each made distinct by a record number in its
prompt, each with the counterfactual that cuts its distractor clauses. Beside it, a teacher
cache (top-32) is written directly in the cache job's layout: every record's rows are the embedded
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

Then the passes over a score store that the evaluation and the controls make
(`leaf_ray.distributed.store_passes`): at each size a score store is written directly in the
store format, in parts of 10,000 records (the scoring job's `records_per_part`), with the
embedded records under numbered ids and synthetic scores (a perfect detector: the distractor
clauses' units masked; what is measured is the data's size, not the detector). A fresh driver
on a fresh local cluster builds the random control's training set from it and grades its
detection, and records its own VmHWM, the largest VmHWM of a Ray task worker
(`task_worker_peak_rss_mb`), the object store's peak, each pass's wall time and the files.

Then the scoring job's front half, without its models (`rows_to_score` in
`leaf_ray.distributed.scoring`): at each size a one-file JSONL corpus of the embedded records
under numbered ids, with 100 repeated ids at its end, and finished parts' markers that list
the first half of the ids. A fresh driver on a fresh local cluster reads it, finds the repeated
ids and the done rows, and counts the rows left, once in the default 16 MiB pieces (`chunks`)
and once as one piece (`whole`, how the build before pieces read a file), and records the
same memory figures and the wall time.

Each size's measurement is one child process (`--one SIZE`), so nothing carries over.
`--stages distill,store,read` picks what runs; a run of some stages keeps the others' figures.
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
STORE_GOALS = {"driver_peak_rss_mb": 1.5, "task_worker_peak_rss_mb": 1.5}


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


def build_set(folder: Path, size: int) -> dict:
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


def write_teacher_cache(folder: Path, base: list, size: int, k: int = 32, part_records: int = 2048) -> None:
    """The cache of every record of the set, as the cache job lays it out: parts of
    ``part_records`` pairs (4,096 records, its default ``records_per_part``) in row groups of
    64 records, with the embedded teacher's rows for each template under each copy's key (see
    the module docstring)."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from leaf_ray.distillation.teacher_cache import (PART_SCHEMA, cache_folder, cache_rows, record_key,
                                                     tokenizer_fingerprint, write_part)
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
        write_part(cache / "logits" / f"part-{part:05d}.parquet",
                   pa.table(columns, schema=PART_SCHEMA.with_metadata({"k": str(k)})), records_per_row_group=64)
    student = AutoTokenizer.from_pretrained(EMBEDDED / "student")
    fingerprint = {"teacher": model_fingerprint(EMBEDDED / "teacher"), "tokenizer": tokenizer_fingerprint(student),
                   "k": k, "temperature": 1.0, "vocab": vocab}
    (cache / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
    (cache / "summary.json").write_text(json.dumps({"records": 2 * size}) + "\n")


STORE_PART_RECORDS = 10_000  # the scoring job's default records_per_part


def template_score_rows() -> list[tuple[dict, dict]]:
    """Per embedded record, its original (corpus schema) and a scores row of a perfect detector:
    the units of its correlated distractor clauses masked."""
    from leaf_ray.detection.units import split_units
    from leaf_ray.evaluation import confounder_spans

    rows = []
    for line in (EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines():
        record = json.loads(line)
        units = split_units(record["instruction"])
        truth = confounder_spans(record["meta"])
        masked = [u.is_maskable and any(a <= u.start and u.end <= b for a, b in truth) for u in units]
        diff = [1.0 if m else 0.0 for m in masked]
        rows.append((record, {"level": "instruction", "text_offset": 0, "unit_kind": "text",
                              "unit_text": [u.text for u in units], "unit_start": [u.start for u in units],
                              "unit_end": [u.end for u in units], "teacher": [0.0] * len(units), "student": diff,
                              "diff": diff, "masked": masked, "threshold": 0.5}))
    return rows


def build_store(folder: Path, size: int) -> dict:
    """A score store of ``size`` records (see the module docstring), unless already there."""
    from leaf_ray.detection.store import write_batch

    if not (folder / "_done").exists():
        started = time.perf_counter()
        templates = template_score_rows()
        for lo in range(0, size, STORE_PART_RECORDS):
            ids = [f"scale-{index:08d}" for index in range(lo, min(size, lo + STORE_PART_RECORDS))]
            chosen = [templates[index % len(templates)] for index in range(lo, lo + len(ids))]
            write_batch(folder, ids, [{**row, "id": i} for i, (_, row) in zip(ids, chosen)],
                        [{**record, "id": i} for i, (record, _) in zip(ids, chosen)], [], [], {"read": len(ids)})
        print(f"[bench_scale] wrote a score store of {size} records in {time.perf_counter() - started:.1f} s",
              flush=True)
    files = [path for path in folder.rglob("*") if path.is_file()]
    return {"store_files": len(files), "store_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1)}


def measure_store_passes(size: int, work: Path) -> dict:
    """The random control's set and the detection grade of one size's store, in this (fresh)
    process: the driver of both passes on its own local cluster."""
    import ray

    from leaf_ray.config import PruningConfig
    from leaf_ray.distributed.store_passes import grade_store, write_control_set

    store, control = work / f"store-{size}", work / f"control-{size}"
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=2 * 2**30)
    poller = Poller(b"ray::")
    poller.start()
    started = time.perf_counter()
    summary = write_control_set(store, control, "random", PruningConfig(), seed=0)
    control_s = time.perf_counter() - started
    started = time.perf_counter()
    graded = grade_store(store)
    grade_s = time.perf_counter() - started
    poller.done.set()
    poller.join()
    ray.shutdown()
    assert summary["pairs"] == graded["records"] == size, (summary, graded["records"])
    return {"records": size, "driver_peak_rss_mb": round(vm_hwm_mb("self"), 1),
            "task_worker_peak_rss_mb": round(max(poller.workers.values(), default=0.0), 1),
            "object_store_peak_mb": round(poller.store_peak / 2**20, 1),
            "control_s": round(control_s, 2), "grade_s": round(grade_s, 2),
            "control_files": sum(1 for path in control.rglob("*") if path.is_file()),
            "clause_f1": round(graded["clause"]["f1"], 3)}


CORPUS_REPEATS = 100  # records at the corpus's end that repeat an earlier id
MARKER_KEYS = 10_000  # keys a finished part's marker lists (the scoring job's records_per_part)


def build_corpus(folder: Path, size: int) -> dict:
    """A one-file JSONL corpus of ``size`` records (the embedded records under numbered ids, then
    :data:`CORPUS_REPEATS` repeats of earlier ids) and a score folder whose finished parts'
    markers list the first half of the ids, unless already there."""
    corpus, markers = folder / "corpus.jsonl", folder / "score" / "_done"
    if not markers.exists():
        started = time.perf_counter()
        lines = [json.loads(line) for line in (EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines()]
        folder.mkdir(parents=True, exist_ok=True)
        with corpus.open("w") as out:
            for index in [*range(size), *range(CORPUS_REPEATS)]:
                out.write(json.dumps({**lines[index % len(lines)], "id": f"scale-{index:08d}"}) + "\n")
        markers.mkdir(parents=True)
        for part, lo in enumerate(range(0, size // 2, MARKER_KEYS)):
            keys = [f"scale-{index:08d}" for index in range(lo, min(size // 2, lo + MARKER_KEYS))]
            (markers / f"{part:05d}.json").write_text(json.dumps({"keys": keys}))
        print(f"[bench_scale] wrote a corpus of {size} records in {time.perf_counter() - started:.1f} s", flush=True)
    return {"corpus_mb": round(corpus.stat().st_size / 2**20, 1), "markers": len(list(markers.glob("*.json")))}


def measure_reading(size: int, pieces: str, work: Path) -> dict:
    """The scoring job's reading, duplicate ids and resume (``rows_to_score``, no model) over one
    size's corpus, in this (fresh) process on its own local cluster. ``pieces``: ``chunks`` reads
    in the default pieces of 16 MiB; ``whole`` makes the file one piece, as the build before
    pieces read it (a task per file)."""
    import ray

    from leaf_ray.config import ScoringConfig
    from leaf_ray.distributed.scoring import rows_to_score

    folder = work / f"corpus-{size}"
    corpus = folder / "corpus.jsonl"
    scoring = ScoringConfig(corpus=str(corpus), **({"read_chunk_bytes": corpus.stat().st_size + 1}
                                                   if pieces == "whole" else {}))
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=2 * 2**30)
    poller = Poller(b"ray::")
    poller.start()
    started = time.perf_counter()
    pending, count, skipped = rows_to_score([str(corpus)], scoring, sorted((folder / "score" / "_done").glob("*.json")),
                                            work / f"resume-{size}")
    left = pending.count()
    wall = time.perf_counter() - started
    poller.done.set()
    poller.join()
    ray.shutdown()
    assert (count, skipped, left) == (size + CORPUS_REPEATS, size // 2, size - size // 2 + CORPUS_REPEATS), \
        (count, skipped, left)
    return {"records": size, "pieces": pieces, "read_chunk_bytes": scoring.read_chunk_bytes,
            "rows": count, "skipped_as_done": skipped, "pending": left,
            "driver_peak_rss_mb": round(vm_hwm_mb("self"), 1),
            "task_worker_peak_rss_mb": round(max(poller.workers.values(), default=0.0), 1),
            "object_store_peak_mb": round(poller.store_peak / 2**20, 1), "wall_s": round(wall, 2)}


def vm_hwm_mb(pid: int | str) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024


def worker_pids(title: bytes) -> list[str]:
    """The processes whose title starts with ``title`` (Ray titles its workers ``ray::<what runs>``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title):
                pids.append(entry.name)
        except OSError:  # gone meanwhile
            continue
    return pids


class Poller(threading.Thread):
    """Keeps the peak VmHWM of every worker titled ``title`` and the peak object store use."""

    def __init__(self, title: bytes = b"ray::RayTrainWorker") -> None:
        super().__init__(daemon=True)
        self.title = title
        self.workers: dict[str, float] = {}
        self.store_peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        while not self.done.wait(0.5):
            for pid in worker_pids(self.title):
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


def build() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def run_child(*args: str) -> dict:
    """One measurement in a fresh driver process (on its own fresh local cluster); its JSON."""
    child = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                           env={**os.environ, "RAY_ADDRESS": "local"})
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode or not lines:
        sys.exit(f"{' '.join(args)} failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def ratios(results: list[dict], goals: dict[str, float], group: str | None = None) -> tuple[dict, dict]:
    """Each size's figures over the smallest size's (of the same ``group``), and whether the
    largest size meets ``goals``."""
    def ratio(row: dict, key: str) -> float:
        base = next(r for r in results if group is None or r[group] == row[group])  # the smallest size's run
        value, reference = row[key], base[key]
        if isinstance(value, list):  # workers: the largest of each run
            value, reference = max(value), max(reference)
        return round(value / reference, 3)

    size = "pairs" if "pairs" in results[0] else "records"
    label = (lambda row: f"{row[size]} {row[group]}") if group else (lambda row: str(row[size]))
    largest = [row for row in results if row[size] == results[-1][size]]
    return ({label(row): {key: ratio(row, key) for key in goals} for row in results if row[size] != results[0][size]},
            {f"{key}{' ' + row[group] if group else ''}": ratio(row, key) <= limit
             for key, limit in goals.items() for row in largest})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stages", default="distill,store,read", help="any of distill, store, read")
    parser.add_argument("--work-dir", default="/tmp/leaf-ray-bench-scale")
    parser.add_argument("--one", type=int, help="measure this size's distillation in this process; print its JSON")
    parser.add_argument("--one-store", type=int, help="measure this size's store passes in this process")
    parser.add_argument("--teacher", choices=["online", "cache"], default="online", help="with --one")
    parser.add_argument("--one-read", type=int, help="measure this size's reading and resume in this process")
    parser.add_argument("--pieces", choices=["chunks", "whole"], default="chunks", help="with --one-read")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = parser.parse_args()
    work = Path(args.work_dir)
    if args.one is not None:
        print("RESULT " + json.dumps(measure_one(args.one, args.teacher, work, args.steps)), flush=True)
        return
    if args.one_store is not None:
        print("RESULT " + json.dumps(measure_store_passes(args.one_store, work)), flush=True)
        return
    if args.one_read is not None:
        print("RESULT " + json.dumps(measure_reading(args.one_read, args.pieces, work)), flush=True)
        return

    sizes, stages = [int(s) for s in args.sizes.split(",")], args.stages.split(",")
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    if "distill" in stages:
        results = []
        for size in sizes:
            written = build_set(work / f"set-{size}", size)
            for teacher in ("online", "cache"):
                subprocess.run(["rm", "-rf", str(work / f"run-{size}-{teacher}")], check=True)
                results.append({**run_child("--one", str(size), "--teacher", teacher, "--steps", str(args.steps),
                                            "--work-dir", str(work)), **written})
                print(f"[bench_scale] {results[-1]}", flush=True)
        by_size, met = ratios(results, GOALS, group="teacher")
        report.update({
            "benchmark": "distillation driver and worker memory, object store and time to the first step, by data size",
            "build": build(),
            "setup": {"workers": 2, "steps": args.steps, "batch_size": 16, "teacher": "online (embedded teacher) "
                      "and cache (top-32)", "student": "embedded student", "cluster": "local, 4 CPUs",
                      "machine_cpus": os.cpu_count()},
            "sizes": results, "ratios_to_smallest": by_size,
            "goals": {f"{key} at the largest size / at the smallest": f"<= {limit}" for key, limit in GOALS.items()},
            "goals_met": met})
    if "store" in stages:
        results = []
        for size in sizes:
            written = build_store(work / f"store-{size}", size)
            subprocess.run(["rm", "-rf", str(work / f"control-{size}")], check=True)
            results.append({**run_child("--one-store", str(size), "--work-dir", str(work)), **written})
            print(f"[bench_scale] {results[-1]}", flush=True)
        by_size, met = ratios(results, STORE_GOALS)
        report["store_passes"] = {
            "benchmark": "the random control's training set and the detection grade, cut and counted part by part "
                         "on Ray Data from a score store, by its size",
            "build": build(),
            "setup": {"records_per_part": STORE_PART_RECORDS, "scores": "synthetic, a perfect detector",
                      "cluster": "local, 4 CPUs", "machine_cpus": os.cpu_count()},
            "sizes": results, "ratios_to_smallest": by_size,
            "goals": {f"{key} at the largest size / at the smallest": f"<= {limit}"
                      for key, limit in STORE_GOALS.items()} | {"store_files at 1M records": "<= 1000"},
            "goals_met": met | ({"store_files at 1M records": results[-1]["store_files"] <= 1000}
                                if results[-1]["records"] >= 1_000_000 else {})}
    if "read" in stages:
        results = []
        for size in sizes:
            written = build_corpus(work / f"corpus-{size}", size)
            for pieces in ("chunks", "whole"):
                results.append({**run_child("--one-read", str(size), "--pieces", pieces, "--work-dir", str(work)),
                                **written})
                print(f"[bench_scale] {results[-1]}", flush=True)
        by_size, met = ratios(results, STORE_GOALS, group="pieces")
        report["reading"] = {
            "benchmark": "the scoring job's reading, duplicate ids and resume (rows_to_score, no model) over a "
                         "one-file JSONL corpus with half its records done, by its size; in 16 MiB pieces "
                         "(chunks) and as one piece (whole: how the build before pieces read a file)",
            "build": build(),
            "setup": {"repeated_ids": CORPUS_REPEATS, "done": "the first half of the ids, in markers of "
                      f"{MARKER_KEYS} keys", "cluster": "local, 4 CPUs", "machine_cpus": os.cpu_count()},
            "sizes": results, "ratios_to_smallest": by_size,
            "goals": {f"{key} at the largest size / at the smallest": f"<= {limit}"
                      for key, limit in STORE_GOALS.items()},
            "goals_met": met}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"distillation": report.get("ratios_to_smallest"),
                      "store_passes": report.get("store_passes", {}).get("ratios_to_smallest"),
                      "reading": report.get("reading", {}).get("ratios_to_smallest")}, indent=2))


if __name__ == "__main__":
    main()
