"""The embedded benchmark's generator: spans locate the text, splits correlate as configured."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaf_ray.synthetic.tasks import SPLITS, make_split
from leaf_ray.data import parse_record
from leaf_ray.evaluation import shortcut_number
from leaf_ray.synthetic.tokenizer import train_tokenizer


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
        for clause in meta["distractors"]:
            a, b = clause["clause_span"]
            pattern = re.escape(clause["template"]).replace(r"\{o\}", r"[a-z]+").replace(r"\{d\}", str(clause["number"]))
            assert re.fullmatch(pattern, text[a:b]), (pattern, text[a:b])
            na, nb = clause["number_span"]
            assert a <= na < nb <= b and text[na:nb] == str(clause["number"])
        assert text.endswith("?")


@pytest.mark.parametrize("family", ["simple", "hard"])
def test_split_correlations_are_as_configured(family):
    def shortcut_rate(records):
        with_clause = [r for r in records if shortcut_number(r["meta"]) is not None]
        return sum(shortcut_number(r["meta"]) == r["answer"] for r in with_clause) / len(with_clause), len(with_clause)

    def expected(rho):  # D is the answer with probability rho, else uniform on 0..18
        return rho + (1 - rho) / 19

    n = 2000  # binomial sd <= 0.011: tolerances are 3 sd
    rate, present = shortcut_rate(make_split(family, "student_pretrain", n, 0))
    assert rate == 1.0 and present == n
    rate, present = shortcut_rate(make_split(family, "distill", n, 0))
    assert abs(rate - expected(0.9)) < 0.02 and present == n
    rate, present = shortcut_rate(make_split(family, "distill", n, 0, rho=0.5))
    assert abs(rate - expected(0.5)) < 0.035
    rate, present = shortcut_rate(make_split(family, "teacher_train", n, 0))
    # Random D, sometimes absent.
    assert abs(rate - expected(0.0)) < 0.03 and abs(present / n - SPLITS["teacher_train"].p_distractor) < 0.03
    rate, present = shortcut_rate(make_split(family, "test_conflict", n, 0))
    assert rate == 0.0 and present == n
    assert all(not r["meta"]["distractors"] for r in make_split(family, "test_clean", 200, 0))


def test_hard_family_is_longer_with_several_distractors():
    simple = make_split("simple", "distill", 300, 0)
    hard = make_split("hard", "distill", 300, 0)
    assert all(len(r["meta"]["distractors"]) == 1 for r in simple)
    assert all(2 <= len(r["meta"]["distractors"]) <= 3 for r in hard)
    assert all(sum(d["correlated"] for d in r["meta"]["distractors"]) == 1 for r in hard)
    assert sum(len(r["instruction"]) for r in hard) > 1.5 * sum(len(r["instruction"]) for r in simple)


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
