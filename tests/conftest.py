"""Shared fixtures: tiny tokenizers and models built here (nothing is downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from leaf_ray.synthetic.tokenizer import train_tokenizer

CORPUS = [
    "ann has 3 . tom has 5 . ann gets 4 more . the bus left at 7 . how many does ann have ?",
    "note : 9 is lucky . there are 2 birds outside . bob has 1 . bob gets 8 more .",
    "how many apples does sue have ? sue has 6 apples and gets 2 more .",
    "Step 1: add the numbers.\nStep 2: check the sum.\nThe answer is 7.",
    "naïve café, 東京 and emoji 🙂 are text too.",
] * 4

# ChatML-like: no trimming, a system-free user/assistant layout.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|turn|>{{ message['role'] }}\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def no_ray_left_running():
    """A module must stop the Ray it started in the test process. One left running is killed by
    test_scoring_job's `ray stop --force`, and a minute later Ray ends the whole test process with
    exit code 1 and no report (a CI run died so)."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this module left Ray running in the test process: ray.shutdown() it")


@pytest.fixture(scope="session")
def byte_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400, kind="byte_bpe")


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=420, kind="metaspace_bpe", chat_template=CHATML_TEMPLATE)


def tiny_llama(vocab_size: int, seed: int, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def byte_model(byte_tokenizer):
    return tiny_llama(len(byte_tokenizer), seed=0)


@pytest.fixture(scope="session")
def metaspace_model(metaspace_tokenizer):
    return tiny_llama(len(metaspace_tokenizer), seed=1, hidden=96, layers=3)


EMBEDDED = Path(__file__).resolve().parents[1] / "assets" / "embedded"

# vLLM's KV cache for the tiny test models (thousands of tokens of theirs). Left to
# gpu_memory_utilization, the CPU build sized it from the machine's memory: 4 GiB, and 20 s of
# each engine's start went to allocating and warming it.
KV_CACHE_BYTES = 64 * 2**20
