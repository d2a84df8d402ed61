"""Expected refusals through the real command line (the installed ``leaf-ray`` script, in a
subprocess): one ``error:`` line that says what to change, exit status 2, no traceback.

Each refusal comes from a real check: a local Ray cluster starts where the check needs one
(capacity, folders, tokenizers are checked by the driver before any Ray work is scheduled)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leaf_ray.synthetic.tokenizer import train_tokenizer
from tests.conftest import CORPUS, tiny_llama

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.ray


def refusal(args: list[str], cwd: Path) -> str:
    """Run ``leaf-ray args``; assert the refusal's shape and return its one line."""
    env = {**os.environ, "RAY_ADDRESS": "local"}
    done = subprocess.run([BIN / "leaf-ray", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two tiny models with different tokenizers, a one-file corpus, and a config writer."""
    root = tmp_path_factory.mktemp("refusals")
    for name, kind, seed in (("byte", "byte_bpe", 0), ("metaspace", "metaspace_bpe", 1)):
        tokenizer = train_tokenizer(CORPUS, vocab_size=420, kind=kind)
        model = tiny_llama(len(tokenizer), seed=seed)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "corpus.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "instruction": f"ann has {i} . how many ?", "response": str(i)}) + "\n"
        for i in range(4)))
    return root


def config(root: Path, name: str, **sections) -> Path:
    body = {"name": name, "run_dir": str(root / "runs" / name), "teacher": str(root / "byte"),
            "student": str(root / "byte"), "scoring": {"corpus": str(root / "corpus.jsonl"), "num_actors": 1,
                                                       "resources": {"num_cpus": 1}}}
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_a_missing_corpus_column(workspace):
    path = config(workspace, "column", scoring={"columns": {"instruction": "problem"}})
    line = refusal(["score", "--config", str(path)], workspace)
    assert "scoring.columns.instruction: column 'problem' is not in the corpus" in line


def test_an_impossible_resources_request(workspace):
    path = config(workspace, "resources", scoring={"resources": {"num_cpus": 1000}})
    line = refusal(["score", "--config", str(path)], workspace)
    assert line.startswith("error: scoring.resources / scoring.num_actors: 1 x {CPU: 1000")
    assert "can never be scheduled on this cluster" in line


def test_a_folder_another_run_holds(workspace):
    path = config(workspace, "locked")
    folder = workspace / "runs" / "locked" / "score"
    folder.mkdir(parents=True)
    with (folder / ".lock").open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running job holds it
        handle.write(f"pid {os.getpid()} on test")
        handle.flush()
        line = refusal(["score", "--config", str(path)], workspace)
    assert f"{folder} is in use by another run (pid {os.getpid()} on test)" in line


def test_a_changed_fingerprint(workspace):
    from leaf_ray.config import PipelineConfig, PruningConfig, load_config
    from leaf_ray.distributed.scoring import scoring_fingerprint

    path = config(workspace, "fingerprint")
    folder = workspace / "runs" / "fingerprint" / "score"
    folder.mkdir(parents=True)
    # What a run with another pruning rule left in the folder.
    other = load_config(path, PipelineConfig).model_copy(update={"pruning": PruningConfig(quantile=0.2)})
    (folder / "fingerprint.json").write_text(json.dumps(scoring_fingerprint(other)))
    line = refusal(["score", "--config", str(path)], workspace)
    assert f"{folder} holds the output of another run (pruning changed (" in line and '"quantile": 0.2' in line
    assert "Delete" in line and "run_dir" in line


def test_a_cross_tokenizer_distillation(workspace):
    path = config(workspace, "tokenizers", student=str(workspace / "metaspace"),
                  distillation={"max_steps": 1, "batch_size": 2, "variant": "kd", "lam": 1.0})
    line = refusal(["distill", "--config", str(path)], workspace)
    assert "teacher and student tokenizers differ" in line and "pick a teacher of the student's family" in line


def test_an_invalid_config_field(workspace):
    path = config(workspace, "invalid", pruning={"threshold": "iterative"})
    done = subprocess.run([BIN / "leaf-ray", "validate", str(path)], cwd=workspace, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "threshold 'iterative' cuts whole clauses: set grow_spans to clause or sentence" in done.stderr
