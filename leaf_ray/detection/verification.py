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
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from leaf_ray.checkers import resolve_checker
from leaf_ray.config import VerificationConfig
from leaf_ray.data import Record, TrainingPair, write_jsonl
from leaf_ray.detection.store import read_part_pairs, write_training_part


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
    counts: dict[str, int]  # answered, right and kept: they add up over parts
    config: VerificationConfig

    @property
    def summary(self) -> dict[str, Any]:
        return selection_summary(self.counts, self.config)


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
    counts = {"originals": len(originals), "counterfactuals": len(cf_right), "kept_originals": len(kept),
              "kept_counterfactuals": sum(len(p.counterfactuals) for p in kept),
              "student_right_originals": sum(student_right.values()),
              "student_right_counterfactuals": sum(cf_right.values())}
    if teacher_answers:
        counts["teacher_right_originals"] = sum(teacher_right.values())
    return Selection(kept, counts, config)


def selection_summary(counts: Mapping[str, int], config: VerificationConfig) -> dict[str, Any]:
    """How many originals and counterfactuals were answered and kept, and the accuracies."""
    originals, cfs = counts.get("originals", 0), counts.get("counterfactuals", 0)
    summary = {
        "originals": originals, "counterfactuals": cfs,
        "kept_originals": counts.get("kept_originals", 0), "kept_counterfactuals": counts.get("kept_counterfactuals", 0),
        "student_accuracy_original": counts.get("student_right_originals", 0) / max(originals, 1),
        "student_accuracy_counterfactual": counts.get("student_right_counterfactuals", 0) / max(cfs, 1),
        "rules": {"keep_originals": config.keep_originals, "keep_counterfactuals": config.keep_counterfactuals},
    }
    if "teacher_right_originals" in counts:
        summary["teacher_accuracy_original"] = counts["teacher_right_originals"] / max(originals, 1)
    return summary


def read_part_answers(folder: Path, part: str) -> dict[str, str]:
    """One part's generated answers (key -> text) from a Parquet folder partitioned by part
    (``<folder>/part=<part>/``, as Ray Data's ``write_parquet(partition_cols=["part"])`` writes it);
    none when the part has none."""
    path = folder / f"part={part}"
    if not path.is_dir():
        return {}
    table = pq.read_table(path, columns=["key", "text"])
    return dict(zip(table.column("key").to_pylist(), table.column("text").to_pylist()))


def verify_part(source: Path, part: str, generated: Path, output: Path, config: VerificationConfig) -> dict[str, int]:
    """Keep the pairs of one training-set part of ``source`` that the rules select, given the
    answers in ``generated/student`` and ``generated/teacher``: the kept pairs become the part of
    the same name in ``output``, every answer goes to ``output/answers/<part>``; returns the
    part's counts, which add up over parts."""
    pairs = read_part_pairs(source, part)
    student, teacher = read_part_answers(generated / "student", part), read_part_answers(generated / "teacher", part)
    selection = select(pairs, student, teacher, config)
    write_training_part(output, part, selection.pairs)
    write_jsonl(output / "answers" / part, [{"key": row["key"], "kind": row["kind"], "student": student[row["key"]],
                                              "teacher": teacher.get(row["key"])} for row in generation_requests(pairs)])
    return selection.counts
