"""Stage 2 at scale: Ray Train runs the LeaF distillation loop on a group of workers.

The driver joins the corpus with the scoring job's counterfactuals into training pairs and
hands them to :class:`~ray.train.torch.TorchTrainer` as Ray Datasets. Each worker loads the
frozen teacher and the student (wrapped for DDP by ``prepare_model``), draws its share of
every step's batch, and runs the same :func:`~leaf_ray.distillation.accumulate_gradients`
as the in-process loop. Checkpoints hold the student as a Hugging Face directory plus the
optimizer, the schedule and the step; the step is also the data position, because the
batch of step ``s`` on rank ``r`` is drawn from a generator seeded by ``(seed, rank)`` and
advanced ``s`` times. A rerun with the same ``name`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from leaf_ray.config import DistillationConfig
from leaf_ray.data import Record
from leaf_ray.distillation import (
    TrainingPair,
    accumulate_gradients,
    make_optimizer,
    pair_records,
    sample_batch,
    split_validation,
    validation_loss,
)
from leaf_ray.score_store import is_training_set, read_jsonl_parts, read_training_set, scored_originals

# Fault injection for recovery tests: set in the driver's environment, the rank-0 worker
# dies once, at this step.
FAIL_AT_STEP_ENV = "LEAF_RAY_FAIL_AT_STEP"


def load_pairs(config: DistillationConfig) -> list[TrainingPair]:
    """Originals with their counterfactuals: the verification stage's kept samples when
    ``data_dir`` is its output, else the records the scoring job scored."""
    store = Path(config.data_dir)
    if not (store / "summary.json").exists():
        raise FileNotFoundError(f"{store} holds no finished scoring or verification run (no summary.json)")
    if is_training_set(store):
        return pair_records(*read_training_set(store))
    return pair_records(scored_originals(store, config.corpus), read_jsonl_parts(store, "counterfactuals"))


def pair_to_row(pair: TrainingPair) -> dict[str, str]:
    return {"id": pair.original.id, "original": json.dumps(pair.original.to_dict()),
            "counterfactuals": json.dumps([c.to_dict() for c in pair.counterfactuals])}


def row_to_pair(row: dict[str, str]) -> TrainingPair:
    return TrainingPair(Record(**json.loads(row["original"])),
                        [Record(**c) for c in json.loads(row["counterfactuals"])])


def _all_reduce_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _validate(student, teacher, tokenizer, validation: list[TrainingPair], config: DistillationConfig,
              vocab: int, rank: int, world: int) -> dict[str, float]:
    """Validation KD loss over all workers' slices; answer accuracy when the records have answers."""
    from leaf_ray.evaluation import answer_accuracy, greedy_generate

    mine = [p.original for p in validation[rank::world]]
    total, tokens = validation_loss(student, teacher, tokenizer, mine, config, vocab) if mine else (0.0, 0)
    correct, counted = 0.0, 0
    answered = [r for r in mine if r.answer is not None]
    if answered:
        report = answer_accuracy(greedy_generate(student, tokenizer, [r.instruction for r in answered]),
                                 [r.to_dict() for r in answered], config.checker)
        correct, counted = report.accuracy * len(answered), len(answered)
    total, tokens, correct, counted = _all_reduce_sum([total, tokens, correct, counted])
    metrics = {"val_loss": total / max(tokens, 1)}
    if counted:
        metrics["val_accuracy"] = correct / counted
    return metrics


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: resume, then step, validate and checkpoint until ``max_steps``."""
    from leaf_ray.detection import load_model
    from leaf_ray.losses import shared_vocab_size

    config = DistillationConfig.model_validate(loop_config["distillation"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)

    device = ray.train.torch.get_device()
    teacher, teacher_tokenizer = load_model(config.teacher, device=str(device))
    student, tokenizer = load_model(config.student, device=str(device))
    teacher.eval().requires_grad_(False)
    student.requires_grad_(True)
    vocab = shared_vocab_size(teacher_tokenizer, tokenizer, teacher.config.vocab_size, student.config.vocab_size)
    # Every worker reads the whole (text-only) pair list and draws its own stream from it:
    # sampling with replacement, reproducible per rank, with no dependence on how Ray
    # splits blocks between workers.
    def read(name: str) -> list[TrainingPair]:
        if name not in loop_config["datasets"]:
            return []
        return sorted((row_to_pair(r) for r in ray.train.get_dataset_shard(name).iter_rows()),
                      key=lambda p: p.original.id)

    pairs, validation = read("train"), read("validation")

    model = ray.train.torch.prepare_model(student, parallel_strategy=config.strategy)
    optimizer, schedule = make_optimizer(model, config)
    unwrapped = model.module if hasattr(model, "module") else model

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "training_state.pt", weights_only=False)
            saved = type(unwrapped).from_pretrained(Path(folder) / "model", dtype=unwrapped.dtype)
            unwrapped.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["step"]

    validate_every = config.validation_interval(len(pairs))
    per_worker = config.batch_size // world
    rng = random.Random(config.seed if world == 1 else f"{config.seed}/{rank}")
    for _ in range(start):  # replay the draws of finished steps: the step is the data position
        sample_batch(pairs, config, per_worker, rng)
    log = Path(loop_config["output_dir"]) / "metrics.jsonl"  # every step's metrics; a resumed attempt appends
    fail_at = loop_config["fail_at_step"]
    failed_once = Path(loop_config["output_dir"]) / f"injected-failure-at-{fail_at}"

    for step in range(start + 1, config.max_steps + 1):
        started = time.perf_counter()
        model.train()
        originals, counterfactuals = sample_batch(pairs, config, per_worker, rng)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = accumulate_gradients(model, teacher, tokenizer, originals, counterfactuals, config, vocab)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        names = ["loss", *sorted(parts)]
        means = _all_reduce_sum([value / world for value in (loss, *(parts[k] for k in names[1:]))])
        metrics = {"step": step, **dict(zip(names, means)), "lr": schedule.get_last_lr()[0],
                   "step_s": time.perf_counter() - started}
        if rank == 0 and step == fail_at and not failed_once.exists():
            failed_once.touch()
            os._exit(1)  # an injected crash: Ray Train restarts the group from the last checkpoint
        last = step == config.max_steps
        if step % validate_every == 0 or last:
            model.eval()
            metrics.update(_validate(unwrapped, teacher, tokenizer, validation, config, vocab, rank, world))
        if rank == 0:
            with log.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        # ray.train.report is a round trip to the controller (about a second here): report
        # at validation and checkpoint steps only; every step is in the metrics log.
        if step % config.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    unwrapped.save_pretrained(Path(folder) / "model")
                    tokenizer.save_pretrained(Path(folder) / "model")
                    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                "step": step}, Path(folder) / "training_state.pt")
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if rank == 0 else None)
        elif "val_loss" in metrics:
            ray.train.report(metrics)


def read_history(log: Path) -> list[dict[str, Any]]:
    """The metrics log by step; a step an attempt repeated after resuming keeps its last entry."""
    by_step = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        by_step[entry["step"]] = entry
    return [by_step[step] for step in sorted(by_step)]


def run_distillation(config: DistillationConfig, name: str) -> dict[str, Any]:
    """Train (or resume) on Ray and export ``output_dir/model``; returns the final metrics.

    A finished export (``output_dir/export.json``) is kept as it is.
    """
    # Ray Train workers do not run in the driver's working directory: hand them absolute paths.
    config = config.model_copy(update={key: str(Path(getattr(config, key)).resolve())
                                       for key in ("teacher", "student", "data_dir", "corpus")
                                       if getattr(config, key) is not None})
    output = Path(config.output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    done = output / "export.json"
    if done.exists():
        return json.loads(done.read_text())
    started = time.perf_counter()
    pairs = load_pairs(config)
    train, validation = split_validation(pairs, config.validation_fraction, config.validation_max_records)
    if not train:
        raise ValueError(f"no training pairs in {config.data_dir} for corpus {config.corpus}")
    datasets = {split: ray.data.from_items([pair_to_row(p) for p in rows])
                for split, rows in (("train", train), ("validation", validation)) if rows}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"distillation": config.model_dump(), "output_dir": str(output),
                           "datasets": list(datasets), "fail_at_step": int(os.environ.get(FAIL_AT_STEP_ENV, "0"))},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.resources.num_cpus,
                                                           **({"GPU": config.resources.num_gpus}
                                                              if config.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(output / "ray_train"),
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} produced no checkpoint; see {output / 'ray_train'}")
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / "model", output / "model", dirs_exist_ok=True)
    final = {"name": name, "train_pairs": len(train), "validation_pairs": len(validation),
             "metrics": result.metrics, "history": read_history(output / "metrics.jsonl"),
             "wall_s": round(time.perf_counter() - started, 2), "checkpoint": result.checkpoint.path}
    done.write_text(json.dumps(final, indent=2, default=str) + "\n")
    return final
