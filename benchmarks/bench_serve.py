"""Serving load test at two model sizes: our Serve app against raw vLLM and Ray Serve LLM's own app.

For each model size, the same prompts and load over loopback HTTP against each system, one at
a time, nothing else on the cores:

- **raw_vllm**: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``),
  without Ray: the limit;
- **serve_llm**: Ray Serve LLM's own ``build_openai_app``, the same engine config (what Ray
  Serve itself costs, without our ingress);
- **serve_llm_direct**: the same with HAProxy and direct streaming (``RAY_SERVE_ENABLE_HA_PROXY=1``,
  ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1``): the engine replica is its own HTTP ingress
  (vLLM's FastAPI app), one hop;
- **ours**: ``leaf_ray/serving/app.py`` (API key, request guard, ``/v1/focus``, OpenAI error
  shape) with Serve's default proxy;
- **ours_haproxy**: ours behind Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``);
- **ours_throughput**: ours with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (direct ingress, gRPC
  between deployments, user code on the replica's event loop).

Serve reads these options from the environment when its controller, proxy and replicas start,
so each Ray system runs in its own child process with its own Ray cluster
(``--serve SYSTEM``); this process sends every load, with one client.

Two sizes: the embedded student (0.65M parameters) and a random-weight model with the layer
shape of Qwen2.5-0.5B (hidden 896, 14 query / 2 key-value heads, MLP 4864) and 7 of its 24
layers: about 100M parameters, float32 on the CPU, where the engine's step is no longer
negligible beside the per-request path.

Every request decodes exactly ``max_tokens`` tokens (``ignore_eos``), so tokens/s compares the
same work. Per system: a warm-up, ``--repeats`` loads at ``--concurrency``, then
``--latency-requests`` requests one at a time (p50 at concurrency 1: the per-request overhead
is ours minus raw vLLM's). Writes ``benchmarks/results/serve.json``.

    .venv/bin/python benchmarks/bench_serve.py [--sizes embedded,qwen100m] [--systems ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from leaf_ray.data import iter_records

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "assets" / "embedded" / "student"
PROMPTS = REPO / "assets" / "embedded" / "data" / "simple" / "test_conflict.jsonl"
SERVE_PORT, RAW_VLLM_PORT = 8000, 8001
MODEL_ID = "leaf-student"
REQUEST_TIMEOUT_S = 300
START_TIMEOUT_S = 900
ENGINE_THREADS = 1  # the engine's threads, the same for every system (2 cores: the HTTP path needs the other)

HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
SYSTEMS: dict[str, dict] = {
    "raw_vllm": {"app": None, "env": {}},
    "serve_llm": {"app": "serve_llm", "env": {}},
    "serve_llm_direct": {"app": "serve_llm", "env": {**HAPROXY, "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"}},
    "ours": {"app": "ours", "env": {}},
    "ours_haproxy": {"app": "ours", "env": HAPROXY},
    "ours_throughput": {"app": "ours", "env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}},
}
# Qwen2.5-0.5B's layer shape; 7 of its 24 layers and the embedded tokenizer's vocabulary: ~100M parameters.
QWEN_LAYER_SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
                    "num_key_value_heads": 2}
QWEN_LAYERS = 7


def engine_settings(model: str) -> dict:
    """ServingConfig fields of the engine, shared by every system."""
    return {"model": model, "model_id": MODEL_ID, "max_model_len": 512, "dtype": "float32",
            "gpu_memory_utilization": 0.2, "resources": {"num_cpus": ENGINE_THREADS}, "focus": False}


def build_qwen_shaped(out: Path) -> Path:
    """A random-weight Qwen2 model of QWEN_LAYER_SHAPE with the embedded student's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(STUDENT)
    config = Qwen2Config(vocab_size=len(tokenizer), num_hidden_layers=QWEN_LAYERS, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **QWEN_LAYER_SHAPE)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def serve_system(system: str, model: str) -> None:
    """Child process: run ``system``'s Serve app on a fresh local Ray cluster until SIGTERM."""
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    from leaf_ray.config import ServingConfig
    from leaf_ray.serving.app import build_app, llm_config_for

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    settings = engine_settings(model)
    ray.init(num_cpus=8)  # logical CPUs: the engine reserves its threads' worth, the ingress and proxy a share
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
        if SYSTEMS[system]["app"] == "ours":
            app = build_app(settings)
        else:
            app = build_openai_app({"llm_configs": [llm_config_for(ServingConfig.model_validate(settings))]})
        serve.run(app, name="bench", route_prefix="/")
        print("READY", flush=True)
        while True:
            time.sleep(1)
    finally:
        serve.shutdown()
        ray.shutdown()


