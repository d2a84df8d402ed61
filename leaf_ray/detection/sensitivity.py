"""Gradient sensitivity of the response loss w.r.t. input embeddings, batched.

For each sample, the loss is the mean next-token NLL over its *target* tokens (the
response, or the next reasoning step in response-level mode). The sensitivity of a
*context* token (the instruction, or the reasoning prefix) is, by default, the L2 norm over
the hidden dimension of d(loss)/d(embedding), the paper's score; gradient x input and
integrated gradients are the other gradient methods (:func:`embedding_attributions`). One
forward and one backward per padded batch: the batch loss is the *sum* of per-sample mean
losses, so each sample's gradient is exactly its own loss's gradient (attention never
crosses samples).

Token scores are then projected onto character *units* of the scored text, so a teacher
and a student with different tokenizers are compared on the same pieces of text. Units
follow the text's structure (:mod:`leaf_ray.detection.units`): words and identifiers, LaTeX
commands, punctuation runs, whitespace runs, and single characters of scripts written
without spaces. ``units: tokens`` uses the student's tokens instead, as the official code.
The occlusion method scores units directly (:mod:`leaf_ray.detection.occlusion`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from leaf_ray.data import RenderedSample, overlapping_tokens, pad_batch
from leaf_ray.detection.units import Unit

@dataclass(frozen=True)
class ScoringItem:
    """What the scorer needs of one sample: tokens, their character offsets into the
    rendered text, the context span to score and the target span whose loss is taken."""

    input_ids: Sequence[int]
    offsets: Sequence[tuple[int, int]]
    context_span: tuple[int, int]
    target_span: tuple[int, int]

    @classmethod
    def instruction_level(cls, rendered: RenderedSample) -> ScoringItem:
        return cls(rendered.input_ids, rendered.offsets, rendered.instruction_span, rendered.response_span)

    def token_indices(self, span: tuple[int, int]) -> list[int]:
        return overlapping_tokens(self.offsets, span)

    @property
    def context_tokens(self) -> list[int]:
        return self.token_indices(self.context_span)

    @property
    def target_tokens(self) -> list[int]:
        return self.token_indices(self.target_span)


def prepare_for_scoring(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no parameter grads: only the input embeddings need a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def collate(items: Sequence[ScoringItem], padding_side: str = "right", pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a batch; ``target_mask[b, t]`` marks tokens whose prediction is in the loss."""
    targets = [[i for i in item.target_tokens if i > 0] for item in items]  # token 0 has no predecessor
    if not all(targets):
        raise ValueError("sample has no target tokens to take the loss on")
    return pad_batch([item.input_ids for item in items], targets, pad_id, padding_side)


GradientMethod = Literal["grad_norm", "grad_x_input", "integrated_gradients"]


def target_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T-1, V]`` next-token log-probs and ``[B, T-1]`` whether each position predicts a
    ``target_mask`` token (position t-1 predicts token t).

    Position ids are passed explicitly so left-padded rows see the same positions as
    unpadded ones. ``inputs_embeds`` replaces the token embeddings (gradient methods).
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    logits = model(**inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1), batch["target_mask"].to(device)[:, 1:]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean of each row over ``mask``; where(), not multiply: padded rows may hold
    non-finite values."""
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1) / mask.sum(-1)


def sample_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` mean next-token NLL of each row over its ``target_mask`` tokens."""
    log_probs, predicting = target_log_probs(model, batch, inputs_embeds)
    targets = batch["input_ids"].to(log_probs.device)[:, 1:, None]
    return masked_mean(-log_probs.gather(-1, targets).squeeze(-1), predicting)


