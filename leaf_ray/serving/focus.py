"""What a served student attends to: gradient sensitivity of one prompt, per token and per unit.

This backs the serving API's ``/v1/focus``. For a prompt and a response (the student's own
greedy answer when the caller gives none), the sensitivity of each prompt token is the norm
of d(response loss)/d(token embedding) -- the same quantity LeaF scores a corpus with
(:mod:`leaf_ray.detection.sensitivity`). With a teacher configured, the prompt goes through the
corpus scorer's own detector (:func:`leaf_ray.detection.scorer.detect`, with the configured
``method`` and ``pruning``, iterative pruning included): the teacher's scores, the LeaF diff,
the confounder mask and the spans pruning would cut come back too, so a user sees which words
the student leans on that the teacher ignores.

Plain PyTorch; the Serve deployment in :mod:`leaf_ray.serving.focus_deployment` only hands it
requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leaf_ray.config import PruningConfig, ScoringConfig
from leaf_ray.data import Record, RecordError, prompt_token_ids, render_sample
from leaf_ray.detection.pruning import find_spans
from leaf_ray.detection.scorer import PairScorer, context_spans, detect, nan_to_none, require_scorable
from leaf_ray.detection.sensitivity import (
    ScoringItem,
    compare_unit_scores,
    prepare_for_scoring,
    project_to_units,
    token_sensitivity,
)
from leaf_ray.detection.units import DEFAULT_UNIT_PATTERN, split_units
from leaf_ray.evaluation import greedy_generate
from leaf_ray.models import load_model


class FocusError(ValueError):
    """A request that cannot be scored (too long, nothing to score); the message says why."""


@dataclass(frozen=True)
class PromptSensitivity:
    """One model's gradient norms over the prompt's tokens, with their character spans in the prompt."""

    spans: list[tuple[int, int]]
    norms: np.ndarray


class FocusScorer:
    """Scores prompts for one student and, optionally, a teacher. Models load once."""

    def __init__(self, student, student_tokenizer, teacher=None, teacher_tokenizer=None, *,
                 method: str = "grad_norm", pruning: PruningConfig | None = None, max_length: int = 2048,
                 max_new_tokens: int = 16, unit_pattern: str = DEFAULT_UNIT_PATTERN):
        if (teacher is None) != (teacher_tokenizer is None):
            raise ValueError("a teacher needs its tokenizer, and a tokenizer its teacher")
        self.student, self.student_tokenizer = prepare_for_scoring(student), student_tokenizer
        self.detector = None if teacher is None else PairScorer(
            teacher, teacher_tokenizer, student, student_tokenizer,
            ScoringConfig(corpus="-", method=method, max_length=max_length, unit_pattern=unit_pattern))
        self.pruning = pruning or PruningConfig()
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.unit_pattern = unit_pattern
        # No token spans more characters than the longest vocabulary entry, so a prompt longer
        # than max_length of those cannot fit: it is refused before anything tokenizes it.
        self.max_prompt_chars = max_length * max(len(token) for token in student_tokenizer.get_vocab())

    @classmethod
    def from_paths(cls, student: str, teacher: str | None = None, *, dtype: str = "float32",
                   device: str = "auto", **options: Any) -> FocusScorer:
        student_model, student_tokenizer = load_model(student, dtype, device)
        teacher_model, teacher_tokenizer = load_model(teacher, dtype, device) if teacher else (None, None)
        return cls(student_model, student_tokenizer, teacher_model, teacher_tokenizer, **options)

    def prompt_sensitivity(self, model, tokenizer, prompt: str, response: str) -> PromptSensitivity:
        """Gradient norm of every prompt token for the loss of ``response`` (instruction-level LeaF scoring)."""
        rendered = render_sample(tokenizer, prompt, response)
        if len(rendered.input_ids) > self.max_length:
            raise FocusError(f"prompt and response take {len(rendered.input_ids)} tokens, "
                             f"more than the {self.max_length} allowed")
        item = ScoringItem.instruction_level(rendered)
        try:
            require_scorable(item)
        except RecordError as exc:
            raise FocusError(exc.reason) from None
        (norms,) = token_sensitivity(model, [item])
        # Offsets are into the rendered chat text; the prompt starts at `origin` there.
        origin = rendered.instruction_span[0] - rendered.instruction_shift
        return PromptSensitivity(context_spans(item, origin), norms)

    def explain(self, prompt: str, response: str | None = None) -> dict[str, Any]:
        """Per-token and per-unit sensitivity of ``prompt`` (JSON-ready).

        ``units[i].student`` (and ``teacher``, ``diff``) are min-max normalised over the
        non-whitespace units, as in the scores files; whitespace units carry ``None``.
        ``tokens[i].student`` is the raw gradient norm.
        """
        if not prompt.strip():
            raise FocusError("prompt is empty")
        if len(prompt) > self.max_prompt_chars:
            raise FocusError(f"the prompt has {len(prompt)} characters, more than {self.max_length} tokens can hold")
        prompt_tokens = len(prompt_token_ids(self.student_tokenizer, prompt))
        if prompt_tokens > self.max_length:  # before generating an answer to it
            raise FocusError(f"the prompt takes {prompt_tokens} tokens, more than the {self.max_length} allowed")
        source = "request"
        if response is None:
            (response,) = greedy_generate(self.student, self.student_tokenizer, [prompt], self.max_new_tokens)
            source = "student"
        if not response.strip():
            raise FocusError("response is empty" if source == "request" else
                             "the student's answer is empty; pass a response to score")

        student = self.prompt_sensitivity(self.student, self.student_tokenizer, prompt, response)
        out: dict[str, Any] = {
            "prompt": prompt,
            "response": response,
            "response_source": source,
            "tokens": [{"text": prompt[max(a, 0):max(b, 0)], "start": a, "end": b, "student": float(n)}
                       for (a, b), n in zip(student.spans, student.norms)],
            "teacher": self.detector is not None,
        }
        if self.detector is None:
            units = split_units(prompt, self.unit_pattern)
            student_units = project_to_units(units, student.spans, student.norms, prompt)
            # compare_unit_scores normalises the student as the scorer does; the teacher side is unused
            scores = compare_unit_scores(prompt, units, student_units, student_units)
            out["units"] = [{"text": u.text, "start": u.start, "end": u.end, "student": nan_to_none(v)}
                            for u, v in zip(units, scores.student)]
            return out
        scored, masks, thresholds, errors = detect(self.detector, self.pruning, [Record("request", prompt, response)])
        if errors:
            raise FocusError(errors[0].reason)
        scores, mask = scored[0].scores, masks[0]
        out["units"] = [{"text": u.text, "start": u.start, "end": u.end, "student": nan_to_none(s),
                         "teacher": nan_to_none(t), "diff": nan_to_none(d), "confounder": bool(m)}
                        for u, s, t, d, m in zip(scores.units, scores.student, scores.teacher, scores.diff, mask)]
        out["threshold"] = nan_to_none(thresholds[0])
        out["spans"] = [{"start": span.start, "end": span.end, "text": prompt[span.start:span.end],
                         "min_diff": span.min_diff}
                        for span in find_spans(scores, mask, self.pruning.break_at_newlines, self.pruning.grow_spans)]
        return out
