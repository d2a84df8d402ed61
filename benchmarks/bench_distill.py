"""Distillation step throughput and loss memory: the official-style step vs ours, one process.

    python benchmarks/bench_distill.py [--steps 10] [--max-length 256]

Both train the embedded student from the embedded teacher on the same LeaF batches
(`batch_size` originals and one counterfactual each, lam = 0.5).
Baseline (the official recipe): every row padded to `max_length`, float32, the full
vocabulary softmax of teacher and student over every position at once.
Ours (`leaf_ray.distillation.accumulate_gradients`): rows padded to the longest in the
batch, the divergence over response positions only, in checkpointed chunks; bf16 autocast
where bf16 is native (`bf16_autocast: auto`), so float32 on a CPU without AVX512-BF16, as the
baseline. Tokens counted: real (unpadded) tokens of both branches.

Limit: the bare model passes of our step on the same batches, encoded beforehand: the
teacher's forward and the student's forward+backward (of the logits' sum), for both
branches; no tokenizing, no loss. `limit_ratio` is ours over it, both without the optimizer
step (timed apart), alternating repeats so both see the same machine.

Loss memory: the peak of live tensor storage allocated while computing the loss and its
backward from the logits each path produces (padded to max_length, or to the batch's
longest row), counted op by op by a TorchDispatchMode.
Writes benchmarks/results/distill.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from leaf_ray.config import DistillationConfig, PruningConfig, ScoringConfig
from leaf_ray.data import encode_for_training as encode_records
from leaf_ray.data import iter_records, pad_token_id
from leaf_ray.detection.scorer import PairScorer, detect
from leaf_ray.distillation.loop import accumulate_gradients, make_optimizer, sample_batch
from leaf_ray.distillation.losses import distill_loss
from leaf_ray.distillation.variants import variant_pairs
from leaf_ray.models import bf16_autocast_enabled, load_model

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded"


def padded(tokenizer, records, max_length: int) -> dict[str, torch.Tensor]:
    """The official collation: every row right-padded to ``max_length``."""
    batch = encode_records(tokenizer, records)
    pad = max_length - batch["input_ids"].shape[1]
    return {"input_ids": torch.nn.functional.pad(batch["input_ids"], (0, pad), value=pad_token_id(tokenizer)),
            "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, pad)),
            "target_mask": torch.nn.functional.pad(batch["target_mask"], (0, pad))}


def official_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Forward KL with full-vocabulary float32 softmaxes of both models over every position."""
    teacher_probs = torch.softmax(teacher_logits[:, :-1].float(), dim=-1)
    student_log_probs = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)
    per_position = (teacher_probs * (torch.log(teacher_probs + 1e-10) - student_log_probs)).sum(-1)
    mask = target_mask[:, 1:].float()
    return (per_position * mask).sum() / mask.sum()


def official_step(student, teacher, tokenizer, originals, cfs, config: DistillationConfig, max_length: int) -> None:
    losses = []
    for records in (originals, cfs):
        batch = padded(tokenizer, records, max_length)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        losses.append(official_loss(student(**inputs).logits, teacher_logits, batch["target_mask"]))
    (config.lam * losses[0] + (1 - config.lam) * losses[1]).backward()


