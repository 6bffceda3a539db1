"""Per-worker LR schedules, gradient clipping and update metrics: equal to plain PyTorch, per module."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.optim import lr_scheduler as L

import actorgrad as ag
from actorgrad import errors as E


def warmup(step: int) -> float:
    """A LambdaLR factor (top level, so that Ray workers can unpickle it)."""
    return min(1.0, (step + 1) / 3) * 0.9 ** step


def zeros_sched(opt):
    """A 'schedule' callable that returns something else."""
    return 3


class Dense(torch.nn.Module):
    """Linear then tanh: one worker of a chain."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def close(got, ref):
    """Assert that a worker's state_dict equals a reference module's to 1e-5."""
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5)


def data(steps, d_in, d_out, seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)) for _ in range(steps)]


def run_chain(workers, mse, batches):
    """Train the chain of workers on the batches; return the reports."""
    reports = []
    for x, y in batches:
        h = x
        for w in workers:
            h = w(h)
        mse(h, y).backward()
        reports.append(ag.step())
    return reports


def test_schedules_equal_plain_pytorch_per_module(backend):
    torch.manual_seed(0)
    mods = [Dense(4, 6), Dense(6, 5), Dense(5, 3), Dense(3, 2)]
    optims = [
        ag.Optim(torch.optim.SGD, lr=0.1, schedule=ag.Schedule(L.StepLR, step_size=2, gamma=0.5)),
        ag.Optim(torch.optim.SGD, lr=0.05, momentum=0.9, schedule=ag.Schedule(L.LambdaLR, lr_lambda=warmup)),
        ag.Optim(torch.optim.Adam, lr=0.01, schedule=ag.Schedule(L.OneCycleLR, max_lr=0.05, total_steps=8)),
        # Nested recipes are built over the same optimizer (SequentialLR needs its schedulers built first).
        ag.Optim(torch.optim.SGD, lr=0.2, schedule=ag.Schedule(
            L.SequentialLR, schedulers=[ag.Schedule(L.LinearLR, start_factor=0.25, total_iters=2),
                                        ag.Schedule(L.ExponentialLR, gamma=0.7)], milestones=[2])),
    ]
    workers = [ag.spawn(copy.deepcopy(m), name=f"w{i}", optimizer=o) for i, (m, o) in enumerate(zip(mods, optims))]
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")

    refs = [copy.deepcopy(m) for m in mods]
    opts = [torch.optim.SGD(refs[0].parameters(), lr=0.1),
            torch.optim.SGD(refs[1].parameters(), lr=0.05, momentum=0.9),
            torch.optim.Adam(refs[2].parameters(), lr=0.01), torch.optim.SGD(refs[3].parameters(), lr=0.2)]
    scheds = [L.StepLR(opts[0], step_size=2, gamma=0.5), L.LambdaLR(opts[1], lr_lambda=warmup),
              L.OneCycleLR(opts[2], max_lr=0.05, total_steps=8),
              L.SequentialLR(opts[3], [L.LinearLR(opts[3], start_factor=0.25, total_iters=2),
                                       L.ExponentialLR(opts[3], gamma=0.7)], milestones=[2])]
    for x, y in data(6, 4, 2):
        report = run_chain(workers, mse, [(x, y)])[0]
        h = x
        for r in refs:
            h = r(h)
        torch.nn.functional.mse_loss(h, y).backward()
        for i, (o, s) in enumerate(zip(opts, scheds)):
            # The report's lr is the one the step's update used.
            assert report.workers[f"w{i}"].lr == pytest.approx(o.param_groups[0]["lr"], rel=1e-12)
            o.step()
            s.step()
            o.zero_grad()
        for w, r in zip(workers, refs):
            close(w.state_dict(), r)


def test_clipping_equals_plain_pytorch_clip_per_module(backend):
    torch.manual_seed(1)
    mods = [torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), torch.nn.Linear(3, 2)]
    optims = [ag.Optim(torch.optim.SGD, lr=0.1, clip_grad_norm=0.05),
              ag.Optim(torch.optim.SGD, lr=0.1, momentum=0.9, clip_grad_value=0.02),
              ag.Optim(torch.optim.Adam, lr=0.01, clip_grad_norm=1e4)]  # never reached: no clipping
    workers = [ag.spawn(copy.deepcopy(m), name=f"c{i}", optimizer=o) for i, (m, o) in enumerate(zip(mods, optims))]
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    refs = [copy.deepcopy(m) for m in mods]
    opts = [torch.optim.SGD(refs[0].parameters(), lr=0.1),
            torch.optim.SGD(refs[1].parameters(), lr=0.1, momentum=0.9),
            torch.optim.Adam(refs[2].parameters(), lr=0.01)]
    for x, y in data(4, 4, 2, seed=2):
        report = run_chain(workers, mse, [(x, y)])[0]
        h = x
        for r in refs:
            h = r(h)
        torch.nn.functional.mse_loss(h, y).backward()
        big = max(float(p.grad.abs().max()) for p in refs[1].parameters())
        total0 = float(torch.nn.utils.clip_grad_norm_(refs[0].parameters(), 0.05))
        torch.nn.utils.clip_grad_value_(refs[1].parameters(), 0.02)
        total2 = float(torch.nn.utils.clip_grad_norm_(refs[2].parameters(), 1e4))
        for o in opts:
            o.step()
            o.zero_grad()
        r0, r1, r2 = (report.workers[f"c{i}"] for i in range(3))
        assert r0.grad_norm == pytest.approx(total0, rel=1e-5) and r0.clipped == (total0 > 0.05)
        assert r1.clipped == (big > 0.02)
        assert r2.grad_norm == pytest.approx(total2, rel=1e-5) and not r2.clipped
        for w, r in zip(workers, refs):
            close(w.state_dict(), r)
    assert r0.clipped and r1.clipped  # the thresholds were chosen to bite


