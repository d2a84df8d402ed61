"""Each detection method against a slow reference on a tiny model, and span growing.

The references share nothing with the code under test but the model: one sample at a time,
no padding, transformers' own label loss, and plain loops (integrated gradients one path
point per backward; occlusion one unit cut out of the text's tokens per forward).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from leaf_ray.config import PruningConfig, ScoringConfig
from leaf_ray.data import Record, render_sample
from leaf_ray.detection.detectors import DETECTORS, detector_configs
from leaf_ray.detection.occlusion import unit_occlusion
from leaf_ray.detection.pruning import clause_ids, confounder_mask, counterfactuals, grow_to_clauses
from leaf_ray.detection.scorer import PairScorer, context_spans, unit_token_groups
from leaf_ray.detection.sensitivity import ScoringItem, UnitScores, prepare_for_scoring, token_sensitivity
from leaf_ray.detection.units import split_units

SAMPLES = [
    ("ann has 3 . tom has 5 . ann gets 4 more . the bus left at 7 . how many does ann have ?", "7"),
    ("note : 9 is lucky . sue has 6 apples and gets 2 more .\nhow many apples does sue have ?", "8"),
    ("Let $x = \\frac{3}{4}$, then\n```py\nprint(x)\n```\ncafé 東京 🙂 ?", "x = 0.75"),
]


def label_loss(model, input_ids: list[int], targets: list[int], embeds: torch.Tensor | None = None) -> torch.Tensor:
    """One unpadded sample's mean NLL over ``targets``, by transformers' label loss."""
    ids = torch.tensor([input_ids])
    labels = torch.full_like(ids, -100)
    labels[0, targets] = ids[0, targets]
    inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
    return model(**inputs, attention_mask=torch.ones_like(ids), labels=labels).loss


def items_of(tokenizer) -> list[ScoringItem]:
    return [ScoringItem.instruction_level(render_sample(tokenizer, i, r)) for i, r in SAMPLES]


def reference_integrated_gradients(model, item: ScoringItem, steps: int) -> np.ndarray:
    """A per-step loop: at each path point, scale the context embeddings, backward alone."""
    ids = list(item.input_ids)
    targets = [t for t in item.target_tokens if t > 0]
    real = model.get_input_embeddings()(torch.tensor([ids])).detach()
    context = torch.zeros(len(ids), dtype=torch.bool)
    context[item.context_tokens] = True
    total = torch.zeros_like(real)
    for k in range(1, steps + 1):
        point = real.clone()
        point[0, context] = real[0, context] * (k / steps)
        point.requires_grad_(True)
        label_loss(model, ids, targets, point).backward()
        total += point.grad
    return (total / steps * real)[0, item.context_tokens].sum(-1).abs().double().numpy()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_integrated_gradients_equal_a_per_step_loop(byte_model, byte_tokenizer, padding_side):
    model = prepare_for_scoring(byte_model)
    items = items_of(byte_tokenizer)
    batched = token_sensitivity(model, items, padding_side, method="integrated_gradients", steps=5)
    for item, got in zip(items, batched):
        expected = reference_integrated_gradients(model, item, steps=5)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.max())
    # More steps is another sum: the result depends on them (a loop ignoring steps would pass above).
    assert not np.allclose(batched[0], token_sensitivity(model, items, method="integrated_gradients", steps=1)[0])


def test_gradient_times_input_equals_a_per_sample_loop(metaspace_model, metaspace_tokenizer):
    model = prepare_for_scoring(metaspace_model)
    items = items_of(metaspace_tokenizer)
    for item, got in zip(items, token_sensitivity(model, items, method="grad_x_input")):
        embeds = model.get_input_embeddings()(torch.tensor([list(item.input_ids)])).detach().requires_grad_(True)
        label_loss(model, list(item.input_ids), [t for t in item.target_tokens if t > 0], embeds).backward()
        expected = (embeds.grad * embeds).detach()[0, item.context_tokens].sum(-1).abs().double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def reference_occlusion(model, tokenizer, instruction: str, response: str) -> np.ndarray:
    """Remove each unit's tokens, one unit at a time, and take the loss change of that sample."""
    rendered = render_sample(tokenizer, instruction, response)
    item = ScoringItem.instruction_level(rendered)
    origin = rendered.instruction_span[0] - rendered.instruction_shift
    targets = [t for t in item.target_tokens if t > 0]
    ids = list(item.input_ids)
    with torch.no_grad():
        whole = label_loss(model, ids, targets).item()
        scores = []
        for unit in split_units(instruction):
            gone = [t for t in item.context_tokens
                    if rendered.offsets[t][0] - origin < unit.end and rendered.offsets[t][1] - origin > unit.start]
            if not unit.is_maskable or not gone:
                scores.append(0.0)
                continue
            kept = [t for t in range(len(ids)) if t not in gone]
            cut = label_loss(model, [ids[t] for t in kept], [kept.index(t) for t in targets]).item()
            scores.append(abs(cut - whole))
    return np.array(scores)