def start(system: str, model: str) -> subprocess.Popen:
    """Start ``system`` serving ``model``; return once it answers a chat request."""
    env = {**os.environ, **SYSTEMS[system]["env"]}
    if system == "raw_vllm":
        settings = engine_settings(model)
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port", str(RAW_VLLM_PORT),
                   "--max-model-len", str(settings["max_model_len"]), "--dtype", settings["dtype"],
                   "--gpu-memory-utilization", str(settings["gpu_memory_utilization"])]
        # What llm_config_for sets for each CPU engine of ours.
        env.update({"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(ENGINE_THREADS)})
    else:
        command = [sys.executable, __file__, "--serve", system, "--model", model]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{system} exited with {server.returncode} before it was ready")
        try:
            if requests.post(f"{url_of(system)}/v1/chat/completions", json=body, timeout=30).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(3)
    stop(server)
    raise RuntimeError(f"{system} was not ready within {START_TIMEOUT_S} s")


def stop(server: subprocess.Popen) -> None:
    """End the server's whole process group (vLLM's engine runs in a child process of its own)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    # What Ray reparented and left running: vLLM's engine process, and Serve's HAProxy.
    for pattern in ("^VLLM::", "bin/haproxy "):
        subprocess.run(["pkill", "-u", str(os.getuid()), "-f", pattern], check=False)
    time.sleep(5)


def url_of(system: str) -> str:
    return f"http://127.0.0.1:{RAW_VLLM_PORT if system == 'raw_vllm' else SERVE_PORT}"


def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Send one chat request per prompt, ``concurrency`` at a time; latency and token figures."""
    def one(prompt: str) -> tuple[int | None, float, int]:
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        began = time.perf_counter()
        try:
            reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException:  # no response at all: a dropped request
            return None, time.perf_counter() - began, 0
        tokens = reply.json()["usage"]["completion_tokens"] if reply.status_code == 200 else 0
        return reply.status_code, time.perf_counter() - began, tokens

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - began
    statuses = [s for s, _, _ in results]
    ok_latencies = [lat for s, lat, _ in results if s == 200]
    tokens = sum(t for _, _, t in results)
    return {
        "requests": len(prompts), "concurrency": concurrency, "ok": statuses.count(200),
        "errors": sum(1 for s in statuses if s is not None and s != 200), "dropped": statuses.count(None),
        "p50_ms": round(float(np.percentile(ok_latencies, 50)) * 1000, 1) if ok_latencies else None,
        "p99_ms": round(float(np.percentile(ok_latencies, 99)) * 1000, 1) if ok_latencies else None,
        "completion_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
    }


def measure(url: str, prompts: list[str], args) -> dict:
    """A warm-up, ``args.repeats`` loads at ``args.concurrency`` (medians), then requests one at a time."""
    load(url, prompts[:args.concurrency], args.concurrency, args.max_tokens)
    runs = [load(url, prompts, args.concurrency, args.max_tokens) for _ in range(args.repeats)]
    single = load(url, prompts[:args.latency_requests], 1, args.max_tokens)
    return {**{key: statistics.median(run[key] for run in runs) for key in ("tokens_per_s", "p50_ms", "p99_ms")},
            "errors": sum(run["errors"] for run in runs), "dropped": sum(run["dropped"] for run in runs),
            "p50_ms_concurrency_1": single["p50_ms"], "runs": runs, "concurrency_1": single}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="embedded,qwen100m")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=30)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "serve.json")
    parser.add_argument("--serve", choices=[s for s in SYSTEMS if s != "raw_vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_system(args.serve, args.model)

    import ray
    import torch
    import transformers
    import vllm

    systems = args.systems.split(",")
    prompts = [r.instruction for r in iter_records(PROMPTS)][:args.requests]
    result = {
        "device": f"cpu: {cpu_name()}, {os.cpu_count()} cores, no GPU",
        "engine": {**engine_settings("<size>"), "threads": ENGINE_THREADS},
        "workload": {"requests": args.requests, "concurrency": args.concurrency, "repeats": args.repeats,
                     "latency_requests": args.latency_requests, "max_tokens": args.max_tokens, "ignore_eos": True,
                     "temperature": 0, "prompts": str(PROMPTS.relative_to(REPO)),
                     "transport": f"HTTP over loopback (Serve on :{SERVE_PORT}, raw vLLM on :{RAW_VLLM_PORT})"},
        "statistic": "median over the repeats of each load's tokens/s, p50 and p99; p50 of the concurrency-1 load",
        "sizes": {},
        "versions": {"ray": ray.__version__, "vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes.split(","):
            model = STUDENT if size == "embedded" else build_qwen_shaped(Path(scratch) / size)
            config = transformers.AutoConfig.from_pretrained(model)
            with torch.device("meta"):
                parameters = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
            results: dict[str, dict] = {}
            for system in systems:
                print(f"[{size}] {system} ...", flush=True)
                server = start(system, str(model))
                try:
                    # Serve falls back to its own proxy when it cannot start HAProxy: record which ran.
                    haproxy = subprocess.run(["pgrep", "-x", "haproxy"], capture_output=True).returncode == 0
                    results[system] = {"env": SYSTEMS[system]["env"], "haproxy_running": haproxy,
                                       **measure(url_of(system), prompts, args)}
                finally:
                    stop(server)
                print(f"[{size}] {system}", json.dumps({k: v for k, v in results[system].items()
                                                         if k not in ("runs", "concurrency_1")}), flush=True)
                result["sizes"][size] = size_summary(size, config, parameters, results)
                args.output.write_text(json.dumps(result, indent=2) + "\n")  # after each system: a failure keeps the rest
    print(json.dumps({size: {k: s[k] for k in ("vs_raw_vllm", "overhead_ms_concurrency_1")}
                      for size, s in result["sizes"].items()}, indent=1))


def size_summary(size: str, config, parameters: int, results: dict[str, dict]) -> dict:
    """One size's systems, with each one's tokens/s over raw vLLM's and its concurrency-1 p50 minus raw vLLM's."""
    raw = results.get("raw_vllm")
    return {
        "model": ("assets/embedded/student" if size == "embedded" else
                  f"random Qwen2ForCausalLM, Qwen2.5-0.5B layer shape {QWEN_LAYER_SHAPE}, {QWEN_LAYERS} layers"),
        "architecture": config.architectures[0], "parameters": parameters,
        "vs_raw_vllm": {name: round(r["tokens_per_s"] / raw["tokens_per_s"], 3) for name, r in results.items()}
        if raw else None,
        "overhead_ms_concurrency_1": {name: round(r["p50_ms_concurrency_1"] - raw["p50_ms_concurrency_1"], 1)
                                      for name, r in results.items()} if raw else None,
        "systems": results,
    }

if __name__ == "__main__":
    main()
