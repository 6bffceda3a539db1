"""Behaviour of the public API on both backends (docs/design.md, "Semantics").

detach, no_grad, outputs that no pass needs, workers without gradients, state
dicts, multi-seed and explicit-gradient backward, worker names, node values
after a step, and the StepReport. PyTorch is the oracle wherever numbers are
compared.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import actorgrad as ag

ATOL = RTOL = 1e-5
B, D = 6, 4


class TwoOut(nn.Module):
    """A module with two outputs."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return torch.tanh(h[:, :D]), h[:, D:]


def close(a, b, msg: str = "") -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=(lambda m: f"{msg}: {m}") if msg else None)


def state_equal(worker: ag.Worker, module: nn.Module, msg: str = "") -> None:
    got, want = worker.state_dict(), module.state_dict()
    assert set(got) == set(want), msg
    for k in want:
        close(got[k], want[k], f"{msg} {worker.name}.{k}")


def snapshot(worker: ag.Worker) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in worker.state_dict().items()}


def unchanged(worker: ag.Worker, before: dict[str, torch.Tensor]) -> bool:
    after = worker.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def sgd(lr: float = 0.1, **kw) -> ag.Optim:
    return ag.Optim(torch.optim.SGD, lr=lr, **kw)


# --- detach ----------------------------------------------------------------------------


def test_detach_stops_gradient_at_the_edge(backend):
    torch.manual_seed(1)
    enc_m, head_m = nn.Linear(D, D), nn.Linear(D, 1)
    o_enc, o_head = copy.deepcopy(enc_m), copy.deepcopy(head_m)
    enc = ag.spawn(enc_m, name="enc", optimizer=sgd(momentum=0.9))
    head = ag.spawn(head_m, name="head", optimizer=sgd())
    mse = ag.spawn(nn.MSELoss(), name="mse")
    enc_before = snapshot(enc)

    x, y = torch.randn(B, D), torch.randn(B, 1)
    h = enc(x)
    hd = h.detach()
    assert hd.detached and not h.detached
    loss = mse(head(hd), y)
    loss.backward()
    report = ag.step()

    assert unchanged(enc, enc_before), "the producer of a detached edge must get no gradient"
    assert report.updated == ["head"]
    assert not report.workers["enc"].applied
    # The consumer's own parameters do update, exactly as in PyTorch with h.detach().
    o_opt = torch.optim.SGD(o_head.parameters(), lr=0.1)
    nn.functional.mse_loss(o_head(o_enc(x).detach()), y).backward()
    o_opt.step()
    state_equal(head, o_head)
    state_equal(enc, o_enc)
    close(hd.value(), h.value())


def test_detach_one_edge_of_a_fan_out(backend):
    """A node consumed twice, once through detach: only the attached edge sends gradient back."""
    torch.manual_seed(2)
    mods = [nn.Linear(D, D), nn.Linear(D, 1), nn.Linear(D, 1)]
    oracle = copy.deepcopy(mods)
    enc, ha, hb = (ag.spawn(mod, name=n, optimizer=sgd()) for mod, n in zip(mods, ("enc", "ha", "hb")))
    mse = ag.spawn(nn.MSELoss(), name="mse")
    x, ya, yb = torch.randn(B, D), torch.randn(B, 1), torch.randn(B, 1)
    h = enc(x)
    la, lb = mse(ha(h), ya), mse(hb(h.detach()), yb)
    la.backward()
    lb.backward()
    ag.step()

    opts = [torch.optim.SGD(o.parameters(), lr=0.1) for o in oracle]
    oh = oracle[0](x)
    (nn.functional.mse_loss(oracle[1](oh), ya) + nn.functional.mse_loss(oracle[2](oh.detach()), yb)).backward()
    for o in opts:
        o.step()
    for w, o in zip((enc, ha, hb), oracle):
        state_equal(w, o)


# --- no_grad ---------------------------------------------------------------------------


