"""Stage 2 at scale: Ray Train runs :func:`leaf_ray.distillation.loop.train` on a group of workers.

The driver never holds the training set: it hashes the set's files in fixed-size chunks
(the run's fingerprint), reads the first few hundred validation pairs, and hands
:class:`~ray.train.torch.TorchTrainer` a Ray Dataset that reads the set part by part. Each
worker streams that dataset epoch after epoch and keeps every world-th pair
(:func:`~leaf_ray.distillation.loop.streamed_batches`). Each worker loads the teacher (or,
with ``teacher: cache``, reads the teacher cache of the training set instead) and
the student, restores the newest checkpoint if there is one
(:func:`checkpoints_newest_first`), wraps the student (DDP through ``prepare_model``, or
FSDP2, :mod:`leaf_ray.distillation.parallel`), and calls ``train`` with
its rank and a report callback that writes the metrics log and, every
``checkpoint_every`` steps, a checkpoint: the full student as a Hugging Face directory plus
the full optimizer state, the schedule and the step. A rerun with the same ``name`` resumes from the
newest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from itertools import islice
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from leaf_ray.config import DistillationConfig, PipelineConfig
from leaf_ray.detection.store import pair_to_row, read_part_pairs, row_to_pair, training_set_manifest, training_set_parts
from leaf_ray.distillation.loop import PairStream, train, validation_bucket
from leaf_ray.distillation.teacher_cache import cache_folder, check_cache
from leaf_ray.distillation.variants import variant_config
from leaf_ray.distributed.capacity import check_capacity
from leaf_ray.files import claim_folder, folder_lock, write_text_atomically
from leaf_ray.models import model_fingerprint, shared_vocab_of

# Fault injection for recovery tests: set in the driver's environment, the rank-0 worker
# dies once, at this step.
FAIL_AT_STEP_ENV = "LEAF_RAY_FAIL_AT_STEP"


@dataclass(frozen=True)
class DistillationRun:
    """One Ray Train run: the settings, the models, the training set and where it writes."""

    config: DistillationConfig
    teacher: str
    student: str
    data_dir: str  # a training set (leaf_ray/detection/store.py)
    output_dir: str  # ray_train/, metrics.jsonl, model/, export.json
    name: str
    teacher_cache: str | None = None  # with distillation.teacher: cache, the folder workers read instead


    @classmethod
    def for_variant(cls, pipeline: PipelineConfig, variant: str, data_dir: str | Path) -> DistillationRun:
        """The run of ``variant`` in ``pipeline``'s run folder; prints what the variant overrode."""
        config, changes = variant_config(pipeline.distillation, variant)
        for change in changes:
            print(f"[leaf-ray] variant {variant}: {change}", flush=True)
        cache = str(cache_folder(data_dir)) if config.teacher == "cache" else None
        return cls(config, pipeline.teacher, pipeline.student, str(data_dir),
                   str(pipeline.layout.distill(variant)), f"{pipeline.name}-{variant}", cache)

    def resolved(self) -> DistillationRun:
        """Absolute paths: Ray Train workers do not run in the driver's working directory."""
        return replace(self, **{key: str(Path(getattr(self, key)).resolve())
                                for key in ("teacher", "student", "data_dir", "output_dir", "teacher_cache")
                                if getattr(self, key) is not None})


def training_set_dataset(folder: Path) -> ray.data.Dataset:
    """The training set as a Ray Dataset of pair rows, read part by part on the cluster (the
    driver holds only the part names), in part order."""
    def read(row: dict[str, str]) -> list[dict[str, str]]:
        return [pair_to_row(pair) for pair in read_part_pairs(folder, row["part"])]

    dataset = ray.data.from_items([{"part": part} for part in training_set_parts(folder)]).flat_map(read)
    dataset.context.execution_options.preserve_order = True
    return dataset


