"""Causal attention distillation: the LeaF objective and the one training loop.

The student learns from a frozen teacher on each original prompt and on a counterfactual
of it (a confounding span cut out):

    loss = lam * D(p_T(y|x) || p_S(y|x)) + (1 - lam) * D(p_T(y|x_cf) || p_S(y|x_cf))

over the completion tokens (``lam = 1`` is plain KD). ``mode: mixed`` instead puts
originals and counterfactuals in one pool, as the official code does. The teacher is a model
run under no_grad, or (``teacher: cache``) a :class:`TeacherCache` of its top-k log-probs.

:func:`train` is the only optimizer loop. It runs as rank ``r`` of ``world`` workers: a
Ray Train worker calls it with its rank and a ``report`` callback that checkpoints, the
embedded benchmark's harness calls it with rank 0 of 1 and pairs held in memory, a Ray
Train worker with its shard of the training set as a stream. It is plain PyTorch; with
``torch.distributed`` initialised (DDP or FSDP, :mod:`leaf_ray.distillation.parallel`),
losses and validation sums are all-reduced.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import count
from typing import Any

import torch
from tqdm.auto import tqdm

from leaf_ray.config import DistillationConfig
from leaf_ray.data import Record, TrainingPair, encode_for_training
from leaf_ray.distillation.losses import distill_loss, leaf_loss, sparse_distill_loss
from leaf_ray.distillation.parallel import bare_model, clip_gradients, load_optimizer_state, lockstep_forwards
from leaf_ray.distillation.teacher_cache import TeacherCache
from leaf_ray.models import bf16_autocast_enabled


StepBatch = tuple[list[Record], "list[Record] | None"]  # (originals, one counterfactual each or None)


@dataclass(frozen=True)
class PairStream:
    """A training set too big to hold, read again for every epoch: ``read()`` yields every pair
    in the same order each time (a worker's Ray Data iterator); ``size`` is about how many."""

    read: Callable[[], Iterable[TrainingPair]]
    size: int


def branches(chosen: Sequence[TrainingPair], config: DistillationConfig, rng: random.Random) -> StepBatch:
    """The originals of ``chosen`` and, for the hybrid loss, one counterfactual of each, drawn
    by ``rng``. A pair without counterfactuals uses its original in the counterfactual branch,
    so it contributes plain KD. ``mixed`` mode and plain KD have no second branch."""
    originals = [p.original for p in chosen]
    if config.mode == "mixed" or config.lam >= 1.0:
        return originals, None
    return originals, [rng.choice(p.counterfactuals) if p.counterfactuals else p.original for p in chosen]


def mixed_pool(pairs: Iterable[TrainingPair]) -> Iterator[TrainingPair]:
    """``mixed`` mode's pool, as the official code builds it: originals and counterfactuals alike."""
    for pair in pairs:
        for record in (pair.original, *pair.counterfactuals):
            yield TrainingPair(record, [], pair.level)


def sample_batch(pairs: Sequence[TrainingPair], config: DistillationConfig, size: int, rng: random.Random
                 ) -> StepBatch:
    """``size`` pairs drawn with replacement (in ``mixed`` mode, from the pool), with their branches."""
    if config.mode == "mixed":
        pairs = list(mixed_pool(pairs))
    return branches([rng.choice(pairs) for _ in range(size)], config, rng)


def sampled_batches(pairs: Sequence[TrainingPair], config: DistillationConfig, size: int, rank: int, world: int,
                    start: int) -> Iterator[StepBatch]:
    """Step batches drawn with replacement from pairs held in memory (the embedded benchmark's
    harness), reproducible per rank; the draws of the ``start`` finished steps are replayed."""
    rng = random.Random(config.seed if world == 1 else f"{config.seed}/{rank}")
    for _ in range(start):
        sample_batch(pairs, config, size, rng)
    while True:
        yield sample_batch(pairs, config, size, rng)


def buffer_shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """``items`` in a random order that only ever holds ``buffer_size`` of them: each new item
    takes the place of a random one from the buffer, which is yielded."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def streamed_batches(stream: PairStream, config: DistillationConfig, size: int, rank: int, world: int,
                     start: int) -> Iterator[StepBatch]:
    """Step batches from a stream, epoch after epoch: this rank's pairs (every ``world``-th, so the
    shards are the same in every run), in a per-epoch order seeded by ``(seed, rank, epoch)``
    (:func:`buffer_shuffled` over ``shuffle_buffer`` pairs), ``size`` at a time; an epoch's last
    partial batch is dropped. The ``start`` batches a resumed run already trained are drawn and
    skipped, so it goes on with the batch an unbroken run would train next."""
    step = 0
    for epoch in count():
        rng = random.Random(f"{config.seed}/{rank}/{epoch}")
        pairs = stream.read() if config.mode != "mixed" else mixed_pool(stream.read())
        mine = (pair for index, pair in enumerate(pairs) if index % world == rank)
        batch, batches_this_epoch = [], 0
        for pair in buffer_shuffled(mine, config.shuffle_buffer, rng):
            batch.append(pair)
            if len(batch) < size:
                continue
            chosen, batch = branches(batch, config, rng), []
            step, batches_this_epoch = step + 1, batches_this_epoch + 1
            if step > start:
                yield chosen
        if not batches_this_epoch:
            raise ValueError(f"worker {rank} of {world} holds fewer than {size} training pairs: lower "
                             "distillation.batch_size or distillation.num_workers")


def encode_branch(tokenizer, records: Sequence[Record]) -> dict[str, Any]:
    """One branch's padded batch; the records ride along for a cached teacher to look up."""
    return {**encode_for_training(tokenizer, records), "records": records}


