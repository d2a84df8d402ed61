"""The students a run can distil, each defined once with its rules.

| variant              | lam      | batch | counterfactuals cut at            |
|----------------------|----------|-------|-----------------------------------|
| kd                   | 1        | 1x    | none (the paper's "KD w/o mask")  |
| kd_compute_matched   | 1        | 2x    | none; as many sequences as LeaF   |
| leaf                 | config's | 1x    | the detected confounder spans     |
| leaf_instr_resp      | config's | 1x    | leaf's, plus a pair per record    |
                                              whose reasoning prefix and
                                              instruction are both cut
| random               | config's | 1x    | random spans, as much text        |
| oracle               | config's | 1x    | the ground-truth confounders      |
| oracle_instr_resp    | config's | 1x    | oracle's, plus the ground truth   |
                                              cut from prefix and instruction

A response-level counterfactual of the ``*_instr_resp`` variants cuts the record's instruction
confounders too (those its instruction-level pair cuts): a reasoning that restates a prompt's
shortcut leaves it in both places, and a counterfactual that removes only one copy still
lets the student copy the other.

:func:`variant_config` turns one distillation config into a variant's, and says what it
changed; :func:`variant_pairs` builds a variant's training pairs from scored records.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from leaf_ray.config import DistillationConfig, PruningConfig
from leaf_ray.data import Record, TrainingPair
from leaf_ray.detection.pruning import counterfactuals, cut, find_spans, mask_of_spans, random_mask_like
from leaf_ray.detection.scorer import ScoredRecord
from leaf_ray.detection.store import read_part_pairs, read_store_part
from leaf_ray.evaluation import confounder_spans


@dataclass(frozen=True)
class Variant:
    what: str
    lam: float | None  # fixed lam, or None: the config's
    batch_multiplier: int
    spans: Literal["none", "detected", "random", "oracle"]
    response_level: bool = False  # also trains on pairs cut in the reasoning prefix


VARIANTS: dict[str, Variant] = {
    "kd": Variant("plain KD on the originals", 1.0, 1, "none"),
    "kd_compute_matched": Variant("plain KD with twice the batch, as many sequences per step as LeaF", 1.0, 2, "none"),
    "leaf": Variant("the hybrid loss, counterfactuals cut at the detected confounders", None, 1, "detected"),
    "leaf_instr_resp": Variant("LeaF on instruction and reasoning-prefix counterfactuals", None, 1, "detected",
                               response_level=True),
    "random": Variant("control: as much text cut at random places", None, 1, "random"),
    "oracle": Variant("control: the ground-truth confounders cut", None, 1, "oracle"),
    "oracle_instr_resp": Variant("control: the ground-truth confounders cut from the instruction and the "
                                 "reasoning prefix", None, 1, "oracle", response_level=True),
}


def variant_config(base: DistillationConfig, variant: str) -> tuple[DistillationConfig, list[str]]:
    """The distillation config of ``variant`` and a line per setting the variant overrode.

    A shared section (a pipeline's, written for LeaF) is normalised to each variant. A
    section that names ``variant`` itself and sets a ``lam`` the variant forbids is a
    contradiction, and is rejected with the field to change.
    """
    rules = VARIANTS[variant]
    if (base.variant == variant and rules.lam is not None and "lam" in base.model_fields_set
            and base.lam != rules.lam):
        raise ValueError(f"distillation.lam: variant {variant!r} trains with lam = {rules.lam} ({rules.what}); "
                         f"drop lam or set it to {rules.lam}")
    update: dict = {"variant": variant}
    if rules.lam is not None:
        update["lam"] = rules.lam
    if rules.batch_multiplier != 1:
        update["batch_size"] = base.batch_size * rules.batch_multiplier
    changes = [f"{key}: {getattr(base, key)} -> {value}" for key, value in update.items()
               if key != "variant" and getattr(base, key) != value]
    # model_validate, not model_copy: the copy must pass the same checks as a file would.
    return DistillationConfig.model_validate({**base.model_dump(), **update}), changes


def variant_masks(variant: str, scored: Sequence[ScoredRecord], detected: Sequence[np.ndarray], seed: int
                  ) -> list[np.ndarray]:
    """Per scored record, the units ``variant`` cuts: the detector's (``detected``), as many at
    random places, or the ground truth's."""
    spans = VARIANTS[variant].spans
    masks = []
    for s, mask in zip(scored, detected):
        if spans == "none":
            mask = np.zeros(len(s.scores.units), dtype=bool)
        elif spans == "random":
            mask = random_mask_like(s.scores, mask, record_rng(seed, s.record.id))
        elif spans == "oracle":
            truth = confounder_spans(s.record.meta, level=s.level)  # in the instruction / the response
            mask = mask_of_spans(s.scores, [(a - s.text_offset, b - s.text_offset) for a, b in truth])
        masks.append(mask)
    return masks


def record_rng(seed: int, record_id: str) -> np.random.Generator:
    """A record's own random stream, so that its control spans do not depend on which records
    were drawn before it: a set built part by part, on any number of workers, is the same."""
    return np.random.default_rng([seed, zlib.crc32(record_id.encode())])


def scored_part(store: Path, part: str, level: str = "instruction") -> tuple[list[ScoredRecord], list[np.ndarray]]:
    """One score-store part's records at ``level``, by id, with the detector's masks."""
    rows, originals = read_store_part(store, part)
    records = {row["id"]: Record.from_dict(row) for row in originals}
    rows = sorted((row for row in rows if row["level"] == level), key=lambda row: row["id"])
    return ([ScoredRecord.from_row(row, records[row["id"]]) for row in rows],
            [np.array(row["masked"], dtype=bool) for row in rows])


def part_pairs(variant: str, store: Path, detected_set: Path, part: str, pruning: PruningConfig, seed: int,
               level: str = "instruction") -> list[TrainingPair]:
    """``variant``'s pairs at ``level`` from one part: the detector's own (the part of that name
    in ``detected_set``, the scoring or verification output), or cut from ``store``'s scores."""
    if VARIANTS[variant].spans == "detected":
        return read_part_pairs(detected_set, part)
    scored, detected = scored_part(store, part, level)
    return variant_pairs(variant, scored, pruning, seed, detected)


def part_instruction_cuts(variant: str, store: Path, part: str, pruning: PruningConfig, seed: int
                          ) -> dict[str, list[tuple[int, int]]]:
    """:func:`instruction_cuts` of one score-store part's records."""
    scored, detected = scored_part(store, part)
    return instruction_cuts(variant, scored, pruning, seed, detected)


def variant_pairs(variant: str, scored: Sequence[ScoredRecord], pruning: PruningConfig, seed: int,
                  detected: Sequence[np.ndarray]) -> list[TrainingPair]:
    """Originals with the counterfactuals ``variant`` trains on, cut from their scores.

    ``detected``: the detector's mask of each scored record (:func:`leaf_ray.detection.scorer.detect`,
    or a scores file's ``masked``)."""
    pairs = []
    for s, mask in zip(scored, variant_masks(variant, scored, detected, seed)):
        rows = [] if VARIANTS[variant].spans == "none" else counterfactuals(
            s.record, s.scores, pruning, level=s.level, text_offset=s.text_offset, mask=mask)
        pairs.append(s.pair(rows))
    return pairs


def with_instruction_cuts(pair: TrainingPair, cuts: dict[str, list[tuple[int, int]]]) -> TrainingPair:
    """A response-level pair whose counterfactuals also lose the instruction ranges ``cuts`` holds
    for its record (:func:`instruction_cuts`)."""
    ranges = cuts.get(pair.original.id)
    if pair.level != "response" or not ranges:
        return pair
    return replace(pair, counterfactuals=[replace(c, instruction=cut(c.instruction, ranges))
                                          for c in pair.counterfactuals])


def instruction_cuts(variant: str, scored: Sequence[ScoredRecord], pruning: PruningConfig, seed: int,
                     detected: Sequence[np.ndarray]) -> dict[str, list[tuple[int, int]]]:
    """Per record id, the instruction ranges ``variant`` cuts at instruction level (all its spans
    together), for the response-level counterfactuals of the same records."""
    return {s.record.id: [(span.start, span.end) for span in find_spans(s.scores, mask, pruning.break_at_newlines,
                                                                       pruning.grow_spans)]
            for s, mask in zip(scored, variant_masks(variant, scored, detected, seed))}
