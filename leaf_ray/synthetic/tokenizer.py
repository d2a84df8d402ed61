"""Train small Hugging Face tokenizers locally (no downloads), with a chat template.

Byte-level BPE covers any UTF-8 text with a small vocabulary, so the embedded models
can score arbitrary corpora. A Metaspace (SentencePiece-style) variant exists so that
tests can pair two genuinely different tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
TURN_START, TURN_SEP = "<|turn|>", "<|sep|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, TURN_START, TURN_SEP]

# Llama-3-like: the content is trimmed, each turn closes with EOS (the generation stop).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|turn|>{{ message['role'] }}<|sep|>\n{{ message['content'] | trim }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn|>assistant<|sep|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, kind: str = "byte_bpe",
                    chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``texts``.

    ``kind``: ``byte_bpe`` (GPT-2 style byte-level BPE: every UTF-8 string round-trips) or
    ``metaspace_bpe`` (SentencePiece-style ``▁word`` pieces with byte fallback).
    """
    if kind == "byte_bpe":
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "metaspace_bpe":
        core = Tokenizer(models.BPE(byte_fallback=True))
        core.pre_tokenizer = pre_tokenizers.Metaspace()
        core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        # <0xNN> byte tokens make any character encodable without an unknown token.
        alphabet = []
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    specials = SPECIAL_TOKENS + ([f"<0x{i:02X}>" for i in range(256)] if kind == "metaspace_bpe" else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = chat_template
    return tokenizer
