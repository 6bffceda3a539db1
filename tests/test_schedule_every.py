"""LR schedules: ``ag.Schedule(..., every="step")`` steps with every ag.step(); ``every="update"`` (default)
with each optimizer step of its worker. Sparse experts against plain PyTorch loops of both kinds.

Modules are defined at module level: Ray workers receive them by pickling.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import actorgrad as ag
from actorgrad import errors as E

ATOL = RTOL = 1e-5
ROUTE = [0, 0, 1, 0, 2, 1, 0, 0, 2, 0]  # the router's choice of expert per step: experts 1 and 2 often idle


class MSE(nn.Module):
    """A loss worker."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x, target)


def _experts() -> list[nn.Module]:
    torch.manual_seed(2)
    return [nn.Linear(4, 4) for _ in range(3)]


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)


def _reference(every: str) -> list[nn.Module]:
    experts = _experts()
    opts = [torch.optim.SGD(e.parameters(), lr=0.2) for e in experts]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()" for idle experts
        for i, k in enumerate(ROUTE):
            x, y = _data(i)
            for o in opts:
                o.zero_grad(set_to_none=True)
            F.mse_loss(experts[k](x), y).backward()
            for j, (o, s) in enumerate(zip(opts, scheds)):
                o.step()  # a no-op for experts without a gradient (p.grad is None)
                if every == "step" or j == k:
                    s.step()
    return experts


@pytest.mark.parametrize("every", ["step", "update"])
def test_sparse_experts_schedule_equals_pytorch(backend, every):
    ref = _reference(every)
    sched = ag.Schedule(torch.optim.lr_scheduler.StepLR, every=every, step_size=2, gamma=0.5)
    if every == "update":  # the default
        sched = ag.Schedule(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    experts = [ag.spawn(e, optimizer=ag.Optim(torch.optim.SGD, lr=0.2, schedule=sched), name=f"expert{j}")
               for j, e in enumerate(_experts())]
    loss = ag.spawn(MSE(), name="loss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, k in enumerate(ROUTE):
            x, y = _data(i)
            loss(experts[k](x), y).backward()
            rep = ag.step()
            assert rep.workers[f"expert{k}"].applied
    for j, (w, e) in enumerate(zip(experts, ref)):
        for name, v in e.state_dict().items():
            assert torch.allclose(w.state_dict()[name], v, atol=ATOL, rtol=RTOL), f"expert{j}.{name} ({every})"


def test_every_is_checked(backend):
    bad = ag.Schedule(torch.optim.lr_scheduler.StepLR, every="epoch", step_size=2)
    with pytest.raises(E.ConfigError, match="every") as info:
        ag.spawn(nn.Linear(2, 2), optimizer=ag.Optim(torch.optim.SGD, lr=0.1, schedule=bad), name="lin")
    assert info.value.worker == "lin"
