"""Distillation losses over response tokens, computed in chunks.

Logits at position ``t`` predict token ``t + 1``; a response-token mask over *tokens*
therefore selects logits ``[:, :-1]`` where ``mask[:, 1:]`` is set (the official code
compares logits and labels at the same position, one token off).

Only the selected positions are kept, and they are processed ``chunk_tokens`` at a time:
the float32 full-vocabulary probabilities of teacher and student exist for one chunk
at once, and with gradients the chunk is recomputed in the backward pass instead of
being stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from leaf_ray.errors import RunRefused

LossType = Literal["forward_kl", "reverse_kl", "jsd"]


class VocabularyMismatchError(RunRefused):
    """Teacher and student tokenizers disagree, so their distributions cannot be compared."""


def shared_vocab_size(teacher_tokenizer, student_tokenizer, teacher_vocab: int, student_vocab: int) -> int:
    """How many logit columns teacher and student share.

    Checkpoints often pad the embedding matrix (151936 vs 152064 rows for one tokenizer),
    so logits are sliced to the smaller width, provided both tokenizers map the same
    token strings to the same ids and every real token fits in that width.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        only_t = len(set(t_vocab.items()) - set(s_vocab.items()))
        only_s = len(set(s_vocab.items()) - set(t_vocab.items()))
        raise VocabularyMismatchError(
            f"teacher and student tokenizers differ ({only_t} token ids only in the teacher's, "
            f"{only_s} only in the student's); logit distillation needs one tokenizer. Scoring works across "
            f"tokenizers, but to distil pick a teacher of the student's family (same tokenizer), or distil "
            f"from the teacher's generated answers instead (cross-tokenizer losses such as ULD/GOLD are "
            f"not implemented here)")
    shared = min(teacher_vocab, student_vocab)
    needed = max(t_vocab.values()) + 1
    if shared < needed:
        raise VocabularyMismatchError(f"model vocab width {shared} is smaller than the tokenizer's {needed} ids")
    return shared


def _divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: LossType,
                temperature: float, beta: float) -> torch.Tensor:
    """Per-position divergence ``[N]`` in float32 for ``[N, V]`` logits."""
    return _divergence_of_logprobs(F.log_softmax(student_logits.float() / temperature, dim=-1),
                                   F.log_softmax(teacher_logits.float() / temperature, dim=-1), kind, beta)


def _divergence_of_logprobs(s: torch.Tensor, t: torch.Tensor, kind: LossType, beta: float) -> torch.Tensor:
    """Per-position divergence ``[N]`` of normalised log-probabilities ``[N, V]`` (student, teacher)."""
    if kind == "forward_kl":  # KL(p_T || p_S)
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse_kl":  # KL(p_S || p_T)
        return (s.exp() * (s - t)).sum(-1)
    if kind == "jsd":  # beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), m = beta p_T + (1 - beta) p_S
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    raise ValueError(f"unknown loss {kind!r}; use forward_kl, reverse_kl or jsd")


def response_positions(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V]`` logits of the positions that predict a response token (shifted by one)."""
    predicting = response_mask[:, 1:].bool()
    return student_logits[:, :-1][predicting], teacher_logits[:, :-1][predicting]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, response_mask: torch.Tensor,
                 kind: LossType = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                 chunk_tokens: int | None = 1024) -> torch.Tensor:
    """Mean per-token divergence over response tokens, scaled by ``temperature ** 2``.

    ``student_logits`` / ``teacher_logits``: ``[B, T, V]`` (same V: slice with
    :func:`shared_vocab_size` first). ``response_mask``: ``[B, T]`` over tokens.
    ``chunk_tokens=None`` computes everything at once (the reference).
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise VocabularyMismatchError(
            f"logit widths differ ({student_logits.shape[-1]} vs {teacher_logits.shape[-1]}); "
            "slice both to shared_vocab_size() first")
    student, teacher = response_positions(student_logits, teacher_logits.detach(), response_mask)
    count = student.shape[0]
    if count == 0:
        return student_logits.sum() * 0.0
    step = count if chunk_tokens is None else chunk_tokens
    total = student.new_zeros((), dtype=torch.float32)
    for lo in range(0, count, step):
        s_chunk, t_chunk = student[lo:lo + step], teacher[lo:lo + step]
        if step < count and s_chunk.requires_grad:
            part = checkpoint(_divergence, s_chunk, t_chunk, kind, temperature, beta, use_reentrant=False)
        else:
            part = _divergence(s_chunk, t_chunk, kind, temperature, beta)
        total = total + part.sum()
    return total / count * temperature ** 2