def first_validation_pairs(dataset: ray.data.Dataset, fraction: float, limit: int) -> list[dict[str, str]]:
    """The first ``limit`` pair rows whose id falls in the validation fraction: the same rows
    :func:`split_validation` holds out, read only as far as needed."""
    if fraction == 0:
        return []
    candidates = dataset.filter(lambda row: validation_bucket(row["id"]) < fraction)
    return list(islice(candidates.iter_rows(), limit))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: load, restore, wrap, then :func:`train` with a checkpointing report."""
    from leaf_ray.distillation.losses import shared_vocab_size
    from leaf_ray.distillation.parallel import bare_model, full_training_state, shard_student
    from leaf_ray.distillation.teacher_cache import TeacherCache
    from leaf_ray.models import load_model

    config = DistillationConfig.model_validate(loop_config["distillation"])
    output = Path(loop_config["output_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)

    device = ray.train.torch.get_device()
    student, tokenizer = load_model(loop_config["student"], device=str(device))
    if config.teacher == "cache":  # the teacher's top-k log-probs, never the teacher itself
        teacher = TeacherCache(loop_config["teacher_cache"])
        vocab = teacher.vocab
    else:
        teacher, teacher_tokenizer = load_model(loop_config["teacher"], device=str(device))
        vocab = shared_vocab_size(teacher_tokenizer, tokenizer, teacher.config.vocab_size, student.config.vocab_size)

    # Every worker streams the training set and keeps every world-th pair of it
    # (streamed_batches), so its shard does not depend on how Ray hands out blocks, and a
    # resumed or FSDP run sees the batches of the run it is compared with.
    shard = ray.train.get_dataset_shard("train")
    pairs = PairStream(lambda: (row_to_pair(row) for row in shard.iter_rows()), loop_config["train_pairs"])
    validation = [row_to_pair(row) for row in loop_config["validation"]]

    # Restore before wrapping: the checkpoint holds the full student, which DDP replicates
    # and FSDP shards like freshly loaded weights.
    resume = None
    for folder in checkpoints_newest_first(Path(loop_config["checkpoints"])):
        try:
            state = torch.load(folder / "training_state.pt", weights_only=True, map_location="cpu")
            saved = type(student).from_pretrained(folder / "model", dtype=student.dtype)
        except Exception as exc:  # a checkpoint a crash cut short: fall back to the one before
            print(f"[leaf-ray] skipping unreadable checkpoint {folder}: {exc}", flush=True)
            continue
        student.load_state_dict(saved.state_dict())
        resume = state
        break
    if config.strategy == "fsdp":
        model = shard_student(student, device, world)
    else:
        model = ray.train.torch.prepare_model(student)

    fail_at = loop_config["fail_at_step"]
    failed_once = output / f"injected-failure-at-{fail_at}"

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        step = metrics["step"]
        if rank == 0 and step == fail_at and not failed_once.exists():
            failed_once.touch()
            os._exit(1)  # an injected crash: Ray Train restarts the group from the last checkpoint
        if rank == 0:  # every step's metrics; a resumed attempt appends
            with (output / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        # ray.train.report is a round trip to the controller (about a second here): report
        # at validation and checkpoint steps only; every step is in the metrics log.
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            # The full student and optimizer state: gathered from every worker under FSDP.
            weights, optimizer = full_training_state(state["model"], state["optimizer"])
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    bare_model(state["model"]).save_pretrained(Path(folder) / "model", state_dict=weights)
                    tokenizer.save_pretrained(Path(folder) / "model")
                    torch.save({"optimizer": optimizer, "schedule": state["schedule"].state_dict(), "step": step},
                               Path(folder) / "training_state.pt")
                    (Path(folder) / "progress.json").write_text(json.dumps({"step": step}))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if rank == 0 else None)
        elif "val_loss" in metrics:
            ray.train.report(metrics)

    train(model, teacher, tokenizer, pairs, config, vocab, validation=validation,
          rank=rank, world=world, resume=resume, report=report)


def checkpoints_newest_first(folder: Path) -> list[Path]:
    """This run's checkpoint directories on storage, the highest step first.

    Read from the run's storage folder, not ``ray.train.get_checkpoint()``: Ray Train 2.60
    registers a worker's checkpoint only when its controller next polls that worker, so a
    group that dies a few steps after checkpointing restarts with ``get_checkpoint() is
    None`` and would start over although the checkpoint is on disk.
    """
    steps = {}
    for progress in folder.glob("checkpoint_*/progress.json"):
        try:
            steps[progress.parent] = json.loads(progress.read_text())["step"]
        except (OSError, ValueError, KeyError):  # cut short by a crash: not a checkpoint
            continue
    return sorted(steps, key=lambda directory: (steps[directory], directory.name), reverse=True)


def check_teacher(run: DistillationRun) -> None:
    """Before any Ray worker starts (they would fail the same way, later and in a worker's log):
    refuse a teacher whose tokenizer differs from the student's, or a cache that was built for
    another tokenizer, temperature or teacher. A teacher that is not on this node (training
    nodes need not hold it) cannot be compared: the cache's own record of it stands."""
    if run.teacher_cache is None:
        shared_vocab_of(run.teacher, run.student)
        return
    from transformers import AutoTokenizer

    on_this_node = Path(run.teacher).is_dir()
    if not on_this_node:
        print(f"[leaf-ray] teacher {run.teacher} is not on this node: trusting the cache's record of it", flush=True)
    check_cache(run.teacher_cache, AutoTokenizer.from_pretrained(run.student), run.config.temperature,
                model_fingerprint(run.teacher) if on_this_node else None)


def read_history(log: Path) -> list[dict[str, Any]]:
    """The metrics log by step; a step an attempt repeated after resuming keeps its last entry."""
    by_step = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        by_step[entry["step"]] = entry
    return [by_step[step] for step in sorted(by_step)]


def run_fingerprint(config: DistillationConfig, data_digest: str) -> dict[str, Any]:
    """What a checkpoint is only valid for: the training set's files (``data_digest``, from
    :func:`training_set_manifest`), the worker count and every other setting (but
    ``max_failures`` and ``resources``, which do not change what is trained)."""
    settings = json.dumps(config.model_dump(exclude={"max_failures", "num_workers", "resources"}), sort_keys=True, default=str)
    return {"data": data_digest, "num_workers": config.num_workers,
            "settings": hashlib.sha256(settings.encode()).hexdigest()[:16]}


def run_distillation(run: DistillationRun) -> dict[str, Any]:
    """Train (or resume) on Ray and export ``output_dir/model``; returns the final metrics.

    A finished export (``output_dir/export.json``) is kept as it is.
    """
    run = run.resolved()
    config = run.config
    output = Path(run.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    done = output / "export.json"
    if done.exists():
        return json.loads(done.read_text())
    with folder_lock(output):  # a second run on this folder refuses instead of mixing checkpoints
        started = time.perf_counter()
        check_teacher(run)
        manifest = training_set_manifest(Path(run.data_dir))
        fingerprint = run_fingerprint(config, manifest["digest"])
        if run.teacher_cache is not None:  # checkpoints are only valid for the cache they learned from
            fingerprint["teacher_cache"] = hashlib.sha256(
                (Path(run.teacher_cache) / "fingerprint.json").read_bytes()).hexdigest()[:16]
        claim_folder(output, fingerprint)
        worker = config.resources.bundle() if config.use_gpu else {"CPU": config.resources.num_cpus}
        check_capacity(worker, config.num_workers, "distillation.resources / distillation.num_workers")
        pairs = training_set_dataset(Path(run.data_dir))
        validation = first_validation_pairs(pairs, config.validation_fraction, config.validation_max_records)
        held = {row["id"] for row in validation}
        # Pairs outside validation; a held record's other-level pair, if the limit fell between
        # the two, is in neither, so this may count one or two too many.
        train_pairs = manifest["pairs"] - len(validation)
        if train_pairs <= 0:
            raise ValueError(f"no training pairs in {run.data_dir}")
        ingest = DataConfig.default_ingest_options()
        ingest.preserve_order = True  # the same stream, hence the same shards, in every run
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"distillation": config.model_dump(), "teacher": run.teacher, "student": run.student,
                               "teacher_cache": run.teacher_cache,
                               "output_dir": str(output), "checkpoints": str(output / "ray_train" / run.name),
                               "train_pairs": train_pairs, "validation": validation,
                               "fail_at_step": int(os.environ.get(FAIL_AT_STEP_ENV, "0"))},
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                         resources_per_worker=worker),
            run_config=RunConfig(name=run.name, storage_path=str(output / "ray_train"),
                                 failure_config=FailureConfig(max_failures=config.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
            datasets={"train": pairs.filter(lambda row: row["id"] not in held)},
            dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training run {run.name!r} produced no checkpoint; see {output / 'ray_train'}")
        with result.checkpoint.as_directory() as folder:
            shutil.copytree(Path(folder) / "model", output / "model", dirs_exist_ok=True)
        final = {"name": run.name, "variant": config.variant, "lam": config.lam, "batch_size": config.batch_size,
                 "train_pairs": train_pairs, "validation_pairs": len(validation),
                 "metrics": result.metrics, "history": read_history(output / "metrics.jsonl"),
                 "wall_s": round(time.perf_counter() - started, 2), "checkpoint": result.checkpoint.path}
        write_text_atomically(done, json.dumps(final, indent=2, default=str) + "\n")
        return final
