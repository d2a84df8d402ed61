"""The Ray Data scoring job on a real local Ray cluster: bad records, kill and resume."""

from __future__ import annotations

import decimal
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from leaf_ray.detection.store import read_jsonl_parts, read_originals, read_scores, read_training_set
from tests.conftest import EMBEDDED

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")]

BAD_LINES = [
    b'{"id": "broken", "instruction": "ann has',                                    # malformed JSON
    json.dumps({"id": "no-response", "instruction": "ann has 3 ."}).encode(),          # missing field
    json.dumps({"id": "empty", "instruction": "  ", "response": "3"}).encode(),        # empty instruction
    json.dumps({"id": "too-long", "instruction": "ann has 3 . " * 80, "response": "3"}).encode(),
    b'{"id": "latin1", "instruction": "caf\xe9 has 3", "response": "3"}',              # not UTF-8
]
BAD_KEYS = {"no-response", "empty", "too-long"}
EXTRA = 3  # records with Parquet columns JSON cannot hold (a timestamp, a decimal, bytes)


def make_corpus(root: Path, good: int) -> tuple[Path, set[str]]:
    """a.jsonl: half the good records, the bad lines, then a repeat of its first id; b.parquet: the
    other half; c.parquet: EXTRA more good records with odd column types, a repeat of an id of
    b.parquet, and a date no Python date can hold. The Parquet files have several row groups."""
    lines = (EMBEDDED / "data" / "simple" / "distill.jsonl").read_bytes().splitlines()[:good + EXTRA]
    records = [json.loads(line) for line in lines]
    corpus = root / "corpus"
    corpus.mkdir()
    half = good // 2
    repeat = {**records[0], "instruction": "a repeat of the first id"}
    (corpus / "a.jsonl").write_bytes(b"\n".join(lines[:half] + BAD_LINES + [json.dumps(repeat).encode()]) + b"\n")
    pq.write_table(pa.Table.from_pylist(records[half:good]), corpus / "b.parquet", row_group_size=50)
    odd = records[good:] + [{**records[half], "instruction": "a repeat of an id of b.parquet"}, records[half + 1]]
    odd[-1] = {**odd[-1], "id": "bad-date"}
    table = pa.Table.from_pylist(odd).append_column(
        "crawled", pa.array([10**18] * len(odd), pa.timestamp("ns"))).append_column(
        "price", pa.array([decimal.Decimal("2.50")] * len(odd), pa.decimal128(5, 2))).append_column(
        "blob", pa.array([b"\xff\x00"] * len(odd))).append_column(
        "published", pa.array([1] * (len(odd) - 1) + [2**31 - 1], pa.date32()))
    pq.write_table(table, corpus / "c.parquet", row_group_size=2)
    return corpus, {r["id"] for r in records}


ODD_META = {"crawled": "2001-09-09T01:46:40", "price": "2.50", "blob": "/wA=", "published": "1970-01-02"}
READ, SCORED, ERRORS = 240 + len(BAD_LINES) + 1 + EXTRA + 2, 240 + EXTRA, len(BAD_LINES) + 3


def write_config(root: Path, corpus: Path, output: Path) -> Path:
    """A pipeline config whose run_dir's score/ folder is ``output``."""
    config = {"run_dir": str(output.parent), "teacher": str(EMBEDDED / "teacher"), "student": str(EMBEDDED / "student"),
              "scoring": {"corpus": str(corpus), "max_length": 96, "batch_size": 16, "num_actors": 1,
                          "records_per_part": 32, "resources": {"num_cpus": 1},
                          # pieces of a few lines or row groups: rows are read in many tasks and
                          # still numbered as in the whole file (the errors' file:line keys)
                          "read_chunk_bytes": 4096},
              "pruning": {"threshold": "quantile", "quantile": 0.1}}
    path = root / f"{output.parent.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_job(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "score.py"), "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(job: subprocess.Popen) -> str:
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-4000:]
    return out


def outputs(root: Path) -> tuple[dict, list, dict]:
    scores = {row["id"]: row for row in read_scores(root)}
    cfs = sorted(read_jsonl_parts(root, "counterfactuals"), key=lambda r: r["id"])
    errors = {row["key"]: row for row in read_jsonl_parts(root, "errors")}
    return scores, cfs, errors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    corpus, good_ids = make_corpus(root, good=240)
    output = root / "full" / "score"
    finish(start_job(write_config(root, corpus, output)))
    return root, corpus, good_ids, output


