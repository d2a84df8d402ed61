"""What vLLM's prompt log-probs through ``ray.data.llm`` return on this Ray and vLLM, against the
cache's own top-k from the transformers teacher (leaf_ray.distillation.losses.teacher_top_k).

    python benchmarks/probe_prompt_logprobs.py [--records 16] [--k 32]

Renders embedded-benchmark records with the chat template, hands the token ids to
``build_processor(vLLMEngineProcessorConfig(...))`` with ``prompt_logprobs=k`` (and the engine's
``max_logprobs`` raised to k), and compares, at every response position, the ids and log-probs
vLLM returns with the transformers teacher's top k. Writes
benchmarks/results/prompt_logprobs.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray
import torch
from ray.data.llm import build_processor, vLLMEngineProcessorConfig

from leaf_ray.data import encode_for_training, iter_records, render_sample
from leaf_ray.distillation.losses import teacher_top_k
from leaf_ray.models import load_model

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "prompt_logprobs.json")
    args = parser.parse_args()

    teacher, tokenizer = load_model(EMBEDDED / "teacher")
    records = list(iter_records(EMBEDDED / "data" / "simple" / "distill.jsonl"))[:args.records]
    items = [{"key": r.id, "tokenized_prompt": render_sample(tokenizer, r.instruction, r.response).input_ids}
             for r in records]
    ray.init(include_dashboard=False)
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=str(EMBEDDED / "teacher"),
            engine_kwargs={"dtype": "float32", "max_model_len": 512, "gpu_memory_utilization": 0.2,
                           "enforce_eager": True, "max_logprobs": args.k},
            batch_size=16, concurrency=1, placement_group_config={"bundles": [{"CPU": 1}]},
            chat_template_stage={"enabled": False}, tokenize_stage={"enabled": False},
            detokenize_stage={"enabled": False},
        ),
        preprocess=lambda row: {**row, "sampling_params": {"temperature": 0.0, "max_tokens": 1,
                                                           "prompt_logprobs": args.k}},
        postprocess=lambda row: {"key": row["key"], "prompt_logprobs": row["prompt_logprobs"]},
    )
    started = time.perf_counter()
    rows = {row["key"]: row["prompt_logprobs"] for row in processor(ray.data.from_items(items)).take_all()}
    wall_s = time.perf_counter() - started
    sample = rows[records[0].id]

    # transformers: the top k at the positions that predict a response token, per record.
    worst, id_overlap, entries_per_position = 0.0, [], set()
    for record in records:
        batch = encode_for_training(tokenizer, [record])
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"]).logits
        ours = teacher_top_k(logits, batch["target_mask"], args.k)
        # vLLM's entry t is the distribution that predicted token t (entry 0 is None).
        positions = [t for t in range(1, batch["target_mask"].shape[1]) if batch["target_mask"][0, t]]
        for row, t in enumerate(positions):
            theirs = {int(token): float(info["logprob"]) for token, info in rows[record.id][t].items()
                      if info is not None}
            entries_per_position.add(len(theirs))
            top = dict(zip(ours.ids[row].tolist(), ours.logprobs[row].tolist()))
            id_overlap.append(len(top.keys() & theirs.keys()) / len(top))
            worst = max(worst, max(abs(theirs[token] - value) for token, value in top.items() if token in theirs))
    result = {
        "ray": ray.__version__,
        "what_comes_back": f"prompt_logprobs: a {type(sample).__name__} with an entry per prompt token; "
                           f"entry 0: {type(sample[0]).__name__}, entry 1: {type(sample[1]).__name__} "
                           f"with values like {next(iter(sample[1].values()))}",
        "k": args.k,
        "entries_per_position": sorted(entries_per_position),
        "top_k_id_overlap_mean": round(sum(id_overlap) / len(id_overlap), 4),
        "max_abs_logprob_diff": worst,
        "records": len(records),
        "wall_s": round(wall_s, 2),
    }
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
