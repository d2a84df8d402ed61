"""/v1/focus's core (leaf_ray.serving.focus) agrees with the corpus scorer (PairScorer) and pruning, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from leaf_ray.config import PruningConfig, ScoringConfig
from leaf_ray.data import iter_records
from leaf_ray.detection.scorer import PairScorer, detect
from leaf_ray.models import load_model
from leaf_ray.evaluation import greedy_generate
from leaf_ray.serving.focus import FocusError, FocusScorer
from leaf_ray.detection.pruning import find_spans
from tests.conftest import EMBEDDED

pytestmark = pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")


@pytest.fixture(scope="module")
def models():
    return load_model(EMBEDDED / "teacher"), load_model(EMBEDDED / "student")


@pytest.fixture(scope="module")
def records():
    return list(iter_records(EMBEDDED / "data" / "hard" / "test_conflict.jsonl"))[:6]


def column(units: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if u[key] is None else u[key] for u in units])


DETECTORS = {"paper": ("grad_norm", PruningConfig()),
             "iterative": ("grad_norm", PruningConfig(threshold="iterative", grow_spans="clause")),
             "occlusion": ("occlusion", PruningConfig(grow_spans="clause", max_spans=1))}


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_with_teacher_matches_the_corpus_detector(models, records, detector):
    # /v1/focus runs the configured detector, the scoring job's: same scores, mask and spans.
    (teacher, t_tok), (student, s_tok) = models
    method, pruning = DETECTORS[detector]
    focus = FocusScorer(student, s_tok, teacher, t_tok, method=method, pruning=pruning)
    scorer = PairScorer(teacher, t_tok, student, s_tok, ScoringConfig(corpus="c", method=method))
    scored, masks, thresholds, errors = detect(scorer, pruning, records)
    assert not errors
    flagged = 0
    for record, expected, mask, threshold in zip(records, scored, masks, thresholds):
        got = focus.explain(record.instruction, record.response)
        scores = expected.scores
        assert [(u["text"], u["start"], u["end"]) for u in got["units"]] == [(u.text, u.start, u.end) for u in scores.units]
        for key, values in (("student", scores.student), ("teacher", scores.teacher), ("diff", scores.diff)):
            # batched (padded) vs one at a time: float32 sums differ in the last digits (occlusion's
            # loss differences, normalised, by up to 3e-6)
            np.testing.assert_allclose(column(got["units"], key), values, rtol=1e-4, atol=1e-5, equal_nan=True)
        assert [u["confounder"] for u in got["units"]] == mask.tolist()
        assert got["threshold"] == (None if np.isnan(threshold) else pytest.approx(threshold, rel=1e-4))
        spans = find_spans(scores, mask, pruning.break_at_newlines, pruning.grow_spans)
        assert [(s["start"], s["end"]) for s in got["spans"]] == [(s.start, s.end) for s in spans]
        assert all(s["text"] == record.instruction[s["start"]:s["end"]] for s in got["spans"])
        flagged += len(spans)
    assert flagged > 0  # the embedded student does lean on distractors: some spans must be found


def test_student_only_matches_the_student_column(models, records):
    (teacher, t_tok), (student, s_tok) = models
    focus = FocusScorer(student, s_tok)
    scorer = PairScorer(teacher, t_tok, student, s_tok, ScoringConfig(corpus="c"))
    scored, _ = scorer.score(records[:3])
    for record, expected in zip(records, scored):
        got = focus.explain(record.instruction, record.response)
        np.testing.assert_allclose(column(got["units"], "student"), expected.scores.student, rtol=1e-4, atol=1e-6, equal_nan=True)
        assert got["teacher"] is False and "spans" not in got and "diff" not in got["units"][0]
        # Tokens tile the prompt (the byte-level tokenizer covers every character) with raw norms.
        assert "".join(t["text"] for t in got["tokens"]) == record.instruction
        assert all(t["student"] >= 0 for t in got["tokens"]) and max(t["student"] for t in got["tokens"]) > 0


def test_response_defaults_to_the_students_greedy_answer(models, records):
    _, (student, s_tok) = models
    focus = FocusScorer(student, s_tok, max_new_tokens=8)
    prompt = records[0].instruction
    got = focus.explain(prompt)
    assert got["response_source"] == "student"
    assert got["response"] == greedy_generate(student, s_tok, [prompt], 8)[0]
    assert got == focus.explain(prompt, got["response"]) | {"response_source": "student"}


def test_requests_that_cannot_be_scored_say_why(models):
    _, (student, s_tok) = models
    focus = FocusScorer(student, s_tok, max_length=64)
    with pytest.raises(FocusError, match="more than the 64 allowed"):
        focus.explain("ann has 3 . " * 40, "3")
    with pytest.raises(FocusError, match="prompt is empty"):
        focus.explain("   ", "3")
    # Past what 64 of the longest tokens can hold: refused before anything tokenizes it (without
    # a tokenizer, tokenizing would raise something other than FocusError).
    focus.student_tokenizer = None
    with pytest.raises(FocusError, match="48000 characters, more than 64 tokens can hold"):
        focus.explain("ann has 3 . " * 4000)
    focus.student_tokenizer = s_tok
    with pytest.raises(FocusError, match="response is empty"):
        focus.explain("ann has 3 .", "  ")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        FocusScorer(student, s_tok, teacher=student)

