"""Starting many workers: ag.ready, start-up failures named at once, shared processes, memory as USS/PSS.

The scale benchmark itself (bench/scale.py, `make bench-scale`) is a benchmark, not a test: only a
tiny run of it on the local backend is here, and nothing asserts a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import actorgrad as ag
from actorgrad import errors as E
from conftest import _process_gone, wait_process_gone
from test_death_cause import SlowStart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BadStart(torch.nn.Linear):
    """A Linear layer whose unpickling raises in any process but the one that created it."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.origin = os.getpid()

    def __setstate__(self, state: dict) -> None:
        if state.get("origin") != os.getpid():
            raise RuntimeError("weights file missing on this node")
        super().__setstate__(state)


def test_ready_waits_for_every_worker_and_memory_reports_uss_and_pss(backend):
    a = ag.spawn(torch.nn.Linear(2, 2), name="a")
    b = ag.spawn(torch.nn.Tanh(), name="b")
    assert ag.ready() == ["a", "b"]
    assert ag.ready([a], timeout=30) == ["a"]
    assert b(a(torch.ones(1, 2))).value().shape == (1, 2)
    mem = a.memory()
    assert {"rss_bytes", "uss_bytes", "pss_bytes", "live_tensors", "calls"} <= set(mem)
    # USS (pages only this process holds) <= PSS (shared pages split among processes) <= RSS.
    assert 0 < mem["uss_bytes"] <= mem["pss_bytes"] <= mem["rss_bytes"]
    with pytest.raises(E.ConfigError):
        ag.ready(["nobody"])


def test_a_worker_that_cannot_start_is_named_at_once(ray_session):
    ray_session()
    ag.init(backend="ray", timeout=30)
    try:
        ag.spawn(SlowStart(delay=60), name="slow")
        ag.spawn(BadStart(), name="bad")
        with pytest.raises(E.WorkerDied) as info:
            ag.ready(progress=False)
        assert info.value.worker == "bad"
        assert "could not start" in str(info.value) and "weights file missing" in str(info.value)
        # Named while the slow worker still starts: ready did not wait for it (it sleeps a minute).
        assert ag.api._current().transport.starting("slow") is not None
    finally:
        ag.shutdown()


def test_workers_sharing_a_process_train_as_plain_pytorch_and_fail_alone(ray_session):
    ray_session()
    ag.init(backend="ray", timeout=60, workers_per_process=2)
    try:
        torch.manual_seed(0)
        mods = [torch.nn.Linear(3, 3) for _ in range(3)]
        ref = [torch.nn.Linear(3, 3) for _ in range(3)]
        for m, r in zip(mods, ref):
            r.load_state_dict(m.state_dict())
        opt = ag.Optim(torch.optim.SGD, lr=0.1)
        ws = [ag.spawn(m, name=f"w{i}", optimizer=opt) for i, m in enumerate(mods)]
        bad = ag.spawn(BadStart(), name="bad")  # shares w2's process
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")
        with pytest.raises(E.WorkerDied) as info:
            ag.ready(progress=False)
        assert info.value.worker == "bad" and "weights file missing" in str(info.value)
        ag.ready(ws + [mse])
        transport = ag.api._current().transport
        pids = [transport.identity(w.name)["pid"] for w in ws + [mse]]
        assert pids[0] == pids[1] and pids[2] != pids[0] and pids[3] != pids[2]
        ropt = torch.optim.SGD([p for r in ref for p in r.parameters()], lr=0.1)
        x, y = torch.randn(4, 3), torch.randn(4, 3)
        for _ in range(2):
            h = x
            for w in ws:
                h = w(h)
            mse(h, y).backward()
            ag.step()
            ropt.zero_grad()
            torch.nn.functional.mse_loss(ref[2](ref[1](ref[0](x))), y).backward()
            ropt.step()
        for w, r in zip(ws, ref):
            for k, v in w.state_dict().items():
                torch.testing.assert_close(v, r.state_dict()[k], atol=1e-5, rtol=1e-5)
        assert bad.name == "bad"
    finally:
        ag.shutdown()


def test_workers_per_process_is_checked():
    from actorgrad.transport.ray import RayTransport

    with pytest.raises(E.ConfigError, match="workers_per_process"):
        RayTransport.__init__(object.__new__(RayTransport), workers_per_process=0)


LAZY = r"""
import sys, torch
from actorgrad.transport.startup import lazy_dynamo
assert lazy_dynamo()
m = torch.nn.Linear(3, 3)
for opt in (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(m.parameters())):
    m(torch.ones(2, 3)).sum().backward()
    opt.step(); opt.zero_grad()
    opt.load_state_dict(opt.state_dict())
assert type(sys.modules["torch._dynamo"]).__name__ == "_DynamoStandIn", "torch._dynamo was imported"
f = torch.compile(lambda x: x * 2 + 1, backend="eager")  # anything else of torch._dynamo: the real one
assert f(torch.ones(2)).tolist() == [3.0, 3.0]
import torch._dynamo
assert type(sys.modules["torch._dynamo"]).__name__ == "module" and torch._dynamo.config is not None
m(torch.ones(2, 3)).sum().backward(); opt.step(); opt.zero_grad()
print("OK")
"""


