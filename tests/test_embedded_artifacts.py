"""The committed embedded artifacts are what `leaf-ray bench build` declares, and meet the bar."""

from __future__ import annotations

import json

import pytest

from leaf_ray.synthetic.build import code_hash, config_hash, file_hashes
from leaf_ray.config import BenchmarkConfig
from tests.conftest import EMBEDDED

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