def test_no_grad_saves_nothing(backend):
    torch.manual_seed(3)
    lin_m = nn.Linear(D, 2)
    oracle = copy.deepcopy(lin_m)
    lin = ag.spawn(lin_m, name="lin", optimizer=sgd())
    act = ag.spawn(nn.Tanh(), name="act")
    mse = ag.spawn(nn.MSELoss(), name="mse")
    before = snapshot(lin)
    x, y = torch.randn(B, D), torch.randn(B, 2)

    with ag.no_grad():
        out = act(lin(x))
        loss = mse(out, y)
    with torch.no_grad():
        want_out = torch.tanh(oracle(x))
    close(out.value(), want_out, "value under no_grad")
    close(torch.tensor(loss.item()), nn.functional.mse_loss(want_out, y), "loss under no_grad")
    with pytest.raises(ag.errors.ConfigError):
        loss.backward()
    with pytest.raises(ag.errors.ConfigError):
        out.backward(gradient=torch.ones(B, 2))
    report = ag.step()  # the error left the step and every worker usable
    assert report.updated == []
    assert unchanged(lin, before)

    # Outside the block, calls save again and train exactly as PyTorch.
    loss = mse(act(lin(x)), y)
    loss.backward()
    ag.step()
    opt = torch.optim.SGD(oracle.parameters(), lr=0.1)
    nn.functional.mse_loss(torch.tanh(oracle(x)), y).backward()
    opt.step()
    state_equal(lin, oracle)


def test_no_grad_input_is_a_constant_for_later_calls(backend):
    """A node made under no_grad, used by a call outside it: that edge carries no gradient."""
    torch.manual_seed(4)
    enc_m, head_m = nn.Linear(D, D), nn.Linear(D, 1)
    o_head = copy.deepcopy(head_m)
    enc = ag.spawn(enc_m, name="enc", optimizer=sgd())
    head = ag.spawn(head_m, name="head", optimizer=sgd())
    mse = ag.spawn(nn.MSELoss(), name="mse")
    before = snapshot(enc)
    x, y = torch.randn(B, D), torch.randn(B, 1)
    with ag.no_grad():
        h = enc(x)
    loss = mse(head(h), y)
    loss.backward()
    report = ag.step()
    assert unchanged(enc, before)
    assert report.updated == ["head"]
    opt = torch.optim.SGD(o_head.parameters(), lr=0.1)
    oh = nn.functional.linear(x, before["weight"], before["bias"])  # a constant, as under no_grad
    nn.functional.mse_loss(o_head(oh), y).backward()
    opt.step()
    state_equal(head, o_head)


# --- outputs no pass needs ---------------------------------------------------------------


