"""Train/eval mode of workers (issue 12): worker.train()/eval()/training and ag.set_training.

A small CNN with BatchNorm2d and Dropout on scikit-learn's digits, split over
three workers, trained with an evaluation every few steps under ag.no_grad()
and eval mode, equals plain PyTorch with model.eval()/model.train(): the
accuracies, every parameter and every buffer (running statistics and
num_batches_tracked). The plain-PyTorch twin draws each part's dropout masks
from that worker's own generator (actorgrad.core.rng), as the workers do.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

import actorgrad as ag
from actorgrad import errors as E
from actorgrad.core.rng import WorkerRng

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

ATOL = RTOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=(lambda m: f"{msg}: {m}") if msg else None)


def cnn_parts() -> list[nn.Module]:
    """A CNN for 8x8 digits in three parts: conv+BN, conv+BN+dropout, the classifier."""
    return [
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3)),
        nn.Sequential(nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10)),
    ]


def test_cnn_with_batchnorm_and_dropout_equals_pytorch(backend):
    from _common import load_digits_split

    split = load_digits_split(seed=0, tiny=True)
    x_tr = split.x_train.float().view(-1, 1, 8, 8)
    x_te = split.x_test.float().view(-1, 1, 8, 8)
    torch.manual_seed(0)
    parts = cnn_parts()
    ref = [copy.deepcopy(p) for p in parts]
    names = ["conv1", "conv2", "head"]
    seed = ag.api._current().seed
    rngs = [WorkerRng(seed, n, torch.device("cpu")) for n in names]  # the workers' generators, for the twin
    ref_opts = [torch.optim.SGD(p.parameters(), lr=0.05, momentum=0.9) for p in ref]
    opt = ag.Optim(torch.optim.SGD, lr=0.05, momentum=0.9)
    workers = [ag.spawn(p, name=n, optimizer=opt) for p, n in zip(parts, names)]
    xent = ag.spawn(nn.CrossEntropyLoss(), name="xent")
    assert all(w.training for w in workers)

    def ref_forward(x: torch.Tensor) -> torch.Tensor:
        for part, rng in zip(ref, rngs):
            with rng:
                x = part(x)
        return x

    def ag_forward(x: torch.Tensor) -> ag.Node:
        h = x
        for w in workers:
            h = w(h)
        return h

    order = torch.Generator().manual_seed(1)
    accuracies, ref_accuracies = [], []
    for step in range(1, 13):
        idx = torch.randperm(len(x_tr), generator=order)[:32]
        x, y = x_tr[idx], split.y_train[idx]
        xent(ag_forward(x), y).backward()
        ag.step()
        for p in ref:
            p.train()
        for o in ref_opts:
            o.zero_grad()
        nn.functional.cross_entropy(ref_forward(x), y).backward()
        for o in ref_opts:
            o.step()
        if step % 4 == 0:
            if step == 4:
                ag.set_training(False)
            else:  # the per-worker spelling, as nn.Module's
                assert all(w.eval() is w for w in workers)
            assert not any(w.training for w in workers)
            with ag.no_grad():
                pred = ag_forward(x_te).value().argmax(1)
            accuracies.append((pred == split.y_test).float().mean().item())
            ag.step()
            for p in ref:
                p.eval()
            with torch.no_grad():
                ref_accuracies.append((ref_forward(x_te).argmax(1) == split.y_test).float().mean().item())
            if step == 4:
                ag.set_training(True, workers=workers)
            else:
                assert all(w.train() is w for w in workers)
            assert all(w.training for w in workers)
    assert accuracies == ref_accuracies
    assert accuracies[-1] > 0.5, accuracies
    for w, part in zip(workers, ref):
        got = w.state_dict()
        want = part.state_dict()
        assert set(got) == set(want)
        for k in want:
            close(got[k], want[k], f"{w.name}.{k}")
    assert int(workers[0].state_dict()["1.num_batches_tracked"]) == 12  # no evaluation counted


def test_mode_applies_to_calls_issued_after_the_switch(backend):
    bn = nn.BatchNorm1d(3)
    ref = copy.deepcopy(bn)
    w = ag.spawn(bn, name="bn")
    x1, x2 = torch.randn(8, 3), torch.randn(8, 3)
    with ag.no_grad():
        a = w(x1)  # issued in training mode: batch statistics, running stats updated
        w.eval()
        b = w(x2)  # eval: running statistics, nothing updated
        got_a, got_b = a.value(), b.value()
    ag.step()
    with torch.no_grad():
        want_a = ref(x1)
        ref.eval()
        want_b = ref(x2)
    close(got_a, want_a)
    close(got_b, want_b)
    for k, v in ref.state_dict().items():
        close(w.state_dict()[k], v, k)


def test_spawn_time_mode_and_errors(backend):
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    m.eval()
    w = ag.spawn(m, name="evalmode")
    assert not w.training
    x = torch.randn(4, 2)
    with ag.no_grad():
        close(w(x).value(), m(x))  # dropout is off, as in the spawned module
    ag.step()
    with pytest.raises(ValueError):
        w.train("yes")  # type: ignore[arg-type]
    with pytest.raises(E.ConfigError):
        ag.set_training(1)  # type: ignore[arg-type]
    with pytest.raises(E.ConfigError, match="no such worker") as info:
        ag.set_training(False, workers=["nobody"])
    assert info.value.worker == "nobody"
    assert "set_training" in ag.__all__
