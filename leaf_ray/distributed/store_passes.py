"""Passes over score stores and training sets on Ray Data, a task per part: the variants'
training sets that are not the scoring job's own, and the detection grade of the evaluation.

A score store keeps a part's scores and its records' originals under one name, and a training
set keeps a pair's counterfactuals in its original's part, so a part joins on its own. Each task
reads one part and writes or counts what it makes of it; the driver holds the part names and
the counts, never a record. Only the response-level variants join across stores (a record's
instruction cuts sit in another store's part): that join is a Ray Data group-by on the id. The
work on a part is the plain core (:func:`leaf_ray.distillation.variants.part_pairs`,
:func:`leaf_ray.evaluation.grade_store_part`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from leaf_ray.config import PruningConfig, RunLayout
from leaf_ray.data import TrainingPair
from leaf_ray.detection.store import (
    batch_name,
    clear_training_set,
    pair_to_row,
    row_to_pair,
    store_parts,
    training_set_parts,
    write_training_part,
)
from leaf_ray.distillation.variants import VARIANTS, part_instruction_cuts, part_pairs, with_instruction_cuts
from leaf_ray.distributed.resume import with_small_shuffle_tasks
from leaf_ray.evaluation import grade_store_part, sum_detection_counts
from leaf_ray.files import write_text_atomically


def parts_dataset(parts: list[str]) -> ray.data.Dataset:
    """A row per part name, a block each, so that every part is its own task."""
    return ray.data.from_items([{"part": part} for part in parts], override_num_blocks=max(len(parts), 1))


def over_parts(parts: list[str], work: Callable[[str], dict[str, Any]], num_cpus: float = 1) -> list[dict[str, Any]]:
    """``work(part)`` for every part name in ``parts``, a Ray task each; their results (small dicts)."""
    return parts_dataset(parts).map(lambda row: work(row["part"]), num_cpus=num_cpus).take_all() if parts else []


def scored_parts(store: Path) -> list[str]:
    parts = store_parts(store)
    if not parts:
        raise FileNotFoundError(f"{store} holds no scored part (scores/part-*.parquet): run the scoring stage first")
    return parts


def write_part(folder: Path, part: str, pairs: list[TrainingPair]) -> dict[str, int]:
    write_training_part(folder, part, pairs)
    return {"pairs": len(pairs), "response_level_pairs": sum(p.level == "response" for p in pairs)}


def write_summary(folder: Path, variant: str, counts: list[dict[str, int]]) -> dict[str, Any]:
    """The set's summary, written last: a killed build has none and is redone whole."""
    summary = {"variant": variant, "pairs": sum(c["pairs"] for c in counts),
               "response_level_pairs": sum(c["response_level_pairs"] for c in counts), "parts": len(counts)}
    write_text_atomically(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def write_control_set(store: Path, folder: Path, variant: str, pruning: PruningConfig, seed: int) -> dict[str, Any]:
    """``variant``'s training set, cut from ``store`` part by part into parts of the same names."""
    clear_training_set(folder)
    return write_summary(folder, variant, over_parts(scored_parts(store), lambda part: write_part(
        folder, part, part_pairs(variant, store, store, part, pruning, seed))))


PAIR_COLUMNS = ("id", "level", "original", "counterfactuals")
PAIR_SCHEMA = pa.schema([(column, pa.string()) for column in PAIR_COLUMNS])
JOIN_SCHEMA = pa.schema([*PAIR_SCHEMA, ("cuts", pa.string())])
COUNT_SCHEMA = pa.schema([("pairs", pa.int64()), ("response_level_pairs", pa.int64())])


def with_record_cuts(group: pa.Table) -> pa.Table:
    """The rows of one record id: its response-level pair, whose counterfactuals lose the
    instruction ranges of the record's cuts row (either may be missing)."""
    rows = group.to_pylist()
    cuts = {row["id"]: json.loads(row["cuts"]) for row in rows if row["cuts"]}
    pairs = [pair_to_row(with_instruction_cuts(row_to_pair(row), cuts)) for row in rows if row["original"]]
    return pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA)


def write_response_level_set(layout: RunLayout, verified: bool, folder: Path, variant: str, pruning: PruningConfig,
                             seed: int) -> dict[str, Any]:
    """A ``*_instr_resp`` variant's training set: its instruction-level pairs, part by part as the
    controls are cut, and its response-level pairs, whose counterfactuals also lose their
    record's instruction cuts. The two stores' parts hold different records, so the response
    pairs meet their cuts in a group-by on the id (a hash shuffle on the cluster) and are
    written in parts named by their ids. ``verified``: the detector's own pairs are the
    verification stage's."""
    clear_training_set(folder)
    store, response_store = layout.score, layout.score_response
    detected_set, response_set = (layout.verify, layout.verify_response) if verified else (store, response_store)
    detected = VARIANTS[variant].spans == "detected"
    counts = over_parts(training_set_parts(detected_set) if detected else scored_parts(store), lambda part: write_part(
        folder, part, part_pairs(variant, store, detected_set, part, pruning, seed)))

    def cut_rows(part: str) -> list[dict[str, str]]:
        cuts = part_instruction_cuts(variant, store, part, pruning, seed)
        return [{**dict.fromkeys(PAIR_COLUMNS, ""), "id": record_id, "cuts": json.dumps(ranges)}
                for record_id, ranges in cuts.items() if ranges]

    def response_rows(part: str) -> list[dict[str, str]]:
        return [{**pair_to_row(pair), "cuts": ""} for pair in part_pairs(
            variant, response_store, response_set, part, pruning, seed, level="response")]

    def rows_of(parts: list[str], rows: Callable[[str], list[dict[str, str]]]) -> ray.data.Dataset:
        """The rows of every part, in blocks that keep the join's schema even when empty."""
        return with_small_shuffle_tasks(parts_dataset(parts)).map_batches(lambda batch: pa.Table.from_pylist(
            [row for part in batch.column("part").to_pylist() for row in rows(part)], schema=JOIN_SCHEMA),
            batch_format="pyarrow", batch_size=1)

    def write_block(block: pa.Table) -> pa.Table:
        pairs = sorted(map(row_to_pair, block.to_pylist()), key=lambda p: p.original.id)
        counts = [write_part(folder, f"part-response-{batch_name([p.original.id for p in pairs])}", pairs)] if pairs else []
        return pa.Table.from_pylist(counts, schema=COUNT_SCHEMA)

    response_parts = training_set_parts(response_set) if detected else store_parts(response_store)
    if response_parts:
        rows = rows_of(response_parts, response_rows)
        if store_parts(store):
            rows = rows.union(rows_of(store_parts(store), cut_rows))
        pairs = rows.groupby("id", num_partitions=len(response_parts)).map_groups(with_record_cuts,
                                                                                  batch_format="pyarrow")
        counts += pairs.map_batches(write_block, batch_format="pyarrow", batch_size=None).take_all()
    if not any(c["response_level_pairs"] for c in counts):
        raise ValueError(f"{variant}: the response-level pass kept no record (see {response_store}/errors: a "
                         "single-step response has no reasoning prefix to prune); use a corpus with multi-step "
                         "responses or drop the variant")
    return write_summary(folder, variant, counts)


def grade_store(store: Path) -> dict[str, Any]:
    """Detection precision, recall and F1 of every instruction-level row of ``store`` against its
    record's ground truth, and how many records have one."""
    return sum_detection_counts(over_parts(scored_parts(store), lambda part: grade_store_part(store, part)))