def flat_norm(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(a[k] - b[k])) ** 2 for k in a))


def test_metrics_grad_norm_update_norm_and_staleness(backend):
    torch.manual_seed(2)
    lin_a, lin_b, lin_p = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2), torch.nn.Linear(3, 2)
    a = ag.spawn(copy.deepcopy(lin_a), name="a", optimizer=ag.Optim(
        torch.optim.SGD, lr=0.1, momentum=0.9, track_update_norm=True))
    act = ag.spawn(torch.nn.Tanh(), name="act")
    b = ag.spawn(copy.deepcopy(lin_b), name="b", optimizer=ag.Optim(torch.optim.Adam, lr=0.01, track_update_norm=True))
    # update="pass", called twice on constants: two passes, two updates, the second one behind by one.
    p = ag.spawn(copy.deepcopy(lin_p), name="p", update="pass",
                 optimizer=ag.Optim(torch.optim.SGD, lr=0.1, track_update_norm=True))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
        x1, x2, y2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
        before = {w.name: w.state_dict() for w in (a, b, p)}
        # The gradients plain PyTorch computes at the same weights, per module.
        ra, rb = copy.deepcopy(lin_a), copy.deepcopy(lin_b)
        ra.load_state_dict(before["a"])
        rb.load_state_dict(before["b"])
        torch.nn.functional.mse_loss(rb(torch.tanh(ra(x))), y).backward()
        # p's second update: the gradient of its second call, at the weights both forwards used.
        rp = copy.deepcopy(lin_p)
        rp.load_state_dict(before["p"])
        torch.nn.functional.mse_loss(rp(x2), y2).backward()
        second_pass_norm = math.sqrt(sum(float(q.grad.norm()) ** 2 for q in rp.parameters()))

        mse(b(act(a(x))), y).backward()
        out1, out2 = p(x1), p(x2)
        mse(out1, y2).backward()
        mse(out2, y2).backward()
        report = ag.step()
        after = {w.name: w.state_dict() for w in (a, b, p)}
        for name, ref in (("a", ra), ("b", rb)):
            rep = report.workers[name]
            want = math.sqrt(sum(float(q.grad.norm()) ** 2 for q in ref.parameters()))
            assert rep.grad_norm == pytest.approx(want, rel=1e-5)
            assert rep.update_norm == pytest.approx(flat_norm(after[name], before[name]), rel=1e-4, abs=1e-7)
            assert rep.update_norm > 0 and rep.staleness == 0 and rep.updates == 1 and not rep.clipped
        rp_ = report.workers["p"]
        assert rp_.updates == 2 and rp_.passes == 2 and rp_.staleness == 1, rp_
        assert rp_.grad_norm == pytest.approx(second_pass_norm, rel=1e-5)
        assert rp_.update_norm == pytest.approx(flat_norm(after["p"], before["p"]), rel=1e-4, abs=1e-7)
        r_act = report.workers["act"]
        assert r_act.updates == 0 and r_act.staleness is None and r_act.lr is None and r_act.update_norm is None
    text = str(report)
    assert "update_norm" in text and "staleness" in text and all(n in text for n in ("a", "act", "b", "p", "mse"))
    assert report.to_dict()["workers"]["a"]["update_norm"] == report.workers["a"].update_norm


def even_steps(ctx) -> bool:
    """A custom update rule: apply at the close of even steps only (odd steps' gradients are dropped)."""
    return ctx.event == "close" and ctx.step % 2 == 0


def test_callable_rule_updates_clip_and_step_the_schedule(backend):
    torch.manual_seed(6)
    lin = torch.nn.Linear(3, 2)
    w = ag.spawn(copy.deepcopy(lin), name="w", update=even_steps, optimizer=ag.Optim(
        torch.optim.SGD, lr=0.2, clip_grad_norm=0.1, track_update_norm=True,
        schedule=ag.Schedule(L.ExponentialLR, gamma=0.5)))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    ref = copy.deepcopy(lin)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    sched = L.ExponentialLR(opt, gamma=0.5)
    for step, (x, y) in enumerate(data(4, 3, 2, seed=8), start=1):
        before = w.state_dict()
        report = run_chain([w], mse, [(x, y)])[0].workers["w"]
        if step % 2 == 0:
            torch.nn.functional.mse_loss(ref(x), y).backward()
            total = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1))
            assert report.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
            opt.step()
            sched.step()
            opt.zero_grad()
            assert report.updates == 1 and report.clipped and report.grad_norm == pytest.approx(total, rel=1e-5)
            assert report.update_norm == pytest.approx(flat_norm(w.state_dict(), before), rel=1e-4)
        else:
            assert report.updates == 0 and report.update_norm is None and not report.applied
        close(w.state_dict(), ref)


