"""Evaluation metrics and the `leaf-ray eval` command on tiny files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from leaf_ray.synthetic.tasks import make_split
from leaf_ray.cli import app
from leaf_ray.data import Record, write_jsonl
from leaf_ray.checkers import check_number, extract_number
from leaf_ray.evaluation import answer_accuracy, detection_by_count, detection_prf
from leaf_ray.detection.units import split_units
from tests.conftest import EMBEDDED


def test_number_checker():
    assert extract_number("the answer is 12.") == "12" and extract_number("none") is None
    assert check_number(" 7", "7") and not check_number("17", "7") and not check_number("", "7")


def test_accuracy_and_copy_rate_by_hand():
    records = [r for r in make_split("simple", "test_conflict", 40, seed=0) if r["meta"]["correlated_count"] >= 2][:4]
    # A copy of any correlated clause's number counts, the last one's too.
    shortcut = [str(r["meta"]["distractors"][-1]["number"]) for r in records]
    predictions = [records[0]["answer"], shortcut[1], shortcut[2], "nonsense"]
    report = answer_accuracy(predictions, [Record.from_dict(r) for r in records])
    assert report.accuracy == 0.25 and report.copy_rate == 0.5
    clean = [Record.from_dict(r) for r in make_split("simple", "test_clean", 2, seed=0)]
    assert answer_accuracy(["1", "2"], clean).copy_rate is None  # nothing to copy


def scores_row(record, masked_spans):
    units = split_units(record["instruction"])
    return {"id": record["id"], "level": "instruction", "unit_text": [u.text for u in units],
            "unit_start": [u.start for u in units], "unit_end": [u.end for u in units],
            "masked": [any(a <= u.start and u.end <= b for a, b in masked_spans) and bool(u.text.strip())
                       for u in units]}


def test_detection_prf_against_ground_truth():
    records = [r for r in make_split("hard", "distill", 20, seed=0) if r["meta"]["correlated_count"] == 1]
    clause = [tuple(d["clause_span"]) for d in records[0]["meta"]["distractors"] if d["correlated"]]
    number = [tuple(d["number_span"]) for d in records[0]["meta"]["distractors"] if d["correlated"]]
    perfect = scores_row(records[0], clause)
    rows = [(list(zip(perfect["unit_start"], perfect["unit_end"], perfect["unit_text"])), perfect["masked"],
             records[0]["meta"])]
    report = detection_prf(rows, "clause")
    assert (report.precision, report.recall, report.f1) == (1.0, 1.0, 1.0)
    only_number = scores_row(records[0], number)
    rows = [(list(zip(only_number["unit_start"], only_number["unit_end"], only_number["unit_text"])),
             only_number["masked"], records[0]["meta"])]
    clause_units = sum(1 for u in split_units(records[0]["instruction"])
                       if u.text.strip() and clause[0][0] <= u.start and u.end <= clause[0][1])
    report = detection_prf(rows, "clause")
    assert report.precision == 1.0 and report.recall == pytest.approx(1 / clause_units)
    assert detection_prf(rows, "number").f1 == 1.0


def test_false_cuts_and_recall_by_count_by_hand():
    records = make_split("hard", "distill", 200, seed=0)
    none = [r for r in records if r["meta"]["correlated_count"] == 0][:2]
    two = next(r for r in records if r["meta"]["correlated_count"] == 2)

    def graded(record, spans):
        row = scores_row(record, spans)
        return list(zip(row["unit_start"], row["unit_end"], row["unit_text"])), row["masked"], record["meta"]

    uncorrelated = [tuple(d["clause_span"]) for d in none[0]["meta"]["distractors"]]
    first, second = [tuple(d["clause_span"]) for d in two["meta"]["distractors"] if d["correlated"]]
    report = detection_by_count([
        graded(none[0], uncorrelated),  # a distractor without a shortcut: cut, but not a false cut
        graded(none[1], [tuple(none[1]["meta"]["question_span"])]),  # the question: a false cut
        graded(two, [first]),  # one of two confounders found
    ])
    assert report.false_cut_rate == 0.5
    first_units = sum(1 for u in split_units(two["instruction"]) if u.text.strip() and first[0] <= u.start < first[1])
    second_units = sum(1 for u in split_units(two["instruction"]) if u.text.strip() and second[0] <= u.start < second[1])
    assert report.multi_confounder_recall == pytest.approx(first_units / (first_units + second_units))
    assert report.cut_records_by_count == {0: 1.0, 2: 1.0} and report.records_by_count == {0: 2, 2: 1}
    assert detection_by_count([graded(two, [])]).false_cut_rate is None  # no record without a confounder


@pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")
def test_eval_command_on_a_tiny_file(tmp_path):
    from leaf_ray.models import load_model
    from leaf_ray.evaluation import greedy_generate

    records = make_split("simple", "test_conflict", 12, seed=5)
    data = tmp_path / "tiny.jsonl"
    write_jsonl(data, records)
    scores = tmp_path / "scores.jsonl"
    write_jsonl(scores, [scores_row(r, [tuple(d["clause_span"]) for d in r["meta"]["distractors"]]) for r in records])
    result = CliRunner().invoke(app, ["eval", "--model", str(EMBEDDED / "student"), "--data", str(data),
                                      "--scores", str(scores), "--attention", "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "r.json").read_text())["files"][str(data)]

    model, tokenizer = load_model(EMBEDDED / "student")
    predictions = greedy_generate(model, tokenizer, [r["instruction"] for r in records])
    expected = answer_accuracy(predictions, [Record.from_dict(r) for r in records])
    assert entry["n"] == 12 and entry["accuracy"] == expected.accuracy and entry["copy_rate"] == expected.copy_rate
    assert entry["detection"]["clause"]["f1"] == 1.0
    assert 0.0 < entry["attention_mass"] < 1.0

    bad = tmp_path / "no_answer.jsonl"
    write_jsonl(bad, [{"id": "a", "instruction": "x", "response": "y"}])
    result = CliRunner().invoke(app, ["eval", "--model", str(EMBEDDED / "student"), "--data", str(bad)])
    assert result.exit_code != 0 and "answer" in result.output
