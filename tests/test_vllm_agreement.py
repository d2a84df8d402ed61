"""Greedy answers from transformers and from vLLM (CPU build, real engine) agree on the embedded models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leaf_ray.benchmark.tasks import make_split
from leaf_ray.data import write_jsonl
from leaf_ray.detection import load_model
from leaf_ray.evaluation import greedy_generate
from tests.conftest import EMBEDDED

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_vllm_and_transformers_agree(name, tmp_path):
    records = make_split("simple", "test_conflict", 20, seed=11) + make_split("hard", "test_conflict", 20, seed=11)
    data = tmp_path / "prompts.jsonl"
    write_jsonl(data, records)
    report = tmp_path / "report.json"
    # The CLI in a subprocess: vLLM spawns its engine workers from a __main__-guarded entry point.
    leaf_ray_cli = Path(sys.executable).with_name("leaf-ray")
    run = subprocess.run([str(leaf_ray_cli), "eval", "--engine", "vllm", "--model", str(EMBEDDED / name),
                          "--data", str(data), "--output", str(report)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    from_vllm = json.loads(report.read_text())["files"][str(data)]["predictions"]

    model, tokenizer = load_model(EMBEDDED / name)
    from_hf = greedy_generate(model, tokenizer, [r["instruction"] for r in records])
    assert [from_vllm[r["id"]] for r in records] == from_hf