@pytest.mark.parametrize("which", ["byte", "metaspace"])
def test_occlusion_equals_removing_each_unit_one_at_a_time(which, request):
    tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    model = prepare_for_scoring(request.getfixturevalue(f"{which}_model"))
    items, groups = [], []
    for instruction, response in SAMPLES:
        rendered = render_sample(tokenizer, instruction, response)
        item = ScoringItem.instruction_level(rendered)
        origin = rendered.instruction_span[0] - rendered.instruction_shift
        items.append(item)
        groups.append(unit_token_groups(split_units(instruction), item, context_spans(item, origin)))
    # A small batch budget: variants of one record land in different batches.
    batched = unit_occlusion(model, items, groups, max_tokens_per_batch=200)
    for (instruction, response), got in zip(SAMPLES, batched):
        expected = reference_occlusion(model, tokenizer, instruction, response)
        assert (expected > 0).sum() > 5
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["grad_x_input", "integrated_gradients", "occlusion"])
def test_every_method_scores_records_through_the_scorer(byte_model, byte_tokenizer, metaspace_model,
                                                         metaspace_tokenizer, method):
    config = ScoringConfig(corpus="c", method=method, ig_steps=3)
    scorer = PairScorer(metaspace_model, metaspace_tokenizer, byte_model, byte_tokenizer, config)
    records = [Record(str(i), ins, res) for i, (ins, res) in enumerate(SAMPLES)]
    scored, errors = scorer.score(records)
    assert not errors and len(scored) == len(SAMPLES)
    for s in scored:
        solid = s.scores.scored
        assert np.all(np.isnan(s.scores.diff[~solid]))
        assert s.scores.diff[solid].min() == 0 and s.scores.diff[solid].max() == 1
    (alone,), _ = scorer.score([records[2]])  # batching does not change a record's scores
    np.testing.assert_allclose(alone.scores.diff, scored[2].scores.diff, atol=1e-5)


# Iterative pruning against a loop that re-derives every decision: clauses by a regex on the
# text, reliance shares by summing squared unit scores, entropies by one unpadded forward per
# model, and each cut by string surgery on the current text. It shares only the scorer's
# per-round scores (tested above) with the code under test.
ITERATIVE_RECORDS = [
    Record("a", "ann has 3 . note : 7 is lucky . tom has 5 . ann gets 4 more . the bus left at 7 . how many ?", "7"),
    Record("b", "sue has 6 , bob has 1 ; sue gets 2 more . how many does sue have ?", "8"),
    Record("c", "hint : it is 9 . eva has 4 . eva gets 5 more . room 9 is empty . how many ?", "9"),
    Record("r", "lia has 2 . note : 5 is lucky . lia gets 3 more . how many ?",
           "lia has 2 .\nnote : 5 is lucky .\nlia gets 3 more .\n2 + 3 = 5 .\n#### 5"),
]


def reference_entropy(model, item: ScoringItem) -> float:
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([list(item.input_ids)])).logits[0].float(), -1)
    positions = [t - 1 for t in item.target_tokens if t > 0]
    return float(-(log_probs[positions].exp() * log_probs[positions]).sum(-1).mean())


def reference_iterative(scorer: PairScorer, record: Record, pruning: PruningConfig) -> str:
    """The scored text (instruction, or reasoning prefix) after iterative pruning, one record at a time."""
    response_level = scorer.config.level == "response"
    lines = record.response.split("\n")
    text = "\n".join(lines[:3]) + "\n" if response_level else record.instruction
    rest = "\n".join(lines[3:])
    for _ in range(pruning.max_rounds):
        if response_level:
            current = Record(record.id, record.instruction, text + rest)
            prepared = scorer.prepare(current, ((0, len(text)), (len(text), len(text) + len(lines[3]) + 1)))
        else:
            prepared = scorer.prepare(Record(record.id, text, record.response))
        (scored,) = scorer.score_prepared([prepared])
        units = scored.scores.units
        solid = [i for i, u in enumerate(units) if u.text.strip()]
        shares = []
        for raw in (scored.scores.teacher_raw, scored.scores.student_raw):
            total = sum(raw[i] ** 2 for i in solid)
            shares.append({i: raw[i] ** 2 / total for i in solid})
        clauses = [m.span() for m in re.finditer(r"[^\n]*?[.;,?](?=\s|$)|[^\n]+$", text, re.M) if m.group().strip()]
        best = None
        for start, end in clauses:
            inside = [i for i in solid if start <= units[i].start and units[i].end <= end and units[i].is_maskable]
            if inside:
                gap = sum(shares[1][i] for i in inside) - sum(shares[0][i] for i in inside)
                if best is None or gap > best[0]:
                    best = (gap, units[inside[0]].start, units[inside[-1]].end)
        teacher_h, student_h = (reference_entropy(model, item) for model, item in zip(scorer.models, prepared.items))
        if best is None or not (best[0] >= pruning.strong_gap or (
                best[0] >= pruning.min_gap and student_h - teacher_h <= pruning.entropy_margin)):
            break
        _, start, end = best
        if text[end:end + 1] == " ":
            end += 1
        elif text[start - 1:start] == " ":
            start -= 1
        text = text[:start] + text[end:]
    return text


