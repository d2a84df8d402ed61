"""The scoring job's output folder: written batch by batch, resumable, without duplicates.

Layout::

    scores/part-<batch>.parquet         per record: units, teacher / student / diff, mask
    counterfactuals/part-<batch>.jsonl  one record per pruned span (corpus schema + provenance)
    errors/part-<batch>.jsonl           records that could not be processed, with a reason
    _done/<batch>.json                  the batch's keys and counts, written last
    summary.json

A batch counts as done only when its ``_done`` marker exists; part files are renamed into
place whole, and parts without a marker (a killed batch) are removed on the next run. A
rerun therefore skips every key in a marker and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from leaf_ray.data import Record, iter_records, write_jsonl

OUTPUTS = {"scores": ".parquet", "counterfactuals": ".jsonl", "errors": ".jsonl"}


def batch_name(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _write_jsonl(rows: list[dict[str, Any]]):
    def write(tmp: Path) -> None:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return write


def write_batch(root: Path, keys: list[str], scores: list[dict[str, Any]], counterfactuals: list[dict[str, Any]],
                errors: list[dict[str, Any]], stats: dict[str, Any]) -> str:
    """Write one batch's parts, then its marker. Returns the batch name."""
    name = batch_name(keys)
    if scores:
        _atomic_write(root / "scores" / f"part-{name}.parquet",
                      lambda tmp: pq.write_table(pa.Table.from_pylist(scores), tmp))
    if counterfactuals:
        _atomic_write(root / "counterfactuals" / f"part-{name}.jsonl", _write_jsonl(counterfactuals))
    if errors:
        _atomic_write(root / "errors" / f"part-{name}.jsonl", _write_jsonl(errors))
    marker = {"keys": keys, **stats}
    _atomic_write(root / "_done" / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(marker)))
    return name


def done_keys(root: Path) -> set[str]:
    """Keys of finished batches; removes parts and temp files that no marker vouches for."""
    markers = {p.stem for p in (root / "_done").glob("*.json")}
    for folder in OUTPUTS:
        for path in (root / folder).glob("*"):
            name = path.name.removeprefix(".tmp-").removeprefix("part-").split(".")[0]
            if path.name.startswith(".tmp-") or name not in markers:
                path.unlink()
    for tmp in (root / "_done").glob(".tmp-*"):
        tmp.unlink()
    keys: set[str] = set()
    for path in (root / "_done").glob("*.json"):
        keys.update(json.loads(path.read_text())["keys"])
    return keys


def totals(root: Path) -> dict[str, float]:
    """Counts summed over every finished batch (this run's and earlier runs')."""
    total: dict[str, float] = {}
    for path in (root / "_done").glob("*.json"):
        marker = json.loads(path.read_text())
        for key, value in marker.items():
            if key != "keys":
                total[key] = total.get(key, 0) + value
    return total


def error_row(key: str, error) -> dict[str, Any]:
    return {"key": key, **error.to_dict()}


def error_key(error) -> str:
    """How an error is keyed for resuming: its record id, else ``file:line``."""
    return error.record_id if error.record_id is not None else f"{error.source}:{error.line}"


def write_summary(root: Path, before: dict[str, float], wall_s: float, processed: int, skipped: int) -> dict[str, Any]:
    """summary.json: totals over every run, and this run's share and throughput."""
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
                     "tokens_per_s": round(tokens / wall_s, 1) if wall_s else 0.0},
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def read_scores(root: Path) -> list[dict[str, Any]]:
    return [row for path in sorted((root / "scores").glob("part-*.parquet")) for row in pq.read_table(path).to_pylist()]


def scored_originals(root: Path, corpus: str | Path) -> list[Record]:
    """The corpus records the scoring run in ``root`` scored (not those that went to errors/)."""
    scored = {row["id"] for row in read_scores(root)}
    return [r for r in iter_records(corpus) if r.id in scored]


# A training set: originals and the counterfactuals (with ``source_id``) to train on, as the
# verification stage and the pipeline's control variants write it; summary.json last.
def write_training_set(folder: Path, originals: list[Record], counterfactuals: list[dict[str, Any]],
                       summary: dict[str, Any]) -> None:
    write_jsonl(folder / "originals.jsonl", [r.to_dict() for r in originals])
    write_jsonl(folder / "counterfactuals.jsonl", counterfactuals)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def is_training_set(folder: Path) -> bool:
    return (folder / "originals.jsonl").exists() and (folder / "summary.json").exists()


def read_training_set(folder: Path) -> tuple[list[Record], list[dict[str, Any]]]:
    counterfactuals = folder / "counterfactuals.jsonl"
    return (list(iter_records(folder / "originals.jsonl")),
            [json.loads(line) for line in counterfactuals.read_text(encoding="utf-8").splitlines() if line.strip()])


def read_jsonl_parts(root: Path, folder: str) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted((root / folder).glob("part-*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
