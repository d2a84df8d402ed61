"""Evaluation: greedy answer accuracy, copy rate, detection P/R/F1, attention mass.

All plain PyTorch / transformers. Ground truth for detection and attention comes from a
record's ``meta`` as the embedded benchmark writes it: ``meta["distractors"]`` lists
clauses with ``clause_span`` / ``number_span`` (character ranges in the instruction) and
``correlated`` (the clause that carries the shortcut).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from leaf_ray.data import prompt_token_ids, render_sample

_NUMBER = re.compile(r"-?\d+")


def extract_number(text: str) -> str | None:
    """The first integer in ``text`` (the benchmark's answers are integers)."""
    match = _NUMBER.search(text)
    return match.group() if match else None


def check_number(prediction: str, answer: str) -> bool:
    got = extract_number(prediction)
    return got is not None and got == extract_number(answer)


def check_exact(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


CHECKERS: dict[str, Callable[[str, str], bool]] = {"number": check_number, "exact": check_exact}


@torch.no_grad()
def greedy_generate(model, tokenizer, instructions: Sequence[str], max_new_tokens: int = 8,
                    batch_size: int = 64, progress: bool = False) -> list[str]:
    """Greedy completions of the chat prompts for ``instructions`` (left-padded batches)."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    starts = range(0, len(instructions), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, unit="batch"):
        prompts = [prompt_token_ids(tokenizer, text) for text in instructions[start:start + batch_size]]
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention_mask[i, width - len(ids):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return outputs


def vllm_generate(model_dir: str, instructions: Sequence[str], max_new_tokens: int = 8,
                  max_model_len: int = 512, gpu_memory_utilization: float = 0.2) -> list[str]:
    """Greedy completions with a vLLM engine (CUDA, or the CPU build), from the same token ids
    as :func:`greedy_generate`. Call it under ``if __name__ == "__main__":``: vLLM spawns workers."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [{"prompt_token_ids": prompt_token_ids(tokenizer, text)} for text in instructions]
    llm = LLM(model=model_dir, dtype="float32", max_model_len=max_model_len,
              gpu_memory_utilization=gpu_memory_utilization, seed=0)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    return [o.outputs[0].text for o in outputs]


def shortcut_number(meta: dict[str, Any]) -> str | None:
    """The correlated distractor's number, if the record has one."""
    for clause in meta.get("distractors", []):
        if clause.get("correlated"):
            return str(clause["number"])
    return None


@dataclass
class AnswerReport:
    n: int
    accuracy: float
    copy_rate: float | None  # share of answers equal to the shortcut number (records that have one)
    predictions: list[str]


def answer_accuracy(predictions: Sequence[str], records: Sequence[dict[str, Any]],
                    checker: str = "number") -> AnswerReport:
    check = CHECKERS[checker]
    correct = [check(p, str(r["answer"])) for p, r in zip(predictions, records)]
    copies = [(extract_number(p) == shortcut_number(r.get("meta") or {}))
              for p, r in zip(predictions, records) if shortcut_number(r.get("meta") or {}) is not None]
    return AnswerReport(
        n=len(records),
        accuracy=sum(correct) / max(len(correct), 1),
        copy_rate=sum(copies) / len(copies) if copies else None,
        predictions=list(predictions),
    )


def confounder_spans(meta: dict[str, Any], part: str = "clause") -> list[tuple[int, int]]:
    """Ground-truth confounder character ranges: the correlated clause, or just its number."""
    key = "clause_span" if part == "clause" else "number_span"
    return [tuple(c[key]) for c in meta.get("distractors", []) if c.get("correlated")]


@dataclass
class DetectionReport:
    precision: float
    recall: float
    f1: float
    flagged_per_record: float


def detection_prf(scored: Sequence[tuple[Sequence[tuple[int, int, str]], Sequence[bool], dict[str, Any]]],
                  part: str = "clause") -> DetectionReport:
    """Unit-level precision / recall / F1 of confounder masks against the ground truth.

    ``scored``: per record, its units ``(start, end, text)``, the mask per unit, and meta.
    Whitespace units are not counted. A unit is a true confounder when it lies inside a
    ground-truth span.
    """
    tp = fp = fn = flagged = 0
    for units, mask, meta in scored:
        truth = confounder_spans(meta, part)
        for (start, end, text), masked in zip(units, mask):
            if not text.strip():
                continue
            positive = any(a <= start and end <= b for a, b in truth)
            tp += masked and positive
            fp += masked and not positive
            fn += (not masked) and positive
            flagged += bool(masked)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return DetectionReport(precision, recall, f1, flagged / max(len(scored), 1))


def grade_detection(score_rows: Sequence[dict[str, Any]], meta_by_id: dict[str, dict[str, Any]]
                    ) -> dict[str, dict[str, float]]:
    """Detection P/R/F1 of instruction-level scores rows against their records' ground truth."""
    graded = [(list(zip(row["unit_start"], row["unit_end"], row["unit_text"])), row["masked"], meta_by_id[row["id"]])
              for row in score_rows if row["id"] in meta_by_id and row.get("level", "instruction") == "instruction"]
    return {part: vars(detection_prf(graded, part)) for part in ("clause", "number")}


@torch.no_grad()
def attention_mass(model, tokenizer, records: Sequence[dict[str, Any]], batch_size: int = 32) -> float:
    """Mean attention from the positions that predict the answer onto the confounder clause.

    Teacher-forced on the gold response; averaged over layers, heads, answer positions and
    records. Needs eager attention to return the weights.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    device = next(model.parameters()).device
    totals: list[float] = []
    try:
        usable = [r for r in records if confounder_spans(r.get("meta") or {})]
        for start in range(0, len(usable), batch_size):
            batch = usable[start:start + batch_size]
            rendered = [render_sample(tokenizer, r["instruction"], str(r["response"])) for r in batch]
            width = max(len(x.input_ids) for x in rendered)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, x in enumerate(rendered):
                input_ids[i, : len(x.input_ids)] = torch.tensor(x.input_ids)
                attention_mask[i, : len(x.input_ids)] = 1
            attentions = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               output_attentions=True).attentions
            stacked = torch.stack(attentions, dim=1).float().cpu()  # [B, layers, heads, T, T]
            for i, (record, x) in enumerate(zip(batch, rendered)):
                origin = x.instruction_span[0] - x.instruction_shift
                keys = sorted({t for a, b in confounder_spans(record["meta"])
                               for t in x.token_indices((origin + a, origin + b))})
                queries = [t - 1 for t in x.token_indices(x.response_span) if t > 0]
                totals.append(stacked[i][:, :, queries][..., keys].sum(-1).mean().item())
    finally:
        model.set_attn_implementation(previous)
    return sum(totals) / len(totals) if totals else float("nan")
