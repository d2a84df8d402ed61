"""The scoring job's output folder: written part by part, resumable, without duplicates.

Layout::

    originals/part-<part>.jsonl        the records scored, in the corpus schema
    counterfactuals/part-<part>.jsonl  one record per pruned span (corpus schema + provenance)
    scores/part-<part>.parquet         per record: units, teacher / student / diff, mask
    errors/part-<part>.jsonl           records that could not be processed, with a reason
    _done/<part>.json                  the part's keys, counts, writer and scorers (host:pid), written last
    summary.json

A part gathers the scored rows of many batches (``scoring.records_per_part``; the Ray job's
sink bundles them), so that a million records make hundreds of files, not a few per batch.
A part counts as done only when its ``_done`` marker exists; part files are renamed into
place whole, and parts without a marker (a killed write) are removed on the next run. A
rerun therefore skips every key in a marker and redoes the rest.

``originals/`` + ``counterfactuals/`` + ``summary.json`` is also the *training-set* format
that every later stage reads (:func:`read_training_set`): the verification stage and the
control variants write their own training sets the same way (:func:`write_training_set`, in
parts of :data:`PAIRS_PER_PART` pairs), so nothing downstream re-reads the corpus. Every
writer keeps a record's counterfactuals in the part of its original, so a part joins on its
own: distillation streams a set part by part (:func:`read_part_pairs`) and never holds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterable
from itertools import count, islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from leaf_ray.data import Record, TrainingPair
from leaf_ray.files import write_atomically, write_text_atomically

OUTPUTS = {"originals": ".jsonl", "counterfactuals": ".jsonl", "scores": ".parquet", "errors": ".jsonl"}


def batch_name(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]


def _write_jsonl(rows: list[dict[str, Any]]):
    def write(tmp: Path) -> None:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return write


STAT_COLUMNS = ("tokens", "masked_units", "scored_units")


def scored_row(key: str, scorer: str, score: dict[str, Any] | None = None, original: dict[str, Any] | None = None,
               counterfactuals: list[dict[str, Any]] = (), error: dict[str, Any] | None = None, *,
               tokens: int = 0, masked_units: int = 0, scored_units: int = 0) -> dict[str, Any]:
    """What scoring made of one key (a record, or a row that failed), as flat columns a Ray Data
    block carries between the scoring actors and the writer: outputs as JSON text, "" for none,
    so that every block has the same schema."""
    def text(value: Any) -> str:
        return "" if value is None else json.dumps(value, ensure_ascii=False)

    return {"key": key, "scorer": scorer, "score": text(score), "original": text(original),
            "counterfactuals": json.dumps(list(counterfactuals), ensure_ascii=False), "error": text(error),
            "tokens": tokens, "masked_units": masked_units, "scored_units": scored_units}


def write_part(root: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the :func:`scored_row` rows of one part (any number of batches) and its marker;
    return the part's counts. Nothing is written for no rows."""
    if not rows:
        return {}
    cfs = [cf for row in rows for cf in json.loads(row["counterfactuals"])]
    stats = {"read": len(rows), "scored": sum(bool(row["score"]) for row in rows),
             "errors": sum(bool(row["error"]) for row in rows), "counterfactuals": len(cfs),
             **{column: sum(int(row[column]) for row in rows) for column in STAT_COLUMNS}}
    scorers: dict[str, int] = {}
    for row in rows:
        scorers[row["scorer"]] = scorers.get(row["scorer"], 0) + 1
    write_batch(root, [row["key"] for row in rows], [json.loads(row["score"]) for row in rows if row["score"]],
                [json.loads(row["original"]) for row in rows if row["original"]], cfs,
                [json.loads(row["error"]) for row in rows if row["error"]], {**stats, "scored_by": scorers})
    model_batches = sorted({row["model_batch"] for row in rows if row.get("model_batch")})  # the Ray job's timings
    return {**stats, "model_batches": model_batches} if model_batches else stats


def write_batch(root: Path, keys: list[str], scores: list[dict[str, Any]], originals: list[dict[str, Any]],
                counterfactuals: list[dict[str, Any]], errors: list[dict[str, Any]], stats: dict[str, Any]) -> str:
    """Write one part's files, then its marker. Returns the part name."""
    name = batch_name(keys)
    if originals:
        write_atomically(root / "originals" / f"part-{name}.jsonl", _write_jsonl(originals))
    if scores:
        write_atomically(root / "scores" / f"part-{name}.parquet",
                      lambda tmp: pq.write_table(pa.Table.from_pylist(scores), tmp))
    if counterfactuals:
        write_atomically(root / "counterfactuals" / f"part-{name}.jsonl", _write_jsonl(counterfactuals))
    if errors:
        write_atomically(root / "errors" / f"part-{name}.jsonl", _write_jsonl(errors))
    marker = {"keys": keys, "written_by": f"{socket.gethostname()}:{os.getpid()}", **stats}
    write_text_atomically(root / "_done" / f"{name}.json", json.dumps(marker))
    return name


