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
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LossType = Literal["forward_kl", "reverse_kl", "jsd"]


class VocabularyMismatchError(ValueError):
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
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
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


def leaf_loss(original: torch.Tensor, counterfactual: torch.Tensor, lam: float) -> torch.Tensor:
    """The hybrid LeaF objective ``lam * L(x) + (1 - lam) * L(x_cf)``; ``lam = 1`` is plain KD."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam * original + (1.0 - lam) * counterfactual