# Stored teacher log-probs are clamped here so that float16 holds them (exp(-1e4) is 0 anyway).
LOGPROB_FLOOR = -1e4


@dataclass(frozen=True)
class SparseTargets:
    """The teacher's distribution at ``N`` response positions, kept as its top ``k`` tokens.

    ``ids`` ``[N, k]`` and ``logprobs`` ``[N, k]`` (at the distillation temperature), and
    ``tail`` ``[N]``: the log of the mass on every other token of ``vocab`` (``-inf`` when
    ``k == vocab``). Rows are in the order :func:`response_positions` selects positions.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    vocab: int

    @property
    def k(self) -> int:
        return self.ids.shape[-1]


def teacher_top_k(teacher_logits: torch.Tensor, response_mask: torch.Tensor, k: int,
                  temperature: float = 1.0) -> SparseTargets:
    """What the cache stores of ``[B, T, V]`` teacher logits: top ``k`` and tail mass per response position."""
    vocab = teacher_logits.shape[-1]
    predicting = response_mask[:, 1:].bool()
    logprobs = F.log_softmax(teacher_logits[:, :-1][predicting].float() / temperature, dim=-1)
    top, ids = logprobs.topk(min(k, vocab), dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)
    return SparseTargets(ids, top.clamp(min=LOGPROB_FLOOR), tail.clamp(min=LOGPROB_FLOOR) if k < vocab else tail,
                         vocab)


def _bucket_divergence(student_logits: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor, kind: LossType,
                       temperature: float, beta: float) -> torch.Tensor:
    """Per-position divergence over ``k`` (+1 tail) buckets: the teacher's top-k tokens and, when
    ``teacher`` has a column more than ``ids``, everything else as one bucket."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_buckets = s.gather(-1, ids)
    if teacher.shape[-1] > ids.shape[-1]:
        s_buckets = torch.cat([s_buckets, torch.logsumexp(s.scatter(-1, ids, float("-inf")), -1, keepdim=True)], -1)
    # Renormalise: float16 storage leaves the stored buckets summing to 1 only within ~1e-3.
    return _divergence_of_logprobs(s_buckets, F.log_softmax(teacher.float(), dim=-1), kind, beta)


def sparse_distill_loss(student_logits: torch.Tensor, targets: SparseTargets, response_mask: torch.Tensor,
                        kind: LossType = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                        chunk_tokens: int | None = 1024) -> torch.Tensor:
    """:func:`distill_loss` against a cached teacher: the divergence between teacher and student
    distributions coarsened to ``k + 1`` buckets (the teacher's top ``k`` tokens, and the rest as
    one). Every divergence of ``LossType`` is defined on buckets; each is at most its dense value
    (coarsening never increases a divergence) and equals it when ``k`` is the vocabulary."""
    if student_logits.shape[-1] != targets.vocab:
        raise VocabularyMismatchError(f"student logits are {student_logits.shape[-1]} wide but the cached teacher "
                                      f"covered {targets.vocab} tokens; slice to the cache's vocab first")
    predicting = response_mask[:, 1:].bool()
    student = student_logits[:, :-1][predicting]
    count = student.shape[0]
    if count != targets.ids.shape[0]:
        raise ValueError(f"the cache holds {targets.ids.shape[0]} teacher positions for this batch but it has "
                         f"{count} response positions: the cache was built with another tokenizer or chat template")
    if count == 0:
        return student_logits.sum() * 0.0
    device = student.device
    ids = targets.ids.to(device, torch.int64)
    teacher = targets.logprobs.to(device, torch.float32)
    if targets.k < targets.vocab:
        teacher = torch.cat([teacher, targets.tail.to(device, torch.float32)[:, None]], -1)
    step = count if chunk_tokens is None else chunk_tokens
    total = student.new_zeros((), dtype=torch.float32)
    for lo in range(0, count, step):
        args = (student[lo:lo + step], ids[lo:lo + step], teacher[lo:lo + step], kind, temperature, beta)
        if step < count and student.requires_grad:
            part = checkpoint(_bucket_divergence, *args, use_reentrant=False)
        else:
            part = _bucket_divergence(*args)
        total = total + part.sum()
    return total / count * temperature ** 2


def leaf_loss(original: torch.Tensor, counterfactual: torch.Tensor, lam: float) -> torch.Tensor:
    """The hybrid LeaF objective ``lam * L(x) + (1 - lam) * L(x_cf)``; ``lam = 1`` is plain KD."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam * original + (1.0 - lam) * counterfactual
