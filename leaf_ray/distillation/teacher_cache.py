"""The teacher-logit cache: the teacher's top-k log-probabilities at every response position of
a training set, computed once, so that distillation runs without the teacher.

A cache covers every record of one training set (originals and counterfactuals) and lives
beside it, in ``<training set>/teacher_cache/``::

    logits/part-<part>.parquet    per record: key, positions, ids (list<int32>, positions * k, row-major),
                                  logprobs (list<float16>, the same shape), tail (list<float16>, one per position);
                                  many batches a part, one row group a batch
    _done/<part>.json             the part's keys, written last (a part without one is redone)
    fingerprint.json              what built it: teacher, tokenizer, k, temperature, vocab, leaf-ray version
    summary.json                  written when every record is in: records, positions, bytes per position

A record's key is a hash of what the teacher saw (instruction, response, ``target_start``), so
a record met twice in a training set is one entry. Positions follow
:func:`leaf_ray.distillation.losses.response_positions`: the positions that predict a learned
token, in order. ``k`` is stored log-probs per position; the tail is the log of the
mass on every other token (``-inf`` when ``k`` covers the vocabulary).

Plain PyTorch/transformers; :mod:`leaf_ray.distributed.teacher_cache` runs it on Ray Data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from leaf_ray.data import Record, TrainingPair, encode_for_training, length_batches, render_sample
from leaf_ray.detection.store import read_part_pairs
from leaf_ray.distillation.losses import SparseTargets, teacher_top_k
from leaf_ray.errors import RunRefused

PART_SCHEMA = pa.schema([("key", pa.string()), ("positions", pa.int32()), ("ids", pa.list_(pa.int32())),
                         ("logprobs", pa.list_(pa.float16())), ("tail", pa.list_(pa.float16()))])
# Bytes a cached position costs: k int32 ids and float16 log-probs, and a float16 tail.
BYTES_PER_ID, BYTES_PER_LOGPROB, BYTES_PER_TAIL = 4, 2, 2


def cache_folder(training_set: str | Path) -> Path:
    """Where the cache of a training set lives: beside its originals and counterfactuals."""
    return Path(training_set) / "teacher_cache"


def record_key(record: Record) -> str:
    """What the teacher saw of a record: the same text and learned part give the same key."""
    text = json.dumps([record.instruction, record.response, record.target_start], ensure_ascii=False)
    return hashlib.sha1(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Token ids and chat template: a cache's positions and ids are only valid for both."""
    identity = {"vocab": sorted(tokenizer.get_vocab().items()), "chat_template": tokenizer.chat_template,
                "special": tokenizer.all_special_tokens}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def training_set_records(pairs: Sequence[TrainingPair]) -> dict[str, Record]:
    """Every record a run on these pairs can show the teacher, by key."""
    return {record_key(r): r for p in pairs for r in (p.original, *p.counterfactuals)}


def part_records(training_set: Path, part: str) -> dict[str, Record]:
    """The records of one part of a training set, by key: what a cache build reads at a time. A
    record met in two parts is cached twice, and the reader takes either copy."""
    return training_set_records(read_part_pairs(training_set, part))


