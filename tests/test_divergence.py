"""Ordinary PyTorch programs that must either equal plain PyTorch or fail at once (issue 12).

Tied weights, caller-side torch.no_grad()/autocast, in-place operations on a
worker's input, a forgotten ag.step(), and per-worker random generators.
Plain PyTorch is the oracle wherever numbers are compared.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import pytest
import torch
from torch import nn

import actorgrad as ag
from actorgrad import errors as E

ATOL = RTOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=(lambda m: f"{msg}: {m}") if msg else None)


def sgd(lr: float = 0.1) -> ag.Optim:
    return ag.Optim(torch.optim.SGD, lr=lr)


# --- tied weights ----------------------------------------------------------------------


class Embed(nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


class Head(nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.out = nn.Linear(d, vocab, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(h)


def test_tied_parameter_across_workers_is_refused(backend):
    emb, head = Embed(11, 4), Head(11, 4)
    head.out.weight = emb.emb.weight  # tied, as a language model ties its embedding and output head
    ag.spawn(emb, name="embed", optimizer=sgd())
    with pytest.raises(E.ConfigError) as info:
        ag.spawn(head, name="head", optimizer=sgd())
    err = info.value
    assert err.worker == "head"
    text = str(err)
    assert "'embed'" in text and "out.weight" in text and "emb.weight" in text and "call" in text
    assert "head" not in ag.api._current().workers  # nothing half-spawned


def test_tied_model_in_one_worker_equals_pytorch(backend):
    """The advice of the error works: one worker holding both ends trains as plain PyTorch."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.out = nn.Linear(4, 11, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.emb(ids)))

    torch.manual_seed(3)
    model = LM()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    lm = ag.spawn(model, name="lm", optimizer=sgd(0.5))
    xent = ag.spawn(nn.CrossEntropyLoss(), name="xent")
    for _ in range(3):
        ids, tgt = torch.randint(0, 11, (8,)), torch.randint(0, 11, (8,))
        xent(lm(ids), tgt).backward()
        ag.step()
        opt.zero_grad()
        nn.functional.cross_entropy(ref(ids), tgt).backward()
        opt.step()
    got = lm.state_dict()
    close(got["emb.weight"], ref.emb.weight.detach())
    close(got["out.weight"], ref.out.weight.detach())


def test_shared_buffer_and_same_module_are_refused(backend):
    bn = nn.BatchNorm1d(3)
    other = nn.BatchNorm1d(3)
    other.register_buffer("running_mean", bn.running_mean)
    ag.spawn(bn, name="bn1")
    with pytest.raises(E.ConfigError, match=r"buffer 'running_mean'.*'bn1'") as info:
        ag.spawn(other, name="bn2")
    assert info.value.worker == "bn2"
    with pytest.raises(E.ConfigError, match="already spawned as worker 'bn1'") as info:
        ag.spawn(bn, name="bn3")
    assert info.value.worker == "bn3"
    # A copy is independent, and a stateless module shared inside two workers is harmless.
    ag.spawn(copy.deepcopy(bn), name="bn4")
    act = nn.Tanh()
    ag.spawn(nn.Sequential(nn.Linear(2, 2), act), name="a")
    ag.spawn(nn.Sequential(nn.Linear(2, 2), act), name="b")


def test_owned_ids_are_weak(local):
    """A collected module's id may be reused by a new object: that is no tie."""
    import gc

    for i in range(20):
        ag.spawn(nn.Linear(2, 2), name=f"l{i}")  # the module is dropped at once (the worker has its copy)
        gc.collect()
    assert len(ag.api._current().owned) < 20 * 3


# --- caller-side torch.no_grad / autocast ----------------------------------------------


def test_torch_no_grad_is_honoured(backend):
    lin = ag.spawn(nn.Linear(3, 2), name="lin", optimizer=sgd())
    x = torch.randn(4, 3)
    with torch.no_grad():
        y = lin(x)
    assert not y.call.saved
    y2 = lin(x)
    assert y2.call.saved
    close(y.value(), y2.value())
    with torch.inference_mode():
        assert not lin(x).call.saved
    ag.step()


def test_torch_no_grad_is_honoured_backward_error(backend):
    lin = ag.spawn(nn.Linear(3, 1), name="lin", optimizer=sgd())
    with torch.no_grad():
        y = lin(torch.randn(4, 3))
    with pytest.raises(E.ConfigError, match="no_grad") as info:
        ag.backward(y, gradients=[torch.ones(4, 1)])
    assert info.value.worker == "lin"
    ag.step()


def test_caller_autocast_is_refused(backend):
    lin = ag.spawn(nn.Linear(3, 2), name="lin")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(E.ConfigError, match=r"autocast.*inside the module's forward") as info:
            lin(torch.randn(4, 3))
    assert info.value.worker == "lin"
    assert lin(torch.randn(4, 3)).value().dtype == torch.float32  # usable afterwards
    ag.step()


# --- in-place operations on a worker's input -------------------------------------------


class AddInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1)
        x.mul_(2)
        return self.lin(x)