def branch_loss(student, teacher: torch.nn.Module | TeacherCache, batch: dict[str, Any], config: DistillationConfig,
                vocab: int) -> torch.Tensor:
    """Divergence on one padded batch, logits sliced to the shared vocab: against the teacher
    model under no_grad, or against its cached top-k (the batch must carry its ``records``)."""
    device = next(student.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    mask = batch["target_mask"].to(device)
    student_logits = student(**inputs).logits[..., :vocab]
    if isinstance(teacher, TeacherCache):
        return sparse_distill_loss(student_logits, teacher.targets(batch["records"]), mask, config.loss,
                                   config.temperature, config.jsd_beta, config.loss_chunk_tokens)
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[..., :vocab]
    return distill_loss(student_logits, teacher_logits, mask, config.loss, config.temperature, config.jsd_beta,
                        config.loss_chunk_tokens)


def hybrid_loss(student, teacher, originals: dict[str, torch.Tensor], counterfactuals: dict[str, torch.Tensor] | None,
                config: DistillationConfig, vocab: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The LeaF objective on one step's batches; also returns each branch's value."""
    original = branch_loss(student, teacher, originals, config, vocab)
    if counterfactuals is None:
        return original, {"loss_original": original.item()}
    counterfactual = branch_loss(student, teacher, counterfactuals, config, vocab)
    return (leaf_loss(original, counterfactual, config.lam),
            {"loss_original": original.item(), "loss_counterfactual": counterfactual.item()})


def warmup_cosine(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup, then cosine decay to zero at ``max_steps``."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))
    return factor


def make_optimizer(model: torch.nn.Module, config: DistillationConfig):
    """AdamW with linear warmup then cosine decay to zero at ``max_steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.max_steps))


def validation_bucket(record_id: str) -> float:
    """Where a record falls in [0, 1): those below ``validation_fraction`` may validate."""
    return int(hashlib.sha1(record_id.encode()).hexdigest()[:8], 16) / 16**8


def split_validation(pairs: Sequence[TrainingPair], fraction: float, limit: int
                     ) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """(train, validation): a pair goes to validation by a hash of its id, so the split is the
    same on every worker and every rerun, and adding records never moves old ones."""
    validation = [p for p in pairs if validation_bucket(p.original.id) < fraction][:limit]
    held = {p.original.id for p in validation}
    return [p for p in pairs if p.original.id not in held], validation


def by_length(tokenizer, originals: list[Record], counterfactuals: list[Record] | None
              ) -> tuple[list[Record], list[Record] | None]:
    """Sort a step's pairs by rendered length so each micro-batch pads to similar rows."""
    length = [len(tokenizer(r.instruction + r.response)["input_ids"]) for r in originals]
    order = sorted(range(len(originals)), key=length.__getitem__)
    return [originals[i] for i in order], None if counterfactuals is None else [counterfactuals[i] for i in order]


def accumulate_gradients(student, teacher, tokenizer, originals: list[Record], counterfactuals: list[Record] | None,
                         config: DistillationConfig, vocab: int) -> tuple[float, dict[str, float]]:
    """Forward+backward of one optimizer step's batch in ``grad_accum`` micro-batches.

    Under DDP only the last micro-batch synchronises gradients (``no_sync`` on the others).
    Returns the step's mean loss and its branches.
    """
    micro = len(originals) // config.grad_accum
    device = next(student.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=bf16_autocast_enabled(config.bf16_autocast, device))
    if config.grad_accum > 1:
        originals, counterfactuals = by_length(tokenizer, originals, counterfactuals)
    total, parts_sum = 0.0, {}
    for index, lo in enumerate(range(0, len(originals), micro)):
        last = index == config.grad_accum - 1
        sync = nullcontext() if last or not hasattr(student, "no_sync") else student.no_sync()
        with sync:
            with autocast:
                cf = None if counterfactuals is None else encode_branch(tokenizer, counterfactuals[lo:lo + micro])
                loss, parts = hybrid_loss(student, teacher, encode_branch(tokenizer, originals[lo:lo + micro]), cf,
                                          config, vocab)
            (loss / config.grad_accum).backward()
        total += loss.item() / config.grad_accum
        for key, value in parts.items():
            parts_sum[key] = parts_sum.get(key, 0.0) + value / config.grad_accum
    return total, parts_sum


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums over workers when torch.distributed is up; the values themselves on one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    # nccl reduces GPU tensors only (gloo, CPU ones).
    device = torch.cuda.current_device() if torch.distributed.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def validation_loss(student, teacher, tokenizer, records: Sequence[Record], config: DistillationConfig,
                    vocab: int, batch_size: int = 64) -> tuple[float, int]:
    """(summed per-token KD divergence on the original prompts, response tokens counted).

    The original-prompt divergence whatever ``lam`` is, so runs with different ``lam`` are
    compared on the same quantity; sums so that workers can all-reduce them.
    """
    total, tokens = 0.0, 0
    for lo in range(0, len(records), batch_size):
        batch = encode_branch(tokenizer, records[lo:lo + batch_size])
        count = int(batch["target_mask"][:, 1:].sum())
        total += branch_loss(student, teacher, batch, config, vocab).item() * count
        tokens += count
    return total, tokens


