"""Replicated workers (issue 15): one module in n workers, gradients summed at step close, exact.

A 3-stage model whose middle stage runs in 2 or 3 replicas, 4 micro-batches per step, Adam, must
equal plain PyTorch (the sum of the 4 micro-batch losses, one optimizer step) after 10 steps on
both backends, with every replica holding bit-identical parameters. Checkpoints of a replicated
worker load into any replica count; a killed replica is recovered like any worker and
``ag.train`` replays exactly. Replicas on different nodes are in tests/test_cluster.py.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import actorgrad as ag
from actorgrad import errors as E
from actorgrad.api import _current

from test_recovery import Crashy

ATOL = 1e-5
MICRO = 4


def stages(seed: int = 0, mid=None):
    torch.manual_seed(seed)
    first = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    middle = mid() if mid is not None else nn.Sequential(nn.Linear(16, 16), nn.GELU())
    last = nn.Linear(16, 2)
    return first, middle, last


def micro_batches(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 2, generator=g)) for _ in range(MICRO)]


def spawn_model(mods, replicas: int, **kw):
    opt = ag.Optim(torch.optim.Adam, lr=1e-2)
    first = ag.spawn(copy.deepcopy(mods[0]), name="first", optimizer=opt)
    mid = ag.spawn(copy.deepcopy(mods[1]), name="mid", optimizer=opt, replicas=replicas, **kw)
    last = ag.spawn(copy.deepcopy(mods[2]), name="last", optimizer=opt)
    mse = ag.spawn(nn.MSELoss(), name="mse")

    def step_fn(s: int) -> None:
        for x, y in micro_batches(s):
            mse(last(mid(first(x))), y).backward()

    return (first, mid, last), step_fn


def plain_run(mods, steps: int):
    mods = [copy.deepcopy(m) for m in mods]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in mods]
    for s in range(1, steps + 1):
        for x, y in micro_batches(s):
            nn.functional.mse_loss(mods[2](mods[1](mods[0](x))), y).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    return mods


def assert_same(workers, mods) -> None:
    for w, m in zip(workers, mods):
        got = w.state_dict()
        for k, v in m.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=ATOL, rtol=ATOL, msg=lambda s: f"{w.name}.{k}: {s}")


def assert_replicas_identical(name: str) -> None:
    rt = _current()
    members = rt.replicas[name]
    states = [rt.get_state(m, "full", None) for m in members]
    for m, st in zip(members[1:], states[1:]):
        for k, v in states[0]["module"].items():
            assert torch.equal(st["module"][k], v), f"{m}.{k} differs from {members[0]}"
        assert st["version"] == states[0]["version"]


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicated_stage_trains_exactly_as_one_module(backend, replicas):
    mods = stages()
    workers, step_fn = spawn_model(mods, replicas)
    for s in range(1, 11):
        step_fn(s)
        report = ag.step()
    members = _current().replicas["mid"]
    assert len(members) == replicas and members[0] == "mid"
    # One row for the worker (all 4 calls), one per replica: each ran its share and applied the update.
    row = report.workers["mid"]
    assert row.calls == MICRO and row.applied and set(report.workers) == {"first", "mid", "last", "mse"}
    assert [r.name for r in row.replicas] == [f"mid[{i}]" for i in range(replicas)]
    assert [r.calls for r in row.replicas] == [len(range(i, MICRO, replicas)) for i in range(replicas)]
    assert all(r.applied and r.version == row.version for r in row.replicas)
    assert "mid[1]" in str(report)
    assert_same(workers, plain_run(mods, 10))
    assert_replicas_identical("mid")
    assert f"replicas={replicas}" in repr(workers[1])


def test_a_step_that_uses_fewer_calls_than_replicas_still_agrees(local):
    mods = stages(1)
    workers, _ = spawn_model(mods, 3)
    first, mid, last = workers
    plain = [copy.deepcopy(m) for m in mods]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in plain]
    x, y = torch.randn(3, 6), torch.randn(3, 2)
    for _ in range(3):  # one call per step: two replicas only take part in the update
        ((last(mid(first(x))) - y) ** 2).mean().backward()
        ag.step()
        (nn.functional.mse_loss(plain[2](plain[1](plain[0](x))), y)).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    assert_same(workers, plain)
    assert_replicas_identical("mid")


def test_checkpoint_of_replicas_loads_into_another_replica_count(local, tmp_path):
    mods = stages(2)
    workers, step_fn = spawn_model(mods, 3)
    for s in range(1, 4):
        step_fn(s)
        ag.step()
    ag.save(str(tmp_path / "ckpt"))
    want = {w.name: w.state_dict() for w in workers}
    ag.shutdown()
    for replicas in (2, 1):
        ag.init(backend="local")
        workers2, step_fn2 = spawn_model(stages(99), replicas)  # other weights: the checkpoint overwrites them
        ag.load(str(tmp_path / "ckpt"))
        for w in workers2:
            for k, v in want[w.name].items():
                torch.testing.assert_close(w.state_dict()[k], v, atol=0, rtol=0)
        for s in range(4, 7):  # and training goes on exactly, Adam state included
            step_fn2(s)
            ag.step()
        assert_same(workers2, plain_run(mods, 6))
        if replicas > 1:
            assert_replicas_identical("mid")
        ag.shutdown()
    ag.init(backend="local")


def test_replicas_refuse_rules_that_cannot_agree(local):
    with pytest.raises(E.ConfigError, match="update='pass'"):
        ag.spawn(nn.Linear(2, 2), optimizer=ag.Optim(torch.optim.SGD, lr=0.1), update="pass", replicas=2)
    with pytest.raises(E.ConfigError, match="max_staleness"):
        ag.spawn(nn.Linear(2, 2), optimizer=ag.Optim(torch.optim.SGD, lr=0.1), max_staleness=1, replicas=2)
    with pytest.raises(E.ConfigError, match="replicas must be"):
        ag.spawn(nn.Linear(2, 2), replicas=0)
    with pytest.raises(E.ConfigError, match="replica_placement"):
        ag.spawn(nn.Linear(2, 2), replicas=2, replica_placement="everywhere")
    w = ag.spawn(nn.Linear(2, 2), name="ok", optimizer=ag.Optim(torch.optim.SGD, lr=0.1), replicas=2)
    w(torch.ones(1, 2)).sum().backward()
    ag.step()


class FailsOnSecond(nn.Module):
    """Raises on its second call in a step, which the round robin gives to replica 1."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        if float(x.sum()) > 100:
            raise RuntimeError("this input is refused")
        return self.lin(x)


