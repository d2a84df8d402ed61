"""Train the embedded benchmark's tiny Llama teacher and student (plain PyTorch, CPU).

The loss is the NLL of the response tokens only (answer and end-of-turn): a full-sequence
LM loss would leak the answer through predicting the distractor number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from leaf_ray.distillation.loop import warmup_cosine


def make_llama(tokenizer: PreTrainedTokenizerFast, layers: int, hidden: int, heads: int,
               seed: int, max_positions: int = 512) -> LlamaForCausalLM:
    """A small Llama; ``hidden / heads`` must be 64 for vLLM's CPU attention backend."""
    if hidden // heads != 64:
        raise ValueError(f"head_dim {hidden // heads} != 64: vLLM's CPU backend cannot serve it")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def response_nll(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL over target tokens (position t-1 predicts token t)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicting = batch["target_mask"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1][predicting].float(), batch["input_ids"][:, 1:][predicting])


def train_response_lm(model: LlamaForCausalLM, datasets: Sequence[dict[str, torch.Tensor]], *, steps: int, batch_size: int,
                      lr: float, seed: int, warmup: int = 50, desc: str = "train") -> list[float]:
    """AdamW with warmup and cosine decay over ``steps`` batches.

    Batches come from each of ``datasets`` in turn (one per task family), so short prompts
    are not padded to the width of long ones.

    Float32 throughout: on CPUs without native bf16, autocast is about 3x slower, and the
    models are too small to need it.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps))
    model.train()
    losses = []
    with tqdm(range(steps), desc=desc, unit="step", mininterval=2.0) as bar:
        for step in bar:
            data = datasets[step % len(datasets)]
            idx = torch.randint(0, data["input_ids"].shape[0], (batch_size,), generator=generator)
            batch = {k: data[k][idx] for k in ("input_ids", "attention_mask", "target_mask")}
            width = int(batch["attention_mask"].sum(-1).max())  # trim shared right padding
            batch = {k: v[:, :width] for k, v in batch.items()}
            loss = response_nll(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    model.eval()
    return losses