def test_a_worker_process_builds_and_steps_optimizers_without_importing_torch_dynamo():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ACTORGRAD_LAZY_DYNAMO", None)
    out = subprocess.run([sys.executable, "-c", LAZY], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


def test_bench_scale_runs_in_a_tiny_size(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "scale.md"
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--backend", "local", "--n", "2", "--steps", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "| chain | 2 |" in text and "| fan | 2 |" in text


def _train_chain(n: int, seed: int, steps: int = 2) -> tuple[list, list]:
    """Spawn an n-worker Linear chain and an MSE worker, train it beside plain PyTorch; return (workers, pids)."""
    torch.manual_seed(seed)
    mods = [torch.nn.Linear(4, 4) for _ in range(n)]
    ref = [torch.nn.Linear(4, 4) for _ in range(n)]
    for m, r in zip(mods, ref):
        r.load_state_dict(m.state_dict())
    ws = [ag.spawn(m, name=f"w{i}", optimizer=ag.Optim(torch.optim.SGD, lr=0.1)) for i, m in enumerate(mods)]
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    ropt = torch.optim.SGD([p for r in ref for p in r.parameters()], lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(3, 4), torch.randn(3, 4)
        h, want = x, x
        for w, r in zip(ws, ref):
            h, want = w(h), r(want)
        mse(h, y).backward()
        ag.step()
        ropt.zero_grad()
        torch.nn.functional.mse_loss(want, y).backward()
        ropt.step()
    for w, r in zip(ws, ref):
        for k, v in w.state_dict().items():
            torch.testing.assert_close(v, r.state_dict()[k], atol=1e-6, rtol=1e-6)
    transport = ag.api._current().transport
    return ws, [transport.identity(w.name)["pid"] for w in ws + [mse]]


def test_pooled_processes_serve_the_next_runtime_exactly_and_a_killed_one_is_not_reused(ray_session, monkeypatch):
    from actorgrad.transport.startup import POOL_ENV

    ray_session()
    monkeypatch.setenv(POOL_ENV, "1")
    ag.init(backend="ray", timeout=60)
    try:
        ws, first = _train_chain(2, seed=0)
        assert len(set(first)) == 3  # still one process per worker
        ag.api._current().transport.kill("w1")  # a killed worker's process never goes back to the pool
    finally:
        ag.shutdown()
    ag.init(backend="ray", timeout=60)
    try:
        # Same worker names, other weights, a new channel secret: the survivors serve it, exactly.
        _, second = _train_chain(3, seed=1)
        assert len(set(second)) == 4
        reused = set(second) & set(first)
        assert reused == {first[0], first[2]}, (first, second)
        # A worker that cannot start in a pooled process is named with its own error, as in its own process.
        ag.spawn(BadStart(), name="bad")
        with pytest.raises(E.WorkerDied) as info:
            ag.ready(progress=False)
        assert info.value.worker == "bad"
        assert "could not start" in str(info.value) and "weights file missing" in str(info.value)
    finally:
        ag.shutdown()
    monkeypatch.delenv(POOL_ENV)
    ag.init(backend="ray", timeout=60)
    try:
        _, third = _train_chain(1, seed=2, steps=1)
        assert not set(third) & set(second)  # off (the default): processes of its own
    finally:
        ag.shutdown()


def test_only_plain_cpu_workers_go_to_the_process_pool():
    from types import SimpleNamespace

    from actorgrad.transport.ray import RayTransport

    t = object.__new__(RayTransport)
    t.reuse, t.workers_per_process = True, 1
    cpu, cuda = SimpleNamespace(device=None), SimpleNamespace(device="cuda:0")
    assert t._poolable(cpu, {}) and t._poolable(SimpleNamespace(device="cpu"), {})
    assert not t._poolable(cuda, {})  # its process would keep the device memory torch cached
    for option in ({"num_cpus": 1}, {"num_gpus": 1}, {"resources": {"x": 1}}, {"max_restarts": 1}, {"replicas": 2},
                   {"placement_group": object()}):
        assert not t._poolable(cpu, option), option
    t.workers_per_process = 2
    assert not t._poolable(cpu, {})
    t.workers_per_process, t.reuse = 1, False
    assert not t._poolable(cpu, {})


class Sleepy(torch.nn.Module):
    """Sleeps x[0, 0] seconds in its forward, after touching ``marker`` (when given) to say it has begun."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seconds = float(x[0, 0])
        if seconds > 1:
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
        time.sleep(seconds)
        return x * 1


def test_a_pooled_process_still_computing_at_shutdown_is_killed_not_reused(ray_session, monkeypatch, tmp_path):
    from ray.experimental import internal_kv

    from actorgrad.transport.startup import POOL_ENV

    ray_session()
    monkeypatch.setenv(POOL_ENV, "1")
    marker = tmp_path / "started"
    ag.init(backend="ray", timeout=60)
    try:
        sleepy = ag.spawn(Sleepy(str(marker)), name="sleepy")
        idle = ag.spawn(torch.nn.Linear(1, 1), name="idle")
        for _ in range(2):  # measured as expensive: its next forward runs on the worker's compute thread
            sleepy(torch.full((1, 1), 0.05)).value()
        idle(torch.ones(1, 1)).value()
        transport = ag.api._current().transport
        namespace = transport.namespace
        busy_pid, idle_pid = (transport.identity(n)["pid"] for n in ("sleepy", "idle"))
        sleepy(torch.full((1, 1), 30.0))
        deadline = time.monotonic() + 60
        while not marker.exists():  # its forward has begun
            assert time.monotonic() < deadline, "the long forward never started"
            time.sleep(0.05)
    finally:
        ag.shutdown()
    wait_process_gone(busy_pid)  # killed, not kept computing in the pool
    # The runtime's lookup entries are gone with it (a sweep on a long-lived cluster would pile them up).
    assert internal_kv._internal_kv_get(f"{namespace}/sleepy", namespace="actorgrad") is None
    assert internal_kv._internal_kv_get(f"{namespace}/idle", namespace="actorgrad") is None
    assert not _process_gone(idle_pid)  # the idle one went back to the pool