def test_staleness_is_k_in_a_full_pipeline(backend):
    torch.manual_seed(4)
    k, d, steps = 2, 4, 6
    s0 = ag.spawn(Dense(d, d), name="s0", max_staleness=k,
                  optimizer=ag.Optim(torch.optim.SGD, lr=0.05, track_update_norm=True))
    s1 = ag.spawn(Dense(d, d), name="s1", max_staleness=k, optimizer=ag.Optim(torch.optim.SGD, lr=0.05))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse", max_staleness=k)
    handles = []
    for x, y in data(steps, d, d, seed=5):
        mse(s1(s0(x)), y).backward()
        handles.append(ag.step(wait=False))
    reports = [h.wait() for h in handles]
    # Step s's forward used the weights after step s-1-k; its update lands on those after step s-1.
    expected = [min(k, s - 1) for s in range(1, steps + 1)]
    assert [r.workers["s0"].staleness for r in reports] == expected
    assert [r.workers["s1"].staleness for r in reports] == expected
    assert all(r.workers["s0"].update_norm is not None and r.workers["s0"].update_norm > 0 for r in reports)
    assert all(r.workers["s1"].update_norm is None for r in reports)


def build_scheduled(seed):
    torch.manual_seed(seed)
    a = ag.spawn(torch.nn.Linear(4, 5), name="a", optimizer=ag.Optim(
        torch.optim.SGD, lr=0.1, momentum=0.9, schedule=ag.Schedule(L.StepLR, step_size=2, gamma=0.5)))
    # max_staleness=1: forwards run on the weights one step back (also with ag.step() waiting), which
    # a checkpoint keeps, along with how many updates back they are.
    b = ag.spawn(torch.nn.Linear(5, 2), name="b", max_staleness=1, optimizer=ag.Optim(
        torch.optim.Adam, lr=0.01, schedule=ag.Schedule(L.OneCycleLR, max_lr=0.05, total_steps=10)))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    return [a, b], mse


def test_save_load_resumes_the_schedule_exactly(backend, tmp_path):
    workers, mse = build_scheduled(0)
    run_chain(workers, mse, data(3, 4, 2, seed=6))
    ag.save(str(tmp_path / "ckpt"))
    later = data(4, 4, 2, seed=7)
    expected_reports = run_chain(workers, mse, later)
    expected = {w.name: w.state_dict() for w in workers}

    ag.shutdown()
    ag.init(backend=backend, timeout=60)
    workers, mse = build_scheduled(99)  # fresh workers and schedules: everything must come from the checkpoint
    ag.load(str(tmp_path / "ckpt"))
    reports = run_chain(workers, mse, later)
    for w in workers:
        got = w.state_dict()
        for k, v in expected[w.name].items():
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-6)
    for r, e in zip(reports, expected_reports):
        for name in ("a", "b"):
            assert r.workers[name].lr == pytest.approx(e.workers[name].lr, rel=1e-12)
            assert r.workers[name].staleness == e.workers[name].staleness == (1 if name == "b" else 0)


@pytest.mark.parametrize("kwargs, words", [
    ({"schedule": ag.Schedule(torch.nn.Linear, in_features=2, out_features=2)}, "LRScheduler"),
    ({"schedule": L.StepLR}, "ag.Schedule"),
    ({"schedule": ag.Schedule(L.StepLR)}, "could not be built"),
    ({"schedule": ag.Schedule(zeros_sched)}, "returned int"),
    ({"schedule": ag.Schedule(L.ReduceLROnPlateau)}, "ReduceLROnPlateau"),
    ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
    ({"clip_grad_value": 0}, "clip_grad_value"),
    ({"clip_grad_norm": "1"}, "clip_grad_norm"),
    ({"clip_grad_norm": 1.0, "clip_grad_value": 1.0}, "not both"),
])
def test_bad_schedule_or_clip_is_a_config_error_naming_the_worker(local, kwargs, words):
    with pytest.raises(E.ConfigError) as info:
        ag.spawn(torch.nn.Linear(2, 2), name="lin", optimizer=ag.Optim(torch.optim.SGD, lr=0.1, **kwargs))
    assert info.value.worker == "lin" and "lin" in str(info.value) and words in str(info.value)
    # Nothing was spawned: the name is still free, and the runtime works.
    w = ag.spawn(torch.nn.Linear(2, 2), name="lin", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    w(torch.randn(1, 2)).value()
