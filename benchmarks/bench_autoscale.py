"""Autoscaling, shown on one machine with real Ray: timelines into benchmarks/results/autoscale.json.

    python benchmarks/bench_autoscale.py            # both scenarios (about 5 minutes here)
    python benchmarks/bench_autoscale.py serve      # or one of them: serve, cluster

1. **Serve.** The Serve app (Ray Serve LLM, vLLM CPU engine) with ``min_replicas: 1``,
   ``max_replicas: 2`` and a low ``target_ongoing_requests``, driven by a bounded load on
   loopback: the engine deployment goes to 2 replicas, and back to 1 once the load stops and
   ``downscale_delay_s`` has passed. Every request must succeed through both transitions.
2. **Cluster.** Ray's own autoscaler on its fake multi-node provider (what Ray's autoscaler
   tests use), with node types read from ``cluster/raycluster.yaml`` (:func:`manifest_node_types`):
   a scoring job whose actors the head cannot hold makes it add worker nodes of the right type;
   the job completes on them, and the idle nodes are removed after the idle timeout.

``tests/test_autoscaling.py`` runs the same two functions and asserts on their timelines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "autoscale.json"
EMBEDDED = ROOT / "assets" / "embedded"
MODEL_ID = "leaf-student"
SERVE_URL = "http://127.0.0.1:8000"

# Serve scenario: the target is one ongoing request per replica, so 2 concurrent clients want 2
# replicas. Each request decodes 64 tokens (ignore_eos): the engine's work, not HTTP, keeps one core
# busy, and the other core starts the second engine (on 2 cores a request-per-ms load starved that
# start for minutes). Ray Serve wants the look-back window longer than its 10 s metrics interval.
SERVE_SETTINGS = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 2.0,
                  "downscale_delay_s": 10.0, "look_back_period_s": 12.0}
CONCURRENCY = 2


def engine_replicas(app: str = "default") -> tuple[int, int]:
    """(running, all) replicas of the app's vLLM engine deployment, from Serve's status API."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    (engine,) = [status for name, status in deployments.items() if name.startswith("LLMServer")]
    states = {str(getattr(state, "value", state)): count for state, count in engine.replica_states.items()}
    return states.get("RUNNING", 0), sum(states.values())