@torch.no_grad()
def sample_entropies(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]`` mean entropy (nats) of the model's next-token distribution over each row's
    ``target_mask`` tokens: how sure it is of the response, whatever the response says."""
    log_probs, predicting = target_log_probs(model, batch)
    return masked_mean(-(log_probs.exp() * log_probs).sum(-1), predicting)


def embedding_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                        embeds: torch.Tensor) -> torch.Tensor:
    """d(sample loss)/d(input embedding) at ``embeds``, one forward+backward: the batch loss
    is the sum of per-sample losses, and attention never crosses samples."""
    embeds = embeds.detach().requires_grad_(True)
    with torch.enable_grad():
        (grads,) = torch.autograd.grad(sample_losses(model, batch, embeds).sum(), embeds)
    return grads.float()


def embedding_attributions(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                           method: GradientMethod = "grad_norm", steps: int = 8) -> torch.Tensor:
    """``[B, T]`` attribution of each token to its sample's loss.

    - ``grad_norm``: the L2 norm of the gradient (the paper's score; one pass);
    - ``grad_x_input``: ``|gradient . embedding|``, the first-order loss change if the token's
      embedding were zeroed (one pass);
    - ``integrated_gradients``: ``|embedding . mean gradient|`` along the straight path from
      zeroed context embeddings (``batch["context_mask"]``) to the real ones, a right Riemann
      sum of ``steps`` points; the other tokens stay as they are (``steps`` passes, batched).
    """
    device = next(model.parameters()).device
    embeds = model.get_input_embeddings()(batch["input_ids"].to(device)).detach()
    if method == "grad_norm":
        return embedding_gradients(model, batch, embeds).norm(dim=-1).cpu()
    if method == "grad_x_input":
        return (embedding_gradients(model, batch, embeds) * embeds.float()).sum(-1).abs().cpu()
    if method != "integrated_gradients":
        raise ValueError(f"unknown gradient method {method!r}")
    context = batch["context_mask"].to(device)[..., None]
    alphas = torch.arange(1, steps + 1, device=device, dtype=embeds.dtype) / steps
    path = torch.cat([torch.where(context, alpha * embeds, embeds) for alpha in alphas])
    repeated = {k: v.repeat(steps, *[1] * (v.dim() - 1)) for k, v in batch.items() if k != "offsets"}
    grads = embedding_gradients(model, repeated, path).view(steps, *embeds.shape).mean(0)
    return (grads * embeds.float()).sum(-1).abs().cpu()


def token_sensitivity(model: torch.nn.Module, items: Sequence[ScoringItem], padding_side: str = "right",
                      method: GradientMethod = "grad_norm", steps: int = 8) -> list[np.ndarray]:
    """Per item, the attribution of each context token (in ``item.context_tokens`` order)."""
    batch = collate(items, padding_side)
    batch["context_mask"] = torch.zeros_like(batch["target_mask"])
    for b, item in enumerate(items):
        batch["context_mask"][b, [int(batch["offsets"][b]) + i for i in item.context_tokens]] = True
    scores = embedding_attributions(model, batch, method, steps)
    out = []
    for b, item in enumerate(items):
        offset = int(batch["offsets"][b])
        out.append(scores[b, [offset + i for i in item.context_tokens]].numpy().astype(np.float64))
    return out


def project_to_units(units: Sequence[Unit], token_spans: Sequence[tuple[int, int]],
                     token_norms: Sequence[float], text: str) -> np.ndarray:
    """Unit scores from token scores: the L2 norm of the gradient mass falling on each unit.

    A token's squared norm is shared among the units it overlaps in proportion to the
    characters it covers in each, counting only non-whitespace characters when it has
    any (a byte-level BPE token like " ann" belongs to the word, not to the space).
    With one token per unit this is the token's own norm.
    """
    spans = np.clip(np.asarray(token_spans, dtype=np.int64).reshape(-1, 2), 0, len(text))
    lengths = np.maximum(spans[:, 1] - spans[:, 0], 0)
    if not lengths.any():
        return np.zeros(len(units))
    # Every character of every token, with the token it belongs to (vectorised: this ran per
    # character in Python and cost a tenth of the scorer's time).
    token_of_char = np.repeat(np.arange(len(spans)), lengths)
    chars = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + spans[token_of_char, 0]
    is_solid = np.array([not c.isspace() for c in text], dtype=bool)[chars]
    solid_per_token = np.bincount(token_of_char, weights=is_solid, minlength=len(spans))
    counted = is_solid | (solid_per_token[token_of_char] == 0)
    per_token = np.bincount(token_of_char, weights=counted, minlength=len(spans))
    share = np.square(np.asarray(token_norms, dtype=np.float64)) / np.maximum(per_token, 1)
    unit_of_char = np.searchsorted(np.array([u.start for u in units]), chars, side="right") - 1
    mass = np.bincount(unit_of_char[counted], weights=share[token_of_char][counted], minlength=len(units))
    return np.sqrt(mass)


def minmax(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant (or single-value) vector has no spread and maps to zeros."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    lo, hi = values.min(), values.max()
    if not hi > lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def leaf_diff(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """``minmax(minmax(g_T) - minmax(g_S))``: low where the student leans on a unit the teacher ignores."""
    return minmax(minmax(teacher) - minmax(student))


UnitKind = Literal["text", "tokens"]


@dataclass
class UnitScores:
    """Scores of one sample's scored text, per unit.

    ``kind`` says what the units are. ``text``: pieces of text (:func:`~leaf_ray.detection.units.split_units`); scores
    are normalised over the non-whitespace units, and whitespace units carry NaN.
    ``tokens``: the student's tokens (:func:`~leaf_ray.detection.units.token_units`); as in the official code, every
    token is in the population, whitespace included, and none carries NaN.
    """

    text: str
    units: list[Unit]
    teacher: np.ndarray
    student: np.ndarray
    diff: np.ndarray
    kind: UnitKind = "text"
    # Each model's unnormalised unit scores (gradient norms, attributions, loss changes), which
    # keep the scale normalisation drops: how much of a model's reliance a clause holds.
    teacher_raw: np.ndarray | None = None
    student_raw: np.ndarray | None = None

    @property
    def scored(self) -> np.ndarray:
        """The units normalisation and the quantile run over."""
        return population(self.units, self.kind)

    @property
    def maskable(self) -> np.ndarray:
        return np.array([u.is_maskable for u in self.units], dtype=bool)


def population(units: Sequence[Unit], kind: UnitKind) -> np.ndarray:
    return np.array([kind == "tokens" or not u.is_space for u in units], dtype=bool)


def compare_unit_scores(text: str, units: list[Unit], teacher_raw: np.ndarray,
                        student_raw: np.ndarray, kind: UnitKind = "text") -> UnitScores:
    """Normalise over the unit population (see :class:`UnitScores`) and take the LeaF diff."""
    scored = population(units, kind)
    teacher = np.full(len(units), np.nan)
    student = np.full(len(units), np.nan)
    diff = np.full(len(units), np.nan)
    teacher[scored] = minmax(teacher_raw[scored])
    student[scored] = minmax(student_raw[scored])
    diff[scored] = leaf_diff(teacher_raw[scored], student_raw[scored])
    return UnitScores(text, units, teacher, student, diff, kind, np.asarray(teacher_raw, dtype=np.float64),
                      np.asarray(student_raw, dtype=np.float64))
