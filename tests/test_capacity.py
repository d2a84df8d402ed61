"""The capacity check's packing rule against brute force over every placement."""

from __future__ import annotations

import itertools
import math

from leaf_ray.distributed.capacity import fits


def placeable(bundle: dict, count: int, extra: dict, nodes: list[dict]) -> bool:
    """Slow and obvious: try every node for every bundle (and for ``extra``)."""
    demands = [bundle] * count + ([extra] if extra else [])
    for placement in itertools.product(range(len(nodes)), repeat=len(demands)):
        used = [dict.fromkeys(node, 0.0) for node in nodes]
        ok = True
        for demand, index in zip(demands, placement):
            for name, amount in demand.items():
                used[index][name] = used[index].get(name, 0.0) + amount
                ok &= used[index][name] <= nodes[index].get(name, 0.0) + 1e-9
        if ok:
            return True
    return False


NODES = [[{"CPU": 2.0}], [{"CPU": 4.0}], [{"CPU": 2.0}, {"CPU": 2.0}], [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0}],
         [{"CPU": 3.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}]]


BUNDLES = [{"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 1.75}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 3.0}]


def test_fits_agrees_with_every_placement():
    for nodes, bundle, count, extra in itertools.product(NODES, BUNDLES, [1, 2, 3], [{}, {"CPU": 0.25}]):
        expected = placeable(bundle, count, extra, nodes)
        assert fits(bundle, count, extra, [(node, 1) for node in nodes]) == expected, (nodes, bundle, count, extra)


def test_node_groups_with_counts_and_no_limit():
    assert fits({"CPU": 2.0}, 3, {"CPU": 0.25}, [({"CPU": 2.0}, 4)])            # the read task on a 4th node
    assert not fits({"CPU": 2.0}, 4, {"CPU": 0.25}, [({"CPU": 2.0}, 4)])
    assert fits({"CPU": 2.0, "GPU": 1.0}, 100, {"CPU": 0.25}, [({"CPU": 4.0}, 1), ({"CPU": 8.0, "GPU": 1.0}, math.inf)])
    assert not fits({"CPU": 1.0, "GPU": 2.0}, 1, {}, [({"CPU": 8.0, "GPU": 1.0}, math.inf)])
