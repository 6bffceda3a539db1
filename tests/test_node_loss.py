"""Node loss on a Ray cluster (ray.cluster_utils.Cluster, several nodes on one machine).

A node holding a worker is removed while training. With recovery on, Ray restarts the worker
on a replacement node, every worker is restored to the last checkpoint and ``ag.train`` replays
the lost steps: the final parameters equal an uninterrupted plain-PyTorch run. Without a node
that can host the worker, the wait fails with ``WorkerDied`` naming it (not recovered).
"""

from __future__ import annotations

import logging
import time

import pytest

import actorgrad as ag
from actorgrad import errors as E

from conftest import actor_nodes, free_port, ray_init_args, wait_process_gone, worker_pid
from test_recovery import EVERY, assert_equal, batch, big_oracle, params, spawn_all, spawn_big

NO_MARKER = "/nonexistent"  # the model's 'mid' never crashes by itself here: its node is lost
PLACES = {"enc": {"home": 1}, "mid": {"spot": 1}, "act": {"home": 1}, "head": {"home": 1}, "mse": {"home": 1}}


@pytest.fixture
def cluster(tmp_path):
    """A head node (every worker but 'mid') and one node with the 'spot' resource that 'mid' needs."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"home": 8}, "include_dashboard": True, "dashboard_port": free_port()})
    spot = c.add_node(num_cpus=1, resources={"spot": 1})
    c.wait_for_nodes()
    args = ray_init_args()
    args.pop("num_cpus")
    args["address"] = c.address
    ray.init(**args)
    try:
        yield c, spot
    finally:
        ag.shutdown()
        ray.shutdown()
        c.shutdown()


def node_of(name: str) -> str:
    """The node id of a live worker."""
    found = actor_nodes([name])
    assert name in found, f"worker '{name}' is not alive"
    return found[name]


def test_node_lost_without_replacement_names_the_worker_and_is_not_recovered(cluster, tmp_path):
    c, spot = cluster
    ag.init(backend="ray", timeout=15, recover=True, checkpoint_every=EVERY, checkpoint_dir=str(tmp_path / "ck"))
    workers, step_fn = spawn_all(NO_MARKER, "nowhere", PLACES)
    step_fn(1)
    ag.step()
    pid = worker_pid(workers[1].actor)
    c.remove_node(spot, allow_graceful=False)
    wait_process_gone(pid)  # removing a node returns before its processes have exited
    t0 = time.monotonic()
    with pytest.raises(E.WorkerDied) as info:
        step_fn(2)
        ag.step()
    assert info.value.worker == "mid" and not info.value.recovered
    assert "mid" in str(info.value) and "did not come back within 15s" in str(info.value)
    assert time.monotonic() - t0 < 15 + 30  # the runtime's deadline, plus the failure's own detection


def test_node_lost_mid_training_recovers_a_large_module_on_a_replacement_node_exactly(cluster, tmp_path, caplog):
    """Ray restarts the lost node's worker on a replacement node; its spec comes from the caller's node
    (losing the worker's node loses no copy of a module far above what Ray inlines)."""
    caplog.set_level(logging.WARNING, logger="actorgrad")
    c, spot = cluster
    steps = 6
    ag.init(backend="ray", timeout=120, recover=True, checkpoint_every=EVERY, checkpoint_dir=str(tmp_path / "ck"))
    places = {"enc": {"home": 1}, "big": {"spot": 1}, "act": {"home": 1}, "head": {"home": 1}, "mse": {"home": 1}}
    workers, step_fn = spawn_big(1024, resources=places)  # 4 MiB: far above what Ray inlines (100 KiB)
    first_node = node_of("big")
    pid = worker_pid(workers[1].actor)
    lost = []

    def fn(s: int) -> None:
        if s == 5 and not lost:
            c.remove_node(spot, allow_graceful=False)
            wait_process_gone(pid)
            lost.append(c.add_node(num_cpus=1, resources={"spot": 1}))
        step_fn(s)

    reports = ag.train(fn, steps)
    assert lost and [r.step for r in reports] == list(range(1, steps + 1))
    recovering = [r.getMessage() for r in caplog.records if "recovering from" in r.getMessage()]
    assert len(recovering) == 1 and "the node it ran on" in recovering[0], recovering
    assert_equal(params(workers), big_oracle(steps, 1024))
    assert node_of("big") != first_node
    x, _ = batch(99)
    assert workers[0](x).value().shape[0] == 16  # the runtime stays usable
