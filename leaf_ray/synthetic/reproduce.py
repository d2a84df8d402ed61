"""``leaf-ray bench reproduce``: distillation variants and controls on the embedded benchmark.

For each family: score the distillation corpus once with teacher and student (once per
detection method the variants name), then for each variant and seed distil a fresh copy of
the student and measure it on the held-out conflict and clean sets. ``leaf@<detector>`` is
LeaF with its counterfactuals cut by a detector of :mod:`leaf_ray.detection.detectors`
(plain ``leaf`` is ``leaf@grad_norm``). The variants and their rules are defined once, in
:mod:`leaf_ray.distillation.variants`; training is :func:`leaf_ray.distillation.loop.train`,
the loop every Ray Train worker runs. ``leaf_instr_resp`` also scores the reasoning prefix
(response level) and trains on the pairs of both levels; it needs multi-step responses (the
``reasoning`` family), and is rejected for single-answer families rather than silently equal
to ``leaf``.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leaf_ray.config import DistillationConfig, PruningConfig, ScoringConfig
from leaf_ray.data import iter_records
from leaf_ray.detection.detectors import detector_configs
from leaf_ray.detection.scorer import PairScorer, ScoringPass
from leaf_ray.distillation.loop import train
from leaf_ray.distillation.losses import shared_vocab_size
from leaf_ray.distillation.teacher_cache import TeacherCache, cache_rows, training_set_records, write_cache
from leaf_ray.distillation.variants import (
    VARIANTS,
    instruction_cuts,
    variant_config,
    variant_pairs,
    with_instruction_cuts,
)
from leaf_ray.evaluation import accuracy, attention_mass
from leaf_ray.models import load_model
from leaf_ray.synthetic.build import FAMILIES, REASONING_PREFIX_FRACTION


def reproduce(embedded: Path, families: list[str], variants: list[str], seeds: list[int],
              base: DistillationConfig, pruning: PruningConfig, eval_records: int = 300,
              cache_k: int = 32, detector: str = "grad_norm", corpus: str = "distill",
              on_row: Callable[[str, str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The variants' accuracies per family over ``seeds``, distilled on the family's ``corpus``
    (``distill``, or ``distill_confounded``: every record carries a shortcut). A variant without
    ``@<detector>`` cuts with ``detector``. With ``base.teacher == "cache"`` each variant trains
    from a teacher cache of its pairs (top ``cache_k``), built in this process. ``on_row(family,
    variant, row)`` gets each row as it is finished (the CLI saves it then: an hours-long run that
    stops keeps the rows it finished)."""
    unknown = [v for v in variants if v.partition("@")[0] not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; use {', '.join(VARIANTS)}, or <variant>@<detector>")
    detectors = {v: v.partition("@")[2] or detector for v in variants}
    setups = {v: detector_configs(detectors[v], ScoringConfig(corpus="-", max_length=512,
                                                              prefix_fraction=REASONING_PREFIX_FRACTION), pruning)
              for v in variants}
    rules = {v: VARIANTS[v.partition("@")[0]] for v in variants}
    for family in families:
        if family != "reasoning" and any(rules[v].response_level for v in variants):
            raise ValueError(f"the *_instr_resp variants need multi-step responses; family {family!r} answers in one "
                             "step (use the reasoning family)")
    teacher, tokenizer = load_model(embedded / "teacher")
    pristine, student_tokenizer = load_model(embedded / "student")
    vocab = shared_vocab_size(tokenizer, student_tokenizer, teacher.config.vocab_size, pristine.config.vocab_size)
    results: dict[str, Any] = {}
    for family in families:
        data = embedded / "data" / family
        records = list(iter_records(data / f"{corpus}.jsonl"))
        spec = FAMILIES[family]
        tests = {split.removeprefix("test_"): list(iter_records(data / f"{split}.jsonl"))[:eval_records]
                 for split in spec.tests}
        levels = ["instruction"] + (["response"] if any(rules[v].response_level for v in variants) else [])
        passes = {}
        for level in levels:
            for method in sorted({setups[v][0].method for v in variants}):
                scoring = setups[variants[0]][0].model_copy(update={"level": level, "method": method})
                passes[level, method] = ScoringPass.run(
                    PairScorer(teacher, tokenizer, pristine, student_tokenizer, scoring), records)

        def measured(model, records) -> float:
            return accuracy(model, student_tokenizer, records, spec.checker, spec.max_new_tokens).accuracy

        results[family] = {}
        for variant in variants:
            runs = []
            name, (scoring, variant_pruning) = variant.partition("@")[0], setups[variant]
            detected = {level: passes[level, scoring.method].masks(variant_pruning) for level in levels}
            for seed in seeds:
                config, _ = variant_config(base.model_copy(update={"seed": seed}), name)
                student = copy.deepcopy(pristine).requires_grad_(True)
                instruction = passes["instruction", scoring.method].scored
                pairs = variant_pairs(name, instruction, variant_pruning, seed, detected["instruction"])
                if rules[variant].response_level:
                    cuts = instruction_cuts(name, instruction, variant_pruning, seed, detected["instruction"])
                    pairs += [with_instruction_cuts(pair, cuts) for pair in variant_pairs(
                        name, passes["response", scoring.method].scored, variant_pruning, seed, detected["response"])]
                curve = []

                def on_step(metrics: dict[str, Any], _state: dict[str, Any]) -> None:
                    if metrics["step"] % config.validation_interval(len(records)) == 0:
                        student.eval()
                        curve.append({"step": metrics["step"],
                                      "conflict_acc_100": measured(student, tests["conflict"][:100])})

                source = teacher
                if config.teacher == "cache":  # from this run's own pairs, as a pipeline run would
                    rows = cache_rows(teacher, student_tokenizer, list(training_set_records(pairs).values()), cache_k,
                                      config.temperature, vocab)
                    with tempfile.TemporaryDirectory() as folder:
                        source = TeacherCache(write_cache(Path(folder), rows, {"k": cache_k, "vocab": vocab}))  # read into memory
                train(student, source, student_tokenizer, pairs, config, vocab, report=on_step)
                final = {f"{split}_acc": measured(student, records) for split, records in tests.items()}
                final["attention_mass"] = attention_mass(student, student_tokenizer, tests["conflict"])
                final["curve"] = curve
                final.update(pairs=len(pairs), counterfactuals=sum(len(p.counterfactuals) for p in pairs))
                runs.append(final)
            results[family][variant] = {**summarise(runs, seeds, config), "corpus": corpus}
            if rules[variant].spans in ("detected", "random"):
                results[family][variant]["detector"] = detectors[variant]
            if on_row:
                on_row(family, variant, results[family][variant])
    return results


def summarise(runs: list[dict[str, Any]], seeds: list[int], config: DistillationConfig) -> dict[str, Any]:
    conflict = [r["conflict_acc"] for r in runs]
    return {
        "conflict_acc_mean": statistics.mean(conflict),
        "conflict_acc_std": statistics.stdev(conflict) if len(conflict) > 1 else 0.0,
        "clean_acc_mean": statistics.mean(r["clean_acc"] for r in runs),
        **({"heldout_acc_mean": statistics.mean(r["heldout_acc"] for r in runs)} if "heldout_acc" in runs[0] else {}),
        "attention_mass_mean": statistics.mean(r["attention_mass"] for r in runs),
        "seeds": seeds,
        "pairs": runs[0]["pairs"],
        "counterfactuals": runs[0]["counterfactuals"],
        "steps": config.max_steps,
        "batch_size": config.batch_size,
        "lam": config.lam,
        "teacher": config.teacher,
        "runs": runs,
    }
