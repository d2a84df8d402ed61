"""Evaluation: greedy answer accuracy, copy rate, detection P/R/F1, attention mass.

All plain PyTorch / transformers. Ground truth for detection and attention comes from a
record's ``meta`` as the embedded benchmark writes it: ``meta["distractors"]`` lists
clauses with ``clause_span`` / ``number_span`` (character ranges in the instruction) and
``correlated`` (the clause that carries the shortcut).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from leaf_ray.checkers import resolve_checker
from leaf_ray.data import Record, iter_records, pad_batch, pad_token_id, prompt_token_ids, render_sample


@torch.no_grad()
def greedy_generate(model, tokenizer, instructions: Sequence[str], max_new_tokens: int = 8,
                    batch_size: int = 64, progress: bool = False, prefixes: Sequence[str] | None = None) -> list[str]:
    """Greedy completions of the chat prompts for ``instructions``, each continuing from its
    response prefix in ``prefixes`` if given, with transformers (left-padded batches). The vLLM
    twin, from the same token ids, is :mod:`leaf_ray.distributed.generate`."""
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    prefixes = prefixes or [""] * len(instructions)
    outputs: list[str] = []
    starts = range(0, len(instructions), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, unit="batch"):
        prompts = [prompt_token_ids(tokenizer, text, prefix) for text, prefix in
                   zip(instructions[start:start + batch_size], prefixes[start:start + batch_size])]
        batch = pad_batch(prompts, pad_id=pad_id, side="left")
        width = batch["input_ids"].shape[1]
        generated = model.generate(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        outputs += [continuation_text(tokenizer, ids, new.tolist()) for ids, new in zip(prompts, generated[:, width:])]
    return outputs


def continuation_text(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text ``new_ids`` add after the prompt, as vLLM detokenizes it: in context.

    Decoding the new tokens alone loses the leading space of a SentencePiece ``▁word`` piece
    (Mistral, Gemma), so transformers and vLLM would return different strings for the same
    tokens. Special tokens (the end-of-turn) are skipped, as vLLM does.
    """
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode([*prompt_ids, *new_ids], skip_special_tokens=True)
    return whole[len(prompt):] if whole.startswith(prompt) else tokenizer.decode(new_ids, skip_special_tokens=True)


def shortcut_numbers(meta: dict[str, Any]) -> list[str]:
    """The numbers of the record's correlated clauses (none, one or several)."""
    return [str(clause["number"]) for clause in meta.get("distractors", []) if clause.get("correlated")]


@dataclass
class AnswerReport:
    n: int
    accuracy: float
    copy_rate: float | None  # share of answers equal to a shortcut number (of the records that have one)
    predictions: list[str]
    correct: list[bool]


def paired_difference(first: AnswerReport, second: AnswerReport) -> dict[str, float]:
    """Accuracy of ``first`` minus ``second`` on the same records, with the standard error of the
    mean per-record difference (the pairing removes the variance the records share)."""
    differences = np.array(first.correct, dtype=float) - np.array(second.correct, dtype=float)
    spread = differences.std(ddof=1) if len(differences) > 1 else 0.0
    return {"difference": float(differences.mean()), "standard_error": float(spread / np.sqrt(len(differences)))}


def answer_accuracy(predictions: Sequence[str], records: Sequence[Record], checker: str = "number") -> AnswerReport:
    check = resolve_checker(checker)
    correct = [check(p, str(r.answer)) for p, r in zip(predictions, records)]
    # A copy: the answer the checker reads off is a shortcut number (the final #### N for gsm8k).
    copies = [any(check(p, number) for number in shortcut_numbers(r.meta))
              for p, r in zip(predictions, records) if shortcut_numbers(r.meta)]
    return AnswerReport(
        n=len(records),
        accuracy=sum(correct) / max(len(correct), 1),
        copy_rate=sum(copies) / len(copies) if copies else None,
        predictions=list(predictions),
        correct=correct,
    )


def accuracy(model, tokenizer, records: Sequence[Record], checker: str = "number", max_new_tokens: int = 8,
             batch_size: int = 64, progress: bool = False) -> AnswerReport:
    """Greedy answer accuracy of one model on records with answers (the one accuracy loop); a
    record with a response prefix (``target_start``) is answered by continuing it."""
    predictions = greedy_generate(model, tokenizer, [r.instruction for r in records], max_new_tokens,
                                  batch_size, progress, prefixes=[r.prefix for r in records])
    return answer_accuracy(predictions, records, checker)