def test_inplace_on_input_equals_pytorch(backend):
    torch.manual_seed(5)
    first = nn.Linear(4, 5)
    blocks = [nn.Sequential(nn.ReLU(inplace=True), nn.Linear(5, 5)), AddInPlace(), nn.Linear(5, 1)]
    ref_first, ref_blocks = copy.deepcopy(first), copy.deepcopy(blocks)
    ref_params = list(ref_first.parameters()) + [p for b in ref_blocks for p in b.parameters()]
    opt = torch.optim.SGD(ref_params, lr=0.1)
    workers = [ag.spawn(first, name="w0", optimizer=sgd())]
    workers += [ag.spawn(b, name=f"w{i + 1}", optimizer=sgd()) for i, b in enumerate(blocks)]
    for _ in range(3):
        x = torch.randn(6, 4)
        h = x
        for w in workers:
            h = w(h)
        ag.backward(h, gradients=[torch.ones(6, 1)])
        ag.step()
        opt.zero_grad()
        r = ref_first(x)
        for b in ref_blocks:
            r = b(r)
        r.backward(torch.ones(6, 1))
        opt.step()
    for w, m in zip(workers, [ref_first] + ref_blocks):
        got = w.state_dict()
        for k, v in m.state_dict().items():
            close(got[k], v, f"{w.name}.{k}")


def test_inplace_on_input_under_no_grad(backend):
    w = ag.spawn(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), name="a")
    relu = ag.spawn(nn.ReLU(inplace=True), name="relu")
    x = torch.randn(4, 3)
    with ag.no_grad():
        got = relu(w(x)).value()
    close(got, torch.relu(w(x).value()))
    ag.step()


# --- per-worker random generators -------------------------------------------------------


def _dropout_run(backend: str, seed, steps: int = 4, pids: Optional[set] = None) -> dict[str, torch.Tensor]:
    """A small dropout MLP over two workers, trained with a typical loop; its final parameters.

    ``pids``: the Ray workers' process ids are added to it.
    """
    torch.manual_seed(0)  # the same initial parameters and data every run
    ag.init(backend=backend, timeout=60, seed=seed)
    try:
        a = ag.spawn(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5)), name="a", optimizer=sgd())
        b = ag.spawn(nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 1)), name="b", optimizer=sgd())
        mse = ag.spawn(nn.MSELoss(), name="mse")
        for _ in range(steps):
            x, y = torch.randn(8, 6), torch.randn(8, 1)  # the caller's global generator, before the calls
            mse(b(a(x)), y).backward()
            ag.step()
        if pids is not None:
            transport = ag.api._current().transport
            pids.update(transport.identity(w.name)["pid"] for w in (a, b, mse))
        return {f"{w.name}.{k}": v for w in (a, b) for k, v in w.state_dict().items()}
    finally:
        ag.shutdown()


def _same(p: dict[str, torch.Tensor], q: dict[str, torch.Tensor]) -> bool:
    return p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)


def test_seeded_dropout_is_reproducible_on_both_backends(ray_session, monkeypatch):
    from actorgrad.transport.startup import POOL_ENV

    ray_session()
    runs = {"local": [_dropout_run("local", 123) for _ in range(3)], "ray": [_dropout_run("ray", 123)]}
    # The same seed draws the same masks in a process an earlier runtime used (its generator moved on):
    # the next two Ray runs share pooled processes (transport/ray.py, [Note: process pool]).
    monkeypatch.setenv(POOL_ENV, "1")
    pids: list[set] = [set(), set()]
    runs["ray"] += [_dropout_run("ray", 123, pids=p) for p in pids]
    assert len(pids[1]) == 3 and pids[1] == pids[0], pids  # the third run took the second's processes
    for be, rs in runs.items():
        assert all(_same(rs[0], r) for r in rs[1:]), f"same seed, different parameters on {be}"
    assert _same(runs["local"][0], runs["ray"][0]), "same seed, different parameters across backends"
    assert not _same(runs["local"][0], _dropout_run("local", 124)), "a different seed must draw other masks"
    # The default seed is torch.initial_seed() at ag.init: torch.manual_seed(0) before it gives seed 0.
    torch.manual_seed(0)
    assert _same(_dropout_run("local", None), _dropout_run("local", 0))
    assert not torch.cuda.is_initialized()  # a CPU worker's generator never touches CUDA


def test_worker_generators_are_independent(local):
    """Each worker draws its own sequence, from its own seed and name; the caller's generator is left alone."""
    from actorgrad.core.rng import WorkerRng, worker_seed

    assert worker_seed(1, "a") == worker_seed(1, "a") != worker_seed(1, "b")
    drop = ag.spawn(nn.Dropout(0.5), name="drop")
    seed = ag.api._current().seed
    twin = WorkerRng(seed, "drop", torch.device("cpu"))
    before = torch.get_rng_state()
    x = torch.ones(64)
    got = [drop(x).value() for _ in range(3)]
    ag.step()
    assert torch.equal(torch.get_rng_state(), before), "a worker's draws must not move the caller's generator"
    for g in got:
        with twin:
            want = nn.functional.dropout(x, 0.5)
        assert torch.equal(g, want)


# --- a forgotten ag.step() ---------------------------------------------------------------


def test_forgotten_step_warns_once(local, caplog):
    lin = ag.spawn(nn.Linear(2, 1), name="lin", optimizer=sgd())
    x = torch.randn(3, 2)
    with caplog.at_level(logging.WARNING, logger="actorgrad.runtime"):
        for _ in range(3):  # steps of 100 calls: the earlier maximum is 100, the threshold 400
            for _ in range(100):
                lin(x)
            ag.step()
        for _ in range(400):
            lin(x)
        assert not [r for r in caplog.records if "ag.step()" in r.getMessage()]
        for _ in range(300):  # 401 is past the threshold: one warning, however long it goes on
            lin(x)
    warned = [r for r in caplog.records if "ag.step() once per iteration" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert "holds 401 calls" in warned[0].getMessage()
    ag.step()
