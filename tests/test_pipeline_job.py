"""The pipeline submitted as a real Ray job: `ray start --head`, then
`ray job submit --working-dir . -- python jobs/pipeline.py --config configs/ci.yaml`, with the
cluster's default token authentication left on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EMBEDDED

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")]


@pytest.fixture
def cluster():
    """A head node on its own ports; the venv first on PATH so the job's `python` is this one.
    Token authentication stays on: `ray start` writes ~/.ray/auth_token, and the CLI sends it
    when RAY_AUTH_MODE=token (as the README says)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run([BIN / "ray", "start", "--head", "--port", "6390", "--dashboard-port", "8275",
                              "--num-cpus", "4", "--disable-usage-stats"], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    yield {**env, "RAY_ADDRESS": "http://127.0.0.1:8275"}
    subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True)


def test_submitted_pipeline_writes_the_report_and_models(cluster, tmp_path):
    run = tmp_path / "run"
    job = subprocess.run([BIN / "ray", "job", "submit", "--working-dir", ".", "--",
                          "python", "jobs/pipeline.py", "--config", "configs/ci.yaml", "--run-dir", str(run)],
                         cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout + job.stderr
    assert "variant kd: lam: 0.5 -> 1.0" in job.stdout + job.stderr

    report = json.loads((run / "report.json").read_text())
    assert set(report["accuracy"]) == {"teacher", "student", "kd", "leaf", "leaf_instr_resp"}
    assert "response-level" in report["accuracy"].pop("leaf_instr_resp")["skipped"]
    for row in report["accuracy"].values():
        assert set(row) == {"test_conflict", "test_clean"} and all(0 <= v <= 1 for v in row.values())
    assert report["accuracy"]["teacher"]["test_conflict"] > 0.9  # the embedded teacher is right
    assert 0 < report["detection"]["clause"]["f1"] <= 1
    assert set(report["attention"]) == {"student", "kd", "leaf"}
    assert len(report["samples"]) == 3
    assert {"prepare", "score", "distill_kd", "distill_leaf", "evaluate"} <= set(report["stages"])
    assert report["scoring"]["scored"] == 2000
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "LeaF" in html
    for variant in ("kd", "leaf"):
        export = json.loads((run / "distill" / variant / "export.json").read_text())
        assert export["metrics"]["step"] == 40
        assert export["lam"] == (1.0 if variant == "kd" else 0.5)  # the kd variant's rule, applied visibly
        assert (run / "distill" / variant / "model" / "model.safetensors").exists()

    # A rerun resumes: every stage is complete, so each one is skipped.
    again = subprocess.run([BIN / "ray", "job", "submit", "--working-dir", ".", "--",
                            "python", "jobs/pipeline.py", "--config", "configs/ci.yaml", "--run-dir", str(run)],
                           cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:]
    stages = json.loads((run / "report.json").read_text())["stages"]
    assert all(stage["skipped"] for name, stage in stages.items() if name != "prepare"), stages
