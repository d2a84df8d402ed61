"""Data parallelism of the student, in plain ``torch.distributed``: DDP or FSDP2.

DDP (a replica per worker) is wrapped by Ray Train's ``prepare_model``. FSDP is torch's
FSDP2 ``fully_shard``, applied here, because Ray Train 2.60's wrapper is FSDP1 and refuses
CPU workers; FSDP2 runs on gloo (CPU) and nccl (GPU) alike.

What differs under FSDP, and is handled by the helpers below for both:

- each worker holds a shard of every parameter, so the gradient norm to clip by is summed
  over workers (:func:`clip_gradients`);
- checkpoints hold the *full* student and optimizer state, gathered from every worker
  (:func:`full_training_state`) and loaded back into the shards (:func:`load_optimizer_state`),
  so a run resumes with any number of workers and the export is a plain HF model;
- a forward pass is a collective (each layer is all-gathered as it runs), so every worker
  must run the same forwards: validation and generation run in lockstep, the same records
  on every worker (:func:`lockstep_forwards`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_student(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """FSDP2: each transformer block is its own shard unit, then the rest (embeddings, head).

    The blocks are the classes the model lists in ``_no_split_modules``, as Hugging Face's
    own ``device_map`` splitting uses them; every causal LM in ``transformers`` lists them.
    """
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(model).__name__} lists no _no_split_modules: FSDP cannot find its "
                         "transformer blocks; use strategy: ddp")
    mesh = init_device_mesh(device.type, (world,))
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def lockstep_forwards(model: torch.nn.Module) -> bool:
    """True when a forward pass is a collective that every worker must join (FSDP)."""
    return isinstance(model, FSDPModule)


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model: DDP's ``module``; an FSDP2 model is its own module."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip by the *global* gradient norm and return it.

    DDP gradients are already all-reduced, so the local norm is the global one. FSDP
    gradients are shards (DTensors): their norm is a partial sum that ``full_tensor``
    reduces over workers.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm.item()


def full_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimizer state), full and on CPU, on rank 0 (empty on other FSDP ranks).

    Under FSDP this is a collective: every worker must call it.
    """
    if lockstep_forwards(model):
        return get_model_state_dict(model, options=FULL_STATE), get_optimizer_state_dict(model, optimizer,
                                                                                         options=FULL_STATE)
    return bare_model(model).state_dict(), optimizer.state_dict()


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state from :func:`full_training_state` (every worker passes the full state)."""
    if lockstep_forwards(model):
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