def test_every_good_record_scored_every_bad_one_reported(uninterrupted):
    root, corpus, good_ids, output = uninterrupted
    scores, cfs, errors = outputs(output)
    assert set(scores) == good_ids
    assert BAD_KEYS <= set(errors) and len(errors) == ERRORS
    by_reason = {key: row["reason"] for key, row in errors.items()}
    a, c = corpus / "a.jsonl", corpus / "c.parquet"
    assert "malformed JSON" in by_reason[f"{a}:121"]
    assert "not valid UTF-8" in by_reason[f"{a}:125"]
    assert by_reason["no-response"] == "missing field 'response'"
    assert by_reason["empty"] == "field 'instruction' is empty"
    assert "max_length" in by_reason["too-long"]
    # A repeated id is an error wherever it is, and the first occurrence is the one scored.
    records = [json.loads(line) for line in (EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines()]
    first_id, b_id = records[0]["id"], records[120]["id"]
    assert by_reason[f"{a}:126"] == f"duplicate id {first_id!r}, first at {a}:1"
    assert by_reason[f"{c}:4"] == f"duplicate id {b_id!r}, first at {corpus / 'b.parquet'}:1"
    assert by_reason[f"{c}:5"].startswith("column 'published' cannot be read")
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["read"], summary["scored"], summary["errors"]) == (READ, SCORED, ERRORS)
    assert summary["counterfactuals"] == len(cfs) > 0
    # The sink writes parts of records_per_part (32: two batches) rows or more, not files per batch (16 rows); every file is a part's.
    markers = {path.stem for path in (output / "_done").glob("*.json")}
    assert 1 < len(markers) <= math.ceil(READ / 32)
    assert {path.name.removeprefix("part-").split(".")[0] for folder in ("originals", "counterfactuals", "scores", "errors")
            for path in (output / folder).iterdir()} == markers

    corpus_rows = {record["id"]: record for record in records[:240 + EXTRA]}
    for record in records[240:240 + EXTRA]:  # odd columns arrive as JSON: ISO dates, exact decimals, base64
        record["meta"] = {**record["meta"], **ODD_META}
    # The store keeps each scored record whole (the Parquet parts included): later stages read it, not the corpus.
    assert {r.id: r.to_dict() for r in read_originals(output)} == corpus_rows
    pairs = read_training_set(output)
    assert sum(len(p.counterfactuals) for p in pairs) == len(cfs)
    for cf in cfs:
        (start, end), = cf["char_ranges"]
        source = corpus_rows[cf["source_id"]]["instruction"]
        assert cf["instruction"] == source[:start] + source[end:]
        assert cf["removed_text"] == [source[start:end]]