def test_a_forward_failing_on_one_replica_aborts_the_step_everywhere(local):
    w = ag.spawn(FailsOnSecond(), name="f", optimizer=ag.Optim(torch.optim.SGD, lr=0.1), replicas=2)
    before = w.state_dict()
    w(torch.ones(2, 3)).sum().backward()
    with pytest.raises(E.WorkerError, match="refused") as info:
        w(torch.full((2, 3), 50.0)).sum().backward()
        ag.step()
    assert info.value.worker == "f[1]"
    for k, v in w.state_dict().items():
        assert torch.equal(v, before[k])  # the step applied nothing, on any replica
    assert_replicas_identical("f")
    w(torch.ones(2, 3)).sum().backward()
    ag.step()
    assert_replicas_identical("f")


@pytest.fixture
def recovering(ray_session, tmp_path):
    ray_session()
    ag.init(backend="ray", timeout=60, recover=True, checkpoint_every=3, checkpoint_dir=str(tmp_path / "ckpt"))
    yield tmp_path
    ag.shutdown()


def test_a_killed_replica_recovers_and_train_replays_exactly(recovering):
    marker = str(recovering / "die")
    mods = stages(3, mid=lambda: Crashy(16, 16, marker, "forward"))
    workers, step_fn = spawn_model(mods, 2)
    died = []

    def fn(s: int) -> None:
        if s == 5 and not died:
            open(marker, "w").close()  # the next forward of a "mid" replica exits its process
            died.append(s)
        step_fn(s)

    reports = ag.train(fn, 7)
    assert died == [5] and not os.path.exists(marker)
    assert [r.step for r in reports] == list(range(1, 8))
    mods_ref = stages(3, mid=lambda: Crashy(16, 16, marker, "nowhere"))
    assert_same(workers, plain_run(mods_ref, 7))
    assert_replicas_identical("mid")


def test_the_graph_draws_a_replicated_worker_once(local):
    mods = stages(4)
    workers, step_fn = spawn_model(mods, 2)
    step_fn(1)
    ag.step()
    dot = ag.graph()
    # One node for the replicated worker, with every call of its replicas, and one edge in and out.
    assert dot.count('"mid" [shape=plain') == 1 and "<B>mid</B>" in dot and "mid[1]" not in dot
    assert '"first" -> "mid" [label="4 calls' in dot and '"mid" -> "last" [label="4 calls' in dot
