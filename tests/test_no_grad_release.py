"""Inference under ag.no_grad() frees each call in its worker once no Node of it is left, before ag.step().

Modules are defined at module level: Ray workers receive them by pickling.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

import actorgrad as ag


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_inference_calls_are_freed_before_the_step(backend):
    net = _net()
    w = ag.spawn(net, optimizer=ag.Optim(torch.optim.SGD, lr=0.1), name="net")
    x = torch.randn(3, 4)
    expected = net(x).detach()
    with ag.no_grad():
        for _ in range(200):
            assert torch.allclose(w(x).value(), expected)
    assert w.stats()["calls"] <= 2  # not 200: each call went once its Node did


def test_live_nodes_keep_their_calls(backend):
    w1 = ag.spawn(_net(), name="a")
    w2 = ag.spawn(nn.Linear(2, 2), name="b")
    x = torch.randn(3, 4)
    with ag.no_grad():
        keep = [w1(x) for _ in range(5)]
        h = w1(x)
        out = w2(h)  # h feeds a later call: its value is routed before h can be released
        del h
        gc.collect()
        assert w1.stats()["calls"] == 5  # h's call went too, after its value went to w2
        assert out.value().shape == (3, 2)
        detached = keep[0].detach()
        del keep
        gc.collect()
        assert w1.stats()["calls"] == 1  # the detached Node still holds its call
        assert detached.value().shape == (3, 2)
        del detached
        gc.collect()
        assert w1.stats()["calls"] == 0
    ag.step()  # the step closes normally with released calls
    with ag.no_grad():
        assert w2(w1(x)).value().shape == (3, 2)
    ag.step()