# With these random models the top clause gaps are 0.15-0.19 and the student's entropy is
# 0.065-0.069 nats above the teacher's: the stopping rule below cuts record b by the strong
# gap, c through the entropy gate, and stops a (gap too small) and r (student too unsure).
@pytest.mark.parametrize("level", ["instruction", "response"])
@pytest.mark.parametrize("rule", [{"min_gap": 0.0, "strong_gap": 1.0, "entropy_margin": 99.0, "max_rounds": 3},
                                  {"min_gap": 0.155, "strong_gap": 0.18, "entropy_margin": 0.066, "max_rounds": 4}],
                         ids=["cut-every-round", "stopping-rule"])
def test_iterative_pruning_equals_a_loop_that_cuts_and_rescores(byte_model, byte_tokenizer, metaspace_model, level,
                                                                rule):
    from leaf_ray.detection.scorer import detect

    scorer = PairScorer(byte_model, byte_tokenizer, metaspace_model, byte_tokenizer,
                        ScoringConfig(corpus="c", level=level, prefix_fraction=0.6))
    pruning = PruningConfig(threshold="iterative", grow_spans="clause", mode="collective", **rule)
    records = [r for r in ITERATIVE_RECORDS if level == "instruction" or "\n" in r.response]
    scored, masks, _, errors = detect(scorer, pruning, records)
    assert not errors
    cut = {}
    for record, s, mask in zip(records, scored, masks):
        expected = reference_iterative(scorer, record, pruning)
        rows = counterfactuals(record, s.scores, pruning, level=level, text_offset=s.text_offset, mask=mask)
        got = (rows[0]["instruction"] if level == "instruction" else rows[0]["response"][:len(expected)]) \
            if rows else s.scores.text
        assert got == expected
        cut[record.id] = len(expected) < len(s.scores.text)
    if rule["min_gap"] == 0.0:
        assert all(cut.values())
    elif level == "instruction":
        assert cut == {"a": False, "b": True, "c": True, "r": False}


def scores_of(text: str, low: list[str]) -> UnitScores:
    """Scores where the units whose text is in ``low`` have diff 0 and all others 1."""
    units = split_units(text)
    diff = np.array([np.nan if u.is_space else 0.0 if u.text in low else 1.0 for u in units])
    return UnitScores(text, units, diff, diff, diff)


def test_clauses_end_at_terminators_before_space_and_at_line_breaks():
    text = "x is 3.5 , so y = f(x, 2) ; done ! next\ncode: a.b(c)"
    units = split_units(text)

    def pieces(ids) -> list[str]:
        clauses: dict[int, str] = {}
        for unit, clause in zip(units, ids):
            if clause >= 0:
                clauses[clause] = clauses.get(clause, "") + unit.text
        return [c.strip() for c in clauses.values()]

    assert pieces(clause_ids(units, "clause")) == ["x is 3.5 ,", "so y = f(x, 2) ;", "done !", "next", "code: a.b(c)"]
    assert pieces(clause_ids(units, "sentence")) == ["x is 3.5 , so y = f(x, 2) ; done !", "next", "code: a.b(c)"]


def test_growing_widens_a_flagged_number_to_its_clause_and_each_clause_is_a_counterfactual():
    text = "ann has 3 . note : 9 is lucky . the bus left at 4 . how many ?"
    scores = scores_of(text, ["9", "4"])
    plain, _ = confounder_mask(scores, PruningConfig(threshold="absolute", tau=0.0))
    assert [u.text for u, m in zip(scores.units, plain) if m] == ["9", "4"]
    grown, _ = confounder_mask(scores, PruningConfig(threshold="absolute", tau=0.0, grow_spans="clause"))
    assert "".join(u.text for u, m in zip(scores.units, grown) if m) == "note:9islucky.thebusleftat4."
    assert np.array_equal(grown, grow_to_clauses(scores.units, plain, "clause"))
    rows = counterfactuals(Record("r", text, "3"), scores,
                           PruningConfig(threshold="absolute", tau=0.0, grow_spans="clause"))
    assert [r["instruction"] for r in rows] == ["ann has 3 . the bus left at 4 . how many ?",
                                                "ann has 3 . note : 9 is lucky . how many ?"]


