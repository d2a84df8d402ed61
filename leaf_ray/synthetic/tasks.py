"""Word problems with a known causal structure: the embedded benchmark's data.

``ann has 3 . ann gets 4 more . note : 7 is lucky . how many does ann have ?`` -> ``7``.

The answer is ``x + y`` from the causal sentences. Distractor clauses carry a number ``D``;
how often ``D`` equals the answer (``rho``) is what makes a split *correlated* (a shortcut
to copy) or *decorrelated*. Every record stores the character spans of its causal
numbers and its distractor clauses in ``meta``, so detection can be scored against the
ground truth.

Two families:

- ``simple``: one entity, one distractor clause (3 templates) at a random sentence boundary.
- ``hard``: longer prompts: the correlated clause (always ``note : D is lucky .``) plus one or
  two uncorrelated distractors from a larger set (some naming another person) and
  number-free filler. Only the note carries the shortcut; the others carry random numbers,
  so detection has to be selective, and cutting a random number-bearing span rarely cuts
  the right one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

NAMES = ["ann", "tom", "sue", "bob", "eva", "max", "lia", "sam"]
SIMPLE_DISTRACTORS = ["note : {d} is lucky .", "the bus left at {d} .", "there are {d} birds outside ."]
HARD_CORRELATED = "note : {d} is lucky ."
HARD_UNCORRELATED = [
    "the bus left at {d} .", "there are {d} birds outside .", "the shop opens at {d} .", "room {d} is empty .",
    "{o} is {d} years old .", "{o} saw {d} cats .",
]
FILLERS = ["it is a sunny day .", "the park is quiet .", "everyone likes the game .", "the road is long ."]
QUESTION = "how many does {n} have ?"


@dataclass(frozen=True)
class SplitSpec:
    """How one split is drawn.

    ``rho``: probability that the correlated distractor's number is set to the answer;
    otherwise it is uniform on 0..18 (and matches the answer by chance, 1 in 19).
    ``p_distractor``: probability that distractor clauses are present at all.
    ``conflict``: force the correlated number to differ from the answer.
    """

    rho: float
    p_distractor: float = 1.0
    conflict: bool = False


SPLITS: dict[str, SplitSpec] = {
    "student_pretrain": SplitSpec(rho=1.0),
    # D drawn at random: no shortcut. Mostly present: with distractors in only half of the
    # prompts the teacher first learns a rule that breaks on them, and unlearns it slowly.
    "teacher_train": SplitSpec(rho=0.0, p_distractor=0.9),
    "distill": SplitSpec(rho=0.9),
    "test_conflict": SplitSpec(rho=0.0, conflict=True),
    "test_clean": SplitSpec(rho=0.0, p_distractor=0.0),
}


class _Builder:
    """Joins sentences with spaces while recording each sentence's character span."""

    def __init__(self) -> None:
        self.text = ""

    def add(self, sentence: str) -> tuple[int, int]:
        if self.text:
            self.text += " "
        start = len(self.text)
        self.text += sentence
        return start, len(self.text)


def _number_span(sentence_span: tuple[int, int], sentence: str, number: int) -> list[int]:
    """Character span of ``number`` (its first occurrence as a word) inside a placed sentence."""
    words = sentence.split(" ")
    index = words.index(str(number))
    start = sentence_span[0] + sum(len(w) + 1 for w in words[:index])
    return [start, start + len(str(number))]


def make_record(rng: random.Random, family: str, split: str, record_id: str,
                rho: float | None = None) -> dict[str, Any]:
    """One record of ``family`` drawn as ``split`` prescribes (``rho`` overrides its
    correlation), in the corpus schema."""
    spec = SPLITS[split]
    if rho is not None:
        spec = SplitSpec(rho=rho, p_distractor=spec.p_distractor, conflict=spec.conflict)
    name, other = rng.sample(NAMES, 2)
    x, y = rng.randint(0, 9), rng.randint(1, 9)
    answer = x + y

    facts = [(f"{name} has {x} .", x, "x"), (f"{name} gets {y} more .", y, "y")]
    extra: list[str] = []
    if family == "hard":
        extra = rng.sample(FILLERS, rng.randint(1, 2))
    elif family != "simple":
        raise ValueError(f"unknown family {family!r}; use simple or hard")

    distractors: list[tuple[str, int, bool]] = []  # (template, number, correlated)
    if rng.random() < spec.p_distractor:
        if family == "simple":
            chosen = [rng.choice(SIMPLE_DISTRACTORS)]
        else:
            chosen = [HARD_CORRELATED, *rng.sample(HARD_UNCORRELATED, rng.randint(1, 2))]
        for k, template in enumerate(chosen):
            correlated = k == 0
            if correlated and spec.conflict:
                d = rng.choice([v for v in range(0, 19) if v != answer])
            elif correlated and rng.random() < spec.rho:
                d = answer
            else:
                d = rng.randint(0, 18)
            distractors.append((template, d, correlated))

    # Causal facts keep their order; everything else lands at random sentence boundaries.
    body: list[tuple[str, str, Any]] = [("fact", s, (n, role)) for s, n, role in facts]
    for sentence in extra:
        body.insert(rng.randint(0, len(body)), ("extra", sentence, None))
    for template, d, correlated in distractors:
        sentence = template.format(d=d, o=other)
        body.insert(rng.randint(0, len(body)), ("distractor", sentence, (d, correlated, template)))

    builder = _Builder()
    causal_spans, distractor_meta = [], []
    for kind, sentence, info in body:
        span = builder.add(sentence)
        if kind == "fact":
            number, role = info
            causal_spans.append({"role": role, "number": number, "span": _number_span(span, sentence, number)})
        elif kind == "distractor":
            d, correlated, template = info
            distractor_meta.append({
                "template": template, "number": d, "correlated": correlated,
                "clause_span": list(span), "number_span": _number_span(span, sentence, d),
            })
    builder.add(QUESTION.format(n=name))
    return {
        "id": record_id,
        "instruction": builder.text,
        "response": str(answer),
        "answer": str(answer),
        "meta": {"family": family, "split": split, "causal": causal_spans, "distractors": distractor_meta},
    }


def make_split(family: str, split: str, size: int, seed: int, rho: float | None = None) -> list[dict[str, Any]]:
    """``size`` records, reproducible from ``seed``; ids are ``{family}-{split}-{i}``."""
    rng = random.Random(f"{family}/{split}/{seed}")
    return [make_record(rng, family, split, f"{family}-{split}-{i}", rho) for i in range(size)]

