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


def original_key(pair: TrainingPair) -> str:
    """The generation key of a pair's original: its id, and its level when that is not the
    instruction (a record can have a pair at each level, answered from different prefixes)."""
    return pair.original.id if pair.level == "instruction" else f"{pair.original.id}@{pair.level}"


def generation_requests(pairs: Sequence[TrainingPair]) -> list[dict[str, Any]]:
    """One row per prompt to answer: ``key``, ``kind``, ``instruction``, ``prefix``, ``answer``.

    ``prefix`` is the part of the response the model continues from: empty at instruction
    level; at response level the reasoning prefix, pruned for a counterfactual, so the answer
    shows whether cutting the span from the reasoning changed where it leads.
    """
    def row(key: str, kind: str, record: Record) -> dict[str, Any]:
        return {"key": key, "kind": kind, "instruction": record.instruction, "prefix": record.prefix,
                "answer": record.answer}

    rows = [row(original_key(p), "original", p.original) for p in pairs]
    rows += [row(c.id, "counterfactual", c) for p in pairs for c in p.counterfactuals]
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
    originals = {original_key(p): p.original for p in pairs}
    student_right = {k: check(student_answers[k], str(r.answer)) for k, r in originals.items()}
    teacher_right = {k: check(teacher_answers[k], str(r.answer)) for k, r in originals.items()} if teacher_answers else {}

    def keep_original(pair: TrainingPair) -> bool:
        if config.keep_originals == "all":
            return True
        if config.keep_originals == "teacher_right":
            return teacher_right[original_key(pair)]
        return teacher_right[original_key(pair)] and not student_right[original_key(pair)]

    cf_right = {c.id: check(student_answers[c.id], str(c.answer)) for p in pairs for c in p.counterfactuals}
    kept = [TrainingPair(p.original, [c for c in p.counterfactuals
                                      if config.keep_counterfactuals == "all" or cf_right[c.id]], p.level)
            for p in pairs if keep_original(p)]
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