def test_max_spans_keeps_the_clause_of_the_lowest_diff_in_mask_and_cut():
    text = "ann has 3 . note : 9 is lucky . the bus left at 4 . how many ?"
    scores = scores_of(text, ["9", "4"])
    scores.diff[[u.text for u in scores.units].index("4")] = 0.05  # the bus clause is less suspect
    pruning = PruningConfig(threshold="absolute", tau=0.1, grow_spans="clause", max_spans=1)
    mask, _ = confounder_mask(scores, pruning)
    assert "".join(u.text for u, m in zip(scores.units, mask) if m) == "note:9islucky."
    (row,) = counterfactuals(Record("r", text, "3"), scores, pruning)
    assert row["instruction"] == "ann has 3 . the bus left at 4 . how many ?"


def test_growing_never_cuts_whitespace_or_crosses_a_line_break():
    text = "let y = 2 ;\nx = \\frac{1}{9} + y .\nreturn x"
    scores = scores_of(text, ["9"])
    mask, _ = confounder_mask(scores, PruningConfig(threshold="absolute", tau=0.0, grow_spans="clause"))
    flagged = [u for u, m in zip(scores.units, mask) if m]
    assert "".join(u.text for u in flagged) == "x=\\frac{1}{9}+y."
    assert all(u.is_maskable for u in flagged)


def test_detector_names_set_method_and_post_step():
    scoring, pruning = detector_configs("occlusion+best_clause", ScoringConfig(corpus="c"), PruningConfig(quantile=0.2))
    assert scoring.method == "occlusion" and pruning.grow_spans == "clause" and pruning.max_spans == 1
    assert pruning.quantile == 0.2  # the rest of the rule is kept
    assert len(DETECTORS) == 16 and "grad_norm" in DETECTORS
    _, iterative = detector_configs("grad_norm+iterative", ScoringConfig(corpus="c"), PruningConfig())
    assert iterative.threshold == "iterative" and iterative.grow_spans == "clause"
    with pytest.raises(ValueError, match="set grow_spans to clause or sentence"):
        PruningConfig(threshold="iterative")
    with pytest.raises(ValueError, match="unknown detector 'saliency'"):
        detector_configs("saliency", ScoringConfig(corpus="c"), PruningConfig())
    with pytest.raises(ValueError, match="unknown detector"):
        detector_configs("grad_norm+sentence", ScoringConfig(corpus="c"), PruningConfig())


def test_bench_detect_fills_the_leaderboard_and_renders_it(tmp_path):
    """`leaf-ray bench detect` on a few hard records: every detector graded, growing only adds
    units, the best-clause rule flags at most one clause per record, and the report shows it."""
    import json

    from typer.testing import CliRunner

    from leaf_ray.cli import app
    from tests.conftest import EMBEDDED

    results = tmp_path / "embedded.json"
    results.write_text(json.dumps({"families": {"hard": {"variants": {"kd": {"conflict_acc_mean": 0.1}}}}}))
    outcome = CliRunner().invoke(app, ["bench", "detect", "--embedded", str(EMBEDDED), "--families", "hard",
                                       "--records", "12", "--results", str(results),
                                       "--report-dir", str(tmp_path / "report")])
    assert outcome.exit_code == 0, outcome.output
    hard = json.loads(results.read_text())["families"]["hard"]
    assert hard["variants"] == {"kd": {"conflict_acc_mean": 0.1}}  # other figures are kept
    board = hard["detection_methods"]
    assert set(board) == set(DETECTORS)
    for method in ("grad_norm", "occlusion"):
        plain, grown, best = board[method], board[f"{method}+clause"], board[f"{method}+best_clause"]
        assert grown["clause"]["recall"] >= plain["clause"]["recall"]
        assert grown["flagged_per_record"] >= plain["flagged_per_record"] >= 1
        assert best["flagged_per_record"] <= 6  # the longest hard clause: "the shop opens at D ."
        assert all(0 <= row[part][k] <= 1 for row in (plain, grown, best) for part in ("clause", "number")
                   for k in ("precision", "recall", "f1"))
    page = (tmp_path / "report" / "report.html").read_text()
    assert 'id="detection-methods-hard"' in page and "occlusion+best_clause" in page
