"""Occlusion: how much a sample's response loss changes when one unit is cut out of it.

For each unit of the scored text, the tokens that overlap it are deleted from the rendered
sample (the tokens after it move up: this is the counterfactual pruning would make of that
unit alone), and the score is ``|loss without the unit - loss with everything|``. Removing
something the model relies on moves its loss either way: up when it helped, down when it
misled. Forward passes only, one per unit plus one for the whole sample, batched by length.
Plain PyTorch; no Ray here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from leaf_ray.data import length_batches, pad_batch
from leaf_ray.detection.sensitivity import ScoringItem, sample_losses


def without(item: ScoringItem, removed: Sequence[int]) -> tuple[list[int], list[int]]:
    """The item's token ids with ``removed`` deleted, and its loss targets' new indices."""
    gone = set(removed)
    kept = [t for t in range(len(item.input_ids)) if t not in gone]
    new_index = {old: new for new, old in enumerate(kept)}
    targets = [new_index[t] for t in item.target_tokens if t > 0 and t in new_index]
    return [item.input_ids[t] for t in kept], targets


@torch.no_grad()
def unit_occlusion(model: torch.nn.Module, items: Sequence[ScoringItem], groups: Sequence[Sequence[Sequence[int]]],
                   max_tokens_per_batch: int = 8192, pad_id: int = 0) -> list[np.ndarray]:
    """Per item, the loss change of removing each group of its tokens (``groups[i][u]``: the
    token indices of unit ``u`` of item ``i``). An empty group (a unit no token of the
    context covers) scores 0. Target tokens are never removed."""
    variants: list[tuple[list[int], list[int]]] = []
    owners: list[tuple[int, int]] = []  # (item, group index; -1 for the whole sample)
    for i, item in enumerate(items):
        targets = set(item.target_tokens)
        for u, group in enumerate([(), *groups[i]]):
            removable = [t for t in group if t not in targets]
            if u and not removable:
                continue
            variants.append(without(item, removable))
            owners.append((i, u - 1))
    losses = np.zeros(len(variants))
    for batch in length_batches([len(ids) for ids, _ in variants], max_tokens_per_batch):
        padded = pad_batch([variants[v][0] for v in batch], [variants[v][1] for v in batch], pad_id)
        losses[batch] = sample_losses(model, padded).double().cpu().numpy()
    whole = {i: losses[v] for v, (i, u) in enumerate(owners) if u < 0}
    out = [np.zeros(len(g)) for g in groups]
    for v, (i, u) in enumerate(owners):
        if u >= 0:
            out[i][u] = abs(losses[v] - whole[i])
    return out
