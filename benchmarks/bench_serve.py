"""Serving load test: the Ray Serve LLM + vLLM app against a naive transformers baseline.

In one process, on a local Ray cluster, over loopback HTTP:

1. deploy the serve/ app (vLLM engine, the embedded student), send a fixed number of chat
   requests at a fixed concurrency, record status, latency and completion tokens;
2. delete it, deploy the baseline -- the same model behind a plain ``transformers``
   ``generate`` call in one Serve deployment that takes one request at a time -- and send it
   the same requests.

Every request decodes exactly ``max_tokens`` tokens (``ignore_eos`` in vLLM,
``min_new_tokens`` in transformers), so tokens/s compares the same work. Writes
``benchmarks/results/serve.json``.

    .venv/bin/python benchmarks/bench_serve.py [--requests 200] [--concurrency 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from leaf_ray.data import iter_records

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "assets" / "embedded" / "student"
PROMPTS = REPO / "assets" / "embedded" / "data" / "simple" / "test_conflict.jsonl"
URL = "http://127.0.0.1:8000"
MODEL_ID = "leaf-student"
REQUEST_TIMEOUT_S = 300


def naive_deployment(gpus: int):
    """The baseline: transformers ``generate`` behind FastAPI, one request at a time."""
    import torch
    from fastapi import FastAPI
    from ray import serve

    from leaf_ray.data import render_prompt
    from leaf_ray.models import load_model

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 1, "num_gpus": gpus})
    @serve.ingress(api)
    class NaiveGenerate:
        def __init__(self, model_dir: str, threads: int):
            torch.set_num_threads(threads)  # the same cores vLLM gets; Ray would pin it to 1
            self.model, self.tokenizer = load_model(model_dir, dtype="bfloat16" if gpus else "float32")

        @api.post("/v1/chat/completions")
        def chat(self, body: dict) -> dict:
            prompt = render_prompt(self.tokenizer, body["messages"][-1]["content"])
            input_ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(
                self.model.device)
            max_tokens = body["max_tokens"]
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         max_new_tokens=max_tokens, min_new_tokens=max_tokens if body.get("ignore_eos") else 0,
                                         do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            new = output[0, input_ids.shape[1]:]
            return {"model": body.get("model"),
                    "choices": [{"message": {"role": "assistant",
                                             "content": self.tokenizer.decode(new, skip_special_tokens=True)}}],
                    "usage": {"prompt_tokens": int(input_ids.shape[1]), "completion_tokens": int(new.numel())}}

    return NaiveGenerate


def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Send one chat request per prompt, ``concurrency`` at a time; latency and token figures."""
    def one(prompt: str) -> tuple[int | None, float, int]:
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        start = time.perf_counter()
        try:
            reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException:  # no response at all: a dropped request
            return None, time.perf_counter() - start, 0
        tokens = reply.json()["usage"]["completion_tokens"] if reply.status_code == 200 else 0
        return reply.status_code, time.perf_counter() - start, tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    statuses = [s for s, _, _ in results]
    ok_latencies = [lat for s, lat, _ in results if s == 200]
    tokens = sum(t for _, _, t in results)
    return {
        "requests": len(prompts),
        "concurrency": concurrency,
        "ok": statuses.count(200),
        "errors_4xx": sum(1 for s in statuses if s is not None and 400 <= s < 500),
        "errors_5xx": sum(1 for s in statuses if s is not None and s >= 500),
        "dropped": statuses.count(None),
        "p50_ms": round(float(np.percentile(ok_latencies, 50)) * 1000, 1) if ok_latencies else None,
        "p99_ms": round(float(np.percentile(ok_latencies, 99)) * 1000, 1) if ok_latencies else None,
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(prompts) / wall, 2),
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--baseline-requests", type=int, default=None, help="Default: --requests.")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gpu", action="store_true", help="CUDA vLLM and the baseline on one GPU, bf16")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args()
    gpus = 1 if args.gpu else 0
    engine = ({"dtype": "bfloat16", "gpu_memory_utilization": 0.5, "resources": {"num_cpus": 4, "num_gpus": 1}}
              if args.gpu else {"dtype": "float32"})

    import ray
    import torch
    import transformers
    import vllm
    from ray import serve

    from leaf_ray.serving.app import build_app

    prompts = [r.instruction for r in iter_records(PROMPTS)][:args.requests]
    baseline_prompts = prompts[:args.baseline_requests or args.requests]
    warmup = prompts[:4]

    ray.init(num_cpus=8)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        started = time.perf_counter()
        serve.run(build_app({"model": str(STUDENT), "model_id": MODEL_ID, "max_model_len": 512, "focus": False,
                             **engine}), name="leaf", route_prefix="/")
        deploy_s = time.perf_counter() - started
        load(URL, warmup, len(warmup), args.max_tokens)
        ours = load(URL, prompts, args.concurrency, args.max_tokens)
        print("vllm:", json.dumps(ours), flush=True)
        serve.delete("leaf")

        serve.run(naive_deployment(gpus).bind(str(STUDENT), os.cpu_count() or 1), name="naive", route_prefix="/")
        load(URL, warmup, 1, args.max_tokens)
        baseline = load(URL, baseline_prompts, args.concurrency, args.max_tokens)
        print("transformers:", json.dumps(baseline), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "device": torch.cuda.get_device_name(0) if args.gpu else f"cpu: {cpu_name()}, {os.cpu_count()} cores, no GPU",
        "engine": engine,
        **{k: ours[k] for k in ("requests", "concurrency", "errors_5xx", "dropped", "p50_ms", "p99_ms",
                                "tokens_per_s")},
        "throughput_ratio_vs_hf": round(ours["tokens_per_s"] / baseline["tokens_per_s"], 2),
        "target_ratio": 3.0,
        "ours": {"what": "leaf_ray/serving/app.py: Ray Serve LLM OpenAI ingress + vLLM "
                         f"({'CUDA' if args.gpu else 'CPU'} build) LLMServer, 1 replica",
                 "deploy_s": round(deploy_s, 1), **ours},
        "baseline": {"what": "transformers generate, one request at a time (Serve max_ongoing_requests=1), "
                             f"torch threads = {os.cpu_count()}", **baseline},
        "workload": {"model": str(STUDENT.relative_to(REPO)), "prompts": str(PROMPTS.relative_to(REPO)),
                     "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0,
                     "transport": "HTTP over loopback, Serve proxy on 127.0.0.1:8000",
                     "timeout_s_per_request": REQUEST_TIMEOUT_S},
        "versions": {"ray": ray.__version__, "vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "p50_ms", "p99_ms", "throughput_ratio_vs_hf")}))


if __name__ == "__main__":
    main()
