"""Concurrency: overlapping passes (seen in the trace), pipelined steps with weight stashing, memory."""

from __future__ import annotations

import copy
import time

import pytest
import torch

import actorgrad as ag
from actorgrad.trace import load_spans


class SleepGrad(torch.autograd.Function):
    """Identity whose backward sleeps: a branch with a slow backward and no CPU use."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(0.4)
        return g


class SlowBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, h):
        return self.lin(SleepGrad.apply(h))


def test_independent_passes_overlap_in_the_trace(backend, tmp_path):
    trunk = ag.spawn(torch.nn.Linear(3, 4), name="trunk", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    a = ag.spawn(SlowBranch(), name="branch_a", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    b = ag.spawn(SlowBranch(), name="branch_b", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    h = trunk(x)
    mse(a(h), y).value(), mse(b(h), y).value()  # warm: first calls learn output structure
    ag.step()
    path = str(tmp_path / "overlap.json")
    with ag.trace(path):
        h = trunk(x)
        la, lb = mse(a(h), y), mse(b(h), y)
        la.backward()
        lb.backward()
        report = ag.step()
    assert report.workers["trunk"].passes == 2 and "trunk" in report.updated
    spans = load_spans(path)
    back = {name: [s for s in spans[name] if s["cat"] == "backward"] for name in ("branch_a", "branch_b", "trunk")}
    assert len(back["branch_a"]) == 1 and len(back["branch_b"]) == 1 and len(back["trunk"]) == 2
    sa, sb = back["branch_a"][0], back["branch_b"][0]
    overlap = min(sa["ts"] + sa["dur"], sb["ts"] + sb["dur"]) - max(sa["ts"], sb["ts"])
    # Both branch backwards sleep 0.4 s; run one after the other they would not overlap at all.
    assert overlap > 0.5 * min(sa["dur"], sb["dur"]), (sa, sb)
    updates = [s for s in spans["trunk"] if s["cat"] == "update"]
    assert len(updates) == 1  # the trunk got both passes and updated once


class Stage(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _oracle_stale(stages, opt_fn, data, k, lr):
    """Replay: step s's gradient is taken at the weights after step s-1-k, then applied in order."""
    models = [copy.deepcopy(s) for s in stages]
    opts = [opt_fn(mdl.parameters()) for mdl in models]
    hist = [[copy.deepcopy(mdl.state_dict()) for mdl in models]]  # hist[j]: weights after step j
    for s, micro in enumerate(data, start=1):
        at = hist[max(0, s - 1 - k)]
        shadow = [copy.deepcopy(mdl) for mdl in models]
        for sh, sd in zip(shadow, at):
            sh.load_state_dict(sd)
        total = 0.0
        for x, y in micro:
            h = x
            for sh in shadow:
                h = sh(h)
            total = total + torch.nn.functional.mse_loss(h, y)
        total.backward()
        for mdl, sh, opt in zip(models, shadow, opts):
            for p, q in zip(mdl.parameters(), sh.parameters()):
                p.grad = q.grad.clone()
            opt.step()
            opt.zero_grad()
        hist.append([copy.deepcopy(mdl.state_dict()) for mdl in models])
    return models


@pytest.mark.parametrize("k", [1, 2])
def test_pipelined_steps_with_staleness_equal_a_replaying_oracle(backend, k):
    torch.manual_seed(3)
    d, lr, steps, micro = 6, 0.05, 6, 3
    stages = [Stage(d) for _ in range(3)]
    opt_fn = lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)  # noqa: E731
    workers = [ag.spawn(copy.deepcopy(s), name=f"stage{i}", optimizer=ag.Optim(torch.optim.SGD, lr=lr, momentum=0.9),
                        max_staleness=k) for i, s in enumerate(stages)]
    mse = ag.spawn(torch.nn.MSELoss(), name="mse", max_staleness=k)
    g = torch.Generator().manual_seed(4)
    data = [[(torch.randn(5, d, generator=g), torch.randn(5, d, generator=g)) for _ in range(micro)]
            for _ in range(steps)]
    handles = []
    for micro_batches in data:
        losses = []
        for x, y in micro_batches:  # micro-batches of one step flow through without waiting
            h = x
            for w in workers:
                h = w(h)
            losses.append(mse(h, y))
        for loss in losses:
            loss.backward()
        handles.append(ag.step(wait=False))  # the next step's forward starts at once
    reports = [h.wait() for h in handles]
    assert [r.step for r in reports] == list(range(1, steps + 1))
    expected = _oracle_stale(stages, opt_fn, data, k, lr)
    for w, ref in zip(workers, expected):
        got = w.state_dict()
        for name, v in ref.state_dict().items():
            torch.testing.assert_close(got[name], v, atol=1e-5, rtol=1e-5)
    # Drained: no saved activations, no stashed weights beyond the k + 1 snapshots, nothing pending.
    for w in workers + [mse]:
        st = w.stats()
        assert st["calls"] == 0 and st["saved"] == 0 and st["passes"] == 0 and st["open_steps"] == 0, st
        assert st["stashed_versions"] == 0 and st["snapshots"] <= k + 1 and st["early_messages"] == 0, st


def test_staleness_zero_pipelined_steps_stay_exact(backend):
    torch.manual_seed(5)
    d, lr = 4, 0.1
    stages = [Stage(d) for _ in range(2)]
    workers = [ag.spawn(copy.deepcopy(s), optimizer=ag.Optim(torch.optim.Adam, lr=lr)) for s in stages]
    mse = ag.spawn(torch.nn.MSELoss())
    refs = [copy.deepcopy(s) for s in stages]
    opts = [torch.optim.Adam(r.parameters(), lr=lr) for r in refs]
    g = torch.Generator().manual_seed(6)
    for _ in range(4):
        x, y = torch.randn(3, d, generator=g), torch.randn(3, d, generator=g)
        mse(workers[1](workers[0](x)), y).backward()
        ag.step(wait=False)
        torch.nn.functional.mse_loss(refs[1](refs[0](x)), y).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    ag.step()
    for w, r in zip(workers, refs):
        for name, v in r.state_dict().items():
            torch.testing.assert_close(w.state_dict()[name], v, atol=1e-5, rtol=1e-5)


def test_pass_rule_frees_stashed_weights_after_the_step(backend):
    trunk = ag.spawn(torch.nn.Linear(3, 3), name="trunk", optimizer=ag.Optim(torch.optim.SGD, lr=0.1), update="pass")
    mse = ag.spawn(torch.nn.MSELoss())
    for _ in range(3):
        h = trunk(torch.randn(4, 3))
        mse(h, torch.zeros(4, 3)).backward()
        mse(h, torch.ones(4, 3)).backward()
        report = ag.step()
        assert report.workers["trunk"].applied
    st = trunk.stats()
    assert st["stashed_versions"] == 0 and st["saved"] == 0 and st["calls"] == 0
    assert st["version"] == 6  # two updates per step
