"""Word problems with a known causal structure: the embedded benchmark's data.

``ann has 3 . ann gets 4 more . note : 7 is lucky . how many does ann have ?`` -> ``7``.

The answer is ``x + y`` from the causal sentences. *Correlated* clauses carry a number ``D``
that is the answer with probability ``rho`` (a shortcut to copy); how many of them a record
holds varies, from none to three, and they come from several templates, some of which
(:data:`HELD_OUT_CORRELATED`) only the ``test_heldout`` split uses. Every record stores the
character spans of its causal numbers and of every distractor clause in ``meta``, so
detection can be scored against the ground truth, per record and per count.

Two families:

- ``simple``: one entity, and 0-3 correlated clauses at random sentence boundaries.
- ``hard``: longer prompts: the correlated clauses plus one or two uncorrelated distractors
  (some naming another person, all with random numbers) and number-free filler. Only the
  correlated clauses carry the shortcut, so detection has to be selective, and has to decide
  per record how much to cut: a record may hold none, one, or several.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

NAMES = ["ann", "tom", "sue", "bob", "eva", "max", "lia", "sam"]
# Clauses whose number the student learns to copy (it is the answer in its pre-training).
CORRELATED = ["note : {d} is lucky .", "the magic number is {d} .", "hint : it is {d} .", "{o} guesses {d} ."]
# The same role in wordings no training split uses: does a student ignore a shortcut it never met?
HELD_OUT_CORRELATED = ["lucky pick : {d} .", "the sign says {d} .", "the code is {d} ."]
UNCORRELATED = [
    "the bus left at {d} .", "there are {d} birds outside .", "the shop opens at {d} .", "room {d} is empty .",
    "{o} is {d} years old .", "{o} saw {d} cats .",
]
FILLERS = ["it is a sunny day .", "the park is quiet .", "everyone likes the game .", "the road is long ."]
QUESTION = "how many does {n} have ?"
ANSWERS = range(0, 19)  # x in 0..9, y in 1..9


@dataclass(frozen=True)
class SplitSpec:
    """How one split is drawn.

    ``counts[k]``: probability that a record holds ``k`` correlated clauses (distinct templates).
    ``rho``: probability that a correlated clause's number is set to the answer, drawn for each
    clause; otherwise it is uniform on 0..18 (and matches the answer by chance, 1 in 19).
    ``conflict``: force every correlated number to differ from the answer.
    ``held_out``: draw correlated templates from :data:`HELD_OUT_CORRELATED` instead.
    """

    rho: float
    counts: tuple[float, ...]
    conflict: bool = False
    held_out: bool = False


SPLITS: dict[str, SplitSpec] = {
    # The student learns the shortcut: a correlated clause is always there, and always right.
    "student_pretrain": SplitSpec(rho=1.0, counts=(0.0, 0.5, 0.35, 0.15)),
    # D drawn at random: no shortcut, so the teacher learns the rule.
    "teacher_train": SplitSpec(rho=0.0, counts=(0.25, 0.35, 0.25, 0.15)),
    "distill": SplitSpec(rho=0.9, counts=(0.25, 0.35, 0.25, 0.15)),
    # Every record carries a shortcut: the only shortcut-free examples a student sees are the
    # counterfactuals it is given.
    "distill_confounded": SplitSpec(rho=0.9, counts=(0.0, 0.5, 0.35, 0.15)),
    "test_conflict": SplitSpec(rho=0.0, counts=(0.0, 0.5, 0.35, 0.15), conflict=True),
    "test_heldout": SplitSpec(rho=0.0, counts=(0.0, 0.5, 0.35, 0.15), conflict=True, held_out=True),
    "test_clean": SplitSpec(rho=0.0, counts=(1.0,)),
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


def draw_count(rng: random.Random, counts: tuple[float, ...]) -> int:
    return rng.choices(range(len(counts)), weights=counts)[0]


def correlated_number(rng: random.Random, spec: SplitSpec, answer: int) -> int:
    """A correlated clause's number: never the answer in a conflict split, else the answer with
    probability ``rho``, else uniform."""
    if spec.conflict:
        return rng.choice([v for v in ANSWERS if v != answer])
    return answer if rng.random() < spec.rho else rng.choice(ANSWERS)


def place_sentences(rng: random.Random, facts: list[tuple[str, int, str]], others: list[tuple[str, str, Any]],
                    question: str) -> tuple[str, list[dict], list[dict], list[int]]:
    """The instruction: causal facts in order, every other sentence at a random sentence
    boundary, the question last; with the causal facts' spans (the clause and its number), the
    distractor clauses' spans and the question's span.

    ``others``: ``("extra", sentence, None)`` or ``("distractor", sentence, (d, correlated,
    template))``.
    """
    body: list[tuple[str, str, Any]] = [("fact", s, (n, role)) for s, n, role in facts]
    for kind, sentence, info in others:
        body.insert(rng.randint(0, len(body)), (kind, sentence, info))
    builder = _Builder()
    causal, distractors = [], []
    for kind, sentence, info in body:
        span = builder.add(sentence)
        if kind == "fact":
            number, role = info
            causal.append({"role": role, "number": number, "span": _number_span(span, sentence, number),
                           "clause_span": list(span)})
        elif kind == "distractor":
            d, correlated, template = info
            distractors.append({"template": template, "number": d, "correlated": correlated,
                                "held_out": template in HELD_OUT_CORRELATED,
                                "clause_span": list(span), "number_span": _number_span(span, sentence, d)})
    question_span = list(builder.add(question))
    return builder.text, causal, distractors, question_span


def make_record(rng: random.Random, family: str, split: str, record_id: str,
                rho: float | None = None) -> dict[str, Any]:
    """One record of ``family`` drawn as ``split`` prescribes (``rho`` overrides its
    correlation), in the corpus schema."""
    if family not in ("simple", "hard"):
        raise ValueError(f"unknown family {family!r}; use simple or hard")
    spec = SPLITS[split]
    if rho is not None:
        spec = SplitSpec(rho=rho, counts=spec.counts, conflict=spec.conflict, held_out=spec.held_out)
    name, other = rng.sample(NAMES, 2)
    x, y = rng.randint(0, 9), rng.randint(1, 9)
    answer = x + y

    facts = [(f"{name} has {x} .", x, "x"), (f"{name} gets {y} more .", y, "y")]
    pool = HELD_OUT_CORRELATED if spec.held_out else CORRELATED
    correlated = rng.sample(pool, draw_count(rng, spec.counts))
    others: list[tuple[str, str, Any]] = []
    for template in correlated:
        d = correlated_number(rng, spec, answer)
        others.append(("distractor", template.format(d=d, o=other), (d, True, template)))
    if family == "hard":
        for template in rng.sample(UNCORRELATED, rng.randint(1, 2)):
            d = rng.choice(ANSWERS)
            others.append(("distractor", template.format(d=d, o=other), (d, False, template)))
        others += [("extra", sentence, None) for sentence in rng.sample(FILLERS, rng.randint(1, 2))]
    rng.shuffle(others)

    instruction, causal, distractors, question = place_sentences(rng, facts, others, QUESTION.format(n=name))
    return {
        "id": record_id,
        "instruction": instruction,
        "response": str(answer),
        "answer": str(answer),
        "meta": {"family": family, "split": split, "causal": causal, "question_span": question,
                 "distractors": distractors, "correlated_count": len(correlated)},
    }


def make_split(family: str, split: str, size: int, seed: int, rho: float | None = None) -> list[dict[str, Any]]:
    """``size`` records, reproducible from ``seed``; ids are ``{family}-{split}-{i}``."""
    rng = random.Random(f"{family}/{split}/{seed}")
    return [make_record(rng, family, split, f"{family}-{split}-{i}", rho) for i in range(size)]