def serve_scaling_timeline(max_load_s: float = 240.0, max_idle_s: float = 120.0) -> dict[str, Any]:
    """Deploy the app on the running Ray, load it until a second engine replica runs (and a few
    seconds more), stop, and wait for the return to one replica; sample replicas and in-flight
    requests every half second. Times count from the start of the load: ``replica_added_s`` when
    Serve decided on a second replica, ``scale_up_s`` when it was running; ``scale_down_s`` from
    the end of the load to one replica again."""
    from ray import serve

    from leaf_ray.serving.app import build_app

    serve.run(build_app({"model": str(EMBEDDED / "student"), "model_id": MODEL_ID, "dtype": "float32",
                         "max_model_len": 256, "focus": False, "enforce_eager": True,
                         "kv_cache_memory_bytes": 64 * 2**20,  # the tiny student's: 32k tokens, allocated at once
                         **SERVE_SETTINGS}))
    body = {"model": MODEL_ID, "max_tokens": 64, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": "ann has 3 . ann gets 4 more . how many does ann have ?"}]}
    in_flight, outcomes, lock = [0], [], threading.Lock()
    load_on = threading.Event()
    load_on.set()

    def client() -> None:
        while load_on.is_set():
            with lock:
                in_flight[0] += 1
            try:
                status = requests.post(f"{SERVE_URL}/v1/chat/completions", json=body, timeout=300).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            with lock:
                in_flight[0] -= 1
                outcomes.append(status)

    timeline: list[dict[str, Any]] = []
    start = time.monotonic()

    def sample() -> dict[str, Any]:
        running, total = engine_replicas()
        point = {"t_s": round(time.monotonic() - start, 1), "running_replicas": running, "replicas": total,
                 "in_flight": in_flight[0]}
        timeline.append(point)
        return point

    scaled_up_s = scaled_down_s = None
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            for _ in range(CONCURRENCY):
                pool.submit(client)
            while time.monotonic() - start < max_load_s:
                point = sample()
                if point["running_replicas"] == 2 and scaled_up_s is None:
                    scaled_up_s = point["t_s"]
                if scaled_up_s is not None and point["t_s"] >= scaled_up_s + 5:  # both replicas under load a while
                    break
                time.sleep(0.5)
            load_on.clear()
        load_stopped_s = round(time.monotonic() - start, 1)  # every client has finished its last request
        while time.monotonic() - start < load_stopped_s + max_idle_s:
            point = sample()
            if point["replicas"] == 1 and point["running_replicas"] == 1:
                scaled_down_s = point["t_s"]
                break
            time.sleep(0.5)
    finally:
        load_on.clear()
        serve.shutdown()
    failed = [status for status in outcomes if status != 200]
    return {"settings": {**SERVE_SETTINGS, "concurrency": CONCURRENCY, "max_tokens": body["max_tokens"]},
            "requests": len(outcomes), "failed_requests": len(failed), "failures": sorted(map(str, set(failed))),
            "replica_added_s": next((p["t_s"] for p in timeline if p["replicas"] == 2), None),
            "scale_up_s": scaled_up_s, "load_stopped_s": load_stopped_s,
            "scale_down_s": None if scaled_down_s is None else round(scaled_down_s - load_stopped_s, 1),
            "timeline": timeline}


# --------------------------------------------------------------------------- cluster

MANIFEST = ROOT / "cluster" / "raycluster.yaml"
FAKE_HEAD_ID = "f" * 51 + "00000"  # the id the fake provider gives its head node
GCS_PORT = 6391                    # not Ray's default, so that it never meets another local cluster
IDLE_TIMEOUT_S = 6.0               # the manifest says 300 s; a test cannot wait that long
FAKE_OBJECT_STORE = 300_000_000    # per fake node: they all share this machine's memory


def group_resources(group: dict[str, Any]) -> dict[str, float]:
    """The CPUs and GPUs Ray gets on a pod of a RayCluster group, as KubeRay sets them:
    rayStartParams first, else the container's limits (a CPU quantity rounds up, as a
    Kubernetes Quantity's Value() does)."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = str(limits["cpu"])
    cpus = float(params["num-cpus"]) if "num-cpus" in params else float(
        -(-int(cpu[:-1]) // 1000) if cpu.endswith("m") else int(cpu))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def manifest_node_types(manifest: Path = MANIFEST) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """(head resources, worker node types) of ``cluster/raycluster.yaml`` in the autoscaler's
    config format: each worker group's Ray resources and its min/max replicas."""
    spec = yaml.safe_load(manifest.read_text())["spec"]
    workers = {group["groupName"]: {"resources": group_resources(group), "node_config": {},
                                    "min_workers": group.get("minReplicas", 0), "max_workers": group["maxReplicas"]}
               for group in spec["workerGroupSpecs"]}
    return group_resources(spec["headGroupSpec"]), workers


def fake_cluster_config(head: dict[str, float], workers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An autoscaler config for Ray's fake multi-node provider. It is named as an ``external``
    provider: Ray 2.60's wheel lacks the provider's default config file (example.yaml), so
    ``type: fake_multinode`` fails at start with FileNotFoundError."""
    types = {"ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0}}
    for name, node_type in workers.items():
        types[name] = {**node_type, "resources": {**node_type["resources"], "object_store_memory": FAKE_OBJECT_STORE}}
    return {
        "cluster_name": "leaf-ray-fake", "max_workers": sum(t["max_workers"] for t in workers.values()),
        "provider": {"type": "external", "gcs_address": f"127.0.0.1:{GCS_PORT}", "head_node_id": FAKE_HEAD_ID,
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
                     "launch_multiple": True},
        "available_node_types": types, "head_node_type": "ray.head.default",
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60, "upscaling_speed": 1.0, "auth": {}, "docker": {},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def start_fake_cluster(work: Path) -> dict[str, str]:
    """``ray start --head`` with the autoscaler v2 (as the manifest asks) over the fake provider;
    returns its environment. Token authentication is off on this throwaway cluster: a process
    reads RAY_AUTH_MODE once, when it imports ray, so a test process that already has cannot
    switch to token mode to join it."""
    head, workers = manifest_node_types()
    config = work / "autoscaler.yaml"
    config.write_text(json.dumps(fake_cluster_config(dict(head), workers)))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
           "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["ray", "start", "--head", "--port", str(GCS_PORT), "--num-cpus", str(int(head["CPU"])),
                    "--object-store-memory", str(FAKE_OBJECT_STORE), "--include-dashboard", "false",
                    "--disable-usage-stats", "--autoscaling-config", str(config)],
                   env=env, capture_output=True, check=True)
    return env


def worker_nodes(workers: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Alive worker nodes by node type (told apart by their resources)."""
    import ray

    counts = dict.fromkeys(workers, 0)
    for node in ray.nodes():
        if node["Alive"] and not node["Resources"].get("node:__internal_head__"):
            shape = {k: v for k, v in node["Resources"].items() if k in ("CPU", "GPU")}
            counts[next(name for name, t in workers.items() if t["resources"] == shape)] += 1
    return counts


def cluster_scaling_timeline(work: Path, records: int = 48) -> dict[str, Any]:
    """Start the fake cluster, run the scoring job with actors the head cannot hold (one GPU
    each), and watch the autoscaler add worker nodes and remove them once idle."""
    import ray

    from leaf_ray.config import PipelineConfig, ResourcesConfig, ScoringConfig
    from leaf_ray.distributed.scoring import run_scoring

    head, workers = manifest_node_types()
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join((EMBEDDED / "data" / "simple" / "distill.jsonl").read_text().splitlines(True)[:records]))
    actor = ResourcesConfig(num_cpus=2, num_gpus=1)
    pipeline = PipelineConfig(run_dir=str(work / "run"), teacher=str(EMBEDDED / "teacher"),
                              student=str(EMBEDDED / "student"),
                              scoring=ScoringConfig(corpus=str(corpus), max_length=128, batch_size=16, num_actors=2,
                                                    resources=actor))
    env = start_fake_cluster(work)
    saved = os.environ.pop("RAY_ADDRESS", None)
    timeline: list[dict[str, Any]] = []
    start = time.monotonic()
    stop_sampling = threading.Event()

    def sample_nodes() -> None:
        while not stop_sampling.is_set():
            timeline.append({"t_s": round(time.monotonic() - start, 1), "phase": phase[0], **worker_nodes(workers)})
            time.sleep(0.5)

    phase = ["job"]
    try:
        ray.init(address=f"127.0.0.1:{GCS_PORT}")
        sampler = threading.Thread(target=sample_nodes, daemon=True)
        sampler.start()
        summary = run_scoring(pipeline)
        job_s = round(time.monotonic() - start, 1)
        phase[0] = "idle"
        while time.monotonic() - job_s - start < 120 and any(worker_nodes(workers).values()):
            time.sleep(0.5)
        removed_s = round(time.monotonic() - start, 1)
        nodes_left = sum(worker_nodes(workers).values())
        stop_sampling.set()
        sampler.join()
    finally:
        ray.shutdown()
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    peak = {name: max(point[name] for point in timeline) for name in workers}
    first_up = next((point["t_s"] for point in timeline if any(point[n] for n in workers)), None)
    all_up = next((point["t_s"] for point in timeline if point == {**point, **peak}), None)
    return {"head": head, "node_types": {name: {k: t[k] for k in ("resources", "min_workers", "max_workers")}
                                         for name, t in workers.items()},
            "job": {"num_actors": 2, "actor": actor.model_dump(), "records": records, "scored": summary["scored"],
                    "errors": summary["errors"]},
            "idle_timeout_s": IDLE_TIMEOUT_S, "peak_worker_nodes": peak, "first_node_up_s": first_up,
            "all_nodes_up_s": all_up,
            "job_done_s": job_s, "nodes_removed_s": round(removed_s - job_s, 1),
            "nodes_left": nodes_left, "timeline": timeline}


def main() -> None:
    import ray

    os.environ.setdefault("RAY_ADDRESS", "local")
    which = sys.argv[1:] or ["cluster", "serve"]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if "cluster" in which:
        with tempfile.TemporaryDirectory() as work:
            results["cluster"] = cluster_scaling_timeline(Path(work))
    if "serve" in which:
        ray.init(num_cpus=8, include_dashboard=False)
        try:
            results["serve"] = serve_scaling_timeline()
        finally:
            ray.shutdown()
    results["command"] = "python benchmarks/bench_autoscale.py"
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for name in which:
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "timeline"}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
