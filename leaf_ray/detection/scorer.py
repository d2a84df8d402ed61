"""Confounder detection for whole records: render, score teacher and student, compare, prune.

Three steps, each needing only what it names, so that the Ray job runs them as separate
stages (CPU, model, CPU) that overlap: :class:`RecordPreparer` renders and tokenizes with the
tokenizers; :func:`model_stage` runs the passes with the models (:class:`PairScorer`);
:func:`prune` projects, decides and cuts. :class:`ScoringBatchProcessor` runs all three on one
batch in one process, and any local caller uses it. Plain PyTorch; no Ray here.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from leaf_ray.config import PruningConfig, ScoringConfig
from leaf_ray.data import Record, RecordError, TrainingPair, length_batches, render_sample
from leaf_ray.detection.iterative import iterative_masks
from leaf_ray.detection.occlusion import unit_occlusion
from leaf_ray.detection.pruning import confounder_mask, counterfactuals, response_prefix
from leaf_ray.detection.sensitivity import (
    ScoringItem,
    UnitScores,
    collate,
    compare_unit_scores,
    prepare_for_scoring,
    project_to_units,
    sample_entropies,
    token_sensitivity,
)
from leaf_ray.detection.store import error_key, error_row, scored_row, write_part
from leaf_ray.detection.units import Unit, split_units, token_units
from leaf_ray.models import bf16_autocast_enabled, load_model


def nan_to_none(value: float) -> float | None:
    """JSON has no NaN: scores of whitespace units (and undefined thresholds) become null."""
    return None if np.isnan(value) else float(value)


def require_scorable(item: ScoringItem, record_id: str | None = None) -> None:
    """A sample needs context tokens to score and response tokens for the loss."""
    if not item.context_tokens or not [i for i in item.target_tokens if i > 0]:
        raise RecordError("nothing to score: empty context or target after tokenization", record_id=record_id)


def context_spans(item: ScoringItem, origin: int) -> list[tuple[int, int]]:
    """Character spans of the item's context tokens in the scored text, which starts at
    ``origin`` in the rendered chat text."""
    return [(item.offsets[t][0] - origin, item.offsets[t][1] - origin) for t in item.context_tokens]


def unit_token_groups(units: Sequence[Unit], item: ScoringItem, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Per unit, the item's context tokens that overlap it (``spans``: their character spans in
    the scored text, from :func:`context_spans`); none for units that are never cut."""
    return [[t for t, (a, b) in zip(item.context_tokens, spans) if a < unit.end and b > unit.start]
            if unit.is_maskable else [] for unit in units]


@dataclass
class ScoredRecord:
    record: Record
    scores: UnitScores
    level: str
    text_offset: int  # where the scored text starts in the instruction / response
    num_tokens: int  # the student's rendered sequence length, for throughput

    @property
    def original(self) -> Record:
        """The record as it trains: at response level, learning only what follows the prefix."""
        if self.level == "instruction":
            return self.record
        return replace(self.record, target_start=self.text_offset + len(self.scores.text))

    def pair(self, counterfactual_rows: Sequence[dict]) -> TrainingPair:
        """The training pair of this record and counterfactual rows cut from its scores."""
        return TrainingPair(self.original, [Record.from_dict(r) for r in counterfactual_rows], self.level)

    def to_row(self, mask: Sequence[bool], threshold: float) -> dict:
        """One row of a scores file (Parquet / JSONL): per-unit lists, NaN as None."""
        def floats(values: np.ndarray) -> list[float | None]:
            return [None if math.isnan(v) else v for v in values.tolist()]

        units = self.scores.units
        return {
            "id": self.record.id, "level": self.level, "text_offset": self.text_offset,
            "unit_kind": self.scores.kind, "unit_text": [u.text for u in units], "unit_start": [u.start for u in units],
            "unit_end": [u.end for u in units], "teacher": floats(self.scores.teacher),
            "student": floats(self.scores.student), "diff": floats(self.scores.diff),
            **({"teacher_raw": floats(self.scores.teacher_raw), "student_raw": floats(self.scores.student_raw)}
               if self.scores.teacher_raw is not None else {}),
            "masked": [bool(m) for m in mask], "threshold": nan_to_none(threshold),
        }

    @classmethod
    def from_row(cls, row: dict, record: Record) -> ScoredRecord:
        """The inverse of :meth:`to_row` (without the mask, and the token count as 0)."""
        units = [Unit(s, e, t) for s, e, t in zip(row["unit_start"], row["unit_end"], row["unit_text"])]
        teacher, student, diff, teacher_raw, student_raw = (
            np.array([np.nan if v is None else v for v in row[k]], dtype=float) if k in row else None
            for k in ("teacher", "student", "diff", "teacher_raw", "student_raw"))
        scores = UnitScores("".join(row["unit_text"]), units, teacher, student, diff, row.get("unit_kind", "text"),
                            teacher_raw, student_raw)
        return cls(record, scores, row["level"], row["text_offset"], 0)


