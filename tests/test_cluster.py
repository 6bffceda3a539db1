"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): pinning, placement groups, errors."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch

import actorgrad as ag
from actorgrad import errors as E

from conftest import actor_nodes, free_port, ray_init_args

NODES = ("node_a", "node_b", "node_c")


@pytest.fixture(scope="module")
def cluster():
    """Three nodes with distinct custom resources; the session's single-node Ray steps aside."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_a": 4}, "include_dashboard": True, "dashboard_port": free_port()})
    c.add_node(num_cpus=1, resources={"node_b": 4})
    c.add_node(num_cpus=1, resources={"node_c": 4})
    c.wait_for_nodes()
    args = ray_init_args()
    args.pop("num_cpus")
    args["address"] = c.address
    ray.init(**args)
    node_of_resource = {}
    for n in ray.nodes():
        for r in NODES:
            if r in n["Resources"]:
                node_of_resource[r] = n["NodeID"]
    assert len(node_of_resource) == 3
    yield node_of_resource
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def cluster_rt(cluster):
    ag.init(backend="ray", timeout=90)
    yield cluster
    ag.shutdown()


class TanhLinear(torch.nn.Linear):
    def forward(self, x):
        return torch.tanh(super().forward(x))


def test_workers_pinned_across_nodes_train_exactly_like_pytorch(cluster_rt):
    torch.manual_seed(0)
    mods = [TanhLinear(6, 6), TanhLinear(6, 6), torch.nn.Linear(6, 1)]
    refs = [copy.deepcopy(m) for m in mods]
    workers = [ag.spawn(copy.deepcopy(m), name=f"w_{r}", resources={r: 1},
                        optimizer=ag.Optim(torch.optim.Adam, lr=0.01)) for m, r in zip(mods, NODES)]
    mse = ag.spawn(torch.nn.MSELoss(), name="mse", resources={"node_a": 1})
    opts = [torch.optim.Adam(r.parameters(), lr=0.01) for r in refs]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)
        h = x
        for w in workers:
            h = w(h)
        loss = mse(h, y)
        loss.backward()
        ag.step()
        hr = x
        for r in refs:
            hr = r(hr)
        ref_loss = torch.nn.functional.mse_loss(hr, y)
        ref_loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
        assert abs(loss.item() - ref_loss.item()) < 1e-5
    for w, r in zip(workers, refs):
        for k, v in r.state_dict().items():
            torch.testing.assert_close(w.state_dict()[k], v, atol=1e-5, rtol=1e-5)
    placed = actor_nodes([w.name for w in workers])
    assert placed == {f"w_{r}": cluster_rt[r] for r in NODES}


def test_spread_and_pack_placement_groups_land_as_asked(cluster_rt):
    with ag.placement("strict_spread"):
        spread = [ag.spawn(torch.nn.Linear(2, 2), name=f"spread{i}") for i in range(3)]
    with ag.placement("strict_pack"):
        pack = [ag.spawn(torch.nn.Linear(2, 2), name=f"pack{i}") for i in range(3)]
    for w in spread + pack:
        assert w(torch.ones(1, 2)).value().shape == (1, 2)
    nodes = actor_nodes([w.name for w in spread + pack])
    assert len({nodes[w.name] for w in spread}) == 3
    assert len({nodes[w.name] for w in pack}) == 1
    ag.step()


def test_calling_a_worker_inside_its_placement_block_is_a_clear_error(cluster_rt):
    with ag.placement("pack"):
        w = ag.spawn(torch.nn.Linear(2, 2), name="early")
        with pytest.raises(E.ConfigError) as info:
            w(torch.ones(1, 2))
        assert "placement block" in str(info.value)
    assert w(torch.ones(1, 2)).value().shape == (1, 2)
    ag.step()


def test_impossible_placement_fails_fast_naming_the_worker(cluster_rt):
    start = time.monotonic()
    with pytest.raises(E.PlacementError) as info:
        ag.spawn(torch.nn.Linear(2, 2), name="nowhere", resources={"node_z": 1})
    assert info.value.worker == "nowhere" and "node_z" in str(info.value)
    with pytest.raises(E.PlacementError) as info:
        ag.spawn(torch.nn.Linear(2, 2), name="too_big", resources={"node_a": 5})
    assert "node_a" in str(info.value)
    with pytest.raises(E.PlacementError) as info:
        with ag.placement("strict_spread", timeout=3):
            for i in range(4):  # 4 bundles, only 3 nodes
                ag.spawn(torch.nn.Linear(2, 2), name=f"four{i}")
    assert "four0" in str(info.value) and "STRICT_SPREAD" in str(info.value)
    assert time.monotonic() - start < 30
    # the names are free again and the runtime is usable
    w = ag.spawn(torch.nn.Linear(2, 2), name="four0", resources={"node_b": 1})
    assert w(torch.ones(1, 2)).value().shape == (1, 2)
    ag.step()


def test_replicas_spread_over_nodes_train_exactly(cluster_rt):
    """replicas=3 with replica_placement="strict_spread": one replica per node, one worker to the user."""
    torch.manual_seed(0)
    mid = torch.nn.Linear(6, 6)
    ref = copy.deepcopy(mid)
    w = ag.spawn(mid, name="rep", replicas=3, replica_placement="strict_spread",
                 optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        xs = [torch.randn(4, 6, generator=g) for _ in range(3)]
        for x in xs:  # one call per replica
            (w(x) ** 2).mean().backward()
        ag.step()
        for x in xs:
            (ref(x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(w.state_dict()[k], v, atol=1e-5, rtol=1e-5)
    nodes = actor_nodes(["rep", "rep[1]", "rep[2]"])
    assert len(set(nodes.values())) == 3, nodes
