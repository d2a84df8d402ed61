"""Serving load test: the Ray Serve LLM + vLLM app against raw vLLM and batched transformers.

In one process, over loopback HTTP, the same prompts and load against each, one at a time:

1. **ours**: the serve/ app (Ray Serve LLM ingress + vLLM engine, the embedded student) on a
   local Ray cluster;
2. **raw vLLM**: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
   in a subprocess, without Ray, with the same engine settings and threads: what Ray Serve
   costs;
3. **batched transformers**: the same model behind ``generate`` in one Serve deployment that
   batches concurrent requests (``@serve.batch``, up to the concurrency): what a user would
   build without vLLM.

Every request decodes exactly ``max_tokens`` tokens (``ignore_eos`` in vLLM,
``min_new_tokens`` in transformers), so tokens/s compares the same work. Each load runs
``--repeats`` times after a warm-up; the JSON holds each system's median tokens/s, p50 and
p99 over the repeats, and the ratios. Writes ``benchmarks/results/serve.json``.

    .venv/bin/python benchmarks/bench_serve.py [--requests 200] [--concurrency 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
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
RAW_VLLM_URL = "http://127.0.0.1:8001"
MODEL_ID = "leaf-student"
REQUEST_TIMEOUT_S = 300
ENGINE_START_TIMEOUT_S = 600


def batched_deployment(gpus: int, threads: int, max_batch_size: int):
    """transformers ``generate`` behind FastAPI, concurrent requests batched by ``@serve.batch``
    (left-padded, each row decoding the requested tokens)."""
    import torch
    from fastapi import FastAPI
    from ray import serve

    from leaf_ray.data import pad_batch, pad_token_id, render_prompt
    from leaf_ray.models import load_model

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=4 * max_batch_size,
                      ray_actor_options={"num_cpus": threads if not gpus else 1, "num_gpus": gpus})
    @serve.ingress(api)
    class BatchedGenerate:
        def __init__(self, model_dir: str):
            torch.set_num_threads(threads)
            self.model, self.tokenizer = load_model(model_dir, dtype="bfloat16" if gpus else "float32")
            self.pad_id = pad_token_id(self.tokenizer)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.01)
        async def generate(self, bodies: list[dict]) -> list[dict]:
            prompts = [render_prompt(self.tokenizer, body["messages"][-1]["content"]) for body in bodies]
            rows = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            batch = pad_batch(rows, pad_id=self.pad_id, side="left")
            input_ids = batch["input_ids"].to(self.model.device)
            attention_mask = batch["attention_mask"].to(self.model.device)
            width = input_ids.shape[1]
            max_tokens = max(body["max_tokens"] for body in bodies)  # one length here: the load sends one
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                         pad_token_id=self.pad_id)
            replies = []
            for body, row in zip(bodies, output[:, width:]):
                replies.append({"model": body.get("model"),
                                "choices": [{"message": {"role": "assistant", "content": self.tokenizer.decode(
                                    row, skip_special_tokens=True)}}],
                                "usage": {"completion_tokens": int(row.numel())}})
            return replies

        @api.post("/v1/chat/completions")
        async def chat(self, body: dict) -> dict:
            return await self.generate(body)

    return BatchedGenerate


def start_raw_vllm(engine_args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """vLLM's OpenAI server in a subprocess, ready to answer (its /health is 200)."""
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine_args],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM's server exited with {server.returncode} before it was ready")
        try:
            if requests.get(f"{RAW_VLLM_URL}/health", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(2)
    server.kill()
    raise RuntimeError(f"vLLM's server was not ready within {ENGINE_START_TIMEOUT_S} s")


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


def repeated(url: str, prompts: list[str], args) -> dict:
    """A warm-up, then ``args.repeats`` loads: each load's figures, and the medians."""
    load(url, prompts[:args.concurrency], args.concurrency, args.max_tokens)
    runs = [load(url, prompts, args.concurrency, args.max_tokens) for _ in range(args.repeats)]
    print(url, json.dumps(runs[-1]), flush=True)
    medians = {key: statistics.median(run[key] for run in runs) for key in ("tokens_per_s", "p50_ms", "p99_ms")}
    failures = {key: sum(run[key] for run in runs) for key in ("errors_4xx", "errors_5xx", "dropped")}
    return {**medians, **failures, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-cpus", type=int, default=1,
                        help="CPU build: the engine's threads (ours: its replica's num_cpus), the same for raw "
                             "vLLM and for the transformers baseline")
    parser.add_argument("--gpu", action="store_true", help="CUDA vLLM and the baseline on one GPU, bf16")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args()
    gpus = 1 if args.gpu else 0
    threads = args.engine_cpus
    # The same engine for ours and raw vLLM: on CPU, `threads` threads with the env our app
    # sets for each CPU engine.
    engine = ({"dtype": "bfloat16", "gpu_memory_utilization": 0.5, "resources": {"num_cpus": 4, "num_gpus": 1}}
              if args.gpu else {"dtype": "float32", "gpu_memory_utilization": 0.2,
                                "resources": {"num_cpus": threads}})
    raw_env = {} if args.gpu else {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}
    raw_args = ["--model", str(STUDENT), "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port", "8001",
                "--max-model-len", "512", "--dtype", engine["dtype"],
                "--gpu-memory-utilization", str(engine["gpu_memory_utilization"])]

    import ray
    import torch
    import transformers
    import vllm
    from ray import serve

    from leaf_ray.serving.app import build_app

    prompts = [r.instruction for r in iter_records(PROMPTS)][:args.requests]
    results = {}
    ray.init(num_cpus=8)  # logical CPUs: the engine reserves the cores, the ingress and proxy a share
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        started = time.perf_counter()
        serve.run(build_app({"model": str(STUDENT), "model_id": MODEL_ID, "max_model_len": 512, "focus": False,
                             **engine}), name="leaf", route_prefix="/")
        deploy_s = time.perf_counter() - started
        results["ours"] = repeated(URL, prompts, args)
        serve.delete("leaf")

        serve.run(batched_deployment(gpus, threads, args.concurrency).bind(str(STUDENT)), name="batched",
                  route_prefix="/")
        results["batched_hf"] = repeated(URL, prompts, args)
        serve.delete("batched")
    finally:
        serve.shutdown()
        ray.shutdown()

    server = start_raw_vllm(raw_args, raw_env)  # after Ray is gone: nothing else on the cores
    try:
        results["raw_vllm"] = repeated(RAW_VLLM_URL, prompts, args)
    finally:
        server.terminate()
        server.wait(timeout=60)

    ours, raw, batched = results["ours"], results["raw_vllm"], results["batched_hf"]
    result = {
        "device": torch.cuda.get_device_name(0) if args.gpu else f"cpu: {cpu_name()}, {os.cpu_count()} cores, no GPU",
        "engine": engine,
        "requests": args.requests, "concurrency": args.concurrency, "repeats": args.repeats,
        "statistic": "median over the repeats of each load's tokens/s, p50 and p99",
        "tokens_per_s": ours["tokens_per_s"], "p50_ms": ours["p50_ms"], "p99_ms": ours["p99_ms"],
        "errors_5xx": ours["errors_5xx"], "dropped": ours["dropped"],
        "vs_raw_vllm": round(ours["tokens_per_s"] / raw["tokens_per_s"], 3),
        "vs_batched_hf": round(ours["tokens_per_s"] / batched["tokens_per_s"], 3),
        "ours": {"what": "leaf_ray/serving/app.py: Ray Serve LLM OpenAI ingress + vLLM "
                         f"({'CUDA' if args.gpu else 'CPU'} build) LLMServer, 1 replica",
                 "deploy_s": round(deploy_s, 1), **ours},
        "raw_vllm": {"what": "vLLM's OpenAI server without Ray: python -m vllm.entrypoints.openai.api_server "
                             + " ".join(raw_args[2:]), "env": raw_env, **raw},
        "batched_hf": {"what": f"transformers generate in one Serve replica, @serve.batch up to {args.concurrency} "
                               f"requests (left-padded), torch threads = {threads}", **batched},
        "workload": {"model": str(STUDENT.relative_to(REPO)), "prompts": str(PROMPTS.relative_to(REPO)),
                     "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0,
                     "transport": "HTTP over loopback (Serve proxy on :8000, vLLM's server on :8001)",
                     "timeout_s_per_request": REQUEST_TIMEOUT_S},
        "versions": {"ray": ray.__version__, "vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "p50_ms", "p99_ms", "vs_raw_vllm", "vs_batched_hf")}))


if __name__ == "__main__":
    main()
