"""The committed embedded artifacts are what `leaf-ray bench build` declares, and meet the bar."""

from __future__ import annotations

import json

import pytest

from leaf_ray.synthetic.build import code_hash, config_hash, file_hashes
from leaf_ray.config import BenchmarkConfig, load_config
from tests.conftest import EMBEDDED

ROOT = EMBEDDED.parents[1]
REASONING = load_config(ROOT / "configs" / "benchmark-reasoning.yaml", BenchmarkConfig)

pytestmark = pytest.mark.skipif(not (EMBEDDED / "provenance.json").exists(), reason="embedded models not built")


@pytest.fixture(scope="module")
def provenance():
    return json.loads((EMBEDDED / "provenance.json").read_text())


def test_artifacts_match_the_declared_build(provenance):
    assert provenance["config_hash"] == config_hash(BenchmarkConfig()), "defaults changed: rerun `leaf-ray bench build`"
    assert provenance["code_hash"] == code_hash(), "benchmark code changed: rerun `leaf-ray bench build`"
    assert provenance["files"] == file_hashes(EMBEDDED)


def test_figures_meet_the_benchmark_bar(provenance):
    for family in ("simple", "hard"):
        figures = provenance["figures"][family]
        assert figures["teacher"]["test_conflict"]["accuracy"] >= 0.95
        assert figures["teacher"]["test_heldout"]["accuracy"] >= 0.9  # wordings it never saw
        assert figures["student"]["test_conflict"]["accuracy"] <= 0.30
        assert figures["student"]["test_conflict"]["copy_rate"] >= 0.40
        assert 0.0 < figures["detection"]["clause"]["f1"] <= 1.0


def test_models_load_with_transformers_and_answer_like_provenance(provenance):
    from leaf_ray.synthetic.tasks import make_split
    from leaf_ray.models import load_model
    from leaf_ray.data import Record
    from leaf_ray.evaluation import accuracy

    config = BenchmarkConfig()
    records = [Record.from_dict(r) for r in make_split("simple", "test_conflict", config.test_conflict_records,
                                                           config.seed)[:100]]
    for name in ("teacher", "student"):
        model, tokenizer = load_model(EMBEDDED / name)
        assert model.config.hidden_size // model.config.num_attention_heads == 64
        measured = accuracy(model, tokenizer, records).accuracy
        recorded = provenance["figures"]["simple"][name]["test_conflict"]["accuracy"]
        assert abs(measured - recorded) <= 0.1, (name, measured, recorded)


@pytest.fixture(scope="module")
def reasoning_provenance():
    return json.loads((ROOT / REASONING.output_dir / "provenance.json").read_text())


def test_reasoning_build_matches_its_config_and_meets_the_bar(reasoning_provenance):
    provenance = reasoning_provenance
    assert provenance["config_hash"] == config_hash(REASONING), "configs/benchmark-reasoning.yaml changed: rebuild"
    assert provenance["code_hash"] == code_hash(REASONING.families), "reasoning code changed: rebuild"
    assert provenance["files"] == file_hashes(ROOT / REASONING.output_dir)
    figures = provenance["figures"]["reasoning"]
    assert figures["teacher"]["test_conflict"]["accuracy"] >= 0.95
    assert figures["student"]["test_conflict"]["accuracy"] <= 0.30
    assert figures["student"]["test_conflict"]["copy_rate"] >= 0.40
    # No-note records are in the student's pre-training: clean prompts are in distribution.
    assert figures["student"]["test_clean"]["accuracy"] >= 0.6


def test_reasoning_records_are_multi_step_with_ground_truth_in_both_places():
    from leaf_ray.data import iter_records
    from leaf_ray.detection.pruning import response_prefix

    records = list(iter_records(ROOT / REASONING.output_dir / "data" / "reasoning" / "distill.jsonl"))
    assert len(records) == REASONING.distill_records
    with_note = [r for r in records if r.meta["response_distractors"]]
    assert 0.7 * len(records) < len(with_note) < 0.8 * len(records)  # a quarter of the records hold no note
    for record in records[:300]:
        lines = record.response.split("\n")
        assert len(lines) == 4 + len(record.meta["response_distractors"]) and lines[-1] == f"#### {record.answer}"
        # The response-level prefix (the facts, and the note where there is one); the next step is the sum.
        (p0, p1), (s0, s1) = response_prefix(record.response, "line", 4, 0.6)
        assert "+" in record.response[s0:s1] and "+" not in record.response[p0:p1]
        for note in record.meta["response_distractors"]:
            (clause,) = [d for d in record.meta["distractors"] if d["correlated"]]
            a, b = note["clause_span"]
            assert record.response[a:b] == record.instruction[slice(*clause["clause_span"])]
            assert p0 <= a and b <= p1


def test_reasoning_models_answer_like_provenance(reasoning_provenance):
    from leaf_ray.data import Record
    from leaf_ray.evaluation import accuracy
    from leaf_ray.models import load_model
    from leaf_ray.synthetic.reasoning import make_reasoning_split

    records = [Record.from_dict(r) for r in make_reasoning_split("test_conflict", 100, REASONING.seed)]
    for name in ("teacher", "student"):
        model, tokenizer = load_model(ROOT / REASONING.output_dir / name)
        measured = accuracy(model, tokenizer, records, "gsm8k", 40).accuracy
        recorded = reasoning_provenance["figures"]["reasoning"][name]["test_conflict"]["accuracy"]
        assert abs(measured - recorded) <= 0.1, (name, measured, recorded)


def test_every_committed_results_row_measured_this_build():
    """benchmarks/results/embedded.json holds no row of another build: each family's figures and each
    variant row carry the code hash of the sources that build that family today (a changed generator
    makes this fail until `make reproduce` re-measures)."""
    results = json.loads((ROOT / "benchmarks" / "results" / "embedded.json").read_text())["families"]
    assert {"simple", "hard", "reasoning"} <= set(results)
    for family, figures in results.items():
        current = code_hash(REASONING.families if family == "reasoning" else None)
        assert figures["code_hash"] == current, family
        sections = [key for key in figures if key.endswith("variants")]
        assert "variants" in sections, family
        for section in sections:
            assert figures[section], (family, section)
            stale = [name for name, row in figures[section].items() if row["build"]["code_hash"] != current]
            assert not stale, (family, section, stale)
        for method, row in figures["detection_methods"].items():
            assert {"false_cut_rate", "multi_confounder_recall"} <= set(row), (family, method)
