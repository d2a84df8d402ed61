"""The in-process LeaF recipe, top to bottom, on one machine (what ``make demo`` runs).

score -> prune -> distil (KD and LeaF) -> evaluate -> export. Every stage is the same core
code the Ray jobs run; here it runs in one process so it can be read in one sitting.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from leaf_ray.config import PipelineConfig
from leaf_ray.data import RecordError, iter_records
from leaf_ray.detection import PairScorer, load_model, score_and_prune
from leaf_ray.distillation import pair_records, train_in_process
from leaf_ray.evaluation import answer_accuracy, greedy_generate
from leaf_ray.losses import shared_vocab_size
from leaf_ray.score_store import done_keys, error_key, error_row, read_jsonl_parts, totals, write_batch, write_summary


def score_corpus(scorer: PairScorer, config: PipelineConfig, chunk: int = 256) -> dict[str, Any]:
    """Score and prune the corpus into ``scoring.output_dir``, in the Ray job's resumable layout."""
    started = time.perf_counter()
    output = Path(config.scoring.output_dir)
    finished = done_keys(output)
    before = totals(output)
    parse_errors: list[RecordError] = []
    records = list(iter_records(config.scoring.corpus, parse_errors))
    pending = [r for r in records if r.id not in finished]
    unreadable = [e for e in parse_errors if error_key(e) not in finished]
    if unreadable:
        keys = [error_key(e) for e in unreadable]
        write_batch(output, keys, [], [], [error_row(k, e) for k, e in zip(keys, unreadable)],
                    {"read": len(keys), "errors": len(keys)})
    for lo in tqdm(range(0, len(pending), chunk), desc="score", unit="chunk"):
        batch = pending[lo:lo + chunk]
        rows, cfs, failed, stats = score_and_prune(scorer, config.pruning, batch)
        write_batch(output, [r.id for r in batch], rows, cfs, [error_row(error_key(e), e) for e in failed],
                    {**stats, "read": len(batch), "errors": len(failed)})
    summary = write_summary(output, before, time.perf_counter() - started, len(pending) + len(unreadable),
                            len(finished))
    return {"summary": summary, "records": records, "counterfactuals": read_jsonl_parts(output, "counterfactuals")}


def accuracy_table(models: dict[str, tuple[Any, Any]], files: list[str]) -> dict[str, dict[str, float]]:
    """Greedy accuracy of each (model, tokenizer) on each test file."""
    table = {}
    for name, (model, tokenizer) in models.items():
        table[name] = {}
        for path in files:
            records = [r.to_dict() for r in iter_records(path)]
            report = answer_accuracy(greedy_generate(model, tokenizer, [r["instruction"] for r in records]), records)
            table[name][Path(path).stem] = report.accuracy
    return table


def run_demo(config: PipelineConfig) -> dict[str, Any]:
    if config.distillation is None or config.evaluation is None:
        raise ValueError("the demo needs the 'distillation' and 'evaluation' sections of the pipeline config")
    run = Path(config.run_dir)
    teacher, teacher_tokenizer = load_model(config.scoring.teacher)
    student, tokenizer = load_model(config.scoring.student)
    scorer = PairScorer(teacher, teacher_tokenizer, student, tokenizer, config.scoring)
    scoring = score_corpus(scorer, config)

    distill = config.distillation
    vocab = shared_vocab_size(teacher_tokenizer, tokenizer, teacher.config.vocab_size, student.config.vocab_size)
    pairs = pair_records(scoring["records"], scoring["counterfactuals"])
    students = {}
    for variant, lam in (("kd", 1.0), ("leaf", distill.lam)):
        model = copy.deepcopy(student).requires_grad_(True)
        train_in_process(model, teacher, tokenizer, pairs, distill.model_copy(update={"variant": variant, "lam": lam}),
                         vocab)
        model.save_pretrained(run / "distill" / variant / "model")
        tokenizer.save_pretrained(run / "distill" / variant / "model")
        students[variant] = (model, tokenizer)

    table = accuracy_table({"teacher": (teacher, teacher_tokenizer), "student": (student, tokenizer), **students},
                           config.evaluation.data)
    report = {"scoring": scoring["summary"], "accuracy": table}
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
