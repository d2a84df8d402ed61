"""Loading a causal LM and its tokenizer from a local Hugging Face directory.

Loading does not decide what is trained: the scorer freezes its models
(:func:`leaf_ray.detection.sensitivity.prepare_for_scoring`), distillation freezes the
teacher and trains the student.
"""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(path: str | Path, dtype: str = "float32", device: str = "auto", device_map: str | None = None):
    """(model in eval mode, tokenizer) from a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"dtype": getattr(torch, dtype)}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not device_map:
        model.to(resolve_device(device))
    return model.eval(), tokenizer
