"""Stage 1c, optional: keep the samples whose answers show what LeaF should teach.

Following the paper, a sample is worth distilling when the teacher answers the original
right and the student answers it wrong, and a counterfactual is worth keeping when the
student answers it right (removing the span fixed the student's reasoning). Generation
happens elsewhere (vLLM through Ray Data); this module builds the generation requests and
applies the rules to their answers, in plain Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from leaf_ray.config import VerificationConfig
from leaf_ray.data import Record, TrainingPair
from leaf_ray.checkers import resolve_checker


def generation_requests(pairs: Sequence[TrainingPair]) -> list[dict[str, Any]]:
    """One row per prompt to answer: ``key`` (the record id), ``kind``, ``instruction``, ``answer``."""
    rows = [{"key": p.original.id, "kind": "original", "instruction": p.original.instruction,
             "answer": p.original.answer} for p in pairs]
    rows += [{"key": c.id, "kind": "counterfactual", "instruction": c.instruction, "answer": c.answer}
             for p in pairs for c in p.counterfactuals]
    missing = [row["key"] for row in rows if row["answer"] is None]
    if missing:
        raise ValueError(f"verification needs an 'answer' on every record; {len(missing)} have none, "
                         f"first: {missing[0]!r}")
    return rows


@dataclass
class Selection:
    pairs: list[TrainingPair]
    summary: dict[str, Any]


def select(pairs: Sequence[TrainingPair], student_answers: Mapping[str, str], teacher_answers: Mapping[str, str],
           config: VerificationConfig) -> Selection:
    """Apply the keep rules to generated answers (keyed by record id).

    A counterfactual is only kept with its original, since it trains as that original's pair.
    """
    check = resolve_checker(config.checker)
    originals = [p.original for p in pairs]
    student_right = {r.id: check(student_answers[r.id], str(r.answer)) for r in originals}
    teacher_right = {r.id: check(teacher_answers[r.id], str(r.answer)) for r in originals} if teacher_answers else {}

    def keep_original(record: Record) -> bool:
        if config.keep_originals == "all":
            return True
        if config.keep_originals == "teacher_right":
            return teacher_right[record.id]
        return teacher_right[record.id] and not student_right[record.id]

    cf_right = {c.id: check(student_answers[c.id], str(c.answer)) for p in pairs for c in p.counterfactuals}
    kept = [TrainingPair(p.original, [c for c in p.counterfactuals
                                      if config.keep_counterfactuals == "all" or cf_right[c.id]])
            for p in pairs if keep_original(p.original)]
    summary = {
        "originals": len(originals), "counterfactuals": len(cf_right),
        "kept_originals": len(kept), "kept_counterfactuals": sum(len(p.counterfactuals) for p in kept),
        "student_accuracy_original": sum(student_right.values()) / max(len(originals), 1),
        "student_accuracy_counterfactual": sum(cf_right.values()) / max(len(cf_right), 1),
        "rules": {"keep_originals": config.keep_originals, "keep_counterfactuals": config.keep_counterfactuals},
    }
    if teacher_right:
        summary["teacher_accuracy_original"] = sum(teacher_right.values()) / max(len(originals), 1)
    return Selection(kept, summary)
