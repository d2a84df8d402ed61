"""Causal attention distillation: the LeaF objective and an in-process training loop.

The student learns from a frozen teacher on each original prompt and on a counterfactual
of it (a confounding span cut out):

    loss = lam * D(p_T(y|x) || p_S(y|x)) + (1 - lam) * D(p_T(y|x_cf) || p_S(y|x_cf))

over the completion tokens (``lam = 1`` is plain KD). ``mode: mixed`` instead puts
originals and counterfactuals in one pool, as the official code does.

Batches are padded to their own longest row, never to a fixed length. This module is
plain PyTorch; the Ray Train job runs the same :func:`hybrid_loss` on each worker.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from leaf_ray.config import DistillationConfig
from leaf_ray.data import Record, pad_batch, render_sample
from leaf_ray.losses import distill_loss, leaf_loss


@dataclass
class TrainingPair:
    """An original record and the counterfactuals cut from it (possibly none)."""

    original: Record
    counterfactuals: list[Record] = field(default_factory=list)


def pair_records(originals: Sequence[Record], counterfactuals: Sequence[dict[str, Any]]) -> list[TrainingPair]:
    """Join counterfactual rows (with ``source_id``) to their originals by id."""
    by_source: dict[str, list[Record]] = {}
    for row in counterfactuals:
        by_source.setdefault(row["source_id"], []).append(
            Record(row["id"], row["instruction"], row["response"], row.get("answer"), row.get("meta") or {}))
    return [TrainingPair(r, by_source.get(r.id, [])) for r in originals]


def encode_records(tokenizer, records: Sequence[Record]) -> dict[str, torch.Tensor]:
    rendered = [render_sample(tokenizer, r.instruction, r.response) for r in records]
    return pad_batch([x.input_ids for x in rendered], [x.completion_tokens for x in rendered], tokenizer.pad_token_id)


def sample_batch(pairs: Sequence[TrainingPair], config: DistillationConfig, size: int, rng: random.Random
                 ) -> tuple[list[Record], list[Record] | None]:
    """``size`` originals drawn with replacement and, for the hybrid loss, one counterfactual each.

    A pair without counterfactuals uses its original in the counterfactual branch, so it
    contributes plain KD. ``mixed`` mode draws from one pool of originals and
    counterfactuals and has no second branch.
    """
    if config.mode == "mixed":
        pool = [r for p in pairs for r in (p.original, *p.counterfactuals)]
        return [rng.choice(pool) for _ in range(size)], None
    chosen = [rng.choice(pairs) for _ in range(size)]
    originals = [p.original for p in chosen]
    if config.lam >= 1.0:
        return originals, None
    return originals, [rng.choice(p.counterfactuals) if p.counterfactuals else p.original for p in chosen]


def branch_loss(student, teacher, batch: dict[str, torch.Tensor], config: DistillationConfig,
                vocab: int) -> torch.Tensor:
    """Divergence on one padded batch, teacher under no_grad, logits sliced to the shared vocab."""
    device = next(student.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[..., :vocab]
    student_logits = student(**inputs).logits[..., :vocab]
    return distill_loss(student_logits, teacher_logits, batch["target_mask"].to(device), config.loss,
                        config.temperature, config.jsd_beta, config.loss_chunk_tokens)


def hybrid_loss(student, teacher, originals: dict[str, torch.Tensor], counterfactuals: dict[str, torch.Tensor] | None,
                config: DistillationConfig, vocab: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The LeaF objective on one step's batches; also returns each branch's value."""
    original = branch_loss(student, teacher, originals, config, vocab)
    if counterfactuals is None:
        return original, {"loss_original": original.item()}
    counterfactual = branch_loss(student, teacher, counterfactuals, config, vocab)
    return (leaf_loss(original, counterfactual, config.lam),
            {"loss_original": original.item(), "loss_counterfactual": counterfactual.item()})


def make_optimizer(model: torch.nn.Module, config: DistillationConfig):
    """AdamW with linear warmup then cosine decay to zero at ``max_steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, config.max_steps) / config.max_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def split_validation(pairs: Sequence[TrainingPair], fraction: float, limit: int
                     ) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """(train, validation): a pair goes to validation by a hash of its id, so the split is the
    same on every worker and every rerun, and adding records never moves old ones."""
    def bucket(pair: TrainingPair) -> float:
        return int(hashlib.sha1(pair.original.id.encode()).hexdigest()[:8], 16) / 16**8

    validation = [p for p in pairs if bucket(p) < fraction][:limit]
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
    autocast = torch.autocast(next(student.parameters()).device.type, dtype=torch.bfloat16,
                              enabled=config.bf16_autocast)
    if config.grad_accum > 1:
        originals, counterfactuals = by_length(tokenizer, originals, counterfactuals)
    total, parts_sum = 0.0, {}
    for index, lo in enumerate(range(0, len(originals), micro)):
        last = index == config.grad_accum - 1
        sync = nullcontext() if last or not hasattr(student, "no_sync") else student.no_sync()
        with sync:
            with autocast:
                cf = None if counterfactuals is None else encode_records(tokenizer, counterfactuals[lo:lo + micro])
                loss, parts = hybrid_loss(student, teacher, encode_records(tokenizer, originals[lo:lo + micro]),
                                          cf, config, vocab)
            (loss / config.grad_accum).backward()
        total += loss.item() / config.grad_accum
        for key, value in parts.items():
            parts_sum[key] = parts_sum.get(key, 0.0) + value / config.grad_accum
    return total, parts_sum


@torch.no_grad()
def validation_loss(student, teacher, tokenizer, records: Sequence[Record], config: DistillationConfig,
                    vocab: int, batch_size: int = 64) -> tuple[float, int]:
    """(summed per-token KD divergence on the original prompts, response tokens counted).

    The original-prompt divergence whatever ``lam`` is, so runs with different ``lam`` are
    compared on the same quantity; sums so that workers can all-reduce them.
    """
    total, tokens = 0.0, 0
    for lo in range(0, len(records), batch_size):
        batch = encode_records(tokenizer, records[lo:lo + batch_size])
        count = int(batch["target_mask"][:, 1:].sum())
        total += branch_loss(student, teacher, batch, config, vocab).item() * count
        tokens += count
    return total, tokens


def train_in_process(student, teacher, tokenizer, pairs: Sequence[TrainingPair], config: DistillationConfig,
                     vocab: int, on_eval: Callable[[int], dict[str, float]] | None = None) -> list[dict[str, float]]:
    """Distil on one process: ``max_steps`` optimizer steps of ``batch_size`` pairs.

    ``on_eval(step)`` is called every ``eval_every`` steps (default: each epoch) and at the
    end; its metrics are merged into the returned history.
    """
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    teacher.eval().requires_grad_(False)
    optimizer, schedule = make_optimizer(student, config)
    history: list[dict[str, float]] = []
    every = config.validation_interval(len(pairs))
    with tqdm(range(1, config.max_steps + 1), desc=f"distill[{config.variant}]", unit="step", mininterval=2.0) as bar:
        for step in bar:
            student.train()
            originals, counterfactuals = sample_batch(pairs, config, config.batch_size, rng)
            optimizer.zero_grad(set_to_none=True)
            loss, parts = accumulate_gradients(student, teacher, tokenizer, originals, counterfactuals, config, vocab)
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            record = {"step": step, "loss": loss, **parts}
            if on_eval is not None and (step % every == 0 or step == config.max_steps):
                student.eval()
                record.update(on_eval(step))
            history.append(record)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    student.eval()
    return history
