"""Tiny random-initialised models of real families, built in seconds (nothing is downloaded).

Each family has the ``transformers`` architecture class its real checkpoints use, a tokenizer
(``tokenizers`` BPE, byte-level or SentencePiece-style like the real one) with that family's
special-token layout, and a chat template written to reproduce the structure of the
family's public template:

| family  | class               | BOS                 | turn end      | pad             | template                                   |
|---------|---------------------|---------------------|---------------|-----------------|--------------------------------------------|
| llama3  | LlamaForCausalLM    | <|begin_of_text|>   | <|eot_id|>    | none            | header tokens, contents trimmed            |
| qwen2.5 | Qwen2ForCausalLM    | none                | <|im_end|>    | <|endoftext|>   | ChatML, a default system prompt            |
| gemma2  | Gemma2ForCausalLM   | <bos>               | <end_of_turn> | <pad>           | no system role, 'model' role, trimmed      |
| mistral | MistralForCausalLM  | <s>                 | </s>          | none            | [INST] ... [/INST] wrapping                |

Teacher and student of a family share the tokenizer; head_dim is 64, as vLLM's CPU
attention needs. The models are random: the tests check that every stage runs and is
consistent, not that anything is learned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Qwen3-style: reasoning inside <think> is stripped from assistant turns, so the rendered
# text no longer holds the response as given.
THINK_STRIPPING_TEMPLATE = QWEN25_TEMPLATE.replace(
    "message['content'] + '<|im_end|>\\n'",
    "(message['content'].split('</think>')[-1].lstrip('\\n') if message['role'] == 'assistant' "
    "else message['content']) + '<|im_end|>\\n'")


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type
    config_class: type
    sentencepiece: bool  # SentencePiece-style pieces with byte fallback (Gemma, Mistral), else byte-level BPE
    bos: str | None
    eos: str  # the token that ends an assistant turn (generation stops there)
    pad: str | None
    extra_specials: tuple[str, ...]
    chat_template: str
    config: dict = field(default_factory=dict)


FAMILIES = {
    "llama3": Family("llama3", LlamaForCausalLM, LlamaConfig, False, "<|begin_of_text|>", "<|eot_id|>", None,
                     ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"), LLAMA3_TEMPLATE,
                     {"rope_theta": 500000.0, "tie_word_embeddings": False}),
    "qwen2.5": Family("qwen2.5", Qwen2ForCausalLM, Qwen2Config, False, None, "<|im_end|>", "<|endoftext|>",
                      ("<|im_start|>",), QWEN25_TEMPLATE, {"tie_word_embeddings": True}),
    "gemma2": Family("gemma2", Gemma2ForCausalLM, Gemma2Config, True, "<bos>", "<end_of_turn>", "<pad>",
                     ("<eos>", "<start_of_turn>"), GEMMA_TEMPLATE,
                     {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 256,
                      "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": True}),
    "mistral": Family("mistral", MistralForCausalLM, MistralConfig, True, "<s>", "</s>", None,
                      ("[INST]", "[/INST]"), MISTRAL_TEMPLATE, {"sliding_window": None, "tie_word_embeddings": False}),
}

# Real text shapes: code, LaTeX, newlines and indentation, unspaced CJK, emoji.
TEXTS = [
    'def add(a, b):\n    """Return the sum of a and b."""\n    return a + b\n\nprint(add(2, 3))',
    "Compute $\\frac{1}{2} + \\frac{1}{3}$.\nNote that $x^2 \\geq 0$ for every real $x$.",
    "The answer is $\\boxed{\\frac{5}{6}}$.",
    "東京には猫が3匹いる。4匹増えた。全部で何匹？",
    "naïve café 🙂 has 3 cups , gets 4 more .",
    "Step 1: 3 + 4 = 7.\nStep 2: check that 7 - 4 = 3.\nThe answer is 7.",
    "ann has 3 . ann gets 4 more . note : 9 is lucky . how many does ann have ?",
    "user assistant system model",
]


def records() -> list[dict]:
    """A small corpus in the record schema, with every text shape above and multi-step responses."""
    rows = [
        ("code", TEXTS[0], "5"), ("latex", TEXTS[1], TEXTS[2]), ("cjk", TEXTS[3], "7"),
        ("unicode", TEXTS[4], "7"), ("word", TEXTS[6], TEXTS[5]),
    ]
    out = []
    for copy in range(4):
        for name, instruction, response in rows:
            out.append({"id": f"{name}-{copy}", "instruction": instruction if copy == 0 else f"{instruction} ({copy})",
                        "response": response, "answer": "7" if "7" in response else None})
    return out


def build_tokenizer(family: Family, vocab_size: int = 700) -> PreTrainedTokenizerFast:
    specials = [t for t in (family.pad, family.bos, family.eos, *family.extra_specials) if t]
    if family.sentencepiece:
        core = Tokenizer(models.BPE(byte_fallback=True))
        core.pre_tokenizer = pre_tokenizers.Metaspace()
        core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        specials += [f"<0x{i:02X}>" for i in range(256)]
        alphabet = []
    else:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(specials), special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator(TEXTS * 20 + [r["instruction"] + " " + r["response"] for r in records()], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=family.bos, eos_token=family.eos,
                                        pad_token=family.pad)
    tokenizer.chat_template = family.chat_template
    return tokenizer


def build_model(family: Family, tokenizer: PreTrainedTokenizerFast, layers: int, seed: int):
    torch.manual_seed(seed)
    config = family.config_class(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **family.config)
    model = family.model_class(config)
    model.generation_config.do_sample = False
    return model.eval()


def build(family_name: str, root: Path) -> tuple[Path, Path]:
    """(teacher_dir, student_dir) of ``family_name`` under ``root``: 2 and 1 layers, one tokenizer."""
    family = FAMILIES[family_name]
    tokenizer = build_tokenizer(family)
    dirs = []
    for role, layers, seed in (("teacher", 2, 0), ("student", 1, 1)):
        folder = root / family_name / role
        build_model(family, tokenizer, layers, seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs.append(folder)
    return dirs[0], dirs[1]