def same_tokenizer(first, second) -> bool:
    """Whether two tokenizers cut and render text identically: same vocabulary, merges,
    normalisation and special tokens (the serialised tokenizer), and same chat template."""
    if first is second:
        return True
    if not (getattr(first, "is_fast", False) and getattr(second, "is_fast", False)):
        return False  # a slow tokenizer fails each record in render_sample, with the reason
    return (first.chat_template == second.chat_template
            and first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str())


@dataclass
class Prepared:
    """A record rendered and tokenized for both models, with its scored text cut into units."""

    record: Record
    text: str
    text_offset: int
    items: tuple[ScoringItem, ScoringItem]  # teacher, student
    spans: tuple[list[tuple[int, int]], list[tuple[int, int]]]  # context tokens' spans in text, per model
    units: list[Unit]
    next_step: tuple[int, int] | None  # response level: the step whose loss scores the prefix


RawScores = tuple[np.ndarray, np.ndarray]  # teacher's and student's: per context token, or per unit (occlusion)


@contextmanager
def timed(seconds: Counter[str], phase: str) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] += time.perf_counter() - start


class RecordPreparer:
    """The CPU half of scoring a record: render and tokenize it for both models and cut its
    scored text into units (:meth:`prepare`). Needs the tokenizers only, so that the Ray job
    runs it in CPU processes ahead of the model stage."""

    def __init__(self, teacher_tokenizer, student_tokenizer, config: ScoringConfig,
                 seconds: Counter[str] | None = None):
        self.tokenizers = (teacher_tokenizer, student_tokenizer)
        # Same-family pairs (Llama 3.3 70B teaching Llama 3.2 1B) usually share a tokenizer and
        # template: then each record is rendered and tokenized once, not once per model.
        self.same_tokenizer = same_tokenizer(teacher_tokenizer, student_tokenizer)
        self.config = config
        self.seconds = Counter() if seconds is None else seconds

    @classmethod
    def from_paths(cls, teacher: str | Path, student: str | Path, config: ScoringConfig) -> RecordPreparer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student), config)

    def prepare(self, record: Record,
                split: tuple[tuple[int, int], tuple[int, int]] | None = None) -> Prepared:
        """Render and tokenize ``record`` for both models. At response level ``split`` (prefix
        range, next-step range in the response) overrides the configured split: iterative
        pruning keeps scoring the same step after cutting inside the prefix."""
        cfg = self.config
        if cfg.level == "instruction":
            text, offset, context, target = record.instruction, 0, None, None
        else:
            split = split or response_prefix(record.response, cfg.response_split, cfg.num_segments,
                                             cfg.prefix_fraction)
            if split is None:
                raise RecordError("response has a single step; nothing to score in response-level mode",
                                  record_id=record.id)
            (p0, p1), (s0, s1) = split
            text, offset, context, target = record.response[p0:p1], p0, (p0, p1), (s0, s1)
        items, origins = [], []
        for tokenizer in self.tokenizers[1:] if self.same_tokenizer else self.tokenizers:
            try:
                rendered = render_sample(tokenizer, record.instruction, record.response)
            except Exception as exc:  # tokenizer / template failures are per-record errors
                raise RecordError(f"tokenizer failure: {exc}", record_id=record.id) from exc
            if len(rendered.input_ids) > cfg.max_length:
                raise RecordError(f"too long: {len(rendered.input_ids)} tokens > max_length {cfg.max_length}",
                                  record_id=record.id)
            if context is None:
                item = ScoringItem.instruction_level(rendered)
                origin = rendered.instruction_span[0] - rendered.instruction_shift
            else:
                origin = rendered.response_span[0] - rendered.response_shift
                lo, hi = rendered.response_span
                item = ScoringItem(rendered.input_ids, rendered.offsets,
                                   (max(lo, origin + context[0]), min(hi, origin + context[1])),
                                   (max(lo, origin + target[0]), min(hi, origin + target[1])))
            require_scorable(item, record.id)
            items.append(item)
            origins.append(origin + offset)
        spans = (context_spans(items[0], origins[0]), context_spans(items[-1], origins[-1]))
        units = token_units(text, spans[1]) if cfg.units == "tokens" else split_units(text, cfg.unit_pattern)
        return Prepared(record, text, offset, (items[0], items[-1]), spans, units, target)

    def prepare_all(self, records: Sequence[Record]) -> tuple[list[Prepared], list[RecordError]]:
        """Every record prepared; records that cannot be scored come back as errors."""
        prepared, errors = [], []
        with timed(self.seconds, "render_and_tokenize"):
            for record in records:
                try:
                    prepared.append(self.prepare(record))
                except RecordError as exc:
                    errors.append(exc)
        return prepared, errors


