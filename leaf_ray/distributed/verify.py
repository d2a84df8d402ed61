"""Stage 1c at scale: answer originals and counterfactuals with vLLM (Ray Data's LLM
processor, :mod:`leaf_ray.distributed.generate`), then keep what the rules in
:mod:`leaf_ray.detection.verification` select.

Writes the kept pairs as a training set into the run's ``verify/`` folder (``originals/``,
``counterfactuals/``), ``answers.jsonl`` (every generated answer) and ``summary.json``
last, so a finished stage is skipped on a rerun. Distillation then trains on it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from leaf_ray.config import PipelineConfig
from leaf_ray.data import write_jsonl
from leaf_ray.detection.store import read_training_set, write_training_set
from leaf_ray.detection.verification import generation_requests, select
from leaf_ray.distributed.generate import vllm_generate


def run_verification(pipeline: PipelineConfig, response_pass: bool = False) -> dict[str, Any]:
    """Answer, check and filter; returns (and writes) the summary. A finished run is kept.
    ``response_pass`` verifies the response-level store (score-response/ -> verify-response/)."""
    config = pipeline.verification
    if config is None:
        raise ValueError("the pipeline config has no 'verification' section")
    layout = pipeline.layout
    source, output = (layout.score_response, layout.verify_response) if response_pass else (layout.score, layout.verify)
    if (output / "summary.json").exists():
        return json.loads((output / "summary.json").read_text())
    started = time.perf_counter()
    pairs = read_training_set(source)
    rows = generation_requests(pairs)
    engine = {"max_tokens": config.max_tokens, "max_model_len": config.max_model_len, "dtype": config.dtype,
              "gpu_memory_utilization": config.gpu_memory_utilization, "batch_size": config.batch_size,
              "num_engines": config.num_engines, "resources": config.resources, "enforce_eager": config.enforce_eager}

    student = vllm_generate(pipeline.student, {r["key"]: (r["instruction"], r["prefix"]) for r in rows}, **engine)
    needs_teacher = config.keep_originals != "all"
    teacher = (vllm_generate(pipeline.teacher, {r["key"]: (r["instruction"], r["prefix"]) for r in rows
                                                if r["kind"] == "original"}, **engine) if needs_teacher else {})
    selection = select(pairs, student, teacher, config)

    write_jsonl(output / "answers.jsonl", [{"key": r["key"], "kind": r["kind"], "student": student[r["key"]],
                                            "teacher": teacher.get(r["key"])} for r in rows])
    summary = {**selection.summary, "wall_s": round(time.perf_counter() - started, 2)}
    write_training_set(output, selection.pairs, summary)
    return summary
