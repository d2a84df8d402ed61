"""Resuming a job without the driver holding the keys it already finished.

A resumed scoring or teacher-cache job skips the rows whose key a finished part's marker
lists. At millions of rows those keys fit neither a driver set nor every task's arguments, so
the cluster finds the finished rows: the markers' keys meet the rows' keys in a Ray Data
group-by (a key with a marker and a row is done), and the positions of the done rows are
written, sorted, as one array per source (a corpus file, a training-set part). A read task
memory-maps its own source's array and drops those rows.

A position is ``source index << 32 | row``: sources in a stable order, rows within one.
"""

from __future__ import annotations

import functools
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.data.aggregate import Max, Min

from leaf_ray.distributed.capacity import READ_STAGE_CPUS

SOURCE_SHIFT = 32
RESUME_FOLDER = "_resume"  # the done positions of the run under way, in the job's output folder
MARKER = -1  # a marker's key takes this position: below every row's
KEYS_PER_PARTITION = 100_000  # Ray's default of 200 hash partitions takes seconds on a small job
# Ray Data gathers up to 1 GiB of a shuffle's input blocks into one map task, whose memory then
# grows with the corpus (a 1M-row key shuffle: 618 MB, against 389 MB with 4 MiB; see README).
SHUFFLE_INPUT_BATCH_BYTES = 4 * 2**20


def with_small_shuffle_tasks(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """``dataset``, whose shuffles, and those of every dataset made from it, map at most
    :data:`SHUFFLE_INPUT_BATCH_BYTES` of blocks per task (the setting lives in the context that
    derived datasets share)."""
    dataset.context.shuffle_input_batch_bytes = SHUFFLE_INPUT_BATCH_BYTES
    return dataset


def marker_keys(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": key, "position": MARKER} for key in json.loads(Path(row["marker"]).read_text())["keys"]]


def write_done_positions(keyed: ray.data.Dataset, rows: int, sources: int, markers: list[Path],
                         folder: Path) -> tuple[str, int]:
    """``keyed`` holds every row's ``key`` and ``position`` (about ``rows`` rows from ``sources``
    sources); ``markers`` are the finished parts' markers (JSON with a ``keys`` list). Writes the
    positions of the rows whose key a marker lists under a new subfolder of ``folder``, an array
    per source; returns that subfolder (a new one each run, so that a worker never reuses another
    run's arrays) and how many rows are done."""
    shutil.rmtree(folder, ignore_errors=True)
    run = folder / uuid.uuid4().hex
    run.mkdir(parents=True)
    if not markers:
        return str(run), 0
    finished = ray.data.from_items([{"marker": str(path)} for path in markers]).flat_map(
        marker_keys, num_cpus=READ_STAGE_CPUS)
    grouped = keyed.union(finished).groupby("key", num_partitions=max(1, rows // KEYS_PER_PARTITION)).aggregate(
        Min("position", alias_name="first"), Max("position", alias_name="position"))
    done = grouped.filter(lambda row: row["first"] == MARKER and row["position"] != MARKER)
    by_source = done.map_batches(lambda batch: {"source": batch["position"] >> SOURCE_SHIFT, **batch},
                                 batch_format="numpy", num_cpus=READ_STAGE_CPUS)
    written = by_source.groupby("source", num_partitions=min(sources, 16)).map_groups(
        functools.partial(write_source_positions, folder=run), batch_format="numpy", num_cpus=READ_STAGE_CPUS)
    return str(run), sum(int(row["rows"]) for row in written.iter_rows())


def write_source_positions(group: dict[str, np.ndarray], folder: Path) -> dict[str, np.ndarray]:
    """One source's done positions, sorted, as ``<source>.npy``; returns how many."""
    positions = np.sort(group["position"].astype(np.int64))
    np.save(folder / f"{int(group['source'][0])}.npy", positions)
    return {"rows": np.array([len(positions)])}


@functools.lru_cache(maxsize=16)
def source_positions(run: str, source: int) -> np.ndarray:
    path = Path(run) / f"{source}.npy"
    return np.load(path, mmap_mode="r") if path.exists() else np.empty(0, dtype=np.int64)


def is_done(positions: np.ndarray, run: str) -> np.ndarray:
    """Whether each position is a done row of the run whose arrays ``run`` holds (a binary search
    in its source's memory-mapped array: pages touched, not the array read)."""
    positions = np.asarray(positions, dtype=np.int64)
    done = np.zeros(len(positions), dtype=bool)
    sources = positions >> SOURCE_SHIFT
    for source in np.unique(sources):
        mine = sources == source
        finished = source_positions(run, int(source))
        if len(finished):
            at = np.searchsorted(finished, positions[mine])
            done[mine] = finished[np.minimum(at, len(finished) - 1)] == positions[mine]
    return done
