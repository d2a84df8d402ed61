"""Autoscaling shown with real Ray on one machine: Serve engine replicas follow load, and Ray's
autoscaler adds the worker nodes a scoring job asks for. ``benchmarks/bench_autoscale.py`` runs the
same two scenarios and writes their timelines to ``benchmarks/results/autoscale.json``."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks.bench_autoscale import (
    IDLE_TIMEOUT_S, MANIFEST, SERVE_SETTINGS, cluster_scaling_timeline, group_resources, manifest_node_types,
    serve_scaling_timeline,
)
from tests.conftest import EMBEDDED

needs_models = pytest.mark.skipif(not (EMBEDDED / "student").exists(), reason="embedded models not built")


def test_node_types_are_read_from_the_manifest_as_kuberay_sets_them():
    head, workers = manifest_node_types()
    spec = yaml.safe_load(MANIFEST.read_text())["spec"]
    (group,) = spec["workerGroupSpecs"]
    assert head == {"CPU": float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])}  # 0: the head runs no work
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert workers == {group["groupName"]: {
        "resources": {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}, "node_config": {},
        "min_workers": group["minReplicas"], "max_workers": group["maxReplicas"]}}
    # rayStartParams win over limits; a millicore limit rounds up, as a Kubernetes Quantity's Value() does
    pod = {"template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "1500m"}}}]}}}
    assert group_resources(pod) == {"CPU": 2.0}
    assert group_resources({**pod, "rayStartParams": {"num-cpus": "1", "num-gpus": "2"}}) == {"CPU": 1.0, "GPU": 2.0}


@pytest.mark.ray
@pytest.mark.slow
@needs_models
def test_the_autoscaler_adds_the_nodes_a_scoring_job_asks_for_and_removes_them_when_idle(tmp_path):
    """Ray's autoscaler (v2, fake multi-node provider) with the manifest's node types: the head
    has no CPUs, each actor wants a GPU, so the job runs only once two GPU nodes are added."""
    result = cluster_scaling_timeline(tmp_path)
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}), json.dumps(result["timeline"]))
    assert (result["job"]["scored"], result["job"]["errors"]) == (result["job"]["records"], 0)
    assert result["timeline"][0]["gpu"] == 0                   # the job started on the head alone
    assert result["peak_worker_nodes"] == {"gpu": 2}           # one GPU node per actor, not more
    assert result["nodes_left"] == 0                           # idle nodes were removed ...
    assert result["nodes_removed_s"] >= IDLE_TIMEOUT_S - 1     # ... after the idle timeout, not before


@pytest.mark.ray
@pytest.mark.slow
@needs_models
def test_serve_engine_replicas_follow_the_load_without_failing_a_request():
    import ray

    ray.init(num_cpus=8, include_dashboard=False)  # engine replicas, ingress and proxy each reserve CPUs
    try:
        result = serve_scaling_timeline()
    finally:
        ray.shutdown()
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}), json.dumps(result["timeline"]))
    timeline = result["timeline"]
    assert timeline[0]["replicas"] == 1
    assert result["scale_up_s"] is not None and max(p["running_replicas"] for p in timeline) == 2
    assert result["scale_down_s"] is not None and timeline[-1]["replicas"] == 1
    assert result["scale_down_s"] >= SERVE_SETTINGS["downscale_delay_s"]  # not before the configured delay
    assert result["requests"] > 0 and result["failed_requests"] == 0
