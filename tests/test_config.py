"""Config models: YAML loading, unknown keys rejected, errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from leaf_ray.config import BenchmarkConfig, ConfigError, DistillationConfig, PipelineConfig, PruningConfig, ServingConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    if path.name == "benchmark.yaml":
        assert load_config(path, BenchmarkConfig) == BenchmarkConfig(), "configs/benchmark.yaml documents the defaults"
        return
    if path.name.startswith("benchmark-"):  # another build's BenchmarkConfig
        assert load_config(path, BenchmarkConfig).output_dir != BenchmarkConfig().output_dir
        return
    if path.name.startswith("reproduce"):  # bench reproduce's shared DistillationConfig
        assert load_config(path, DistillationConfig).max_steps > 0
        return
    config = load_config(path, PipelineConfig)
    assert config.teacher and config.student and config.pruning.quantile_cap <= 1


def test_unknown_key_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher: t\nstudent: s\nscoring: {corpus: c, max_lenght: 10}\n")
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
                  C.EvaluationConfig, C.ServingConfig, C.ResourcesConfig, C.BenchmarkConfig, C.ModelRecipe,
                  C.ColumnMapping, C.TeacherCacheConfig):
        for name in model.model_fields:
            assert f"| `{name}` |" in section, f"README does not document {model.__name__}.{name}"


def test_the_run_folder_derives_every_stage_path():
    raw = {"name": "exp1", "run_dir": "runs/exp1", "teacher": "t", "student": "s", "scoring": {"corpus": "c.jsonl"},
           "distillation": {}, "serving": {}}
    config = PipelineConfig.model_validate(raw)
    layout = config.layout
    assert (layout.score, layout.verify, layout.evaluation) == (
        Path("runs/exp1/score"), Path("runs/exp1/verify"), Path("runs/exp1/evaluation.json"))
    assert layout.model("leaf") == Path("runs/exp1/distill/leaf/model")
    assert layout.variant_data("oracle") == Path("runs/exp1/variants/oracle")
    assert config.serving.model is None and config.serving.model_id == "exp1"  # serves the run's LeaF student
    moved = config.model_copy(update={"run_dir": "/elsewhere"})  # what --run-dir does
    assert moved.layout.model("kd") == Path("/elsewhere/distill/kd/model")
    raw["serving"] = {"model_id": "chosen", "model": "m"}
    config = PipelineConfig.model_validate(raw)
    assert config.serving.model_id == "chosen" and config.serving.model == "m"


@pytest.mark.parametrize("section, key", [("scoring", "teacher"), ("scoring", "output_dir"),
                                          ("distillation", "data_dir"), ("distillation", "student")])
def test_paths_and_models_are_declared_once(tmp_path, section, key):
    """Stage folders come from run_dir and the models from the top level: repeating them is an error."""
    path = tmp_path / "old.yaml"
    raw = {"teacher": "t", "student": "s", "scoring": {"corpus": "c"}, "distillation": {}}
    raw[section][key] = "x"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"{section}.{key}: Extra inputs"):
        load_config(path, PipelineConfig)


def test_validate_rejects_a_variant_its_section_contradicts(tmp_path):
    from typer.testing import CliRunner

    from leaf_ray.cli import app

    raw = {"teacher": "t", "student": "s", "scoring": {"corpus": "c"}, "variants": ["kd"],
           "distillation": {"variant": "kd", "lam": 0.5}}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "distillation.lam: variant 'kd' trains with lam = 1.0" in result.output
    raw["distillation"] = {"lam": 0.5}  # a shared section written for LeaF: kd is normalised, not refused
    path.write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0
