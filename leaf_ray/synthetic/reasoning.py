"""The ``reasoning`` family: multi-step answers, one step per line, with a confounder in the
instruction *and* in the reasoning.

    instruction: ann has 3 . the shop opens at 12 . ann gets 4 more . note : 9 is lucky . how many does ann have ?
    response:    ann has 3 .
                 note : 9 is lucky .
                 ann gets 4 more .
                 3 + 4 = 7 .
                 #### 7

The instruction is a ``hard``-style prompt without filler: one uncorrelated distractor and, in
most records, the correlated note. The response restates the facts and the note, one step per
line, then adds, then gives the answer GSM8K-style (``#### 7``, checker ``gsm8k``). The
restated note is the response-level confounder: a student pre-trained where the note's number
is the answer learns to copy it into the sum line. A record without the note (a quarter of
the student's pre-training and of the distillation corpus) has a four-line response, so clean
prompts are in distribution for every student. With ``prefix_fraction`` 0.6, the
response-level prefix is the first three lines (two without the note) and the scored next
step is the sum.

``meta`` holds the ground truth for both places: ``causal`` and ``distractors`` (instruction
character spans, as the other families), ``response_causal`` (the restated facts) and
``response_distractors`` (the restated note), in response character spans.
"""

from __future__ import annotations

import random
from typing import Any

from leaf_ray.synthetic.tasks import (
    ANSWERS,
    CORRELATED,
    NAMES,
    QUESTION,
    UNCORRELATED,
    SplitSpec,
    _number_span,
    correlated_number,
    draw_count,
    place_sentences,
)

NOTE = CORRELATED[0]
# counts: P(no note), P(note).
REASONING_SPLITS: dict[str, SplitSpec] = {
    "student_pretrain": SplitSpec(rho=1.0, counts=(0.25, 0.75)),
    "teacher_train": SplitSpec(rho=0.0, counts=(0.25, 0.75)),
    "distill": SplitSpec(rho=0.9, counts=(0.25, 0.75)),
    "test_conflict": SplitSpec(rho=0.0, counts=(0.0, 1.0), conflict=True),
    "test_clean": SplitSpec(rho=0.0, counts=(1.0,)),
}


def _lines(steps: list[tuple[str, str]]) -> tuple[str, list[tuple[str, tuple[int, int], str]]]:
    """Join ``(kind, text)`` steps one per line; each step with its character span."""
    text, placed = "", []
    for kind, step in steps:
        if text:
            text += "\n"
        placed.append((kind, (len(text), len(text) + len(step)), step))
        text += step
    return text, placed


def make_reasoning_record(rng: random.Random, split: str, record_id: str, rho: float | None = None) -> dict[str, Any]:
    """One ``reasoning`` record drawn as ``split`` prescribes (``rho`` overrides its correlation)."""
    spec = REASONING_SPLITS[split]
    if rho is not None:
        spec = SplitSpec(rho=rho, counts=spec.counts, conflict=spec.conflict)
    name, other = rng.sample(NAMES, 2)
    x, y = rng.randint(0, 9), rng.randint(1, 9)
    answer = x + y
    facts = [(f"{name} has {x} .", x, "x"), (f"{name} gets {y} more .", y, "y")]

    note = None
    others: list[tuple[str, str, Any]] = []
    if draw_count(rng, spec.counts):
        d = correlated_number(rng, spec, answer)
        note = (NOTE.format(d=d), d)
        others.append(("distractor", note[0], (d, True, NOTE)))
    template, e = rng.choice(UNCORRELATED), rng.choice(ANSWERS)
    others.append(("distractor", template.format(d=e, o=other), (e, False, template)))
    rng.shuffle(others)
    instruction, causal, distractors, question = place_sentences(rng, facts, others, QUESTION.format(n=name))

    steps = [("fact", facts[0][0])] + ([("note", note[0])] if note else []) + [("fact", facts[1][0]),
             ("sum", f"{x} + {y} = {answer} ."), ("answer", f"#### {answer}")]
    response, placed = _lines(steps)
    response_distractors = [{"template": NOTE, "number": note[1], "correlated": True, "held_out": False,
                             "clause_span": list(span), "number_span": _number_span(span, step, note[1])}
                            for kind, span, step in placed if kind == "note"]
    response_causal = [{"clause_span": list(span)} for kind, span, _ in placed if kind == "fact"]
    return {
        "id": record_id,
        "instruction": instruction,
        "response": response,
        "answer": str(answer),
        "meta": {"family": "reasoning", "split": split, "causal": causal, "question_span": question,
                 "distractors": distractors, "response_causal": response_causal,
                 "response_distractors": response_distractors, "correlated_count": int(note is not None)},
    }


def make_reasoning_split(split: str, size: int, seed: int, rho: float | None = None) -> list[dict[str, Any]]:
    """``size`` records, reproducible from ``seed``; ids are ``reasoning-{split}-{i}``."""
    rng = random.Random(f"reasoning/{split}/{seed}")
    return [make_reasoning_record(rng, split, f"reasoning-{split}-{i}", rho) for i in range(size)]