def test_output_that_no_pass_needs_blocks_nothing(backend):
    torch.manual_seed(5)
    split_m, head_m, side_m = TwoOut(), nn.Linear(D, 1), nn.Linear(D, D)
    o_split, o_head, o_side = (copy.deepcopy(mod) for mod in (split_m, head_m, side_m))
    split = ag.spawn(split_m, name="split", optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
    head = ag.spawn(head_m, name="head", optimizer=sgd(momentum=0.5))
    side = ag.spawn(side_m, name="side", optimizer=ag.Optim(torch.optim.Adam, lr=0.01, weight_decay=0.1))
    mse = ag.spawn(nn.MSELoss(), name="mse")
    side_before = snapshot(side)
    opts = [torch.optim.Adam(o_split.parameters(), lr=0.01), torch.optim.SGD(o_head.parameters(), lr=0.1, momentum=0.5)]

    for step in range(3):
        x, y = torch.randn(B, D), torch.randn(B, 1)
        a, b = split(x)
        if step == 1:
            side(b)  # output b feeds a worker whose output feeds nothing
        loss = mse(head(a), y)  # only output a reaches a loss
        loss.backward().wait()
        report = ag.step()
        assert report.updated == ["head", "split"]

        for o in opts:
            o.zero_grad(set_to_none=True)
        oa, _ = o_split(x)
        nn.functional.mse_loss(o_head(oa), y).backward()
        for o in opts:
            o.step()
        state_equal(split, o_split, f"step {step}")
        state_equal(head, o_head, f"step {step}")
    assert unchanged(side, side_before)
    state_equal(side, o_side)


# --- no gradient, no optimizer step -----------------------------------------------------


def test_worker_without_gradient_does_not_step_its_optimizer(backend):
    torch.manual_seed(6)
    trunk_m, ha_m, hb_m = nn.Linear(D, D), nn.Linear(D, 1), nn.Linear(D, 1)
    oracle = [copy.deepcopy(mod) for mod in (trunk_m, ha_m, hb_m)]
    recipes = [
        (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
        (torch.optim.SGD, dict(lr=0.1)),
        (torch.optim.Adam, dict(lr=0.05, weight_decay=0.1)),  # momentum and weight decay would move it
    ]
    trunk, ha, hb = (ag.spawn(mod, name=n, optimizer=ag.Optim(c, **kw))
                     for mod, n, (c, kw) in zip((trunk_m, ha_m, hb_m), ("trunk", "ha", "hb"), recipes))
    mse = ag.spawn(nn.MSELoss(), name="mse")
    opts = [c(o.parameters(), **kw) for o, (c, kw) in zip(oracle, recipes)]

    for step in range(4):
        x, ya, yb = torch.randn(B, D), torch.randn(B, 1), torch.randn(B, 1)
        h = trunk(x)
        la, lb = mse(ha(h), ya), mse(hb(h), yb)
        la.backward()
        train_b = step in (0, 2)
        if train_b:
            lb.backward()
        hb_before = snapshot(hb)
        report = ag.step()

        for o in opts:
            o.zero_grad(set_to_none=True)
        oh = oracle[0](x)
        total = nn.functional.mse_loss(oracle[1](oh), ya)
        if train_b:
            total = total + nn.functional.mse_loss(oracle[2](oh), yb)
        total.backward()
        for o in opts:
            o.step()

        assert report.workers["hb"].applied == train_b, f"step {step}"
        assert ("hb" in report.updated) == train_b
        if not train_b:
            assert unchanged(hb, hb_before), f"step {step}: hb received no gradient but its parameters moved"
        for w, o in zip((trunk, ha, hb), oracle):
            state_equal(w, o, f"step {step}")


# --- state dicts ------------------------------------------------------------------------


def test_state_dict_round_trip(backend):
    torch.manual_seed(7)
    mod = nn.Sequential(nn.Linear(D, 3), nn.BatchNorm1d(3))
    oracle = copy.deepcopy(mod)
    w = ag.spawn(mod, name="net", optimizer=sgd())
    sd = w.state_dict()
    want = oracle.state_dict()
    assert list(sd) == list(want)
    for k in want:
        assert torch.equal(sd[k], want[k]), k
        assert sd[k].dtype == want[k].dtype and sd[k].shape == want[k].shape, k

    new = {k: (torch.randn_like(v) if v.is_floating_point() else v + 3) for k, v in want.items()}
    new["1.running_var"] = new["1.running_var"].abs() + 0.5
    w.load_state_dict(new)
    got = w.state_dict()
    for k in new:
        assert torch.equal(got[k], new[k]), k

    # The worker computes and trains with the loaded state, as the PyTorch module does
    # (train mode: the forward also updates the BatchNorm running statistics).
    oracle.load_state_dict(new)
    opt = torch.optim.SGD(oracle.parameters(), lr=0.1)
    mse = ag.spawn(nn.MSELoss(), name="mse")
    x, y = torch.randn(B, D), torch.randn(B, 3)
    out = w(x)
    mse(out, y).backward()
    ag.step()
    o_out = oracle(x)
    nn.functional.mse_loss(o_out, y).backward()
    opt.step()
    close(out.value(), o_out.detach(), "forward after load_state_dict")
    state_equal(w, oracle, "after a step from the loaded state")


# --- backward variants ------------------------------------------------------------------


def test_backward_with_two_seeds_is_one_pass(backend):
    torch.manual_seed(8)
    mods = [nn.Linear(D, D), nn.Linear(D, 1), nn.Linear(D, 2)]
    oracle = copy.deepcopy(mods)
    names = ("enc", "ha", "hb")
    recipes = [(torch.optim.Adam, dict(lr=0.01)), (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
               (torch.optim.SGD, dict(lr=0.1))]
    ws = [ag.spawn(mod, name=n, optimizer=ag.Optim(c, **kw)) for mod, n, (c, kw) in zip(mods, names, recipes)]
    mse = ag.spawn(nn.MSELoss(), name="mse")
    opts = [c(o.parameters(), **kw) for o, (c, kw) in zip(oracle, recipes)]

    for step in range(3):
        x, ya, yb = torch.randn(B, D), torch.randn(B, 1), torch.randn(B, 2)
        h = ws[0](x)
        l1, l2 = mse(ws[1](h), ya), mse(ws[2](h), yb)
        p = ag.backward(l1, l2)
        assert isinstance(p, ag.Pass)
        p.wait()
        assert p.done()
        report = ag.step()
        assert report.passes == 1

        for o in opts:
            o.zero_grad(set_to_none=True)
        oh = oracle[0](x)
        L1, L2 = nn.functional.mse_loss(oracle[1](oh), ya), nn.functional.mse_loss(oracle[2](oh), yb)
        (L1 + L2).backward()
        for o in opts:
            o.step()
        close(torch.tensor([l1.item(), l2.item()]), torch.tensor([L1.item(), L2.item()]), f"step {step}")
        for w, o in zip(ws, oracle):
            state_equal(w, o, f"step {step}")


def test_backward_with_explicit_gradients(backend):
    """node.backward(gradient=g) for a non-scalar node, and ag.backward(..., gradients=[...])."""
    torch.manual_seed(9)
    mods = [nn.Linear(D, 3), nn.Linear(3, 2)]
    oracle = copy.deepcopy(mods)
    ws = [ag.spawn(mod, name=n, optimizer=sgd(momentum=0.9)) for mod, n in zip(mods, ("l1", "l2"))]
    act = ag.spawn(nn.Tanh(), name="act")
    opts = [torch.optim.SGD(o.parameters(), lr=0.1, momentum=0.9) for o in oracle]

    for step in range(3):
        x = torch.randn(B, D)
        h = act(ws[0](x))
        out = ws[1](h)
        g_out, g_h = torch.randn(B, 2), torch.randn(B, 3)
        if step == 0:
            out.backward(gradient=g_out)
        else:
            ag.backward(out, h, gradients=[g_out, g_h])  # two non-scalar seeds, one pass
        ag.step()

        for o in opts:
            o.zero_grad(set_to_none=True)
        oh = torch.tanh(oracle[0](x))
        oo = oracle[1](oh)
        if step == 0:
            oo.backward(g_out)
        else:
            torch.autograd.backward([oo, oh], [g_out, g_h])
        for o in opts:
            o.step()
        for w, o in zip(ws, oracle):
            state_equal(w, o, f"step {step}")


# --- names ------------------------------------------------------------------------------


def test_default_names_and_duplicates(backend):
    a = ag.spawn(nn.Linear(2, 2))
    t = ag.spawn(nn.Tanh())
    b = ag.spawn(nn.Linear(2, 2))
    named = ag.spawn(nn.Linear(2, 2), name="enc")
    assert named.name == "enc"
    pat = re.compile(r"^(\w+)-(\d+)$")
    ma, mt, mb = pat.match(a.name), pat.match(t.name), pat.match(b.name)
    assert ma and mt and mb, (a.name, t.name, b.name)
    assert ma.group(1) == "Linear" and mb.group(1) == "Linear" and mt.group(1) == "Tanh"
    assert int(ma.group(2)) < int(mb.group(2)), "numbered in spawn order"
    assert len({a.name, t.name, b.name, named.name}) == 4
    assert repr(a)  # printable

    with pytest.raises(ag.errors.ConfigError) as info:
        ag.spawn(nn.Linear(2, 2), name="enc")
    assert "enc" in str(info.value)
    with pytest.raises(ag.errors.ConfigError):
        ag.spawn(nn.Tanh(), name=a.name)
    # The failed spawns leave the runtime usable, and the first "enc" intact.
    c = ag.spawn(nn.Linear(2, 2))
    assert c.name not in {a.name, b.name, t.name, "enc"}
    x = torch.randn(3, 2)
    close(named(x).value(), nn.functional.linear(x, **{k: v for k, v in named.state_dict().items()}))
    if backend == "local":
        assert a.actor is None
    else:
        assert a.actor is not None


# --- values after a step ----------------------------------------------------------------


def test_node_values_after_step(backend):
    torch.manual_seed(10)
    enc_m, head_m = nn.Linear(D, D), nn.Linear(D, 1)
    o_enc, o_head = copy.deepcopy(enc_m), copy.deepcopy(head_m)
    enc = ag.spawn(enc_m, name="enc", optimizer=sgd())
    head = ag.spawn(head_m, name="head", optimizer=sgd())
    mse = ag.spawn(nn.MSELoss(), name="mse")
    x, y = torch.randn(B, D), torch.randn(B, 1)

    h = enc(x)
    pred = head(h)
    loss = mse(pred, y)
    loss.backward()
    ag.step()
    # Fetched only now, after the update: the values of the step's forward (before the update).
    oh = o_enc(x)
    op = o_head(oh)
    oloss = nn.functional.mse_loss(op, y)
    close(torch.tensor(loss.item()), oloss.detach(), "loss.item() after step")
    close(h.value(), oh.detach(), "h.value() after step")
    close(pred.value(), op.detach(), "pred.value() after step")
    assert isinstance(loss.item(), float)

    # The updated weights are what the next step uses.
    opts = [torch.optim.SGD(o.parameters(), lr=0.1) for o in (o_enc, o_head)]
    oloss.backward()
    for o in opts:
        o.step()
    h2 = enc(x)
    close(h2.value(), o_enc(x).detach(), "forward of the next step")


# --- the report -------------------------------------------------------------------------


def test_step_report_lists_updated_workers(backend):
    torch.manual_seed(11)
    enc = ag.spawn(nn.Linear(D, D), name="enc", optimizer=sgd())
    act = ag.spawn(nn.ReLU(), name="act")
    head = ag.spawn(nn.Linear(D, 1), name="head", optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
    unused = ag.spawn(nn.Linear(D, 1), name="unused", optimizer=sgd())  # called, never on a path to a loss
    idle = ag.spawn(nn.Linear(D, 1), name="idle", optimizer=sgd())  # not called at all
    mse = ag.spawn(nn.MSELoss(), name="mse")
    x, y = torch.randn(B, D), torch.randn(B, 1)

    h = act(enc(x))
    unused(h)
    loss = mse(head(h), y)
    loss.backward()
    report = ag.step()
    assert isinstance(report, ag.StepReport)
    assert report.updated == ["enc", "head"]
    for name in ("enc", "head"):
        assert report.workers[name].applied, name
        assert report.workers[name].name == name
    for name in ("act", "mse", "unused"):
        assert name in report.workers and not report.workers[name].applied, name
    assert "idle" not in report.updated
    assert report.workers["enc"].calls == 1
    assert report.workers["unused"].calls == 1
    assert report.passes == 1
    assert str(report)

    # The next step's report counts that step only.
    loss = mse(head(act(enc(x))), y)
    loss.backward()
    h2 = act(enc(x))
    loss2 = mse(head(h2), y)
    loss2.backward()
    report2 = ag.step()
    assert report2.step > report.step
    assert report2.updated == ["enc", "head"]
    assert report2.workers["enc"].calls == 2
    assert report2.passes == 2
    report3 = ag.step()  # an empty step updates nothing
    assert report3.updated == []


def test_step_report_lists_update_pass_workers(backend):
    """A worker with update="pass" that applied its updates during the step is listed as updated."""
    torch.manual_seed(12)
    trunk = ag.spawn(nn.Linear(D, D), name="trunk", optimizer=sgd(), update="pass")
    head = ag.spawn(nn.Linear(D, 1), name="head", optimizer=sgd())
    mse = ag.spawn(nn.MSELoss(), name="mse")
    before = snapshot(trunk)
    x, y = torch.randn(B, D), torch.randn(B, 1)
    mse(head(trunk(x)), y).backward().wait()
    report = ag.step()
    assert not unchanged(trunk, before)  # it did update, during the pass
    assert report.updated == ["head", "trunk"], report.workers
    assert report.workers["trunk"].applied
