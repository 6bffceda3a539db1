"""A Ray job for a cluster with two nodes: workers pinned to nodes with custom resources.

Submitted by ``cluster/demo.sh`` (``make cluster-demo``) to a cluster whose head node
advertises the custom resource ``head_node`` and whose second node advertises
``worker_node``:

    make dist    # dist/actorgrad-<version>-py3-none-any.whl
    ray job submit --address http://127.0.0.1:8265 --working-dir <a folder holding this script> \\
        --runtime-env-json '{"py_modules": ["dist/actorgrad-<version>-py3-none-any.whl"]}' \\
        -- python placement_job.py

or, for development, with the repository root as the working dir (actorgrad's source in it):

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", ".git", "docs"]}' \\
        -- python cluster/placement_job.py

It trains a small regression network whose trunk ``enc`` must run on the head node
and whose ``head`` must run on the other node, finds out from Ray's state API
(what ``ray list actors`` shows) where each worker's actor really runs, prints
``PLACEMENT enc=<node id> head=<node id>``, checks that these are two different
nodes and that the loss fell, writes a checkpoint, and prints ``JOB OK``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import ray
import torch
from ray.util.state import list_actors

import actorgrad as ag


def actor_nodes(names: list[str], timeout: float = 30.0) -> dict[str, dict]:
    """Worker name -> its ALIVE Ray actor (node id, namespace, pid), for the actors of this job."""
    job_id = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, detail=True):
            if a.name in names and a.job_id == job_id and (a.ray_namespace or "").startswith("actorgrad-"):
                found[a.name] = {"node_id": a.node_id, "namespace": a.ray_namespace, "pid": a.pid}
        if len(found) == len(names) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@ray.remote(num_cpus=0)
def where_is_actorgrad() -> tuple[str, str, str]:
    """The node id of a Ray worker process, and the version and file its `import actorgrad` loaded."""
    import actorgrad as imported

    return ray.get_runtime_context().get_node_id(), imported.__version__, imported.__file__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ckpt", default="/tmp/actorgrad-demo-ckpt",
                        help="checkpoint directory, written on the node that runs this driver")
    parser.add_argument("--trunk-resource", default="head_node")
    parser.add_argument("--head-resource", default="worker_node")
    args = parser.parse_args()

    t0 = time.monotonic()
    # Inside `ray job submit`, RAY_ADDRESS is set for this driver: ag.init() joins the job's cluster.
    ag.init()
    print(f"connected: RAY_ADDRESS={os.environ.get('RAY_ADDRESS')!r} job={ray.get_runtime_context().get_job_id()} "
          f"nodes={len([n for n in ray.nodes() if n['Alive']])} driver_node={ray.get_runtime_context().get_node_id()}")
    print(f"driver imports actorgrad {ag.__version__} from {ag.__file__}")
    for res in (args.trunk_resource, args.head_resource):
        node, version, path = ray.get(where_is_actorgrad.options(resources={res: 0.01}).remote())
        print(f"a Ray worker on the {res} node ({node[:12]}) imports actorgrad {version} from {path}")

    torch.manual_seed(0)
    try:
        enc = ag.spawn(torch.nn.Linear(4, 16), name="enc", optimizer=ag.Optim(torch.optim.SGD, lr=0.1),
                       resources={args.trunk_resource: 1})
        act = ag.spawn(torch.nn.Tanh(), name="act")
        head = ag.spawn(torch.nn.Linear(16, 1), name="head", optimizer=ag.Optim(torch.optim.SGD, lr=0.1),
                        resources={args.head_resource: 1})
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")
        t_spawned = time.monotonic()

        g = torch.Generator().manual_seed(1)
        w_true = torch.randn(4, 1, generator=g)
        losses: list[float] = []
        step_s: list[float] = []
        for _ in range(args.steps):
            t = time.monotonic()
            x = torch.randn(64, 4, generator=g)
            y = torch.tanh(x @ w_true)
            loss = mse(head(act(enc(x))), y)
            loss.backward()
            ag.step()
            losses.append(loss.item())
            step_s.append(time.monotonic() - t)
        t_trained = time.monotonic()

        where = actor_nodes([enc.name, act.name, head.name, mse.name])
        for name in (enc.name, act.name, head.name, mse.name):
            info = where.get(name)
            print(f"worker {name:5s} actor in namespace {info and info['namespace']} on node "
                  f"{info and info['node_id']} (pid {info and info['pid']})")
        enc_node = where.get("enc", {}).get("node_id")
        head_node = where.get("head", {}).get("node_id")
        print(f"PLACEMENT enc={enc_node} head={head_node}")
        print("LOSSES " + " ".join(f"{v:.4f}" for v in losses))
        assert enc_node and head_node, f"could not find the actors of enc and head in Ray's state API: {where}"
        assert enc_node != head_node, f"enc and head ran on the same node {enc_node}"
        assert losses[-1] < losses[0], f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"

        ag.save(args.ckpt)
        print(f"checkpoint written to {args.ckpt} on node {ray.get_runtime_context().get_node_id()}: "
              f"{sorted(os.listdir(args.ckpt))}")
        later = sorted(step_s[1:]) or [0.0]
        print(f"TIMINGS connect+spawn {t_spawned - t0:.2f}s  train {args.steps} steps {t_trained - t_spawned:.2f}s "
              f"(first step {step_s[0]:.2f}s, waits for the actors to start; then median "
              f"{1000 * later[len(later) // 2]:.1f} ms/step)  total {time.monotonic() - t0:.2f}s")
    finally:
        ag.shutdown()
    print("JOB OK")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