def finished_markers(root: Path, folders=tuple(OUTPUTS)) -> list[Path]:
    """The markers of finished parts (each lists its keys); removes parts (in ``folders``) and
    temp files that no marker vouches for."""
    markers = {p.stem for p in (root / "_done").glob("*.json")}
    for folder in folders:
        for path in (root / folder).glob("*"):
            name = path.name.removeprefix(".tmp-").removeprefix("part-").split(".")[0]
            if path.name.startswith(".tmp-") or name not in markers:
                path.unlink()
    for tmp in (root / "_done").glob(".tmp-*"):
        tmp.unlink()
    return sorted((root / "_done").glob("*.json"))


def totals(root: Path) -> dict[str, float]:
    """Counts summed over every finished batch (this run's and earlier runs')."""
    total: dict[str, float] = {}
    for path in (root / "_done").glob("*.json"):
        marker = json.loads(path.read_text())
        for key, value in marker.items():
            if isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
    return total


def error_row(key: str, error) -> dict[str, Any]:
    return {"key": key, **error.to_dict()}


def error_key(error) -> str:
    """How an error is keyed for resuming: its record id, else ``file:line``."""
    return error.record_id if error.record_id is not None else f"{error.source}:{error.line}"


def write_summary(root: Path, before: dict[str, float], wall_s: float, processed: int, skipped: int,
                  model_stage: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: totals over every run, and this run's share, throughput and (for the Ray
    job) how busy its model stage was."""
    after = totals(root)
    tokens = after.get("tokens", 0) - before.get("tokens", 0)
    summary = {
        "read": int(after.get("read", 0)),
        "scored": int(after.get("scored", 0)),
        "errors": int(after.get("errors", 0)),
        "counterfactuals": int(after.get("counterfactuals", 0)),
        "tokens": int(after.get("tokens", 0)),
        "masked_unit_fraction": after.get("masked_units", 0) / max(after.get("scored_units", 0), 1),
        "this_run": {"records": processed, "skipped_as_done": skipped, "wall_s": round(wall_s, 2),
                     "tokens_per_s": round(tokens / wall_s, 1) if wall_s else 0.0,
                     **({"model_stage": model_stage} if model_stage else {})},
    }
    write_text_atomically(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def store_parts(root: Path) -> list[str]:
    """The names (``part-<name>``) of a score store's parts, sorted. A part's scores and its
    records' originals share the name, so a part joins on its own."""
    return sorted(path.stem for path in (root / "scores").glob("part-*.parquet"))


def read_store_part(root: Path, part: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One part's scores rows and its records' originals (corpus schema)."""
    return pq.read_table(root / "scores" / f"{part}.parquet").to_pylist(), _read_jsonl(root / "originals" / f"{part}.jsonl")


def read_scores(root: Path) -> list[dict[str, Any]]:
    return [row for part in store_parts(root) for row in read_store_part(root, part)[0]]


PAIRS_PER_PART = 10_000  # a training set's parts: few files, each small enough to join in memory


def write_training_set(folder: Path, pairs: Iterable[TrainingPair], summary: dict[str, Any]) -> None:
    """A training set (the verification stage's kept pairs, a control variant's pairs) in parts
    of :data:`PAIRS_PER_PART` pairs, read as they come. Counterfactuals sit in the part of their
    original and point back to it by ``source_id`` and ``level`` (a record may have a pair at
    each level). Parts of an earlier set in ``folder`` are removed first."""
    clear_training_set(folder)
    remaining = iter(pairs)
    for index in count():
        chunk = list(islice(remaining, PAIRS_PER_PART))
        if index and not chunk:  # an empty set still gets its (empty) first part
            break
        write_training_part(folder, f"part-{index:05d}", chunk)
    write_text_atomically(folder / "summary.json", json.dumps(summary, indent=2) + "\n")


def clear_training_set(folder: Path) -> None:
    """Remove a training set's summary and parts (an earlier or a killed write's) before writing it anew."""
    (folder / "summary.json").unlink(missing_ok=True)
    for stale in [*(folder / "originals").glob("part-*"), *(folder / "counterfactuals").glob("part-*")]:
        stale.unlink()


def write_training_part(folder: Path, part: str, pairs: list[TrainingPair]) -> None:
    """One part of a training set: the pairs' originals, and their counterfactuals beside them."""
    write_atomically(folder / "originals" / f"{part}.jsonl", _write_jsonl([{**p.original.to_dict(), "level": p.level}
                                                                           for p in pairs]))
    write_atomically(folder / "counterfactuals" / f"{part}.jsonl", _write_jsonl(
        [{**c.to_dict(), "source_id": p.original.id, "level": p.level} for p in pairs for c in p.counterfactuals]))