def project(config: ScoringConfig, prepared: Sequence[Prepared], raw: Sequence[RawScores]) -> list[ScoredRecord]:
    """The CPU work after the passes: each record's raw scores per model onto its units, and
    the teacher compared with the student (:func:`compare_unit_scores`)."""
    scored = []
    for p, per_token in zip(prepared, raw):
        per_model = [per_token[m] if config.method == "occlusion"  # already per unit
                     else project_to_units(p.units, p.spans[m], per_token[m], p.text) for m in range(2)]
        scores = compare_unit_scores(p.text, p.units, per_model[0], per_model[1], config.units)
        scored.append(ScoredRecord(p.record, scores, config.level, p.text_offset, len(p.items[1].input_ids)))
    return scored


class PairScorer:
    """Scores records with a teacher and a student by ``config.method``: one forward+backward
    per model per batch for the gradient norm and gradient x input, ``ig_steps`` for
    integrated gradients, and a forward per unit for occlusion.

    ``seconds`` sums the wall time of each phase over every call (rendering and tokenizing,
    model passes, projection onto units, and the pruning and writing of the stage around it),
    to show where time goes besides the model passes.
    """

    def __init__(self, teacher, teacher_tokenizer, student, student_tokenizer, config: ScoringConfig):
        self.models = (prepare_for_scoring(teacher), prepare_for_scoring(student))
        self.seconds: Counter[str] = Counter()
        self.preparer = RecordPreparer(teacher_tokenizer, student_tokenizer, config, self.seconds)
        self.config = config

    def timing(self, phase: str):
        return timed(self.seconds, phase)

    @classmethod
    def from_paths(cls, teacher: str | Path, student: str | Path, config: ScoringConfig) -> PairScorer:
        t_model, t_tok = load_model(teacher, config.dtype, config.device, config.device_map)
        s_model, s_tok = load_model(student, config.dtype, config.device)
        return cls(t_model, t_tok, s_model, s_tok, config)

    def prepare(self, record: Record, split: tuple[tuple[int, int], tuple[int, int]] | None = None) -> Prepared:
        return self.preparer.prepare(record, split)

    def prepare_all(self, records: Sequence[Record]) -> tuple[list[Prepared], list[RecordError]]:
        return self.preparer.prepare_all(records)

    def model_scores(self, model_index: int, prepared: Sequence[Prepared]) -> list[np.ndarray]:
        """One model's raw scores per record: per context token for the gradient methods, per
        unit for occlusion. Batches hold similar lengths, so that padding stays small."""
        cfg, model = self.config, self.models[model_index]
        items = [p.items[model_index] for p in prepared]
        if cfg.method == "occlusion":
            groups = [unit_token_groups(p.units, p.items[model_index], p.spans[model_index]) for p in prepared]
            return unit_occlusion(model, items, groups, cfg.max_tokens_per_batch)
        # Integrated gradients runs its steps as one batch: it gets that many times fewer records.
        budget = max(cfg.max_tokens_per_batch // (cfg.ig_steps if cfg.method == "integrated_gradients" else 1), 1)
        scores: list[np.ndarray] = [np.zeros(0)] * len(items)
        for batch in length_batches([len(item.input_ids) for item in items], budget):
            attributions = token_sensitivity(model, [items[i] for i in batch], cfg.padding_side, cfg.method,
                                             cfg.ig_steps)
            for i, values in zip(batch, attributions):
                scores[i] = values
        return scores

    def autocast(self, model) -> torch.autocast:
        device = next(model.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=bf16_autocast_enabled(self.config.bf16_autocast, device))

    def score(self, records: Sequence[Record]) -> tuple[list[ScoredRecord], list[RecordError]]:
        """Score a batch of records; records that cannot be scored come back as errors."""
        prepared, errors = self.prepare_all(records)
        return self.score_prepared(prepared), errors

    def entropies(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """``[N, 2]``: per record, the teacher's and the student's mean entropy over the target
        tokens (one forward per model, batched by length)."""
        out = np.zeros((len(prepared), 2))
        with self.timing("model_passes"):
            for m, model in enumerate(self.models):
                items = [p.items[m] for p in prepared]
                for batch in length_batches([len(item.input_ids) for item in items], self.config.max_tokens_per_batch):
                    with self.autocast(model):
                        values = sample_entropies(model, collate([items[i] for i in batch], self.config.padding_side))
                    out[batch, m] = values.double().cpu().numpy()
        return out

    def passes(self, prepared: Sequence[Prepared]) -> list[RawScores]:
        """The model passes only: per record, the teacher's and the student's raw scores."""
        with self.timing("model_passes"):
            per_model = []
            for m, model in enumerate(self.models):
                with self.autocast(model):
                    per_model.append(self.model_scores(m, prepared))
        return list(zip(*per_model)) if prepared else []

    def score_prepared(self, prepared: Sequence[Prepared]) -> list[ScoredRecord]:
        raw = self.passes(prepared)
        with self.timing("projection"):
            return project(self.config, prepared, raw)


def detect(scorer: PairScorer, pruning: PruningConfig, records: Sequence[Record]
           ) -> tuple[list[ScoredRecord], list[np.ndarray], list[float], list[RecordError]]:
    """Score ``records`` and decide their confounders: the scored records, a mask over each one's
    units with the threshold that made it (NaN where none applies), and the records that
    failed. Iterative pruning (``threshold: iterative``) scores the texts it cuts again; every
    other rule works on the scores alone (:func:`confounder_mask`)."""
    prepared, errors = scorer.prepare_all(records)
    scored = scorer.score_prepared(prepared)
    return (scored, *decide(scorer, pruning, prepared, scored), errors)


@dataclass
class ScoringPass:
    """Records scored once: any pruning rule can then decide on them (:meth:`masks`), as the
    detection leaderboard and the benchmark's variants do. Every record must score."""

    scorer: PairScorer
    prepared: list[Prepared]
    scored: list[ScoredRecord]
    decided: dict[str, list[np.ndarray]] = field(default_factory=dict)  # by rule: iterative rules score again

    @classmethod
    def run(cls, scorer: PairScorer, records: Sequence[Record]) -> ScoringPass:
        prepared, errors = scorer.prepare_all(records)
        if errors:
            raise RecordError(f"{len(errors)} records failed to score, the first: {errors[0]}")
        return cls(scorer, prepared, scorer.score_prepared(prepared))

    def masks(self, pruning: PruningConfig) -> list[np.ndarray]:
        rule = pruning.model_dump_json()
        if rule not in self.decided:
            self.decided[rule] = decide(self.scorer, pruning, self.prepared, self.scored)[0]
        return self.decided[rule]


def decide(scorer: PairScorer, pruning: PruningConfig, prepared: Sequence[Prepared], scored: Sequence[ScoredRecord]
           ) -> tuple[list[np.ndarray], list[float]]:
    """The confounder masks (and thresholds) ``pruning`` makes of records ``scorer`` prepared and
    scored, as :func:`detect`; several rules can be tried on one scoring pass."""
    if pruning.threshold == "iterative":
        return iterative_masks(scorer, prepared, scored, pruning), [math.nan] * len(scored)
    with scorer.timing("pruning"):
        decided = [confounder_mask(s.scores, pruning) for s in scored]
    return [mask for mask, _ in decided], [threshold for _, threshold in decided]


@dataclass
class Passed:
    """A record after the model stage: prepared, with both models' raw scores, and its mask when
    the rule needed the models to decide it (iterative pruning scores the cut texts again)."""

    prepared: Prepared
    raw: RawScores
    mask: np.ndarray | None = None


def model_stage(scorer: PairScorer, pruning: PruningConfig, prepared: Sequence[Prepared]) -> list[Passed]:
    """The model passes of prepared records, and, for a rule that scores again, its decision
    (which projects too; the CPU stage after projects once more, a small price for the rule)."""
    raw = scorer.passes(prepared)
    masks: list[np.ndarray | None] = [None] * len(prepared)
    if pruning.threshold == "iterative":
        with scorer.timing("projection"):
            scored = project(scorer.config, prepared, raw)
        masks = iterative_masks(scorer, prepared, scored, pruning)
    return [Passed(p, r, m) for p, r, m in zip(prepared, raw, masks)]


@dataclass
class PrunedRecord:
    """A scored record's outputs: its scores row, its original row (as it trains, with its
    ``level``), its counterfactual rows (with provenance) and counts."""

    score: dict
    original: dict
    counterfactuals: list[dict]
    tokens: int
    masked_units: int
    scored_units: int


def prune(config: ScoringConfig, pruning: PruningConfig, passed: Sequence[Passed],
          seconds: Counter[str] | None = None) -> list[PrunedRecord]:
    """The CPU stage after the passes: project, decide (unless the model stage did) and cut the
    counterfactuals, into each record's outputs."""
    seconds = Counter() if seconds is None else seconds
    with timed(seconds, "projection"):
        scored = project(config, [p.prepared for p in passed], [p.raw for p in passed])
    with timed(seconds, "pruning"):
        decided = [(p.mask, math.nan) if p.mask is not None else confounder_mask(s.scores, pruning)
                   for p, s in zip(passed, scored)]
        return [PrunedRecord(s.to_row(mask, threshold), {**s.original.to_dict(), "level": s.level},
                             counterfactuals(s.record, s.scores, pruning, level=s.level, text_offset=s.text_offset,
                                             mask=mask, threshold=threshold),
                             s.num_tokens, int(mask.sum()), int(s.scores.scored.sum()))
                for s, (mask, threshold) in zip(scored, decided)]


def score_and_prune(scorer: PairScorer, pruning: PruningConfig, records: Sequence[Record]
                    ) -> tuple[list[PrunedRecord], list[RecordError]]:
    """The outputs of every record of a batch that scored, and the records that failed: the
    three stages of the Ray job (prepare, model passes, prune) one after another."""
    prepared, errors = scorer.prepare_all(records)
    return prune(scorer.config, pruning, model_stage(scorer, pruning, prepared), scorer.seconds), errors


def store_rows(keys: Sequence[str], scorer_name: str, pruned: Sequence[PrunedRecord],
               errors: Sequence[tuple[str, dict]]) -> list[dict]:
    """A :func:`~leaf_ray.detection.store.scored_row` per key: its outputs, or its error row
    (``errors``: (key, error row)); a key with neither is written as handled, with no output."""
    rows = {key: scored_row(key, scorer_name) for key in keys}
    for key, error in errors:
        rows[key] = scored_row(key, scorer_name, error=error)
    for p in pruned:
        key = p.score["id"]
        rows[key] = scored_row(key, scorer_name, p.score, p.original, p.counterfactuals, tokens=p.tokens,
                               masked_units=p.masked_units, scored_units=p.scored_units)
    return list(rows.values())


class ScoringBatchProcessor:
    """Stage 1 on one batch in one process: scores and prunes a batch of records into a row per
    key (:meth:`score_rows`), which the store writes (:func:`~leaf_ray.detection.store.write_part`).
    The Ray job runs the same three steps (prepare, :func:`model_stage`, :func:`prune`) as
    separate stages and writes parts of many batches; called directly, this does all of it
    for its one batch.

    ``keys`` name every row of the batch (a record id, or ``file:line`` for a row that did
    not parse); ``unreadable`` holds the rows that failed before scoring, with their keys.
    A part's marker lists every key, so a rerun skips all of them.
    """

    def __init__(self, scorer: PairScorer, pruning: PruningConfig, output: str | Path | None = None):
        self.scorer = scorer
        self.pruning = pruning
        self.output = Path(output) if output is not None else None
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # which process scored, in each marker

    def score_rows(self, keys: Sequence[str], records: Sequence[Record],
                   unreadable: Sequence[tuple[str, RecordError]] = ()) -> list[dict]:
        pruned, failed = score_and_prune(self.scorer, self.pruning, records)
        errors = [(key, error_row(key, e)) for key, e in [*unreadable, *((error_key(e), e) for e in failed)]]
        return store_rows(keys, self.name, pruned, errors)

    def __call__(self, keys: Sequence[str], records: Sequence[Record],
                 unreadable: Sequence[tuple[str, RecordError]] = ()) -> dict[str, int]:
        rows = self.score_rows(keys, records, unreadable)
        with self.scorer.timing("writing"):
            return write_part(self.output, rows)
