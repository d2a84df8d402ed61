"""Stage 1c at scale: answer originals and counterfactuals with vLLM (Ray Data's LLM
processor, :mod:`leaf_ray.distributed.generate`), then keep what the rules in
:mod:`leaf_ray.detection.verification` select.

One Ray Data pipeline per model reads the source training set part by part, tokenizes,
generates and writes the answers as Parquet partitioned by part (``generated/student/``,
``generated/teacher/``); then a Ray task per part joins the part's pairs with its answers and
writes the kept pairs as the training-set part of the same name in ``verify/``, with every
answer in ``answers/<part>``. The driver holds part names and counts. ``summary.json`` is
written last, so a finished stage is skipped on a rerun and an unfinished one is redone.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from leaf_ray.config import PipelineConfig
from leaf_ray.detection.store import clear_training_set, read_part_pairs, training_set_parts
from leaf_ray.detection.verification import generation_requests, selection_summary, verify_part
from leaf_ray.distributed.capacity import fits_at_once
from leaf_ray.distributed.generate import TOKENIZER_CPUS, generate
from leaf_ray.distributed.store_passes import over_parts, parts_dataset
from leaf_ray.files import write_text_atomically


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
    clear_training_set(output)
    for folder in (output / "generated", output / "answers"):
        shutil.rmtree(folder, ignore_errors=True)
    parts = training_set_parts(source)

    def part_requests(row: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**request, "part": row["part"]} for request in generation_requests(read_part_pairs(source, row["part"]))]

    requests = parts_dataset(parts).flat_map(part_requests)
    engine = {"keep": ("key", "part"), "max_tokens": config.max_tokens, "max_model_len": config.max_model_len,
              "dtype": config.dtype, "gpu_memory_utilization": config.gpu_memory_utilization,
              "kv_cache_memory_bytes": config.kv_cache_memory_bytes,
              "batch_size": config.batch_size, "num_engines": config.num_engines, "resources": config.resources,
              "enforce_eager": config.enforce_eager}
    runs = {"student": (pipeline.student, requests)}
    if config.keep_originals != "all":  # the other rules ask whether the teacher answers the original right
        runs["teacher"] = (pipeline.teacher, requests.filter(lambda row: row["kind"] == "original"))

    def answer(name: str) -> None:
        model, prompts = runs[name]
        generate(model, prompts, **engine).write_parquet(str(output / "generated" / name), partition_cols=["part"])

    # Both models' engines start and answer side by side when the cluster holds them at once
    # (with their tokenizer actors); otherwise one after the other, as a single GPU requires.
    side_by_side = fits_at_once(config.resources.bundle(), len(runs) * config.num_engines,
                                {"CPU": len(runs) * TOKENIZER_CPUS})
    with ThreadPoolExecutor(len(runs) if side_by_side else 1) as pool:
        list(pool.map(answer, runs))
    counts = over_parts(parts, lambda part: verify_part(source, part, output / "generated", output, config))
    totals = Counter()
    for part_counts in counts:
        totals.update(part_counts)  # update, not +: a count of 0 stays (0 of the teacher's right is a figure)
    summary = {**selection_summary(totals, config), "parts": len(parts), "engines_side_by_side": side_by_side,
               "wall_s": round(time.perf_counter() - started, 2)}
    write_text_atomically(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
