"""Config models: YAML loading, unknown keys rejected, errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from leaf_ray.config import BenchmarkConfig, ConfigError, PipelineConfig, PruningConfig, ServingConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    if path.name == "benchmark.yaml":
        assert load_config(path, BenchmarkConfig) == BenchmarkConfig(), "configs/benchmark.yaml documents the defaults"
        return
    config = load_config(path, PipelineConfig)
    assert config.scoring.teacher and config.pruning.quantile_cap <= 1


def test_unknown_key_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("scoring: {teacher: t, student: s, corpus: c, max_lenght: 10}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, PipelineConfig)
    message = str(info.value)
    assert str(path) in message and "scoring.max_lenght" in message and "Extra inputs" in message


def test_wrong_value_names_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("threshold: median\nquantile: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, PruningConfig)
    assert "threshold:" in str(info.value) and "quantile:" in str(info.value)


def test_cross_field_rule_and_bad_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: m\nmin_replicas: 3\nmax_replicas: 1\n")
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(path, ServingConfig)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, ServingConfig)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml", ServingConfig)


def test_readme_documents_every_config_field():
    from pathlib import Path

    from leaf_ray import config as C

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Configuration"):]
    for model in (C.PipelineConfig, C.ScoringConfig, C.PruningConfig, C.VerificationConfig, C.DistillationConfig,
                  C.EvaluationConfig, C.ServingConfig, C.ResourcesConfig, C.BenchmarkConfig, C.ModelRecipe):
        for name in model.model_fields:
            assert f"| `{name}` |" in section, f"README does not document {model.__name__}.{name}"


def test_pipeline_fills_stage_defaults_from_the_run():
    from leaf_ray.config import PipelineConfig

    raw = {"name": "exp1", "scoring": {"teacher": "t", "student": "s", "corpus": "c.jsonl"},
           "distillation": {"teacher": "t", "student": "s", "data_dir": "d"}, "serving": {"model": "m"}}
    config = PipelineConfig.model_validate(raw)
    assert config.distillation.corpus == "c.jsonl" and config.serving.model_id == "exp1"
    raw["serving"]["model_id"] = "chosen"
    raw["distillation"]["corpus"] = "other.jsonl"
    config = PipelineConfig.model_validate(raw)
    assert config.distillation.corpus == "other.jsonl" and config.serving.model_id == "chosen"
