"""``leaf-ray bench detect``: every detector scored against the embedded benchmark's ground truth.

For each family, the first ``detection_records`` distillation records are scored once per
method (:data:`~leaf_ray.detection.detectors.METHODS`); each post-step then masks those scores
(:data:`~leaf_ray.detection.detectors.POST_STEPS`), and the masks are graded at the clause and
the number level, as the build grades the paper's detector. The reasoning family is also
graded at response level, in the reasoning prefix that restates its shortcut clause (the
build's ``response_detection``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from leaf_ray.config import BenchmarkConfig, PruningConfig, ScoringConfig
from leaf_ray.data import iter_records
from leaf_ray.detection.detectors import METHODS, POST_STEPS, detector_configs
from leaf_ray.models import load_model
from leaf_ray.synthetic.build import grade_scored, score_for_detection


LEVEL_KEYS = {"instruction": "detection_methods", "response": "response_detection_methods"}
COUNT_KEYS = ("false_cut_rate", "multi_confounder_recall", "recall_by_count", "cut_records_by_count",
              "records_by_count")


def leaderboard(embedded: Path, families: list[str], records: int = BenchmarkConfig().detection_records,
                methods: tuple[str, ...] = METHODS) -> dict[str, dict[str, Any]]:
    """``{family: {"detection_methods": {detector: {"clause": P/R/F1, "number": P/R/F1, ...}}}}``,
    and ``response_detection_methods`` for the reasoning family."""
    teacher, tokenizer = load_model(embedded / "teacher")
    student, _ = load_model(embedded / "student")
    board: dict[str, dict[str, Any]] = {}
    for family in families:
        rows = [r.to_dict() for r in iter_records(embedded / "data" / family / "distill.jsonl")][:records]
        board[family] = {}
        for level in ["instruction"] + (["response"] if family == "reasoning" else []):
            graded_level = board[family].setdefault(LEVEL_KEYS[level], {})
            for method in tqdm(methods, desc=f"detect {family} ({level})", unit="method"):
                started = time.perf_counter()
                detection = score_for_detection(teacher, student, tokenizer, rows, level, method)
                seconds = time.perf_counter() - started
                for step in POST_STEPS:
                    _, pruning = detector_configs(method + step, ScoringConfig(corpus="-"), PruningConfig())
                    started = time.perf_counter()
                    masks = detection.masks(pruning)  # iterative pruning scores again: its time counts
                    graded = grade_scored(detection.scored, masks, pruning, level)
                    graded_level[method + step] = {
                        "clause": graded["clause"], "number": graded["number"],
                        "flagged_per_record": graded["clause"]["flagged_per_record"],
                        **{key: graded[key] for key in COUNT_KEYS},
                        "rule": graded["rule"], "records": len(rows),
                        "scoring_s": round(seconds + time.perf_counter() - started, 1),
                    }
    return board
