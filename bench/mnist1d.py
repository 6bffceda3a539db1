"""The MNIST-1D MLP of examples/mnist1d_compare.py as benchmark rows: per-step time, plain PyTorch vs workers.

The model is the example's (``mlp_blocks``: Linear+ReLU blocks and a Linear head, Adam for every module),
trained on random data of MNIST-1D's shape (40 features, 10 classes): the time of a step does not depend on
the values, and the bench needs no data set. Two learning rules, each in plain PyTorch in one process and
on workers: end-to-end backprop (exact: the final parameters must match plain PyTorch) and decoupled
greedy learning (every block trains on its own auxiliary classifier, blocks joined by ``detach``), on
workers pipelined with ``max_staleness=1`` and ``ag.step(wait=False)`` as the example runs it.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import Any, Optional

import torch

import actorgrad as ag

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from _common import mlp_blocks  # noqa: E402

FEATURES, CLASSES = 40, 10


def make_setup(hidden: int, depth: int, batch: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Initial blocks, head, auxiliary heads and the batches every runner sees."""
    blocks, head = mlp_blocks(FEATURES, hidden, depth, CLASSES, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        aux = [torch.nn.Linear(hidden, CLASSES) for _ in range(depth - 1)] + [copy.deepcopy(head)]
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(batch, FEATURES, generator=gen), torch.randint(0, CLASSES, (batch,), generator=gen))
            for _ in range(steps)]
    return {"blocks": blocks, "head": head, "aux": aux, "data": data}


def _optim() -> ag.Optim:
    return ag.Optim(torch.optim.Adam, lr=1e-3)


def plain_backprop(s: dict[str, Any]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """End-to-end backprop in one process, one Adam per module (as each worker has one)."""
    modules = [copy.deepcopy(m) for m in [*s["blocks"], s["head"]]]
    opts = [_optim().build(m.parameters()) for m in modules]
    model = torch.nn.Sequential(*modules)
    times = []
    for x, y in s["data"]:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times, _params(modules)


def plain_greedy(s: dict[str, Any]) -> list[float]:
    """Decoupled greedy learning in one process: each block on its own auxiliary loss, inputs detached."""
    blocks = [copy.deepcopy(b) for b in s["blocks"]]
    aux = [copy.deepcopy(a) for a in s["aux"]]
    opts = [_optim().build(m.parameters()) for m in [*blocks, *aux]]
    times = []
    for x, y in s["data"]:
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        h = x
        for b, a in zip(blocks, aux):
            out = b(h)
            loss = torch.nn.functional.cross_entropy(a(out), y)
            loss.backward()
            h = out.detach()
        for o in opts:
            o.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


def workers_backprop(backend: str, s: dict[str, Any]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """End-to-end backprop through block workers, head and loss worker (the example's loop: the previous
    step's loss is fetched while this step runs)."""
    _init(backend)
    try:
        blocks = [ag.spawn(copy.deepcopy(b), name=f"block{i}", optimizer=_optim()) for i, b in enumerate(s["blocks"])]
        head = ag.spawn(copy.deepcopy(s["head"]), name="head", optimizer=_optim())
        xent = ag.spawn(torch.nn.CrossEntropyLoss(), name="xent")
        for w in [*blocks, head, xent]:
            w.stats()  # up and built: timing starts with training

        def train_step(x: torch.Tensor, y: torch.Tensor) -> Any:
            h = x
            for b in blocks:
                h = b(h)
            loss = xent(head(h), y)
            loss.backward()
            return loss

        times = _loop(train_step, s["data"], pipelined=False)
        return times, _params([*blocks, head])
    finally:
        ag.shutdown()


def workers_greedy(backend: str, s: dict[str, Any], pipelined: bool = True) -> list[float]:
    """Decoupled greedy learning on workers: one block, auxiliary head and loss worker per block."""
    _init(backend)
    k = 1 if pipelined else 0
    try:
        blocks, heads, losses = [], [], []
        for i, (b, a) in enumerate(zip(s["blocks"], s["aux"])):
            blocks.append(ag.spawn(copy.deepcopy(b), name=f"block{i}", optimizer=_optim(), max_staleness=k))
            heads.append(ag.spawn(copy.deepcopy(a), name=f"aux{i}", optimizer=_optim(), max_staleness=k))
            losses.append(ag.spawn(torch.nn.CrossEntropyLoss(), name=f"xent{i}", max_staleness=k))
        for w in [*blocks, *heads, *losses]:
            w.stats()

        def train_step(x: torch.Tensor, y: torch.Tensor) -> Any:
            h: Any = x
            loss = None
            for b, aux, xent in zip(blocks, heads, losses):
                out = b(h)
                loss = xent(aux(out), y)
                loss.backward()
                h = out.detach()
            return loss

        return _loop(train_step, s["data"], pipelined=pipelined)
    finally:
        ag.shutdown()


def _init(backend: str) -> None:
    ag.init(backend=backend, ignore_reinit_error=True) if backend == "ray" else ag.init(backend=backend)


def _loop(train_step: Any, data: list, pipelined: bool) -> list[float]:
    """Per-step wall times; pipelined: the steady-state time per step, from the second step until drained."""
    times = []
    prev: Optional[Any] = None
    handle: Any = None
    t_mark = time.perf_counter()
    for i, (x, y) in enumerate(data):
        if i == 1:
            t_mark = time.perf_counter()
        t0 = time.perf_counter()
        loss = train_step(x, y)
        if prev is not None:
            prev.item()
        handle = ag.step(wait=not pipelined)
        prev = loss
        times.append(time.perf_counter() - t0)
    assert prev is not None
    prev.item()
    if pipelined:
        handle.wait()  # every update has landed (steps complete in order)
        steady = (time.perf_counter() - t_mark) / max(1, len(data) - 1)
        times = [steady] * len(data)
    return times


def _params(modules: list) -> dict[str, torch.Tensor]:
    out = {}
    for i, m in enumerate(modules):  # a module or a worker: both have state_dict()
        out.update({f"{i}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
    return out
