"""Confounder thresholds, span pruning and counterfactual records.

Input is a sample's :class:`~leaf_ray.detection.sensitivity.UnitScores` (per-unit LeaF diff over the
scored text). Units with a low diff are confounders; contiguous confounders form spans;
each span, cut from the text, gives one counterfactual. Text outside a cut is kept byte
for byte, so a counterfactual is always ``text[:start] + text[end:]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leaf_ray.config import PruningConfig
from leaf_ray.data import Record
from leaf_ray.detection.sensitivity import UnitScores
from leaf_ray.detection.units import Unit


def threshold_value(diff: np.ndarray, config: PruningConfig) -> float:
    """The diff value at or below which a unit is a confounder.

    The quantile rule takes the official code's order statistic ``sorted(diff)[floor(n*q)]``
    (not an interpolated quantile), capped at ``quantile_cap``.
    """
    if config.threshold == "absolute":
        return config.tau
    ordered = np.sort(diff)
    return float(min(ordered[int(len(ordered) * config.quantile)], config.quantile_cap))


def confounder_mask(scores: UnitScores, config: PruningConfig) -> tuple[np.ndarray, float]:
    """Per unit, whether it is a confounder; and the threshold used.

    The threshold is taken over the scored population (:attr:`UnitScores.scored`).
    Whitespace and lone backslashes are never confounders. A diff with no spread (one
    unit, or all equal) carries no signal, so nothing is masked. ``grow_spans`` then widens
    the mask to whole clauses (:func:`grow_to_clauses`), and ``max_spans`` keeps the units of
    the spans with the lowest diff.
    """
    if config.threshold == "iterative":
        raise ValueError("threshold 'iterative' scores the texts it cuts again: run it through "
                         "leaf_ray.detection.scorer.detect")
    scored = scores.scored
    mask = np.zeros(len(scores.units), dtype=bool)
    values = scores.diff[scored]
    if values.size == 0 or not values.max() > values.min():
        return mask, math.nan
    thr = threshold_value(values, config)
    mask[scored] = values <= thr
    mask &= scores.maskable
    if config.grow_spans != "none":
        mask = grow_to_clauses(scores.units, mask, config.grow_spans)
    if config.max_spans is not None:
        spans = find_spans(scores, mask, config.break_at_newlines, config.grow_spans)
        mask[:] = False
        for span in sorted(spans, key=lambda s: s.min_diff)[:config.max_spans]:
            mask[list(span.units)] = True
    return mask, thr


CLAUSE_ENDS = {"clause": ".!?;,", "sentence": ".!?"}


def clause_ids(units: Sequence[Unit], how: str) -> np.ndarray:
    """Per unit, the index of the clause (or sentence) it belongs to; -1 for line breaks.

    A clause ends after a unit ending in one of ``CLAUSE_ENDS[how]`` that is followed by
    whitespace or the end of the text, outside brackets (so ``3.5``, ``x,y`` and ``f(x, 2)``
    stay whole), and at a line break.
    """
    ids = np.zeros(len(units), dtype=np.int64)
    clause = depth = 0
    for i, unit in enumerate(units):
        if unit.is_space and unit.has_line_break:
            ids[i] = -1
            clause += 1
            continue
        ids[i] = clause
        depth = max(depth + sum(unit.text.count(c) for c in "([{") - sum(unit.text.count(c) for c in ")]}"), 0)
        following = units[i + 1].text if i + 1 < len(units) else " "
        if depth == 0 and unit.text.rstrip()[-1:] in CLAUSE_ENDS[how] and following[:1].isspace():
            clause += 1
    return ids


def grow_to_clauses(units: Sequence[Unit], mask: np.ndarray, how: str) -> np.ndarray:
    """``mask`` with every maskable unit of each clause that holds a masked unit."""
    ids = clause_ids(units, how)
    maskable = np.array([u.is_maskable for u in units], dtype=bool)
    return mask | (np.isin(ids, ids[mask & (ids >= 0)]) & maskable)


@dataclass(frozen=True)
class Span:
    """A cut: ``text[start:end]`` is removed. ``units`` are the masked units it covers."""

    start: int
    end: int
    units: tuple[int, ...]
    min_diff: float


def cut_range(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen a cut over one neighbouring run of spaces so no double space is left behind
    (newlines are kept: they carry structure)."""
    def is_gap(s: str) -> bool:
        return bool(s) and not s.strip() and "\n" not in s

    after = re.match(r"\s+", text[end:])
    before = re.search(r"\s+$", text[:start])
    if after and is_gap(after.group()) and (start == 0 or before):
        return start, end + after.end()
    if before and is_gap(before.group()) and (end == len(text) or after):
        return before.start(), end
    return start, end


def joins_spans(unit: Unit, kind: str, break_at_newlines: bool) -> bool:
    """Whether an unmasked unit between two masked ones leaves them one span: spaces do between
    text units, line breaks only when ``break_at_newlines`` is off. Between tokens nothing
    does, as in the official code (a masked run is a run of adjacent token indices)."""
    return kind == "text" and unit.is_space and not (break_at_newlines and unit.has_line_break)


