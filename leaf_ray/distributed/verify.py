"""Stage 1c at scale: answer originals and counterfactuals with vLLM through Ray Data's
LLM processor (``ray.data.llm.build_processor``), then keep what the rules in
:mod:`leaf_ray.verification` select.

Writes ``originals.jsonl`` and ``counterfactuals.jsonl`` (the kept samples, in the corpus
schema), ``answers.jsonl`` (every generated answer) and ``summary.json`` last, so a
finished stage is skipped on a rerun. The distillation stage reads this folder in place of
the scoring output when it is its ``data_dir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
from ray.data.llm import build_processor, vLLMEngineProcessorConfig

from leaf_ray.config import PipelineConfig, VerificationConfig
from leaf_ray.data import prompt_token_ids, write_jsonl
from leaf_ray.score_store import read_jsonl_parts, scored_originals, write_training_set
from leaf_ray.verification import generation_requests, select


def generate_answers(model_dir: str, rows: list[dict[str, Any]], config: VerificationConfig) -> dict[str, str]:
    """Greedy answers of the model at ``model_dir`` for each row, keyed by ``row['key']``.

    Prompts are tokenized here with the same chat rendering the trainer and evaluator use,
    so the engine's own chat-template and tokenize stages are off.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = [{"key": row["key"], "tokenized_prompt": prompt_token_ids(tokenizer, row["instruction"])} for row in rows]
    resources = config.resources
    bundle = {"CPU": resources.num_cpus, **({"GPU": resources.num_gpus} if resources.num_gpus else {})}
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=model_dir,
            engine_kwargs={"dtype": config.dtype, "max_model_len": config.max_model_len,
                           "gpu_memory_utilization": config.gpu_memory_utilization},
            batch_size=config.batch_size,
            concurrency=config.num_engines,
            placement_group_config={"bundles": [bundle]},
            chat_template_stage={"enabled": False},
            tokenize_stage={"enabled": False},
            detokenize_stage={"enabled": False},
        ),
        preprocess=lambda row: {**row, "sampling_params": {"temperature": 0.0, "max_tokens": config.max_tokens}},
        postprocess=lambda row: {"key": row["key"], "text": row["generated_text"]},
    )
    return {row["key"]: row["text"] for row in processor(ray.data.from_items(items)).take_all()}


def run_verification(pipeline: PipelineConfig) -> dict[str, Any]:
    """Answer, check and filter; returns (and writes) the summary. A finished run is kept."""
    config = pipeline.verification
    if config is None:
        raise ValueError("the pipeline config has no 'verification' section")
    output = Path(config.output_dir)
    if (output / "summary.json").exists():
        return json.loads((output / "summary.json").read_text())
    started = time.perf_counter()
    store = Path(config.data_dir)
    originals = scored_originals(store, pipeline.scoring.corpus)
    counterfactuals = read_jsonl_parts(store, "counterfactuals")
    rows = generation_requests(originals, counterfactuals)

    student = generate_answers(pipeline.scoring.student, rows, config)
    needs_teacher = config.keep_originals != "all"
    teacher = (generate_answers(pipeline.scoring.teacher, [r for r in rows if r["kind"] == "original"], config)
               if needs_teacher else {})
    selection = select(originals, counterfactuals, student, teacher, config)

    write_jsonl(output / "answers.jsonl", [{"key": r["key"], "kind": r["kind"], "student": student[r["key"]],
                                            "teacher": teacher.get(r["key"])} for r in rows])
    summary = {**selection.summary, "wall_s": round(time.perf_counter() - started, 2)}
    write_training_set(output, selection.originals, selection.counterfactuals, summary)
    return summary
