"""``leaf-ray bench build``: the embedded benchmark, from seeds, in one readable recipe.

1. Generate the data splits of each family (tasks.py; reasoning.py) and write the held-out files.
2. Train a byte-level BPE tokenizer with a chat template on the generated text.
3. Train the teacher on decorrelated data (it learns the causal rule).
4. Pre-train the student on correlated data (it learns the shortcut: copy the distractor).
5. Measure both, and gradient detection against the ground truth; write ``provenance.json``.

One build trains one teacher and one student for its families: the committed default
(``configs/benchmark.yaml``) covers ``simple`` and ``hard`` in ``assets/embedded``, and
``configs/benchmark-reasoning.yaml`` the ``reasoning`` family in ``assets/embedded-reasoning``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import leaf_ray
from leaf_ray.config import BenchmarkConfig, PruningConfig, ScoringConfig
from leaf_ray.data import Record, encode_for_training, write_jsonl
from leaf_ray.detection.scorer import PairScorer, ScoringPass
from leaf_ray.evaluation import accuracy, confounder_spans, detection_by_count, detection_prf
from leaf_ray.synthetic.reasoning import make_reasoning_split
from leaf_ray.synthetic.tasks import make_split
from leaf_ray.synthetic.tokenizer import train_tokenizer
from leaf_ray.synthetic.train import make_llama, train_response_lm

ROLE_WORDS = ["user", "assistant", "system"]  # so chat-template role names are single tokens


@dataclass(frozen=True)
class FamilyEval:
    """How a family's answers are generated and checked, and which held-out splits it has."""

    checker: str
    max_new_tokens: int
    sources: tuple[str, ...]  # the modules that generate it
    corpora: tuple[str, ...] = ("distill", "distill_confounded")  # distillation corpora
    tests: tuple[str, ...] = ("test_conflict", "test_heldout", "test_clean")


FAMILIES = {
    "simple": FamilyEval("number", 8, ("tasks.py",)),
    "hard": FamilyEval("number", 8, ("tasks.py",)),
    # One note template: no held-out wordings, and one corpus.
    "reasoning": FamilyEval("gsm8k", 40, ("reasoning.py", "tasks.py"), ("distill",), ("test_conflict", "test_clean")),
}
# Response-level scoring of the reasoning family: of its 5 steps, the first 3 are the prefix
# and the sum line is the step whose loss scores them.
REASONING_PREFIX_FRACTION = 0.6


def family_split(family: str, split: str, size: int, seed: int, rho: float | None = None) -> list[dict[str, Any]]:
    if family == "reasoning":
        return make_reasoning_split(split, size, seed, rho)
    return make_split(family, split, size, seed, rho)


def config_hash(config: BenchmarkConfig) -> str:
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def code_hash(families: list[str] | None = None) -> str:
    """Hash of the sources that determine the artifacts of ``families`` (default: the default
    build's), so a stale build is detectable."""
    root = Path(__file__).resolve().parents[1] / "synthetic"
    sources = sorted({source for f in families or BenchmarkConfig().families for source in FAMILIES[f].sources})
    digest = hashlib.sha256()
    for name in (*sources, "train.py", "tokenizer.py"):
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "provenance.json"}


def held_out_splits(config: BenchmarkConfig, family: str) -> dict[str, list[dict[str, Any]]]:
    sizes = {"distill": config.distill_records, "distill_confounded": config.distill_records,
             "test_conflict": config.test_conflict_records, "test_heldout": config.test_heldout_records,
             "test_clean": config.test_clean_records}
    return {split: family_split(family, split, sizes[split], config.seed,
                                rho=config.distill_rho if split.startswith("distill") else None)
            for split in (*FAMILIES[family].corpora, *FAMILIES[family].tests)}


def _train(tokenizer, pools: dict[str, list[dict[str, Any]]], recipe, desc: str):
    model = make_llama(tokenizer, recipe.layers, recipe.hidden, recipe.heads, seed=recipe.seed)
    datasets = [encode_for_training(tokenizer, [Record.from_dict(r) for r in records]) for records in pools.values()]
    losses = train_response_lm(model, datasets, steps=recipe.steps,
                               batch_size=recipe.batch_size, lr=recipe.learning_rate, seed=recipe.seed, desc=desc)
    return model, losses


def measure(model, tokenizer, records, family: str) -> dict[str, float | None]:
    spec = FAMILIES[family]
    report = accuracy(model, tokenizer, [Record.from_dict(r) for r in records], spec.checker, spec.max_new_tokens)
    return {"accuracy": report.accuracy, "copy_rate": report.copy_rate}


def score_for_detection(teacher, student, tokenizer, records, level: str = "instruction",
                        method: str = "grad_norm") -> ScoringPass:
    """Benchmark records scored with both models by ``method`` (every one must score)."""
    scorer = PairScorer(teacher, tokenizer, student, tokenizer,
                        ScoringConfig(corpus="-", max_length=512, level=level, method=method,
                                      prefix_fraction=REASONING_PREFIX_FRACTION))
    return ScoringPass.run(scorer, [Record.from_dict(r) for r in records])