@torch.no_grad()
def cache_rows(teacher, tokenizer, records: Sequence[Record], k: int, temperature: float, vocab: int,
               max_tokens_per_batch: int = 8192) -> list[dict[str, Any]]:
    """The cache's rows for ``records``: the teacher's top ``k`` over the first ``vocab`` logits at
    each response position, at ``temperature``, rendered with ``tokenizer`` (the student's: the
    one distillation renders with)."""
    device = next(teacher.parameters()).device
    lengths = [len(render_sample(tokenizer, r.instruction, r.response).input_ids) for r in records]
    rows: list[dict[str, Any]] = []
    for batch_indices in length_batches(lengths, max_tokens_per_batch):
        chunk = [records[i] for i in batch_indices]
        batch = encode_for_training(tokenizer, chunk)
        logits = teacher(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits[..., :vocab]
        targets = teacher_top_k(logits, batch["target_mask"].to(device), k, temperature)
        counts = batch["target_mask"][:, 1:].sum(1).tolist()
        ids = targets.ids.int().cpu().numpy()
        logprobs = targets.logprobs.half().cpu().numpy()
        tail = targets.tail.half().cpu().numpy()
        at = 0
        for record, count in zip(chunk, counts):
            rows.append({"key": record_key(record), "positions": count, "ids": ids[at:at + count].ravel(),
                         "logprobs": logprobs[at:at + count].ravel(), "tail": tail[at:at + count]})
            at += count
    return rows


def cache_table(rows: list[dict[str, Any]], k: int) -> pa.Table:
    """Cache rows as an Arrow table; ``k`` also goes into its schema metadata, for readers of
    the bare files."""
    columns = {name: [row[name] for row in rows] for name in PART_SCHEMA.names}
    return pa.table(columns, schema=PART_SCHEMA.with_metadata({"k": str(k)}))


def write_part(path: Path, table: pa.Table, records_per_row_group: int) -> None:
    """One Parquet part. The reader decodes a row group at a time, so a row group is what a
    worker holds of a part: about a batch."""
    pq.write_table(table, path, row_group_size=records_per_row_group)


def write_cache(folder: str | Path, rows: list[dict[str, Any]], fingerprint: dict[str, Any],
                records_per_row_group: int = 64) -> Path:
    """A whole cache written by one process, as one part (the Ray job writes many)."""
    folder = Path(folder)
    (folder / "logits").mkdir(parents=True, exist_ok=True)
    write_part(folder / "logits" / "part-0.parquet", cache_table(rows, fingerprint["k"]), records_per_row_group)
    (folder / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
    (folder / "summary.json").write_text(json.dumps({"records": len(rows)}) + "\n")
    return folder


class TeacherCacheError(RunRefused):
    """A cache that cannot stand in for this run's teacher."""


def finished_cache(folder: str | Path) -> dict[str, Any]:
    """The fingerprint of a finished cache (every record in); a clear error otherwise."""
    folder = Path(folder)
    if not (folder / "summary.json").exists():
        raise TeacherCacheError(f"{folder} holds no finished teacher cache (no summary.json): build it first "
                                "(jobs/teacher_cache.py, or the pipeline's teacher_cache stage)")
    return json.loads((folder / "fingerprint.json").read_text())


def check_cache(folder: str | Path, tokenizer, temperature: float, teacher_fingerprint: str | None = None) -> None:
    """Refuse a cache built for another tokenizer, temperature or (when known) teacher."""
    built = finished_cache(folder)
    problems = []
    if tokenizer_fingerprint(tokenizer) != built["tokenizer"]:
        problems.append("the student's tokenizer or chat template is not the one the cache was built with")
    if temperature != built["temperature"]:
        problems.append(f"distillation.temperature is {temperature}, the cache holds log-probs at "
                        f"{built['temperature']}")
    if teacher_fingerprint is not None and teacher_fingerprint != built["teacher"]:
        problems.append(f"the teacher ({teacher_fingerprint}) is not the one that built the cache ({built['teacher']})")
    if problems:
        raise TeacherCacheError(f"teacher cache {folder} does not match this run: {'; '.join(problems)}. "
                                "Delete it to rebuild it, or distil with teacher: online")


Entry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # one record's ids, log-probs and tail, by position


class TeacherCache:
    """A finished cache folder, read as batches need it: what a distillation worker holds
    instead of the teacher.

    It holds an index of every record (its key's first 64 bits, row group and row: 16 bytes a
    record, found by binary search) and the last ``row_groups_in_memory`` row groups it decoded
    (a row group is about a batch of the build), not the cache: a worker's memory stays flat
    however big the training set and its parts. ``targets(records)`` gives the teacher's
    :class:`SparseTargets` for a batch, rows in the batch's order, as
    :func:`leaf_ray.distillation.losses.sparse_distill_loss` wants them.
    """

    def __init__(self, folder: str | Path, row_groups_in_memory: int = 64):
        self.folder = Path(folder)
        built = finished_cache(self.folder)
        self.vocab = int(built["vocab"])
        self.width = min(int(built["k"]), self.vocab)  # ids per position
        self.groups: list[tuple[Path, int]] = []  # (part, row group within it)
        prefixes, groups, rows = [np.empty(0, np.uint64)], [np.empty(0, np.int32)], [np.empty(0, np.int32)]
        for path in sorted((self.folder / "logits").glob("part-*.parquet")):
            part = pq.ParquetFile(path)
            for group in range(part.num_row_groups):
                keys = part.read_row_group(group, columns=["key"]).column("key").to_pylist()
                prefixes.append(np.fromiter((_prefix(key) for key in keys), dtype=np.uint64, count=len(keys)))
                groups.append(np.full(len(keys), len(self.groups), dtype=np.int32))
                rows.append(np.arange(len(keys), dtype=np.int32))
                self.groups.append((path, group))
        order = np.argsort(np.concatenate(prefixes), kind="stable")
        self._prefixes, self._groups = np.concatenate(prefixes)[order], np.concatenate(groups)[order]
        self._rows = np.concatenate(rows)[order]
        self._decoded: OrderedDict[int, dict[str, Entry]] = OrderedDict()
        self._row_groups_in_memory = row_groups_in_memory

    def __len__(self) -> int:
        return len(self._prefixes)

    def entry(self, key: str) -> Entry | None:
        """A record's cached targets, or None when the cache lacks it."""
        prefix = np.uint64(_prefix(key))
        at = int(np.searchsorted(self._prefixes, prefix))
        while at < len(self._prefixes) and self._prefixes[at] == prefix:  # a shared prefix: check the key
            found = self._group(int(self._groups[at])).get(key)
            if found is not None:
                return found
            at += 1
        return None

    def read_all(self) -> dict[str, Entry]:
        """Every entry, in memory: for small caches and for tests."""
        return {key: entry for number in range(len(self.groups)) for key, entry in self._read_group(number).items()}

    def targets(self, records: Sequence[Record]) -> SparseTargets:
        entries = [self.entry(record_key(r)) for r in records]
        if any(entry is None for entry in entries):
            missing = next(r.id for r, entry in zip(records, entries) if entry is None)
            raise TeacherCacheError(f"record {missing!r} is not in the teacher cache {self.folder}: the training "
                                    "set changed after the cache was built; rerun the teacher_cache stage, which "
                                    "caches the records it lacks")
        # Outside CPU autocast: under bf16 autocast, cat refuses float16 tensors ("Unexpected
        # floating ScalarType"), and the cache's values are data, not activations.
        with torch.autocast("cpu", enabled=False):
            ids, logprobs, tail = (torch.cat([entry[i] for entry in entries]) for i in range(3))
        return SparseTargets(ids, logprobs, tail, self.vocab)

    def _group(self, number: int) -> dict[str, Entry]:
        """A decoded row group, from the last ``row_groups_in_memory`` read or from disk."""
        if number in self._decoded:
            self._decoded.move_to_end(number)
            return self._decoded[number]
        decoded = self._decoded[number] = self._read_group(number)
        if len(self._decoded) > self._row_groups_in_memory:
            self._decoded.popitem(last=False)
        return decoded

    def _read_group(self, number: int) -> dict[str, Entry]:
        path, group = self.groups[number]
        table = pq.ParquetFile(path).read_row_group(group)
        keys, counts = table.column("key").to_pylist(), table.column("positions").to_pylist()
        columns = (_lists(table.column(name)) for name in ("ids", "logprobs", "tail"))
        return {key: (torch.from_numpy(ids.reshape(count, self.width)),
                      torch.from_numpy(logprobs.reshape(count, self.width)), torch.from_numpy(tail))
                for key, count, ids, logprobs, tail in zip(keys, counts, *columns)}


def _prefix(key: str) -> int:
    """A record key's first 64 bits (keys are sha1 hex digests)."""
    return int(key[:16], 16)


def _lists(column: pa.ChunkedArray) -> list[np.ndarray]:
    """A list column as one numpy array per row, without a Python object per value."""
    array = column.combine_chunks()
    values = array.values.to_numpy(zero_copy_only=False).copy()  # writable, for torch
    offsets = array.offsets.to_numpy()
    return [values[lo:hi] for lo, hi in itertools.pairwise(offsets)]