def find_spans(scores: UnitScores, mask: np.ndarray, break_at_newlines: bool = True,
               clauses: str = "none") -> list[Span]:
    """Group masked units into spans (see :func:`joins_spans`); with ``clauses`` (a
    ``grow_spans`` setting) a span also ends where a clause does, so each grown clause is a
    counterfactual of its own."""
    spans: list[Span] = []
    run: list[int] = []
    clause_of = clause_ids(scores.units, clauses) if clauses != "none" else None

    def close() -> None:
        if run:
            first, last = scores.units[run[0]], scores.units[run[-1]]
            start, end = cut_range(scores.text, first.start, last.end)
            spans.append(Span(start, end, tuple(run), float(np.min(scores.diff[run]))))
            run.clear()

    for i, unit in enumerate(scores.units):
        if mask[i]:
            if clause_of is not None and run and clause_of[run[-1]] != clause_of[i]:
                close()
            run.append(i)
        elif not joins_spans(unit, scores.kind, break_at_newlines):
            close()
    close()
    return spans


def cut(text: str, ranges: Sequence[tuple[int, int]]) -> str:
    """``text`` with every ``(start, end)`` range removed; everything else is kept as is."""
    pieces, pos = [], 0
    for start, end in sorted(ranges):
        pieces.append(text[pos:start])
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


def counterfactuals(record: Record, scores: UnitScores, config: PruningConfig, *,
                    level: str = "instruction", text_offset: int = 0,
                    mask: np.ndarray | None = None, threshold: float | None = None) -> list[dict[str, Any]]:
    """Counterfactual records (corpus schema + provenance) for one scored record.

    ``scores.text`` is the scored text: the instruction, or in response-level mode the
    reasoning prefix, which starts at ``text_offset`` in the response. A response-level
    counterfactual keeps the pruned prefix as context: its ``target_start`` is where the
    prefix now ends, and only what follows is learned. ``mask`` overrides the detected
    confounders (the random and oracle controls).
    """
    if mask is None:
        mask, threshold = confounder_mask(scores, config)
    thr = math.nan if threshold is None else threshold
    spans = find_spans(scores, mask, config.break_at_newlines, config.grow_spans)
    groups = [[s] for s in spans] if config.mode == "span" else ([spans] if spans else [])
    source = record.instruction if level == "instruction" else record.response
    prefix_end = text_offset + len(scores.text)
    out = []
    for index, group in enumerate(groups):
        shifted = [Span(s.start + text_offset, s.end + text_offset, s.units, s.min_diff) for s in group]
        new_text = cut(source, [(s.start, s.end) for s in shifted])
        instruction, response = (new_text, record.response) if level == "instruction" else (record.instruction, new_text)
        where = {} if level == "instruction" else {
            "target_start": prefix_end - sum(s.end - s.start for s in shifted)}
        out.append({
            "id": f"{record.id}#{'cf' if level == 'instruction' else 'rcf'}{index}",
            "instruction": instruction,
            "response": response,
            "answer": record.answer,
            "meta": record.meta,
            "source_id": record.id,
            "span_index": index,
            "level": level,
            "removed_text": [source[s.start:s.end] for s in shifted],
            "char_ranges": [[s.start, s.end] for s in shifted],
            "threshold": thr,
            **where,
        })
    return out


def random_mask_like(scores: UnitScores, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A control mask: for each detected span, a span of as many maskable units at a random
    position, so the same amount of text is cut from random places."""
    solid = np.flatnonzero(scores.maskable)
    out = np.zeros_like(mask)
    for span in find_spans(scores, mask):
        width = len(span.units)
        start = rng.integers(0, len(solid) - width + 1)
        out[solid[start:start + width]] = True
    return out


def mask_of_spans(scores: UnitScores, spans: list[tuple[int, int]]) -> np.ndarray:
    """Mask of the maskable units inside the given character ranges (the oracle control)."""
    return np.array([u.is_maskable and any(a <= u.start and u.end <= b for a, b in spans) for u in scores.units])


# --------------------------------------------------------------------------- response level

def split_steps(response: str, how: str, num_segments: int = 4) -> list[tuple[int, int]]:
    """Character ranges of the reasoning steps; together they cover the response."""
    if how == "line":
        bounds = [m.end() for m in re.finditer(r"\n", response)]
    elif how == "sentence":
        bounds = [m.end() for m in re.finditer(r"(?<=[.!?])\s+", response)]
    elif how == "segments":
        units = [m.end() for m in re.finditer(r"\S+", response)]
        size = max(1, math.ceil(len(units) / num_segments))
        bounds = [units[i - 1] for i in range(size, len(units), size)]
    else:
        raise ValueError(f"unknown response split {how!r}; use line, sentence or segments")
    edges = [0] + [b for b in bounds if 0 < b < len(response)] + [len(response)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if response[a:b].strip()]


def response_prefix(response: str, how: str, num_segments: int, prefix_fraction: float
                    ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(prefix range, next-step range) in the response, or None when it has a single step."""
    steps = split_steps(response, how, num_segments)
    if len(steps) < 2:
        return None
    k = min(max(1, round(prefix_fraction * len(steps))), len(steps) - 1)
    return (0, steps[k - 1][1]), steps[k]
