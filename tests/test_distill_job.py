"""The Ray Train distillation job on a real local Ray cluster: 2 DDP workers (gloo, CPU),
export, an injected worker crash, a rerun after a failed run, and FSDP2 against DDP."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from leaf_ray.config import DistillationConfig, PipelineConfig, ResourcesConfig, ScoringConfig, TeacherCacheConfig
from leaf_ray.data import write_jsonl
from leaf_ray.detection.store import read_training_set, write_training_set
from leaf_ray.distillation.loop import split_validation
from leaf_ray.distributed.distill import FAIL_AT_STEP_ENV, DistillationRun, run_distillation
from leaf_ray.distillation.teacher_cache import TeacherCache, cache_folder, training_set_records
from leaf_ray.distributed.scoring import run_scoring
from leaf_ray.distributed.teacher_cache import run_teacher_cache
from leaf_ray.evaluation import greedy_generate
from leaf_ray.models import load_model
from tests.conftest import EMBEDDED

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")]


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> DistillationRun:
    """A 160-record corpus scored by the scoring job, and a small 2-worker run over it."""
    root = tmp_path_factory.mktemp("distill")
    lines = (EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines()[:160]
    corpus = root / "corpus.jsonl"
    write_jsonl(corpus, [json.loads(line) for line in lines])
    pipeline = PipelineConfig(run_dir=str(root), teacher=str(EMBEDDED / "teacher"), student=str(EMBEDDED / "student"),
                              scoring=ScoringConfig(corpus=str(corpus), max_length=128, batch_size=16, num_actors=2,
                                                    resources=ResourcesConfig(num_cpus=1)))
    ray.init(num_cpus=4, include_dashboard=False)
    run_scoring(pipeline)
    config = DistillationConfig(
        lam=0.5, learning_rate=1e-3, batch_size=16, max_steps=24, checkpoint_every=8, eval_every=8, num_workers=2,
        bf16_autocast=False, validation_fraction=0.2, validation_max_records=32, max_failures=1,
        resources=ResourcesConfig(num_cpus=1))
    yield DistillationRun(config, pipeline.teacher, pipeline.student, data_dir=str(pipeline.layout.score),
                          output_dir=str(root / "reference"), name="reference")
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(scored: DistillationRun) -> dict:
    return run_distillation(scored)


def with_output(run: DistillationRun, name: str, **config) -> DistillationRun:
    return DistillationRun(run.config.model_copy(update=config), run.teacher, run.student, run.data_dir,
                           str(Path(run.output_dir).parent / name), name)


def test_a_one_file_corpus_is_spread_over_every_scoring_actor(scored):
    """One JSONL file is one Ray Data block when read; both scoring actors must still get batches."""
    markers = [json.loads(path.read_text()) for path in (Path(scored.data_dir) / "_done").glob("*.json")]
    assert len(markers) == 1 and markers[0]["scored"] == 160  # records_per_part (10,000) gathers every batch
    scorers = Counter(markers[0]["scored_by"])
    assert len(scorers) == 2 and min(scorers.values()) >= 32, scorers  # two batches of 16 at least each


def test_controls_and_the_detection_grade_go_part_by_part_as_the_whole_store_would(scored, tmp_path):
    """Ray Data tasks cut the random and oracle controls, and grade detection, one store part at a
    time. The same records, parted two different ways, give the same control sets, and both are
    what the whole store gives in one process."""
    from leaf_ray.config import PruningConfig
    from leaf_ray.detection.scorer import ScoredRecord
    from leaf_ray.detection.store import read_originals, read_scores, store_parts, write_batch
    from leaf_ray.distillation.variants import variant_pairs
    from leaf_ray.distributed.store_passes import grade_store, write_control_set
    from leaf_ray.evaluation import confounder_spans, grade_detection

    rows = sorted(read_scores(Path(scored.data_dir)), key=lambda row: row["id"])
    originals = {r.id: r for r in read_originals(Path(scored.data_dir))}
    stores = {"in_order": [rows[i:i + 40] for i in range(0, len(rows), 40)],  # 4 parts
              "interleaved": [rows[i::3] for i in range(3)]}  # 3 parts, other neighbours
    for name, parts in stores.items():
        for part in parts:
            write_batch(tmp_path / name, [r["id"] for r in part], part,
                        [{**originals[r["id"]].to_dict(), "level": "instruction"} for r in part], [], [], {})
        assert len(store_parts(tmp_path / name)) == len(parts)

    pruning, seed = PruningConfig(), 3
    whole = [ScoredRecord.from_row(row, originals[row["id"]]) for row in rows]
    detected = [np.array(row["masked"], dtype=bool) for row in rows]
    for variant in ("random", "oracle"):
        expected = variant_pairs(variant, whole, pruning, seed, detected)
        assert sum(len(p.counterfactuals) for p in expected) > 0, variant
        for name, parts in stores.items():
            folder = tmp_path / f"{name}-{variant}"
            summary = write_control_set(tmp_path / name, folder, variant, pruning, seed)
            assert (summary["pairs"], summary["parts"]) == (len(rows), len(parts))
            assert read_training_set(folder) == expected, (variant, name)

    graded = grade_store(tmp_path / "interleaved")
    assert graded.pop("with_truth") == sum(bool(confounder_spans(r.meta)) for r in originals.values()) > 0
    assert graded == {"records": len(rows), **grade_detection(rows, {i: r.meta for i, r in originals.items()})}


def test_two_workers_lower_the_loss_and_export_a_loadable_model(scored, reference):
    student, tokenizer = load_model(scored.student)
    config = scored.config
    _, validation = split_validation(read_training_set(Path(scored.data_dir)), config.validation_fraction,
                                     config.validation_max_records)
    assert reference["validation_pairs"] == len(validation) > 0
    assert reference["metrics"]["step"] == config.max_steps
    history = reference["history"]
    assert [h["step"] for h in history] == list(range(1, config.max_steps + 1))
    first, last = (sum(h["loss"] for h in part) / 4 for part in (history[:4], history[-4:]))
    assert last < 0.7 * first, (first, last)
    assert [h["step"] for h in history if "val_loss" in h] == [8, 16, 24]
    assert 0.0 <= reference["metrics"]["val_accuracy"] <= 1.0

    export = Path(scored.output_dir) / "model"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export)
    loaded_tokenizer = AutoTokenizer.from_pretrained(export)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    answers = greedy_generate(model, loaded_tokenizer, [validation[0].original.instruction], max_new_tokens=4)
    assert answers[0].strip()
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[name]) for name, p in student.named_parameters())


def test_rerunning_a_failed_run_resumes_instead_of_starting_over(scored, reference, monkeypatch, tmp_path):
    run = with_output(scored, "rerun", max_failures=0)
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "20")
    with pytest.raises(Exception):
        run_distillation(run)
    output = Path(run.output_dir)
    assert not (output / "export.json").exists()
    monkeypatch.delenv(FAIL_AT_STEP_ENV)

    # Resuming those checkpoints with another worker count or other pairs is refused at once.
    with pytest.raises(ValueError, match=r"num_workers changed \(2 -> 1\)"):
        run_distillation(DistillationRun(run.config.model_copy(update={"num_workers": 1}), run.teacher, run.student,
                                         run.data_dir, run.output_dir, run.name))
    changed = tmp_path / "changed"
    pairs = read_training_set(Path(run.data_dir))
    write_training_set(changed, pairs[1:], {"pairs": len(pairs) - 1})
    with pytest.raises(ValueError, match="data changed"):
        run_distillation(DistillationRun(run.config, run.teacher, run.student, str(changed), run.output_dir, run.name))

    result = run_distillation(run)
    # The crash came at step 20, before its metrics line; the rerun restarted from the step-16
    # checkpoint, not from step 1, and from there it is the unbroken run, step by step.
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 20)) + list(range(17, 25)), steps
    for theirs, ours in zip(reference["history"], result["history"]):
        assert ours["step"] == theirs["step"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-3), ours["step"]
    assert result["metrics"]["val_loss"] == pytest.approx(reference["metrics"]["val_loss"], rel=1e-3)
    assert run_distillation(run) == result  # finished: the export is kept as it is


def test_fsdp_matches_ddp_and_resumes_its_sharded_state_after_a_crash(scored, reference, monkeypatch):
    """FSDP2 on 2 gloo workers, with a crash at step 13, against the DDP reference run.

    The crash covers Ray Train's in-job restart from the newest checkpoint (whatever the
    strategy); the rerun test above covers restoring a DDP run's state.

    The same seed draws the same batches, so every step's loss and gradient norm must match
    DDP's: a norm clipped per shard (smaller than the global one; clipping is active, the
    norms are far above max_grad_norm) or a resume that lost the sharded optimizer state
    would part from it after the crash.
    """
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "13")
    run = with_output(scored, "fsdp", strategy="fsdp")
    result = run_distillation(run)
    steps = [json.loads(line)["step"] for line in (Path(run.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)) + list(range(9, 25)), steps  # resumed from the step-8 checkpoint

    ddp, fsdp = reference["history"], result["history"]
    assert [h["step"] for h in fsdp] == [h["step"] for h in ddp]
    assert min(h["grad_norm"] for h in ddp) > scored.config.max_grad_norm
    for theirs, ours in zip(ddp, fsdp):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=2e-3), ours["step"]
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=2e-3), ours["step"]
    assert result["metrics"]["val_loss"] == pytest.approx(reference["metrics"]["val_loss"], rel=2e-3)

    # The export is the full student, a plain Hugging Face model, equal to DDP's.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(Path(run.output_dir) / "model").state_dict()
    expected = AutoModelForCausalLM.from_pretrained(Path(scored.output_dir) / "model").state_dict()
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(exported[name], tensor, atol=2e-3), name


def test_a_request_the_cluster_can_never_hold_fails_at_once_naming_the_field(scored, tmp_path):
    """On this 4-CPU cluster Ray would queue these forever: 3 workers of 2 CPUs; a scoring actor
    with all 4 CPUs, which leaves none for the tasks that read the corpus. Each fails before any
    Ray work, naming the fields to change and the cluster's nodes."""
    too_many = with_output(scored, "too-many", num_workers=3, resources=ResourcesConfig(num_cpus=2))
    with pytest.raises(ValueError, match=r"^distillation.resources / distillation.num_workers: 3 x \{CPU: 2\} "
                                         r"can never be scheduled .*nodes: 1 x \{CPU: 4\}"):
        run_distillation(too_many)
    assert not (Path(too_many.output_dir) / "ray_train").exists()

    pipeline = PipelineConfig(run_dir=str(tmp_path), teacher=scored.teacher, student=scored.student,
                              scoring=ScoringConfig(corpus=str(EMBEDDED / "data" / "simple" / "distill.jsonl"),
                                                    resources=ResourcesConfig(num_cpus=4)))
    with pytest.raises(ValueError, match=r"^scoring.resources / scoring.num_actors: 1 x \{CPU: 4\} plus \{CPU: 0.75\}"):
        run_scoring(pipeline)
    assert not list((pipeline.layout.score / "_done").glob("*"))


