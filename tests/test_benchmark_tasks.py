"""The embedded benchmark's generator: spans locate the text, counts and correlations are as
configured, and held-out wordings appear only where they should."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaf_ray.data import parse_record
from leaf_ray.evaluation import causal_spans, confounder_spans, shortcut_numbers
from leaf_ray.synthetic.reasoning import REASONING_SPLITS, make_reasoning_split
from leaf_ray.synthetic.tasks import CORRELATED, HELD_OUT_CORRELATED, SPLITS, UNCORRELATED, make_split
from leaf_ray.synthetic.tokenizer import train_tokenizer


def template_pattern(template: str, number: int) -> str:
    return re.escape(template).replace(r"\{o\}", r"[a-z]+").replace(r"\{d\}", str(number))


@pytest.mark.parametrize("family", ["simple", "hard"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_spans_locate_the_text(family, split):
    for record in make_split(family, split, 200, seed=3):
        parse_record(record)  # in the corpus schema
        text, meta = record["instruction"], record["meta"]
        x, y = (c["number"] for c in meta["causal"])
        assert record["answer"] == record["response"] == str(x + y)
        for causal in meta["causal"]:
            a, b = causal["span"]
            assert text[a:b] == str(causal["number"])
            assert text[b:].startswith(" ") and text[a - 1] == " "
            ca, cb = causal["clause_span"]
            assert ca <= a < b <= cb and text[ca:cb].endswith(" .")
            assert " has " in text[ca:cb] or " gets " in text[ca:cb]
        qa, qb = meta["question_span"]
        assert text[qa:qb].startswith("how many does") and qb == len(text) and text.endswith("?")
        for clause in meta["distractors"]:
            a, b = clause["clause_span"]
            assert re.fullmatch(template_pattern(clause["template"], clause["number"]), text[a:b]), text[a:b]
            na, nb = clause["number_span"]
            assert a <= na < nb <= b and text[na:nb] == str(clause["number"])
        # Clauses never overlap: each sentence is one thing.
        spans = sorted([tuple(c["clause_span"]) for c in meta["distractors"]] +
                       [tuple(c["clause_span"]) for c in meta["causal"]] + [tuple(meta["question_span"])])
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("family", ["simple", "hard"])
def test_counts_follow_the_split(family):
    n = 2000
    for split, spec in SPLITS.items():
        records = make_split(family, split, n, 0)
        counts = Counter(r["meta"]["correlated_count"] for r in records)
        for k, p in enumerate(spec.counts):  # binomial sd <= 0.011: 3 sd
            assert abs(counts[k] / n - p) < 0.035, (split, k, counts)
        assert set(counts) <= set(range(len(spec.counts)))
        for r in records:
            correlated = [d for d in r["meta"]["distractors"] if d["correlated"]]
            assert len(correlated) == r["meta"]["correlated_count"] == len(confounder_spans(r["meta"]))
            assert len({d["template"] for d in correlated}) == len(correlated)  # distinct wordings
            uncorrelated = [d for d in r["meta"]["distractors"] if not d["correlated"]]
            assert (1 <= len(uncorrelated) <= 2) if family == "hard" else not uncorrelated
            assert all(d["template"] in UNCORRELATED for d in uncorrelated)
    # Several records hold two or more confounders; some hold none.
    distill = Counter(r["meta"]["correlated_count"] for r in make_split(family, "distill", n, 0))
    assert distill[0] > 0.2 * n and distill[2] + distill[3] > 0.3 * n


@pytest.mark.parametrize("family", ["simple", "hard"])
def test_held_out_wordings_appear_only_in_their_test_split(family):
    for split in SPLITS:
        templates = {d["template"] for r in make_split(family, split, 1000, 0) for d in r["meta"]["distractors"]
                     if d["correlated"]}
        held_out = split == "test_heldout"
        assert templates == set(HELD_OUT_CORRELATED if held_out else CORRELATED) or not templates
        texts = " ".join(r["instruction"] for r in make_split(family, split, 1000, 0))
        for template in HELD_OUT_CORRELATED:
            wording = template.split("{d}")[0].strip()
            assert (wording in texts) == held_out, (split, wording)
        for r in make_split(family, split, 50, 0):
            assert all(d["held_out"] == (d["template"] in HELD_OUT_CORRELATED) for d in r["meta"]["distractors"])


@pytest.mark.parametrize("family", ["simple", "hard"])
def test_split_correlations_are_as_configured(family):
    def shortcut_rate(records):
        numbers = [(n, r["answer"]) for r in records for n in shortcut_numbers(r["meta"])]
        return sum(n == answer for n, answer in numbers) / len(numbers)

    def expected(rho):  # each clause's D is the answer with probability rho, else uniform on 0..18
        return rho + (1 - rho) / 19

    n = 2000  # clause-level rates over >= 1500 clauses: tolerances are about 3 sd
    assert shortcut_rate(make_split(family, "student_pretrain", n, 0)) == 1.0
    assert abs(shortcut_rate(make_split(family, "distill", n, 0)) - expected(0.9)) < 0.02
    assert abs(shortcut_rate(make_split(family, "distill", n, 0, rho=0.5)) - expected(0.5)) < 0.035
    assert abs(shortcut_rate(make_split(family, "teacher_train", n, 0)) - expected(0.0)) < 0.03
    for split in ("test_conflict", "test_heldout"):
        assert shortcut_rate(make_split(family, split, n, 0)) == 0.0
    assert all(not shortcut_numbers(r["meta"]) for r in make_split(family, "test_clean", 200, 0))


def test_hard_family_is_longer_with_uncorrelated_distractors():
    simple = make_split("simple", "distill", 300, 0)
    hard = make_split("hard", "distill", 300, 0)
    assert all(all(d["correlated"] for d in r["meta"]["distractors"]) for r in simple)
    assert sum(len(r["instruction"]) for r in hard) > 1.5 * sum(len(r["instruction"]) for r in simple)


def test_reasoning_records_hold_a_note_or_none_and_restate_it():
    n = 2000
    for split, spec in REASONING_SPLITS.items():
        records = make_reasoning_split(split, n, 0)
        with_note = sum(r["meta"]["correlated_count"] for r in records)
        assert abs(with_note / n - (1 - spec.counts[0])) < 0.035, split
    for r in make_reasoning_split("distill", 300, 0):
        meta, lines = r["meta"], r["response"].split("\n")
        assert lines[-1] == f"#### {r['answer']}"
        assert len(lines) == 4 + meta["correlated_count"]  # the restated note is a line of its own
        for fact in meta["response_causal"]:
            assert r["response"][slice(*fact["clause_span"])] in r["instruction"]
        for note, clause in zip(meta["response_distractors"], [d for d in meta["distractors"] if d["correlated"]]):
            assert r["response"][slice(*note["clause_span"])] == r["instruction"][slice(*clause["clause_span"])]
        assert causal_spans(meta, "response") and len(causal_spans(meta)) == 3  # two facts and the question


def test_splits_are_reproducible_from_seeds():
    assert make_split("hard", "distill", 50, 7) == make_split("hard", "distill", 50, 7)
    assert make_split("hard", "distill", 50, 7) != make_split("hard", "distill", 50, 8)


@pytest.fixture(scope="module")
def benchmark_tokenizer():
    texts = [t for r in make_split("simple", "distill", 300, 0) for t in (r["instruction"], r["response"])]
    return train_tokenizer(texts, vocab_size=320)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_byte_level_tokenizer_round_trips_any_utf8(benchmark_tokenizer, text):
    ids = benchmark_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert benchmark_tokenizer.decode(ids) == text
    assert benchmark_tokenizer.unk_token_id is None or benchmark_tokenizer.unk_token_id not in ids


def test_random_seeded_records_vary():
    rng = random.Random(0)
    from leaf_ray.synthetic.tasks import make_record

    texts = {make_record(rng, "hard", "distill", "x")["instruction"] for _ in range(50)}
    assert len(texts) == 50
