"""Iterative clause pruning: a detector that decides per record how much to cut, nothing included.

The quantile rule flags the lowest tenth of every record's diff, so it cuts something from
every record, and ``max_spans`` must be told how many confounders a record holds. This rule
needs neither. Each round, on the record's text as cut so far:

1. each clause's *reliance share* per model is its units' share of that model's attribution
   mass (the squared unit scores before normalisation), and its *gap* is the student's share
   minus the teacher's;
2. the clause with the largest gap is cut when the gap is at least ``strong_gap``, or at least
   ``min_gap`` while the student is about as sure of the target as the teacher (mean entropy
   over the target tokens at most ``entropy_margin`` nats above the teacher's);
3. the record is scored again without it, and the next round looks for the next one.

It stops at the first round that cuts nothing, or after ``max_rounds``. Why these signals: a
shortcut is reliance the teacher does not share that still lets the student answer as surely
as the teacher; when a record holds two, the student leans on one and the second shows once
the first is gone. Once every shortcut is cut the student is unsure, and what it leans on then
is guesswork, not a shortcut, so nothing more is cut; a record without a confounder usually
stops at round one. Thresholds were chosen on the embedded benchmark's distillation records
500-999 (README, "Choosing a detection method") and are ``PruningConfig`` fields.

Plain numpy around the scorer's own passes; no Ray here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from leaf_ray.config import PruningConfig
from leaf_ray.data import RecordError
from leaf_ray.detection.pruning import clause_ids, cut, cut_range
from leaf_ray.detection.sensitivity import UnitScores


def clause_gaps(scores: UnitScores, how: str) -> list[tuple[np.ndarray, float]]:
    """Per clause of the scored text (``how``: a ``grow_spans`` setting), its maskable units and
    its gap: the student's share of attribution mass minus the teacher's."""
    population = scores.scored
    teacher = np.where(population, np.nan_to_num(scores.teacher_raw), 0.0) ** 2
    student = np.where(population, np.nan_to_num(scores.student_raw), 0.0) ** 2
    teacher_total, student_total = max(teacher.sum(), 1e-30), max(student.sum(), 1e-30)
    ids = clause_ids(scores.units, how)
    out = []
    for clause in np.unique(ids[ids >= 0]):
        members = np.flatnonzero((ids == clause) & scores.maskable)
        if members.size:
            out.append((members, student[members].sum() / student_total - teacher[members].sum() / teacher_total))
    return out


def cuts_clause(gap: float, teacher_entropy: float, student_entropy: float, config: PruningConfig) -> bool:
    return gap >= config.strong_gap or (gap >= config.min_gap
                                        and student_entropy - teacher_entropy <= config.entropy_margin)


def to_original(position: int, removed: Sequence[tuple[int, int]]) -> int:
    """A position in the text left after ``removed`` (ranges of the original) were cut, in the original."""
    for start, end in sorted(removed):
        if position >= start:
            position += end - start
    return position


def iterative_masks(scorer, prepared: Sequence, scored: Sequence, config: PruningConfig) -> list[np.ndarray]:
    """Per record, the units of its scores (``scored[i]``, round 0) in the clauses iterative
    pruning cuts. ``scorer`` is the :class:`~leaf_ray.detection.scorer.PairScorer` that prepared
    and scored them; every later round scores only the records the previous round cut."""
    rounds = min(config.max_rounds, config.max_spans or config.max_rounds)
    removed: list[list[tuple[int, int]]] = [[] for _ in scored]  # cut ranges in the round-0 scored text
    current = list(zip(range(len(scored)), prepared, scored))
    for round_ in range(rounds):
        if not current:
            break
        tops = [max(clause_gaps(s.scores, config.grow_spans), key=lambda clause: clause[1], default=None)
                for _, _, s in current]
        # Entropies decide only gaps between min_gap and strong_gap: one forward per model, for those.
        undecided = [k for k, top in enumerate(tops) if top and config.min_gap <= top[1] < config.strong_gap]
        entropies = dict(zip(undecided, scorer.entropies([current[k][1] for k in undecided])))
        survivors = []
        for k, ((i, p, s), top) in enumerate(zip(current, tops)):
            if top is None:
                continue
            members, gap = top
            if not cuts_clause(gap, *entropies.get(k, (0.0, 0.0)), config):
                continue
            units = s.scores.units
            start, end = cut_range(s.scores.text, units[members[0]].start, units[members[-1]].end)
            removed[i].append((to_original(start, removed[i]), to_original(end - 1, removed[i]) + 1))
            if round_ == rounds - 1:
                continue  # no round left to score the cut text for
            try:
                survivors.append((i, next_round(scorer, prepared[i], scored[i], removed[i])))
            except RecordError:  # nothing left to score: nothing more to cut
                continue
        rescored = scorer.score_prepared([p for _, p in survivors])
        current = [(i, p, s) for (i, p), s in zip(survivors, rescored)]
    masks = []
    for s, cuts in zip(scored, removed):
        units = s.scores.units
        masks.append(np.array([u.is_maskable and any(a <= u.start and u.end <= b for a, b in cuts) for u in units],
                              dtype=bool))
    return masks


def next_round(scorer, first, scored, removed: Sequence[tuple[int, int]]):
    """The record with ``removed`` cut from its scored text, prepared to score the same target."""
    record, text = first.record, cut(scored.scores.text, removed)
    if first.next_step is None:  # instruction level: the scored text is the instruction
        return scorer.prepare(replace(record, instruction=text))
    offset, shrink = first.text_offset, len(scored.scores.text) - len(text)
    prefix_end = offset + len(scored.scores.text)
    response = record.response[:offset] + text + record.response[prefix_end:]
    step = (first.next_step[0] - shrink, first.next_step[1] - shrink)
    return scorer.prepare(replace(record, response=response), ((offset, offset + len(text)), step))
