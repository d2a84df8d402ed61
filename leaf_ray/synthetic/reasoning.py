"""The ``reasoning`` family: multi-step answers, one step per line, with a confounder in the
instruction *and* in the reasoning.

    instruction: ann has 3 . the shop opens at 12 . ann gets 4 more . note : 9 is lucky . how many does ann have ?
    response:    ann has 3 .
                 note : 9 is lucky .
                 ann gets 4 more .
                 3 + 4 = 7 .
                 #### 7

The instruction is a ``hard``-style prompt without filler: the correlated note and one
uncorrelated distractor. The response restates the facts and the note, one step per line,
then adds, then gives the answer GSM8K-style (``#### 7``, checker ``gsm8k``). The restated
note is the response-level confounder: a student pre-trained where the note's number is the
answer learns to copy it into the sum line. With 5 steps and ``prefix_fraction`` 0.6, the
response-level prefix is the first three lines and the scored next step is the sum.

``meta`` holds the ground truth for both places: ``distractors`` (instruction character
spans, as the other families) and ``response_distractors`` (response character spans).
"""

from __future__ import annotations

import random
from typing import Any

from leaf_ray.synthetic.tasks import HARD_CORRELATED, HARD_UNCORRELATED, NAMES, QUESTION, SPLITS, SplitSpec, _Builder, _number_span


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
    spec = SPLITS[split]
    if rho is not None:
        spec = SplitSpec(rho=rho, p_distractor=spec.p_distractor, conflict=spec.conflict)
    name, other = rng.sample(NAMES, 2)
    x, y = rng.randint(0, 9), rng.randint(1, 9)
    answer = x + y
    facts = [f"{name} has {x} .", f"{name} gets {y} more ."]

    note = None
    body: list[tuple[str, str, Any]] = [("fact", facts[0], x), ("fact", facts[1], y)]
    if rng.random() < spec.p_distractor:
        if spec.conflict:
            d = rng.choice([v for v in range(0, 19) if v != answer])
        else:
            d = answer if rng.random() < spec.rho else rng.randint(0, 18)
        note = (HARD_CORRELATED.format(d=d), d)
        body.insert(rng.randint(0, len(body)), ("distractor", note[0], (d, True, HARD_CORRELATED)))
        template = rng.choice(HARD_UNCORRELATED)
        e = rng.randint(0, 18)
        body.insert(rng.randint(0, len(body)), ("distractor", template.format(d=e, o=other), (e, False, template)))

    builder = _Builder()
    causal, distractors = [], []
    for kind, sentence, info in body:
        span = builder.add(sentence)
        if kind == "fact":
            causal.append({"role": "x" if sentence == facts[0] else "y", "number": info,
                           "span": _number_span(span, sentence, info)})
        else:
            d, correlated, template = info
            distractors.append({"template": template, "number": d, "correlated": correlated,
                                "clause_span": list(span), "number_span": _number_span(span, sentence, d)})
    builder.add(QUESTION.format(n=name))

    steps = [("fact", facts[0])] + ([("note", note[0])] if note else []) + [("fact", facts[1]),
             ("sum", f"{x} + {y} = {answer} ."), ("answer", f"#### {answer}")]
    response, placed = _lines(steps)
    response_distractors = [{"template": HARD_CORRELATED, "number": note[1], "correlated": True,
                             "clause_span": list(span), "number_span": _number_span(span, step, note[1])}
                            for kind, span, step in placed if kind == "note"]
    return {
        "id": record_id,
        "instruction": builder.text,
        "response": response,
        "answer": str(answer),
        "meta": {"family": "reasoning", "split": split, "causal": causal, "distractors": distractors,
                 "response_distractors": response_distractors},
    }


def make_reasoning_split(split: str, size: int, seed: int, rho: float | None = None) -> list[dict[str, Any]]:
    """``size`` records, reproducible from ``seed``; ids are ``reasoning-{split}-{i}``."""
    rng = random.Random(f"reasoning/{split}/{seed}")
    return [make_reasoning_record(rng, split, f"reasoning-{split}-{i}", rho) for i in range(size)]