@pytest.fixture(scope="module")
def cache_pipeline(scored, tmp_path_factory) -> PipelineConfig:
    """A pipeline whose distillation reads the teacher cache of the scored training set; its
    teacher is a copy, so that a test can take it away."""
    root = tmp_path_factory.mktemp("cache")
    shutil.copytree(scored.teacher, root / "teacher")
    distillation = scored.config.model_copy(update={"teacher": "cache", "max_steps": 12, "checkpoint_every": 4,
                                                    "eval_every": 4})
    return PipelineConfig(run_dir=str(root), teacher=str(root / "teacher"), student=scored.student,
                          scoring=ScoringConfig(corpus="unused.jsonl"), distillation=distillation,
                          teacher_cache=TeacherCacheConfig(top_k=16, batch_size=32, records_per_part=64, num_actors=2,
                                                           resources=ResourcesConfig(num_cpus=1)))


def test_the_teacher_cache_job_is_idempotent_resumable_and_tied_to_what_built_it(scored, cache_pipeline):
    folder = cache_folder(scored.data_dir)
    records = training_set_records(read_training_set(Path(scored.data_dir)))
    first = run_teacher_cache(cache_pipeline, scored.data_dir)
    assert first["records"] == first["this_run"]["records"] == len(records)
    assert first["positions"] > 0 and first["raw_bytes_per_position"] == 16 * 6 + 2
    built = TeacherCache(folder).read_all()
    assert built.keys() == records.keys()
    markers = {path: path.stat().st_mtime_ns for path in (folder / "_done").glob("*.json")}
    assert len(markers) > 2

    again = run_teacher_cache(cache_pipeline, scored.data_dir)
    assert again["this_run"]["records"] == 0 and again["records"] == len(records)
    assert {path: path.stat().st_mtime_ns for path in markers} == markers

    # A kill mid-batch leaves a part without its marker (and maybe a temp file): the rerun
    # redoes that batch alone, and the cache is the same.
    lost = sorted(markers)[0]
    lost_keys = json.loads(lost.read_text())["keys"]
    lost.unlink()
    (folder / "logits" / ".tmp-999-part-x.parquet").write_bytes(b"cut short")
    resumed = run_teacher_cache(cache_pipeline, scored.data_dir)
    assert resumed["this_run"]["records"] == len(lost_keys) < len(records)
    assert resumed["this_run"]["skipped_as_done"] == len(records) - len(lost_keys)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in markers.items() if path != lost)
    assert not list((folder / "logits").glob(".tmp-*"))
    rebuilt = TeacherCache(folder).read_all()
    assert rebuilt.keys() == built.keys()
    assert all(torch.equal(a, b) for key in built for a, b in zip(built[key], rebuilt[key]))

    # Another teacher, or another k, would mix two caches in one folder: refused, naming the change.
    with pytest.raises(ValueError, match="teacher changed"):
        run_teacher_cache(cache_pipeline.model_copy(update={"teacher": scored.student}), scored.data_dir)
    other_k = cache_pipeline.teacher_cache.model_copy(update={"top_k": 8})
    with pytest.raises(ValueError, match=r"k changed \(16 -> 8\)"):
        run_teacher_cache(cache_pipeline.model_copy(update={"teacher_cache": other_k}), scored.data_dir)


