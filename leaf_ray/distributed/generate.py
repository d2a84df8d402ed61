"""Greedy generation with vLLM through Ray Data's LLM processor (``ray.data.llm``): the one
vLLM generator, used by verification and ``leaf-ray eval --engine vllm``.

A dataset of prompts streams through two stages: a CPU actor renders and tokenizes each
prompt with the same chat rendering the trainer and the transformers generator use
(:func:`leaf_ray.data.prompt_token_ids`), then the vLLM engines answer the token ids (the
processor's own chat-template and tokenize stages are off, so both engines see the same ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.data.llm import build_processor, vLLMEngineProcessorConfig

from leaf_ray.config import ResourcesConfig
from leaf_ray.data import prompt_token_ids

# The tokenizer actor in front of the engines: light, one per generation.
TOKENIZER_CPUS = 0.5


class TokenizePrompts:
    """Ray Data stage: a row's ``instruction`` and response ``prefix`` as the prompt's token ids."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "tokenized_prompt": prompt_token_ids(self.tokenizer, row["instruction"], row["prefix"])}


def generate(model_dir: str, prompts: ray.data.Dataset, *, keep: Sequence[str] = ("key",), max_tokens: int = 8,
             max_model_len: int = 512, dtype: str = "auto", gpu_memory_utilization: float = 0.2,
             kv_cache_memory_bytes: int | None = None, batch_size: int = 64, num_engines: int = 1,
             resources: ResourcesConfig | None = None, enforce_eager: bool = False) -> ray.data.Dataset:
    """Greedy continuations by the model at ``model_dir`` of each row of ``prompts`` (columns
    ``instruction`` and ``prefix``, the start of the response to continue from, often "").
    The result, lazy, has the ``keep`` columns of each row and its answer as ``text``."""
    resources = resources or ResourcesConfig()
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=model_dir,
            engine_kwargs={"dtype": dtype, "max_model_len": max_model_len, "enforce_eager": enforce_eager,
                           "gpu_memory_utilization": gpu_memory_utilization,
                           **({"kv_cache_memory_bytes": kv_cache_memory_bytes} if kv_cache_memory_bytes else {})},
            batch_size=batch_size,
            concurrency=num_engines,
            placement_group_config={"bundles": [resources.bundle()]},
            chat_template_stage={"enabled": False},
            tokenize_stage={"enabled": False},
            detokenize_stage={"enabled": False},
        ),
        preprocess=lambda row: {**row, "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens}},
        postprocess=lambda row: {**{column: row[column] for column in keep}, "text": row["generated_text"]},
    )
    tokenized = prompts.map(TokenizePrompts, fn_constructor_args=(model_dir,), concurrency=1, num_cpus=TOKENIZER_CPUS)
    return processor(tokenized)


def vllm_generate(model_dir: str, prompts: dict[str, tuple[str, str]], **engine: Any) -> dict[str, str]:
    """:func:`generate` over a few prompts held in memory (key -> (instruction, prefix)): for
    evaluating a test file; the answers come back to the caller."""
    rows = [{"key": key, "instruction": instruction, "prefix": prefix} for key, (instruction, prefix) in prompts.items()]
    return {row["key"]: row["text"] for row in generate(model_dir, ray.data.from_items(rows), **engine).take_all()}
