"""The pipeline submitted as a real Ray job: `ray start --head`, then
`ray job submit --working-dir . -- python jobs/pipeline.py --config configs/ci.yaml`, with the
cluster's default token authentication left on. The config's corpus and test file are cut to
their first records (:func:`ci_config`): every stage runs as in CI, on less data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leaf_ray.config import PipelineConfig, load_config
from leaf_ray.data import TrainingPair
from leaf_ray.detection.store import read_training_set, store_parts
from leaf_ray.distillation.variants import instruction_cuts, scored_part, variant_pairs, with_instruction_cuts
from tests.conftest import EMBEDDED

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The Makefile's cluster start, as `make demo` runs it, on a fresh machine: HOME is an empty
    folder (no ~/.ray, no token yet) and no cluster is running. (tests/test_serve.py attaches
    `leaf-ray serve` to a cluster started so.) Token authentication stays on:
    the CLI sends the token from HOME/.ray/auth_token when RAY_AUTH_MODE=token (as the README says).
    Own ports, so that it never meets a cluster `make demo` left running."""
    home = tmp_path_factory.mktemp("fresh-home")
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    args = "--port 6390 --dashboard-port 8275 --num-cpus 4 --disable-usage-stats"
    started = subprocess.run(["make", "--no-print-directory", "cluster", f"RAY_HEAD_ARGS={args}"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    assert (home / ".ray" / "auth_token").read_text().strip()  # made for this HOME, not borrowed
    yield {**env, "RAY_ADDRESS": "http://127.0.0.1:8275"}
    subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True)


CORPUS_RECORDS, TEST_RECORDS = 300, 50


@pytest.fixture(scope="module")
def ci_config(tmp_path_factory) -> Path:
    """configs/ci.yaml on the first CORPUS_RECORDS records of its corpus and the first
    TEST_RECORDS of its test file (written beside it): the stages and their settings are CI's,
    the data smaller, so that the suite stays short."""
    import yaml

    folder = tmp_path_factory.mktemp("ci-config")
    config = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())

    def first(path: str, count: int) -> str:
        cut = folder / Path(path).name
        cut.write_text("".join((ROOT / path).read_text().splitlines(keepends=True)[:count]))
        return str(cut)

    config["scoring"]["corpus"] = first(config["scoring"]["corpus"], CORPUS_RECORDS)
    config["evaluation"]["data"] = [first(config["evaluation"]["data"][0], TEST_RECORDS)]
    (folder / "ci.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "ci.yaml"


def test_submitted_pipeline_writes_the_report_and_models(cluster, ci_config, tmp_path):
    run = tmp_path / "run"
    job = subprocess.run([BIN / "ray", "job", "submit", "--working-dir", ".", "--",
                          "python", "jobs/pipeline.py", "--config", str(ci_config), "--run-dir", str(run)],
                         cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "variant kd: lam: 0.5 -> 1.0" in job.stdout + job.stderr

    report = json.loads((run / "report.json").read_text())
    assert set(report["accuracy"]) == {"teacher", "student", "kd", "leaf", "leaf_instr_resp", "oracle_instr_resp"}
    for row in report["accuracy"].values():
        assert set(row) == {"test_conflict"} and all(0 <= v <= 1 for v in row.values())
    assert report["accuracy"]["teacher"]["test_conflict"] > 0.9  # the embedded teacher is right
    assert 0 < report["detection"]["clause"]["f1"] <= 1
    assert set(report["attention"]) == {"student", "kd", "leaf", "leaf_instr_resp", "oracle_instr_resp"}
    assert len(report["samples"]) == 3
    assert {"prepare", "score", "score_response", "distill_kd", "distill_leaf", "distill_leaf_instr_resp",
            "distill_oracle_instr_resp", "evaluate"} <= set(report["stages"])
    assert report["scoring"]["scored"] == report["scoring_response"]["scored"] == CORPUS_RECORDS
    # leaf_instr_resp trains on both levels' pairs; a response-level pair learns only after its prefix.
    pairs = read_training_set(run / "variants" / "leaf_instr_resp")
    levels = [p.level for p in pairs]
    assert levels.count("instruction") == levels.count("response") == CORPUS_RECORDS
    response_pairs = [p for p in pairs if p.level == "response" and p.counterfactuals]
    assert response_pairs and all(p.original.target_start > 0 and c.target_start > 0
                                  for p in response_pairs for c in p.counterfactuals)
    # Their counterfactuals lose the instruction's cuts too, where the instruction-level pass cut something.
    cut_instructions = {p.original.id: p.counterfactuals[0].instruction for p in pairs
                        if p.level == "instruction" and len(p.counterfactuals) == 1}
    assert any(c.instruction == cut_instructions[p.original.id] != p.original.instruction
               for p in response_pairs if p.original.id in cut_instructions for c in p.counterfactuals)
    # The oracle cuts the ground-truth note from the prompt and the reasoning prefix together.
    oracle = [p for p in read_training_set(run / "variants" / "oracle_instr_resp") if p.level == "response"]
    with_note = [p for p in oracle if "note :" in p.original.instruction]
    assert with_note and all(len(p.counterfactuals) == 1 for p in with_note)
    for p in with_note:
        (c,) = p.counterfactuals
        assert "note :" not in c.instruction and "note :" not in c.response[:c.target_start]
        assert c.response[c.target_start:] == p.original.response[p.original.target_start:]  # the same target
    # Both sets equal the same pairs joined in one process over the whole stores (the reference).
    config = load_config(ci_config, PipelineConfig).model_copy(update={"run_dir": str(run)})
    for variant in ("leaf_instr_resp", "oracle_instr_resp"):
        assert read_training_set(run / "variants" / variant) == joined_in_one_process(config, variant)
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "LeaF" in html
    for variant in ("kd", "leaf", "leaf_instr_resp", "oracle_instr_resp"):
        export = json.loads((run / "distill" / variant / "export.json").read_text())
        assert export["metrics"]["step"] == 20
        assert export["lam"] == (1.0 if variant == "kd" else 0.5)  # the kd variant's rule, applied visibly
        assert (run / "distill" / variant / "model" / "model.safetensors").exists()

    # A rerun resumes: every stage is complete, so each one is skipped.
    again = subprocess.run([BIN / "ray", "job", "submit", "--working-dir", ".", "--",
                            "python", "jobs/pipeline.py", "--config", str(ci_config), "--run-dir", str(run)],
                           cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:]
    rerun = json.loads((run / "report.json").read_text())
    assert all(stage["skipped"] for name, stage in rerun["stages"].items() if name != "prepare"), rerun["stages"]
    # Every corpus row is done, so neither scoring pass started its model stage (loading both models).
    for summary in (rerun["scoring"], rerun["scoring_response"]):
        assert summary["this_run"]["skipped_as_done"] == CORPUS_RECORDS and "model_stage" not in summary["this_run"]


def joined_in_one_process(config: PipelineConfig, variant: str) -> list[TrainingPair]:
    """A ``*_instr_resp`` set built the slow, obvious way: every record of both stores in memory,
    the instruction cuts in a dict by id."""
    layout, pruning, seed = config.layout, config.pruning, config.distillation.seed

    def everything(store: Path, level: str):
        parts = [scored_part(store, part, level) for part in store_parts(store)]
        return [s for scored, _ in parts for s in scored], [m for _, masks in parts for m in masks]

    scored, masks = everything(layout.score, "instruction")
    cuts = instruction_cuts(variant, scored, pruning, seed, masks)
    if variant == "leaf_instr_resp":  # the detector's own pairs, as scoring wrote them
        instruction, response = read_training_set(layout.score), read_training_set(layout.score_response)
    else:
        response_scored, response_masks = everything(layout.score_response, "response")
        instruction = variant_pairs(variant, scored, pruning, seed, masks)
        response = variant_pairs(variant, response_scored, pruning, seed, response_masks)
    pairs = instruction + [with_instruction_cuts(pair, cuts) for pair in response]
    return sorted(pairs, key=lambda p: (p.original.id, p.level))
