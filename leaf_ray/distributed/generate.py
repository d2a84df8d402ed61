"""Greedy generation with vLLM through Ray Data's LLM processor (``ray.data.llm``): the one
vLLM generator, used by verification and ``leaf-ray eval --engine vllm``.

Prompts are tokenized here with the same chat rendering the trainer and the transformers
generator use (:func:`leaf_ray.data.prompt_token_ids`), so the engine's own chat-template
and tokenize stages are off and both engines see the same token ids.
"""

from __future__ import annotations

import ray
from ray.data.llm import build_processor, vLLMEngineProcessorConfig

from leaf_ray.config import ResourcesConfig
from leaf_ray.data import prompt_token_ids


def vllm_generate(model_dir: str, prompts: dict[str, tuple[str, str]], *, max_tokens: int = 8,
                  max_model_len: int = 512, dtype: str = "auto", gpu_memory_utilization: float = 0.2,
                  batch_size: int = 64, num_engines: int = 1, resources: ResourcesConfig | None = None,
                  enforce_eager: bool = False) -> dict[str, str]:
    """Greedy continuations by the model at ``model_dir`` of each prompt in ``prompts``
    (key -> (instruction, response prefix to continue from, often ""))."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = [{"key": key, "tokenized_prompt": prompt_token_ids(tokenizer, instruction, prefix)}
             for key, (instruction, prefix) in prompts.items()]
    resources = resources or ResourcesConfig()
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=model_dir,
            engine_kwargs={"dtype": dtype, "max_model_len": max_model_len,
                           "gpu_memory_utilization": gpu_memory_utilization, "enforce_eager": enforce_eager},
            batch_size=batch_size,
            concurrency=num_engines,
            placement_group_config={"bundles": [resources.bundle()]},
            chat_template_stage={"enabled": False},
            tokenize_stage={"enabled": False},
            detokenize_stage={"enabled": False},
        ),
        preprocess=lambda row: {**row, "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens}},
        postprocess=lambda row: {"key": row["key"], "text": row["generated_text"]},
    )
    return {row["key"]: row["text"] for row in processor(ray.data.from_items(items)).take_all()}

