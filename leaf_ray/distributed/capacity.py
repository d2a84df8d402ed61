"""Fail fast on a job the cluster can never run, instead of waiting forever.

Ray queues a request it cannot place yet, and without an autoscaler "yet" means "never": a
scoring actor that reserves every CPU of the only node leaves none for the tasks that read
the corpus, and the job shows ``0/1`` until someone kills it. So before starting, a job
checks its whole demand (every actor or worker, plus the light tasks that feed them) against
what the cluster has or can grow to, and otherwise fails naming the field to change.

What the cluster can grow to: the autoscaler's node groups when Ray reports them (the
cluster config in GCS, as Ray Train's own check reads it). When an autoscaler runs but its
node groups are unknown (a KubeRay autoscaler reports none), nothing can be proven, so the
check says so and lets the job start.
"""

from __future__ import annotations

import json
import math

import ray

from leaf_ray.errors import RunRefused

# The corpus reading and splitting stage: one light task at a time is enough to feed the actors.
READ_STAGE_CPUS = 0.25


def check_capacity(bundle: dict[str, float], count: int, fields: str, extra: dict[str, float] | None = None) -> None:
    """Raise :class:`RunRefused` naming ``fields`` unless ``count`` copies of ``bundle`` (one actor or
    worker each), plus one ``extra`` bundle alongside them, fit on the cluster's nodes."""
    nodes, can_grow = node_shapes()
    if nodes is None:
        print(f"[leaf-ray] capacity check skipped: an autoscaler runs but reports no node groups; "
              f"{count} x {_fmt(bundle)} will wait for the nodes it adds", flush=True)
        return
    if not fits(bundle, count, extra or {}, nodes):
        shapes = "; ".join(f"{'up to ' if can_grow else ''}{n if n != math.inf else 'any number of'} x "
                           f"{_fmt(shape)}" for shape, n in nodes)
        alongside = f" plus {_fmt(extra)} for the tasks that feed them" if extra else ""
        raise RunRefused(f"{fields}: {count} x {_fmt(bundle)}{alongside} can never be scheduled on this cluster "
                         f"(nodes: {shapes}). Ask for less per actor or fewer of them, or add nodes.")


def fits_at_once(bundle: dict[str, float], count: int, extra: dict[str, float]) -> bool:
    """Whether ``count`` bundles plus ``extra`` fit on the cluster together (counting the nodes an
    autoscaler can add); False when an autoscaler runs whose node groups are unknown."""
    nodes, _ = node_shapes()
    return nodes is not None and fits(bundle, count, extra, nodes)


def fits(bundle: dict[str, float], count: int, extra: dict[str, float],
         nodes: list[tuple[dict[str, float], float]]) -> bool:
    """Whether ``count`` bundles and one ``extra`` bundle can be placed on ``nodes`` ((resources,
    how many such nodes) pairs). Exact for identical bundles: try each node shape as the one
    that also hosts ``extra``, every other node taking as many bundles as it holds."""
    capacity = [(shape, n, per_node(bundle, shape)) for shape, n in nodes]
    total = sum(n * k for _, n, k in capacity)
    if not extra:
        return total >= count
    for shape, n, k in capacity:
        rest = {name: shape.get(name, 0.0) - extra.get(name, 0.0) for name in shape}
        if any(amount > shape.get(name, 0.0) for name, amount in extra.items()):
            continue
        if total - k + per_node(bundle, rest) >= count:  # one node of this shape hosts extra
            return True
    return False


def per_node(bundle: dict[str, float], shape: dict[str, float]) -> float:
    """How many ``bundle`` fit on one node of ``shape`` (Ray's resource amounts are exact to 1e-4)."""
    limits = [math.floor(shape.get(name, 0.0) / amount + 1e-6) for name, amount in bundle.items() if amount > 0]
    return max(min(limits), 0) if limits else math.inf


def node_shapes() -> tuple[list[tuple[dict[str, float], float]] | None, bool]:
    """(node shapes with how many of each, whether the cluster can grow); shapes are None when an
    autoscaler runs whose node groups Ray does not report."""
    config = ray._private.state.state.get_cluster_config()  # private, but what Ray Train and Ray Data read
    if config is not None and config.node_group_configs:
        groups = [({k: float(v) for k, v in g.resources.items()}, math.inf if g.max_count == -1 else g.max_count)
                  for g in config.node_group_configs if g.max_count != 0]
        return groups, True
    if autoscaler_running():
        return None, True
    return [({k: float(v) for k, v in node["Resources"].items()}, 1) for node in ray.nodes() if node["Alive"]], False


def autoscaler_running() -> bool:
    """Whether an autoscaler that can add nodes runs: v2 marks itself enabled in the GCS; v1
    reports its status there, and on a cluster started by hand (``ray start``, ``ray.init()``)
    that status comes from a read-only autoscaler whose node types are the nodes themselves."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    v2 = _internal_kv_get(ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY.encode(),
                          namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
    if v2 == b"1":
        return True
    status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    types = json.loads(status).get("autoscaler_report", {}).get("node_type_mapping") or {} if status else {}
    return any(node_type != format_readonly_node_type(node_id) for node_id, node_type in types.items())


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: (int(v) if float(v).is_integer() else v) for k, v in resources.items()
             if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type"))}
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(shown.items())) + "}"
