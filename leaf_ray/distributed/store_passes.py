"""Passes over a score store on Ray Data, one task per part: the control variants' training
sets and the detection grade of the evaluation.

A score store keeps a part's scores and its records' originals under one name, so a part
joins on its own. Each task reads one part and writes or counts what it makes of it; the
driver holds the part names and the counts, never a record. The work on a part is the plain
core (:func:`leaf_ray.distillation.variants.write_variant_part`,
:func:`leaf_ray.evaluation.grade_store_part`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from leaf_ray.config import PruningConfig
from leaf_ray.detection.store import clear_training_set, store_parts
from leaf_ray.distillation.variants import write_variant_part
from leaf_ray.evaluation import grade_store_part, sum_detection_counts
from leaf_ray.files import write_text_atomically


def over_parts(store: Path, work: Callable[[str], dict[str, Any]], num_cpus: float = 1) -> list[dict[str, Any]]:
    """``work(part)`` for every part of ``store``, a Ray task each; their results (small dicts)."""
    parts = store_parts(store)
    if not parts:
        raise FileNotFoundError(f"{store} holds no scored part (scores/part-*.parquet): run the scoring stage first")
    return (ray.data.from_items([{"part": part} for part in parts], override_num_blocks=len(parts))
            .map(lambda row: work(row["part"]), num_cpus=num_cpus).take_all())


def write_control_set(store: Path, folder: Path, variant: str, pruning: PruningConfig, seed: int) -> dict[str, Any]:
    """``variant``'s training set, cut from ``store`` part by part into parts of the same names;
    the summary is written last, so a killed build is redone whole."""
    clear_training_set(folder)
    counts = over_parts(store, lambda part: {"pairs": write_variant_part(store, part, folder, variant, pruning, seed)})
    summary = {"variant": variant, "pairs": sum(c["pairs"] for c in counts), "response_level_pairs": 0,
               "parts": len(counts)}
    write_text_atomically(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def grade_store(store: Path) -> dict[str, Any]:
    """Detection precision, recall and F1 of every instruction-level row of ``store`` against its
    record's ground truth, and how many records have one."""
    return sum_detection_counts(over_parts(store, lambda part: grade_store_part(store, part)))