def real_tokens(tokenizer, records) -> int:
    return int(encode_records(tokenizer, records)["attention_mask"].sum())


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage created by the ops run under it and still alive: each op's
    new output storage is counted until it is freed (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def loss_peak_bytes(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target_mask: torch.Tensor,
                    path: str) -> int:
    """Peak tensor memory of one loss forward+backward, given the logits."""
    student_logits = student_logits.detach().clone().requires_grad_(True)
    with PeakTensorMemory() as memory:
        if path == "official":
            loss = official_loss(student_logits, teacher_logits, target_mask)
        else:
            loss = distill_loss(student_logits, teacher_logits, target_mask, chunk_tokens=1024)
        loss.backward()
    return memory.peak


def make_batches(teacher, student, tokenizer, steps: int, batch_size: int, seed: int):
    """LeaF batches from 512 records scored and pruned by the real pipeline."""
    records = list(iter_records(EMBEDDED / "data" / "simple" / "distill.jsonl"))[:512]
    scorer = PairScorer(teacher, tokenizer, student, tokenizer, ScoringConfig(corpus="c"))
    scored, masks, _, _ = detect(scorer, PruningConfig(), records)
    pairs = variant_pairs("leaf", scored, PruningConfig(), seed, masks)
    config = DistillationConfig(batch_size=batch_size, lam=0.5)
    rng = random.Random(seed)
    return [sample_batch(pairs, config, batch_size, rng) for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256, help="the baseline pads every row to this")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "distill.json")
    args = parser.parse_args()

    teacher, tokenizer = load_model(EMBEDDED / "teacher")
    student, _ = load_model(EMBEDDED / "student")
    batches = make_batches(teacher, student, tokenizer, args.steps, args.batch_size, seed=0)
    student.requires_grad_(True).train()
    config = DistillationConfig(batch_size=args.batch_size, lam=0.5)
    tokens = sum(real_tokens(tokenizer, o) + real_tokens(tokenizer, c) for o, c in batches)
    vocab = teacher.config.vocab_size

    def run(step_fn) -> float:
        walls = []
        for _ in range(args.repeats):
            optimizer, _ = make_optimizer(student, config)
            start = time.perf_counter()
            for originals, cfs in batches:
                optimizer.zero_grad(set_to_none=True)
                step_fn(originals, cfs)
                optimizer.step()
            walls.append(time.perf_counter() - start)
        return statistics.median(walls)

    initial = {k: v.clone() for k, v in student.state_dict().items()}
    baseline_s = run(lambda o, c: official_step(student, teacher, tokenizer, o, c, config, args.max_length))
    student.load_state_dict(initial)
    ours_s = run(lambda o, c: accumulate_gradients(student, teacher, tokenizer, o, c, config, vocab))

    # Ours against the limit, gradients only (no optimizer step), alternately.
    encoded = [[encode_records(tokenizer, records) for records in batch] for batch in batches]

    def bare_passes() -> None:
        for branches in encoded:
            student.zero_grad(set_to_none=True)
            for batch in branches:
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                with torch.no_grad():
                    teacher(**inputs)
                student(**inputs).logits.sum().backward()

    def our_gradients() -> None:
        for originals, cfs in batches:
            student.zero_grad(set_to_none=True)
            accumulate_gradients(student, teacher, tokenizer, originals, cfs, config, vocab)

    def encoding() -> None:
        for branches in batches:
            for records in branches:
                encode_records(tokenizer, records)

    optimizer, _ = make_optimizer(student, config)

    def optimizer_steps() -> None:  # on the gradients our_gradients left
        for _ in batches:
            optimizer.step()

    walls = {"limit": [], "ours": [], "encoding": [], "optimizer": []}
    for _ in range(args.repeats):
        for name, fn in (("limit", bare_passes), ("ours", our_gradients), ("encoding", encoding),
                         ("optimizer", optimizer_steps)):
            start = time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - start)
    limit_s, ours_gradients_s, encoding_s, optimizer_s = (
        statistics.median(walls[k]) for k in ("limit", "ours", "encoding", "optimizer"))

    # Loss memory: from the logits each path hands its loss, for one step's originals.
    memory = {}
    originals = batches[0][0]
    for path in ("official", "ours"):
        batch = padded(tokenizer, originals, args.max_length) if path == "official" else encode_records(tokenizer, originals)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            student_logits, teacher_logits = student(**inputs).logits.float(), teacher(**inputs).logits.float()
        memory[path] = loss_peak_bytes(student_logits, teacher_logits, batch["target_mask"], path)

    result = {
        "device": f"cpu: {torch.get_num_threads()} threads",
        "steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size,
        "baseline_max_length": args.max_length,
        "statistic": "median wall time of the repeats",
        "real_tokens_per_step": tokens / args.steps,
        "baseline_tokens_per_s": tokens / baseline_s,
        "ours_tokens_per_s": tokens / ours_s,
        "speedup_vs_official": baseline_s / ours_s,
        "limit_tokens_per_s": tokens / limit_s,
        "ours_gradients_tokens_per_s": tokens / ours_gradients_s,
        "limit_ratio": limit_s / ours_gradients_s,
        "breakdown_s": {"limit_passes": limit_s, "ours_gradients": ours_gradients_s, "encoding": encoding_s,
                        "loss_and_rest": ours_gradients_s - limit_s - encoding_s,
                        "optimizer_steps": optimizer_s},
        "breakdown_note": f"seconds for {args.steps} steps; loss_and_rest = ours_gradients - limit_passes - "
                          "encoding; optimizer_steps (AdamW) is in neither ours_gradients nor the limit",
        "ours_settings": {"bf16_autocast": config.bf16_autocast,
                          "bf16_autocast_used": bf16_autocast_enabled(config.bf16_autocast, torch.device("cpu")),
                          "loss_chunk_tokens": config.loss_chunk_tokens},
        "baseline_loss_peak_bytes": memory["official"],
        "ours_loss_peak_bytes": memory["ours"],
        "loss_peak_memory_ratio": memory["ours"] / memory["official"],
        "loss_memory_measure": "peak live tensor storage created by one loss forward+backward from each "
                               f"path's logits ({args.batch_size} originals), counted by a TorchDispatchMode",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