def grade_scored(scored, masks, pruning: PruningConfig, level: str = "instruction") -> dict[str, Any]:
    """Compare confounder masks of scored records (made by ``pruning``) with the ground-truth
    clauses (in the instruction, or at response level in the reasoning prefix): P/R/F1, and the
    false cuts and recall by how many confounders a record holds."""
    rows, by_role = [], {"shortcut_number": [], "causal_number": [], "other": []}
    for s, mask in zip(scored, masks):
        units = [(u.start, u.end, u.text) for u in s.scores.units]
        rows.append((units, mask, s.record.meta))
        shortcut = confounder_spans(s.record.meta, "number", level)
        causal = [tuple(c["span"]) for c in s.record.meta["causal"]] if level == "instruction" else []
        for u, value in zip(s.scores.units, s.scores.diff):
            if u.is_space:
                continue
            role = ("shortcut_number" if (u.start, u.end) in shortcut
                    else "causal_number" if (u.start, u.end) in causal else "other")
            by_role[role].append(value)
    return {
        "rule": pruning.model_dump(include={"threshold", "quantile", "quantile_cap", "tau", "grow_spans", "max_spans",
                                            *(("min_gap", "strong_gap", "entropy_margin", "max_rounds")
                                              if pruning.threshold == "iterative" else ())}),
        "clause": vars(detection_prf(rows, "clause", level)),
        "number": vars(detection_prf(rows, "number", level)),
        **vars(detection_by_count(rows, level)),
        "mean_diff_by_role": {k: float(np.mean(v)) if v else None for k, v in by_role.items()},
    }


def measure_detection(teacher, student, tokenizer, records, pruning: PruningConfig,
                      level: str = "instruction") -> dict[str, Any]:
    """The paper's detector (gradient norms) against the ground truth."""
    detection = score_for_detection(teacher, student, tokenizer, records, level)
    return grade_scored(detection.scored, detection.masks(pruning), pruning, level)


def build(config: BenchmarkConfig) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    t = time.perf_counter()
    held_out = {family: held_out_splits(config, family) for family in config.families}
    for family, splits in held_out.items():
        for split, records in splits.items():
            write_jsonl(out / "data" / family / f"{split}.jsonl", records)
    teacher_pools = {f: family_split(f, "teacher_train", config.train_records, config.seed) for f in config.families}
    student_pools = {f: family_split(f, "student_pretrain", config.train_records, config.seed, rho=config.student_rho)
                     for f in config.families}
    t = lap("data", t)

    texts = [text for pools in (teacher_pools, student_pools) for records in pools.values()
             for r in records for text in (r["instruction"], r["response"])] + ROLE_WORDS * 100
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    t = lap("tokenizer", t)

    teacher, teacher_losses = _train(tokenizer, teacher_pools, config.teacher, "teacher")
    t = lap("teacher", t)
    student, student_losses = _train(tokenizer, student_pools, config.student, "student")
    t = lap("student", t)

    for name, model in (("teacher", teacher), ("student", student)):
        model.generation_config.do_sample = False
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    t = lap("save", t)

    figures: dict[str, Any] = {}
    pruning = PruningConfig(threshold="quantile", quantile=0.10)
    for family, splits in held_out.items():
        figures[family] = {
            "teacher": {s: measure(teacher, tokenizer, splits[s], family) for s in FAMILIES[family].tests},
            "student": {s: measure(student, tokenizer, splits[s], family) for s in FAMILIES[family].tests},
            "detection": measure_detection(teacher, student, tokenizer,
                                           splits["distill"][: config.detection_records], pruning),
        }
        if family == "reasoning":
            figures[family]["response_detection"] = measure_detection(
                teacher, student, tokenizer, splits["distill"][: config.detection_records], pruning, "response")
    lap("evaluate", t)
    timings["total"] = round(time.perf_counter() - started, 1)

    provenance = {
        "config": config.model_dump(),
        "config_hash": config_hash(config),
        "code_hash": code_hash(config.families),
        "leaf_ray_version": leaf_ray.__version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "figures": figures,
        "final_train_loss": {"teacher": float(np.mean(teacher_losses[-50:])),
                             "student": float(np.mean(student_losses[-50:]))},
        "timings_s": timings,
        "files": file_hashes(out),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def embedded_results(provenance: dict[str, Any]) -> dict[str, Any]:
    """The ``benchmarks/results/embedded.json`` shape, from a build's figures."""
    families = {}
    for family, fig in provenance["figures"].items():
        families[family] = {
            "teacher_conflict_acc": fig["teacher"]["test_conflict"]["accuracy"],
            "teacher_clean_acc": fig["teacher"]["test_clean"]["accuracy"],
            "student_conflict_acc": fig["student"]["test_conflict"]["accuracy"],
            "student_clean_acc": fig["student"]["test_clean"]["accuracy"],
            "student_copy_rate": fig["student"]["test_conflict"]["copy_rate"],
            **({"teacher_heldout_acc": fig["teacher"]["test_heldout"]["accuracy"],
                "student_heldout_acc": fig["student"]["test_heldout"]["accuracy"]} if "test_heldout" in fig["teacher"] else {}),
            "detection_f1": fig["detection"]["clause"]["f1"],
            "detection": fig["detection"],
            **({"response_detection": fig["response_detection"]} if "response_detection" in fig else {}),
            "config_hash": provenance["config_hash"],
            "code_hash": provenance["code_hash"],
            "variants": {},
        }
    return {"source": "leaf-ray bench build", "families": families}