def test_the_staged_job_scores_as_one_process_does(uninterrupted):
    """The job runs prepare, model passes and pruning in three stages of separate processes;
    a record's scores, mask and counterfactuals are what ScoringBatchProcessor makes of it in
    one process."""
    from leaf_ray.config import PruningConfig, ScoringConfig
    from leaf_ray.data import Record
    from leaf_ray.detection.scorer import PairScorer, ScoringBatchProcessor

    _, _, _, output = uninterrupted
    scores, cfs, _ = outputs(output)
    records = [Record.from_dict(json.loads(line)) for line in
               (EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines()[:40]]
    scorer = PairScorer.from_paths(EMBEDDED / "teacher", EMBEDDED / "student", ScoringConfig(corpus="-", max_length=96))
    rows = ScoringBatchProcessor(scorer, PruningConfig(threshold="quantile", quantile=0.1)).score_rows(
        [r.id for r in records], records)
    for row in rows:
        local, staged = json.loads(row["score"]), scores[row["key"]]
        assert local["unit_text"] == staged["unit_text"] and local["masked"] == staged["masked"]
        np.testing.assert_allclose(np.array(local["diff"], dtype=float), np.array(staged["diff"], dtype=float),
                                   atol=1e-5)
        assert ([cf["instruction"] for cf in json.loads(row["counterfactuals"])]
                == [cf["instruction"] for cf in cfs if cf["source_id"] == row["key"]])
    # Its model stage's actor spent most of its wall time inside model passes, and never more than it.
    stage = json.loads((output / "summary.json").read_text())["this_run"]["model_stage"]
    assert stage["actors"] == 1 and stage["batches"] >= math.ceil(READ / 16)
    assert 0 < stage["model_pass_s"] <= stage["wall_s"] and 0 < stage["busy_share"] <= 1


def test_model_stage_share_counts_each_actors_span_once():
    from leaf_ray.distributed.scoring import model_stage_share

    batches = {json.dumps(b) for b in (["a", 10.0, 12.0, 1.5], ["a", 13.0, 14.0, 1.0], ["b", 11.0, 12.0, 0.5])}
    # a: 10..14 (4 s, 2.5 s of passes); b: 11..12 (1 s, 0.5 s): 3 of 5 s
    assert model_stage_share(batches) == {"actors": 2, "batches": 3, "model_pass_s": 3.0, "wall_s": 5.0,
                                          "busy_share": 0.6}


def test_kill_and_resume_gives_the_same_outputs(uninterrupted):
    root, corpus, _, full = uninterrupted
    output = root / "resumed" / "score"
    config = write_config(root, corpus, output)
    job = start_job(config)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((output / "_done").glob("*.json"))) < 2:
        assert job.poll() is None, "the job finished before it could be killed"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    # The driver started the local cluster; stop what is left of it before resuming.
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)
    partial = len(list((output / "_done").glob("*.json")))
    assert 2 <= partial < 16, "the kill should land mid-run"
    done = sum(len(json.loads(path.read_text())["keys"]) for path in (output / "_done").glob("*.json"))

    finish(start_job(config))
    expected, got = outputs(full), outputs(output)
    assert set(got[0]) == set(expected[0])
    for record_id, row in expected[0].items():
        other = got[0][record_id]
        assert other["unit_text"] == row["unit_text"] and other["masked"] == row["masked"]
        # A resumed run batches the remaining records differently (other padded lengths), so the
        # float32 reductions differ in the last digits: 1.4e-5 seen on an AVX512 CPU.
        np.testing.assert_allclose(np.array(other["diff"], dtype=float), np.array(row["diff"], dtype=float),
                                   atol=1e-4)
    assert [(c["id"], c["instruction"]) for c in got[1]] == [(c["id"], c["instruction"]) for c in expected[1]]
    assert set(got[2]) == set(expected[2])
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["scored"], summary["errors"]) == (SCORED, ERRORS) and summary["this_run"]["skipped_as_done"] == done > 0


def test_a_rerun_with_other_models_or_rules_is_refused_not_mixed(uninterrupted):
    """The folder records what wrote it; a rerun that would resume it with another pruning rule,
    unit rule, detection method or model stops at once (before Ray starts), naming what changed."""
    from leaf_ray.config import PipelineConfig, load_config
    from leaf_ray.distributed.scoring import run_scoring

    root, corpus, _, full = uninterrupted
    config = load_config(write_config(root, corpus, full), PipelineConfig)
    changes = [
        ("pruning changed", {"pruning": config.pruning.model_copy(update={"quantile": 0.2})}),
        ("pruning changed", {"pruning": config.pruning.model_copy(update={"grow_spans": "clause"})}),
        ("scoring changed", {"scoring": config.scoring.model_copy(update={"units": "tokens"})}),
        ("scoring changed", {"scoring": config.scoring.model_copy(update={"method": "occlusion"})}),
        ("student changed", {"student": config.teacher}),
    ]
    for message, update in changes:
        with pytest.raises(ValueError, match=message):
            run_scoring(config.model_copy(update=update))
    assert json.loads((full / "summary.json").read_text())["scored"] == SCORED  # untouched


def test_model_that_cannot_load_fails_fast_with_its_name(tmp_path):
    corpus, _ = make_corpus(tmp_path, good=4)
    config = write_config(tmp_path, corpus, tmp_path / "out" / "score")
    data = yaml.safe_load(config.read_text())
    data["teacher"] = str(tmp_path / "no-such-teacher")
    config.write_text(yaml.safe_dump(data))
    job = start_job(config)
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    assert "could not load" in out and "no-such-teacher" in out and "GiB free" in out