def validate(student, teacher, tokenizer, validation: Sequence[TrainingPair], config: DistillationConfig,
             vocab: int, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Validation KD loss over every worker's slice; answer accuracy when the records have answers.

    With ``world == 1`` every caller validates the whole set itself: one process, or FSDP
    workers in lockstep (see :mod:`leaf_ray.distillation.parallel`).
    """
    from leaf_ray.evaluation import accuracy

    mine = [p.original for p in validation[rank::world]]
    total, tokens = validation_loss(student, teacher, tokenizer, mine, config, vocab) if mine else (0.0, 0)
    answered = [r for r in mine if r.answer is not None]
    correct = accuracy(student, tokenizer, answered, config.checker, config.max_new_tokens).accuracy * len(answered) if answered else 0.0
    if world > 1:
        total, tokens, correct, counted = all_reduce_sum([total, tokens, correct, len(answered)])
    else:
        counted = len(answered)
    metrics = {"val_loss": total / max(tokens, 1)}
    if counted:
        metrics["val_accuracy"] = correct / counted
    return metrics


StepReport = Callable[[dict[str, Any], dict[str, Any]], None]


def train(model, teacher, tokenizer, pairs: Sequence[TrainingPair] | PairStream, config: DistillationConfig, vocab: int, *,
          validation: Sequence[TrainingPair] = (), rank: int = 0, world: int = 1, resume: dict[str, Any] | None = None,
          report: StepReport | None = None) -> list[dict[str, Any]]:
    """Distil for ``max_steps`` optimizer steps of ``batch_size`` pairs split over ``world`` workers.

    ``model`` is the student, possibly wrapped by DDP or sharded by FSDP; ``teacher`` is a
    model, frozen here, or a :class:`TeacherCache`. ``pairs`` are held in memory and sampled
    with replacement (:func:`sampled_batches`), or a :class:`PairStream` read in seeded epochs
    (:func:`streamed_batches`, what Ray Train workers get). ``resume`` is a training state an
    earlier call's checkpoint saved (full optimizer state, schedule, step): the run continues
    at the next step with the same data, because both batch sources are seeded per rank and
    skip the batches of the finished steps. ``report(metrics, state)`` is called after every step on every
    worker; ``state`` holds the model, optimizer and schedule a checkpoint needs. Validation
    runs every ``validation_interval`` steps and at the end.
    Returns this call's per-step metrics.
    """
    if isinstance(teacher, torch.nn.Module):
        teacher.eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    optimizer, schedule = make_optimizer(model, config)
    start = 0
    if resume is not None:
        load_optimizer_state(model, optimizer, resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        start = resume["step"]
    per_worker = config.batch_size // world
    if isinstance(pairs, PairStream):
        batches, num_pairs = streamed_batches(pairs, config, per_worker, rank, world, start), pairs.size
    else:
        batches, num_pairs = sampled_batches(pairs, config, per_worker, rank, world, start), len(pairs)
    plain = bare_model(model)  # generation needs the Hugging Face model
    # Sharded forwards are collectives: every FSDP worker validates the whole set in lockstep.
    val_rank, val_world = (0, 1) if lockstep_forwards(model) else (rank, world)
    validate_every = config.validation_interval(num_pairs)

    history = []
    steps = range(start + 1, config.max_steps + 1)
    bar = tqdm(steps, desc=f"distill[{config.variant}]", unit="step", mininterval=2.0, disable=rank != 0)
    for step in bar:
        started = time.perf_counter()
        model.train()
        originals, counterfactuals = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = accumulate_gradients(model, teacher, tokenizer, originals, counterfactuals, config, vocab)
        grad_norm = clip_gradients(model, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        names = ["loss", *sorted(parts)]
        means = all_reduce_sum([value / world for value in (loss, *(parts[k] for k in names[1:]))])
        metrics = {"step": step, **dict(zip(names, means)), "grad_norm": grad_norm, "lr": schedule.get_last_lr()[0],
                   "step_s": time.perf_counter() - started}
        if validation and (step % validate_every == 0 or step == config.max_steps):
            model.eval()
            metrics.update(validate(plain, teacher, tokenizer, validation, config, vocab, val_rank, val_world))
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        if report is not None:
            report(metrics, {"model": model, "optimizer": optimizer, "schedule": schedule, "step": step})
    model.eval()
    return history