def evaluate_models(models: dict[str, tuple[Any, Any]], files: Sequence[str | Path], checker: str = "number",
                    max_new_tokens: int = 8, batch_size: int = 64) -> dict[str, dict[str, AnswerReport]]:
    """The answers of each ``(model, tokenizer)`` on each test file, keyed by model name and file stem."""
    tests = {Path(path).stem: list(iter_records(path)) for path in files}
    return {name: {stem: accuracy(model, tokenizer, records, checker, max_new_tokens, batch_size)
                   for stem, records in tests.items()}
            for name, (model, tokenizer) in models.items()}


def confounder_spans(meta: dict[str, Any], part: str = "clause", level: str = "instruction") -> list[tuple[int, int]]:
    """Ground-truth confounder character ranges: the correlated clauses, or just their numbers; in
    the instruction, or at ``level="response"`` in the response (the reasoning family's)."""
    key = "clause_span" if part == "clause" else "number_span"
    where = "distractors" if level == "instruction" else "response_distractors"
    return [tuple(c[key]) for c in meta.get(where, []) if c.get("correlated")]


def causal_spans(meta: dict[str, Any], level: str = "instruction") -> list[tuple[int, int]]:
    """Ground-truth causal character ranges that no cut may touch: the fact clauses and the
    question in the instruction, or the restated facts at ``level="response"``."""
    if level == "instruction":
        question = [tuple(meta["question_span"])] if "question_span" in meta else []
        return [tuple(c["clause_span"]) for c in meta.get("causal", []) if "clause_span" in c] + question
    return [tuple(c["clause_span"]) for c in meta.get("response_causal", [])]


@dataclass
class DetectionReport:
    precision: float
    recall: float
    f1: float
    flagged_per_record: float


def detection_prf(scored: Sequence[tuple[Sequence[tuple[int, int, str]], Sequence[bool], dict[str, Any]]],
                  part: str = "clause", level: str = "instruction") -> DetectionReport:
    """Unit-level precision / recall / F1 of confounder masks against the ground truth.

    ``scored``: per record, its units ``(start, end, text)``, the mask per unit, and meta.
    Whitespace units are not counted. A unit is a true confounder when it lies inside a
    ground-truth span.
    """
    return detection_report(detection_counts(scored, part, level))


def detection_counts(scored: Sequence[tuple[Sequence[tuple[int, int, str]], Sequence[bool], dict[str, Any]]],
                     part: str = "clause", level: str = "instruction") -> dict[str, int]:
    """The unit counts :func:`detection_prf` is made of; counts of disjoint sets of records add up."""
    tp = fp = fn = flagged = 0
    for units, mask, meta in scored:
        truth = confounder_spans(meta, part, level)
        for (start, end, text), masked in zip(units, mask):
            if not text.strip():
                continue
            positive = any(a <= start and end <= b for a, b in truth)
            tp += masked and positive
            fp += masked and not positive
            fn += (not masked) and positive
            flagged += bool(masked)
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "flagged": int(flagged), "records": len(scored)}


def detection_report(counts: dict[str, int]) -> DetectionReport:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return DetectionReport(precision, recall, f1, counts["flagged"] / max(counts["records"], 1))


@dataclass
class CountReport:
    """How a detector copes with records that hold no confounder, or several.

    ``false_cut_rate``: the share of records without a confounder in which a unit of a causal
    clause (a fact, or the question) is cut. ``multi_confounder_recall``: unit recall of the
    confounder clauses over the records that hold two or more. ``recall_by_count`` and
    ``cut_records_by_count``: per number of confounders, the unit recall and the share of records
    with anything cut. ``None`` where no record has that count.
    """

    false_cut_rate: float | None
    multi_confounder_recall: float | None
    recall_by_count: dict[int, float | None]
    cut_records_by_count: dict[int, float]
    records_by_count: dict[int, int]


