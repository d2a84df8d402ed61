"""Thresholds, spans and counterfactuals; property tests over arbitrary text and diffs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from leaf_ray.config import PruningConfig
from leaf_ray.data import Record
from leaf_ray.detection.pruning import confounder_mask, counterfactuals, find_spans, response_prefix, split_steps, threshold_value
from leaf_ray.detection.sensitivity import UnitScores
from leaf_ray.detection.units import split_units


def unit_scores(text: str, diffs: list[float]) -> UnitScores:
    units = split_units(text)
    solid = [i for i, u in enumerate(units) if not u.is_space]
    diff = np.full(len(units), np.nan)
    diff[solid] = diffs[: len(solid)] + [0.5] * max(0, len(solid) - len(diffs))
    return UnitScores(text, units, diff.copy(), diff.copy(), diff)


def test_quantile_is_the_official_order_statistic_capped():
    diff = np.array([0.9, 0.1, 0.4, 0.0, 1.0, 0.7, 0.3, 0.2, 0.6, 0.8])
    # sorted -> [0, .1, .2, .3, .4, .6, .7, .8, .9, 1]; floor(10 * 0.25) = 2 -> 0.2
    assert threshold_value(diff, PruningConfig(quantile=0.25)) == 0.2
    assert threshold_value(diff, PruningConfig(quantile=0.9)) == 0.5  # 0.9 capped at 0.5
    assert threshold_value(diff, PruningConfig(threshold="absolute", tau=0.33)) == 0.33


def test_span_mode_one_counterfactual_per_span():
    text = "ann has 3 . the bus left at 7 . how many does ann have ?"
    #       ann has 3  .  the bus left at 7  .  how many does ann have ?
    diffs = [0.9, 0.8, 0.0, 0.6, 0.7, 0.1, 0.05, 0.9, 0.7, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    scores = unit_scores(text, diffs)
    cfg = PruningConfig(threshold="absolute", tau=0.1)
    mask, thr = confounder_mask(scores, cfg)
    assert [u.text for u, m in zip(scores.units, mask) if m] == ["3", "bus", "left"]
    cfs = counterfactuals(Record("r1", text, "7", "7"), scores, cfg)
    assert [cf["removed_text"] for cf in cfs] == [["3 "], ["bus left "]]
    assert cfs[0]["instruction"] == "ann has . the bus left at 7 . how many does ann have ?"
    assert cfs[1]["instruction"] == "ann has 3 . the at 7 . how many does ann have ?"
    assert [cf["id"] for cf in cfs] == ["r1#cf0", "r1#cf1"]
    assert all(cf["source_id"] == "r1" and cf["threshold"] == 0.1 and cf["response"] == "7" for cf in cfs)
    collective = counterfactuals(Record("r1", text, "7"), scores, cfg.model_copy(update={"mode": "collective"}))
    assert len(collective) == 1 and collective[0]["instruction"] == "ann has . the at 7 . how many does ann have ?"


def test_no_spread_masks_nothing():
    scores = unit_scores("a b c", [0.0, 0.0, 0.0])
    mask, thr = confounder_mask(scores, PruningConfig())
    assert not mask.any() and np.isnan(thr)


def test_response_steps_and_prefix():
    response = "Step 1: add.\nStep 2: check.\nStep 3: done.\nAnswer 7"
    steps = split_steps(response, "line")
    assert [response[a:b] for a, b in steps] == ["Step 1: add.\n", "Step 2: check.\n", "Step 3: done.\n", "Answer 7"]
    assert "".join(response[a:b] for a, b in steps) == response
    sentences = "One. Two! Three?"
    assert [sentences[a:b] for a, b in split_steps(sentences, "sentence")] == ["One. ", "Two! ", "Three?"]
    assert len(split_steps("a b c d e f g h", "segments", 4)) == 4
    prefix, nxt = response_prefix(response, "line", 4, 0.5)
    assert response[prefix[0]:prefix[1]] == "Step 1: add.\nStep 2: check.\n"
    assert response[nxt[0]:nxt[1]] == "Step 3: done.\n"
    assert response_prefix("just one step", "line", 4, 0.5) is None


texts = st.text(alphabet=st.sampled_from(list("ab7 .\n\t?é東🙂")), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(text=texts, data=st.data(), mode=st.sampled_from(["quantile", "absolute"]))
def test_counterfactual_properties(text, data, mode):
    units = split_units(text)
    n_solid = sum(not u.is_space for u in units)
    diffs = data.draw(st.lists(st.floats(0, 1), min_size=n_solid, max_size=n_solid))
    scores = unit_scores(text, diffs)
    cfg = PruningConfig(threshold=mode, quantile=0.3, tau=0.2)
    mask, _ = confounder_mask(scores, cfg)
    # Whitespace units are never masked.
    assert not any(m and u.is_space for u, m in zip(units, mask))
    spans = find_spans(scores, mask)
    cfs = counterfactuals(Record("x", text, "r"), scores, cfg)
    # One counterfactual per span, spans disjoint and ordered.
    assert len(cfs) == len(spans)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    masked_units = {i for i, m in enumerate(mask) if m}
    assert {i for s in spans for i in s.units} == masked_units
    for span, cf in zip(spans, cfs):
        (start, end), = cf["char_ranges"]
        # Text outside the span is preserved byte for byte.
        assert cf["instruction"] == text[:start] + text[end:]
        assert cf["removed_text"] == [text[start:end]]
        # A span never removes only whitespace, and it covers whole units.
        assert text[start:end].strip()
        assert all(start <= units[i].start and units[i].end <= end for i in span.units)
        assert start in {u.start for u in units} and end in {u.end for u in units}


def test_response_level_counterfactual_cuts_only_the_prefix():
    response = "Step 1: note 7.\nStep 2: add 3 and 4.\nAnswer 7"
    prefix = response[:16]  # "Step 1: note 7.\n" is the scored prefix
    units = split_units(prefix)
    diff = np.array([np.nan if u.is_space else (0.0 if u.text == "note" else 0.9) for u in units])
    scores = UnitScores(prefix, units, diff, diff, diff)
    record = Record("r", "add 3 and 4", response, "7")
    (cf,) = counterfactuals(record, scores, PruningConfig(threshold="absolute", tau=0.1), level="response")
    assert cf["instruction"] == record.instruction and cf["level"] == "response"
    (start, end), = cf["char_ranges"]
    assert cf["response"] == response[:start] + response[end:] == "Step 1: 7.\nStep 2: add 3 and 4.\nAnswer 7"
    # The pruned prefix is context; learning starts where it now ends.
    assert cf["response"][cf["target_start"]:] == response[16:] and cf["id"] == "r#rcf0"


def test_scores_row_reads_back_into_the_same_scores():
    from leaf_ray.detection.scorer import ScoredRecord

    text = "ann has 3 . note : 7 is lucky ."
    units = split_units(text)
    diff = np.array([np.nan if u.is_space else i / 10 for i, u in enumerate(units)])
    scored = ScoredRecord(Record("r1", text, "3"), UnitScores(text, units, diff / 2, diff / 3, diff), "instruction", 0, 9)
    mask, threshold = confounder_mask(scored.scores, PruningConfig())
    back = ScoredRecord.from_row(scored.to_row(mask, threshold), scored.record)
    assert back.scores.text == text and back.scores.units == units
    for name in ("teacher", "student", "diff"):
        np.testing.assert_array_equal(getattr(back.scores, name), getattr(scored.scores, name))
    assert (back.level, back.text_offset) == ("instruction", 0)