def test_ray_train_from_the_cache_never_loads_the_teacher_resumes_and_exports(scored, cache_pipeline, monkeypatch):
    run_teacher_cache(cache_pipeline, scored.data_dir)
    teacher = Path(cache_pipeline.teacher)
    teacher.rename(teacher.with_name("teacher-elsewhere"))  # a worker that loaded it would fail
    try:
        run = DistillationRun.for_variant(cache_pipeline, "leaf", scored.data_dir)
        assert run.teacher_cache == str(cache_folder(scored.data_dir))
        monkeypatch.setenv(FAIL_AT_STEP_ENV, "6")
        result = run_distillation(run)
    finally:
        teacher.with_name("teacher-elsewhere").rename(teacher)
    steps = [json.loads(line)["step"] for line in (Path(run.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 6)) + list(range(5, 13)), steps  # resumed from the step-4 checkpoint
    history = result["history"]
    assert sum(h["loss"] for h in history[-3:]) < sum(h["loss"] for h in history[:3])
    assert "val_loss" in result["metrics"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = Path(run.output_dir) / "model"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    pair = read_training_set(Path(scored.data_dir))[0]
    assert greedy_generate(model, tokenizer, [pair.original.instruction], max_new_tokens=4)[0].strip()


def test_a_resumed_job_finds_its_done_rows_on_the_cluster_as_a_set_would(scored, tmp_path):
    """The done rows of a resumed job come from a Ray Data group-by of the markers' keys with the
    rows' keys (the driver never holds them): the same rows a set of the markers' keys picks, in
    any source, with marker keys that no row has and rows that no marker has."""
    from leaf_ray.distributed.resume import SOURCE_SHIFT, is_done, write_done_positions

    rows = [{"key": f"id-{n * 7919 % 1000}", "position": (n % 3) << SOURCE_SHIFT | n} for n in range(1000)]
    markers = []
    for index, keys in enumerate([[f"id-{n}" for n in range(0, 400, 3)], [f"id-{n}" for n in range(500, 520)],
                                  [f"gone-{n}" for n in range(50)]]):
        markers.append(tmp_path / f"part-{index}.json")
        markers[-1].write_text(json.dumps({"keys": keys}))
    finished = {key for path in markers for key in json.loads(path.read_text())["keys"]}
    expected = sorted(row["position"] for row in rows if row["key"] in finished)

    run, skipped = write_done_positions(ray.data.from_items(rows), len(rows), 3, markers, tmp_path / "_resume")
    positions = np.array([row["position"] for row in rows])
    assert sorted(positions[is_done(positions, run)].tolist()) == expected and skipped == len(expected) > 100

    run, skipped = write_done_positions(ray.data.from_items(rows), len(rows), 3, [], tmp_path / "_resume")
    assert skipped == 0 and not is_done(positions, run).any()
