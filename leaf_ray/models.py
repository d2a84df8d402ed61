"""Loading a causal LM and its tokenizer from a local Hugging Face directory.

Loading does not decide what is trained: the scorer freezes its models
(:func:`leaf_ray.detection.sensitivity.prepare_for_scoring`), distillation freezes the
teacher and trains the student.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bf16_autocast_enabled(setting: bool | str, device: torch.device) -> bool:
    """Whether to autocast forward passes to bf16: ``setting`` when it is a bool; for "auto",
    only where bf16 matmuls are native (CUDA with bf16, CPUs with AVX512-BF16 or AMX).
    Elsewhere bf16 is emulated: about 3x slower than float32 on an AVX512 CPU without it."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


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


def model_fingerprint(path: str | Path, sample_bytes: int = 1 << 20) -> str:
    """Identifies a local model by content, not by path (a Ray job's working directory moves):
    its config, and the size, first and last MiB of each weight file (a retrained model of the
    same shape differs there too; hashing every byte of a large model would take minutes).
    A hub id is its own fingerprint."""
    folder = Path(path)
    if not folder.is_dir():
        return str(path)
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".pt"):
            size = file.stat().st_size
            with file.open("rb") as handle:
                head = handle.read(sample_bytes)
                handle.seek(max(size - sample_bytes, 0))
                digest.update(f"{file.name}:{size}".encode() + head + handle.read(sample_bytes))
    return digest.hexdigest()[:16]


def shared_vocab_of(teacher: str | Path, student: str | Path) -> int:
    """The logit width two local models share (:func:`~leaf_ray.distillation.losses.shared_vocab_size`),
    from their tokenizers and configs, without loading weights; raises if their tokenizers differ."""
    from transformers import AutoConfig, AutoTokenizer

    from leaf_ray.distillation.losses import shared_vocab_size

    return shared_vocab_size(AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student),
                             AutoConfig.from_pretrained(teacher).vocab_size,
                             AutoConfig.from_pretrained(student).vocab_size)