def is_training_set(folder: Path) -> bool:
    return (folder / "summary.json").exists() and (folder / "originals").is_dir()


def read_originals(folder: Path) -> list[Record]:
    """The original records of a training set (for the store: every record that was scored), by id."""
    return sorted((Record.from_dict(row) for row in read_jsonl_parts(folder, "originals")), key=lambda r: r.id)


def training_set_parts(folder: Path) -> list[str]:
    """The names (``part-<name>``) of a training set's parts (a score store's or a written chunk's), sorted."""
    if not is_training_set(folder):
        raise FileNotFoundError(f"{folder} holds no finished training set (originals/ and summary.json)")
    return sorted(path.stem for path in (folder / "originals").glob("part-*.jsonl"))


def read_part_pairs(folder: Path, part: str) -> list[TrainingPair]:
    """One part's originals joined with their counterfactuals (by ``source_id`` and ``level``),
    in the part's order. Every writer keeps a record's counterfactuals in its original's part."""
    by_source: dict[tuple[str, str], list[Record]] = {}
    counterfactuals = folder / "counterfactuals" / f"{part}.jsonl"
    for row in _read_jsonl(counterfactuals) if counterfactuals.exists() else []:
        by_source.setdefault((row["source_id"], row.get("level", "instruction")), []).append(Record.from_dict(row))
    pairs = [TrainingPair(Record.from_dict(row), by_source.pop((row["id"], level), []), level)
             for row in _read_jsonl(folder / "originals" / f"{part}.jsonl") for level in [row.get("level", "instruction")]]
    if by_source:
        raise ValueError(f"{counterfactuals}: counterfactuals of {sorted(by_source)[:3]} have no original in "
                         f"originals/{part}.jsonl; a training set keeps them in their original's part")
    return pairs


def pair_to_row(pair: TrainingPair) -> dict[str, str]:
    """A pair as flat text columns, as a Ray Data block carries it."""
    return {"id": pair.original.id, "level": pair.level, "original": json.dumps(pair.original.to_dict()),
            "counterfactuals": json.dumps([c.to_dict() for c in pair.counterfactuals])}


def row_to_pair(row: dict[str, str]) -> TrainingPair:
    return TrainingPair(Record(**json.loads(row["original"])),
                        [Record(**c) for c in json.loads(row["counterfactuals"])], row["level"])


def read_training_set(folder: Path) -> list[TrainingPair]:
    """Every pair of a training set, sorted by id and level: for the stages that need them all at
    once. Distillation streams the parts instead (:func:`read_part_pairs`)."""
    pairs = [pair for part in training_set_parts(folder) for pair in read_part_pairs(folder, part)]
    return sorted(pairs, key=lambda p: (p.original.id, p.level))


def training_set_manifest(folder: Path) -> dict[str, Any]:
    """What a training set holds, read file by file in fixed-size chunks (memory stays flat
    whatever its size): each part's path, size and sha256, the number of pairs, and one digest
    of them all, which tells two sets apart without parsing a row."""
    files, pairs, digest = [], 0, hashlib.sha256()
    for part in training_set_parts(folder):
        for kind in ("originals", "counterfactuals"):
            path = folder / kind / f"{part}.jsonl"
            if not path.exists():
                continue
            checksum, lines = hashlib.sha256(), 0
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    checksum.update(chunk)
                    lines += chunk.count(b"\n")
            files.append({"path": f"{kind}/{part}.jsonl", "bytes": path.stat().st_size, "sha256": checksum.hexdigest()})
            pairs += lines if kind == "originals" else 0
            digest.update(f"{kind}/{part}.jsonl {checksum.hexdigest()}\n".encode())
    return {"files": files, "pairs": pairs, "digest": digest.hexdigest()[:16]}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_jsonl_parts(root: Path, folder: str) -> list[dict[str, Any]]:
    return [row for path in sorted((root / folder).glob("part-*.jsonl")) for row in _read_jsonl(path)]
