"""Recovery: a worker process killed mid-backward or between steps; Ray restarts it, every worker is
restored to the last checkpoint, and the lost steps are replayed: the final parameters equal an
uninterrupted plain-PyTorch run (Adam moments and step counts included)."""

from __future__ import annotations

import os
import time
from typing import Optional

import pytest
import torch

import actorgrad as ag
from actorgrad import errors as E
from conftest import kill_worker

STEPS = 9
EVERY = 3


class Crashy(ag.Module):
    """A Linear layer whose process exits (os._exit) in its forward or backward when a marker file
    exists; the marker is removed first, so the restarted process runs normally."""

    def __init__(self, d_in: int, d_out: int, marker: str, where: str) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)
        self.marker = marker
        self.where = where

    def _maybe_die(self, where: str) -> None:
        if self.where == where and os.path.exists(self.marker):
            os.remove(self.marker)
            os._exit(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._maybe_die("forward")
        return self.lin(x)

    def backward(self, inputs, outputs, grad_outputs):
        self._maybe_die("backward")
        return super().backward(inputs, outputs, grad_outputs)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


def modules(marker: str, where: str):
    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 8)
    mid = Crashy(8, 8, marker, where)
    head = torch.nn.Linear(8, 1)
    return enc, mid, head


def oracle(marker: str) -> list[torch.Tensor]:
    enc, mid, head = modules(marker, "nowhere")
    opts = [torch.optim.SGD(enc.parameters(), lr=0.05, momentum=0.9), torch.optim.Adam(mid.parameters(), lr=0.01),
            torch.optim.Adam(head.parameters(), lr=0.01)]
    for s in range(1, STEPS + 1):
        x, y = batch(s)
        loss = torch.nn.functional.mse_loss(head(torch.tanh(mid(enc(x)))), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    return [p.detach().clone() for m in (enc, mid, head) for p in m.parameters()]


def spawn_all(marker: str, where: str, resources: Optional[dict[str, dict[str, float]]] = None):
    """enc -> mid -> tanh -> head -> MSE as five workers; ``resources`` per worker name (placement)."""
    enc, mid, head = modules(marker, where)
    res = resources or {}
    w_enc = ag.spawn(enc, name="enc", resources=res.get("enc"),
                     optimizer=ag.Optim(torch.optim.SGD, lr=0.05, momentum=0.9))
    w_mid = ag.spawn(mid, name="mid", resources=res.get("mid"), optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
    act = ag.spawn(torch.nn.Tanh(), name="act", resources=res.get("act"))
    w_head = ag.spawn(head, name="head", resources=res.get("head"), optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse", resources=res.get("mse"))

    def step_fn(s: int) -> None:
        x, y = batch(s)
        mse(w_head(act(w_mid(w_enc(x)))), y).backward()

    return (w_enc, w_mid, w_head), step_fn


def params(workers) -> list[torch.Tensor]:
    out = []
    for w in workers:
        sd = w.state_dict()
        out += [sd[k] for k in sd]
    return out


def assert_equal(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.fixture
def recovering(ray_session, tmp_path):
    ray_session()
    ag.init(backend="ray", timeout=60, recover=True, checkpoint_every=EVERY, checkpoint_dir=str(tmp_path / "ckpt"))
    yield tmp_path
    ag.shutdown()


@pytest.mark.parametrize("where", ["backward", "forward"])
def test_kill_mid_step_recovers_exactly(recovering, where):
    marker = str(recovering / "die")
    workers, step_fn = spawn_all(marker, where)
    want = oracle(marker)
    died: list[E.WorkerDied] = []
    s = 1
    while s <= STEPS:
        if s == 5 and not died:
            open(marker, "w").close()  # the next forward/backward of "mid" exits its process
        t0 = time.monotonic()
        try:
            step_fn(s)
            report = ag.step()
        except E.WorkerDied as err:
            assert time.monotonic() - t0 < 60  # within the runtime's deadline
            died.append(err)
            assert err.worker == "mid" and err.step == 5
            assert "mid" in str(err)
            assert err.recovered and err.restored_step == 3 and err.replay == [4, 5]
            s = err.restored_step + 1
            continue
        assert report.step == s
        s += 1
    assert len(died) == 1
    assert not os.path.exists(marker)
    assert_equal(params(workers), want)


def test_kill_between_steps_then_train_replays(recovering):
    marker = str(recovering / "unused")
    workers, step_fn = spawn_all(marker, "nowhere")
    want = oracle(marker)
    head = workers[2]
    killed = []

    def fn(s: int) -> None:
        if s == 8 and not killed:
            # Between steps 7 and 8: Ray restarts the process (max_restarts from ag.init).
            kill_worker(head.actor, no_restart=False)
            killed.append(s)
        step_fn(s)

    reports = ag.train(fn, STEPS)
    assert killed == [8]
    assert [r.step for r in reports] == list(range(1, STEPS + 1))
    assert_equal(params(workers), want)
    # The runtime stays usable after the recovery.
    x, _ = batch(99)
    assert workers[0](x).value().shape == (16, 8)


BIG = 2048  # nn.Linear(2048, 2048): 16 MiB of float32 weights


def big_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)


def big_modules(width: int = BIG):
    torch.manual_seed(0)
    return torch.nn.Linear(4, width), torch.nn.Linear(width, width), torch.nn.Linear(width, 1)


def big_oracle(steps: int, width: int = BIG) -> list[torch.Tensor]:
    mods = big_modules(width)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in mods]
    for s in range(1, steps + 1):
        x, y = big_batch(s)
        loss = torch.nn.functional.mse_loss(mods[2](torch.tanh(mods[1](mods[0](x)))), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    return [p.detach().clone() for m in mods for p in m.parameters()]


def spawn_big(width: int = BIG, resources: Optional[dict[str, dict[str, float]]] = None):
    """enc -> big -> tanh -> head -> MSE, 'big' a width x width Linear (16 MiB at the default)."""
    res = resources or {}
    enc, big, head = big_modules(width)
    opt = ag.Optim(torch.optim.SGD, lr=0.01, momentum=0.9)
    workers = [ag.spawn(m, name=n, optimizer=opt, resources=res.get(n))
               for n, m in (("enc", enc), ("big", big), ("head", head))]
    act = ag.spawn(torch.nn.Tanh(), name="act", resources=res.get("act"))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse", resources=res.get("mse"))

    def step_fn(s: int) -> None:
        x, y = big_batch(s)
        mse(workers[2](act(workers[1](workers[0](x)))), y).backward()

    return workers, step_fn


def test_kill_of_a_16mib_module_recovers_exactly(recovering, caplog):
    """Ray frees a large constructor argument after the start: the restart must not need it."""
    import logging

    caplog.set_level(logging.WARNING, logger="actorgrad")
    steps = 6
    workers, step_fn = spawn_big()
    big = workers[1]
    assert sum(p.numel() * 4 for p in big_modules()[1].parameters()) >= 16 * 2**20
    killed = []

    def fn(s: int) -> None:
        if s == 5 and not killed:
            kill_worker(big.actor, no_restart=False)  # after the checkpoint of step 3: 4 and 5 replay
            killed.append(time.monotonic())
        step_fn(s)

    reports = ag.train(fn, steps)
    assert killed and [r.step for r in reports] == list(range(1, steps + 1))
    assert sum("recovered: every worker restored to step 3" in r.getMessage() for r in caplog.records) == 1
    assert_equal(params(workers), big_oracle(steps))


def test_kill_without_recovery_names_worker_and_others_stay_usable(ray_session):
    ray_session()
    ag.init(backend="ray", timeout=60)
    try:
        workers, step_fn = spawn_all("/nonexistent", "nowhere")
        step_fn(1)
        ag.step()
        kill_worker(workers[2].actor)
        t0 = time.monotonic()
        with pytest.raises(E.WorkerDied) as info:
            step_fn(2)
            ag.step()
        assert time.monotonic() - t0 < 60
        assert info.value.worker == "head" and info.value.step == 2
        assert not info.value.recovered
        x, _ = batch(3)
        assert workers[0](x).value().shape == (16, 8)
    finally:
        ag.shutdown()


def test_recovery_options_are_checked(local):
    with pytest.raises(E.ConfigError, match=r"max_restarts must be an integer .*got -5"):
        ag.spawn(torch.nn.Linear(2, 2), max_restarts=-5)
    rt = ag.init(backend="local")
    with pytest.raises(E.ConfigError, match=r"checkpoint_every must be an integer >= 1, got 0"):
        rt.enable_recovery(checkpoint_every=0)


def test_local_backend_checkpoints_periodically(tmp_path):
    ag.init(backend="local", recover=True, checkpoint_every=2, checkpoint_dir=str(tmp_path), keep_checkpoints=2)
    try:
        workers, step_fn = spawn_all("/nonexistent", "nowhere")
        ag.train(step_fn, 4)
        at_4 = {w.name: w.state_dict() for w in workers}  # the weights right after step 4
        ag.train(step_fn, 5)
        names = sorted(os.listdir(tmp_path))
        # Steps 0 (before the first call), 2 and 4 were checkpointed; the last two are kept.
        assert names == ["step-00000002", "step-00000004"]
        from actorgrad.checkpoint import read_meta

        kept = tmp_path / "step-00000004"
        meta = read_meta(str(kept))
        assert meta["step"] == 4
        files = {w["name"]: w["file"] for w in meta["workers"]}
        assert set(files) == {"enc", "mid", "act", "head", "mse"}
        for name, want in at_4.items():
            state = torch.load(str(kept / files[name]), weights_only=True, map_location="cpu")
            assert state["module"].keys() == want.keys(), name
            for k in want:
                assert torch.equal(state["module"][k], want[k]), (name, k)
        # The weights moved on after step 4, so the comparison above was not of unchanged weights.
        assert not torch.equal(workers[0].state_dict()["weight"], at_4["enc"]["weight"])
    finally:
        ag.shutdown()