def detection_by_count(scored: Sequence[tuple[Sequence[tuple[int, int, str]], Sequence[bool], dict[str, Any]]],
                       level: str = "instruction") -> CountReport:
    """False cuts and recall by the number of confounders a record holds (``scored`` as for
    :func:`detection_prf`)."""
    found: dict[int, list[int]] = {}  # count -> [confounder units cut, confounder units]
    cut: dict[int, list[bool]] = {}
    false_cuts: list[bool] = []
    for units, mask, meta in scored:
        truth = confounder_spans(meta, "clause", level)
        causal = causal_spans(meta, level)
        solid = [(start, end, bool(m)) for (start, end, text), m in zip(units, mask) if text.strip()]
        inside = [(m, any(a <= start and end <= b for a, b in truth)) for start, end, m in solid]
        tally = found.setdefault(len(truth), [0, 0])
        tally[0] += sum(m and t for m, t in inside)
        tally[1] += sum(t for _, t in inside)
        cut.setdefault(len(truth), []).append(any(m for m, _ in inside))
        if not truth and causal:  # a record whose ground truth has no causal spans cannot be judged
            false_cuts.append(any(m and any(a <= start and end <= b for a, b in causal) for start, end, m in solid))
    multi = [found[k] for k in found if k >= 2]
    multi_total = sum(t for _, t in multi)
    return CountReport(
        false_cut_rate=sum(false_cuts) / len(false_cuts) if false_cuts else None,
        multi_confounder_recall=sum(f for f, _ in multi) / multi_total if multi_total else None,
        recall_by_count={k: (f / t if t else None) for k, (f, t) in sorted(found.items())},
        cut_records_by_count={k: sum(v) / len(v) for k, v in sorted(cut.items())},
        records_by_count={k: len(v) for k, v in sorted(cut.items())},
    )


def grade_detection(score_rows: Sequence[dict[str, Any]], meta_by_id: dict[str, dict[str, Any]]
                    ) -> dict[str, dict[str, float]]:
    """Detection P/R/F1 of instruction-level scores rows against their records' ground truth."""
    graded = graded_rows(score_rows, meta_by_id)
    return {part: vars(detection_prf(graded, part)) for part in ("clause", "number")}


def graded_rows(score_rows: Sequence[dict[str, Any]], meta_by_id: dict[str, dict[str, Any]]) -> list[tuple]:
    return [(list(zip(row["unit_start"], row["unit_end"], row["unit_text"])), row["masked"], meta_by_id[row["id"]])
            for row in score_rows if row["id"] in meta_by_id and row.get("level", "instruction") == "instruction"]


def grade_store_part(store: Path, part: str) -> dict[str, Any]:
    """The detection counts of one score-store part: its rows, how many of its records have a
    ground truth, and the unit counts per kind of span. Parts' counts add up
    (:func:`sum_detection_counts`), so a store is graded one part at a time."""
    from leaf_ray.detection.store import read_store_part

    rows, originals = read_store_part(store, part)
    meta = {record.id: record.meta for record in map(Record.from_dict, originals)}
    graded = graded_rows(rows, meta)
    return {"records": len(rows), "with_truth": sum(bool(confounder_spans(m)) for m in meta.values()),
            **{kind: detection_counts(graded, kind) for kind in ("clause", "number")}}


def sum_detection_counts(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A store's grade from its parts' :func:`grade_store_part` counts."""
    def total(kind: str) -> dict[str, int]:
        return {key: sum(p[kind][key] for p in parts) for key in ("tp", "fp", "fn", "flagged", "records")}

    return {"records": sum(p["records"] for p in parts), "with_truth": sum(p["with_truth"] for p in parts),
            **{kind: vars(detection_report(total(kind))) for kind in ("clause", "number")}}


@torch.no_grad()
def attention_mass(model, tokenizer, records: Sequence[Record], batch_size: int = 32) -> float:
    """Mean attention from the positions that predict the answer onto the confounder clause.

    Teacher-forced on the gold response; averaged over layers, heads, answer positions and
    records. Needs eager attention to return the weights.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    device = next(model.parameters()).device
    totals: list[float] = []
    try:
        usable = [r for r in records if confounder_spans(r.meta)]
        for start in range(0, len(usable), batch_size):
            batch = usable[start:start + batch_size]
            rendered = [render_sample(tokenizer, r.instruction, r.response) for r in batch]
            padded = pad_batch([x.input_ids for x in rendered], pad_id=pad_token_id(tokenizer))
            attentions = model(input_ids=padded["input_ids"].to(device),
                               attention_mask=padded["attention_mask"].to(device), output_attentions=True).attentions
            stacked = torch.stack(attentions, dim=1).float().cpu()  # [B, layers, heads, T, T]
            for i, (record, x) in enumerate(zip(batch, rendered)):
                origin = x.instruction_span[0] - x.instruction_shift
                keys = sorted({t for a, b in confounder_spans(record.meta)
                               for t in x.token_indices((origin + a, origin + b))})
                queries = [t - 1 for t in x.token_indices(x.response_span) if t > 0]
                totals.append(stacked[i][:, :, queries][..., keys].sum(-1).mean().item())
    finally:
        model.set_attn_implementation(previous)
    return sum(totals) / len(totals) if totals else float("nan")
