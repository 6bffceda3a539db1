"""Caller leaves: a caller tensor with requires_grad=True passed into a worker gets ``.grad`` as in PyTorch.

Input optimization, saliency, and a leaf used in several calls and passes, each against plain
PyTorch. Modules are defined at module level: Ray workers receive them by pickling.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import actorgrad as ag
from actorgrad import errors as E

ATOL = RTOL = 1e-5


class MSE(nn.Module):
    """A loss worker: mean squared error against a target."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x, target)


class Mix(nn.Module):
    """Takes its inputs inside a list and a dict, to check that leaves are found in nested arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, xs: list, extra: dict) -> torch.Tensor:
        return self.lin(xs[0] * xs[1] + extra["b"]).sum()


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=ATOL, rtol=RTOL)


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


@pytest.mark.parametrize("wait", [True, False])
def test_input_optimization_equals_pytorch(backend, wait):
    net = _frozen(_net())
    target = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    x_ref = nn.Parameter(torch.randn(3, 8, generator=torch.Generator().manual_seed(6)))
    x = nn.Parameter(x_ref.detach().clone())
    opt_ref, opt = torch.optim.Adam([x_ref], lr=0.05), torch.optim.Adam([x], lr=0.05)
    enc, loss = ag.spawn(copy.deepcopy(net), name="enc"), ag.spawn(MSE(), name="loss")
    for _ in range(6):
        opt_ref.zero_grad()
        F.mse_loss(net(x_ref), target).backward()
        opt_ref.step()

        opt.zero_grad()
        p = loss(enc(x), target).backward()
        if wait:
            p.wait()  # the gradient is there once the pass completes...
            assert x.grad is not None and _close(x.grad, x_ref.grad)
        ag.step()  # ...and at the latest once the step closed
        assert _close(x.grad, x_ref.grad)
        opt.step()
        assert _close(x.detach(), x_ref.detach())


def test_saliency_equals_pytorch(backend):
    torch.manual_seed(4)
    clf = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    image = torch.randn(1, 8)
    ref = image.clone().requires_grad_(True)
    clf(ref)[0, 2].backward()
    # The classifier has an optimizer: inputs=[image] asks for the input's gradient alone.
    w = ag.spawn(copy.deepcopy(clf), optimizer=ag.Optim(torch.optim.SGD, lr=1.0), name="clf")
    x = image.clone().requires_grad_(True)
    onehot = torch.zeros(1, 3)
    onehot[0, 2] = 1.0
    w(x).backward(onehot, inputs=[x]).wait()
    assert _close(x.grad, ref.grad)
    rep = ag.step()
    assert not rep.workers["clf"].applied  # its parameters accumulated nothing
    for k, v in clf.state_dict().items():
        assert torch.equal(w.state_dict()[k], v)


def test_leaf_in_two_calls_and_two_passes_is_summed(backend):
    torch.manual_seed(7)
    mix, net = Mix(), nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())
    a_ref = torch.randn(2, 4, requires_grad=True)
    b_ref = torch.randn(2, 4, requires_grad=True)
    a, b = a_ref.detach().clone().requires_grad_(True), b_ref.detach().clone().requires_grad_(True)
    target = torch.randn(2, 4)
    W1 = ag.spawn(copy.deepcopy(mix), optimizer=ag.Optim(torch.optim.SGD, lr=0.1), name="mix")
    W2 = ag.spawn(copy.deepcopy(net), optimizer=ag.Optim(torch.optim.SGD, lr=0.1), name="net")
    loss = ag.spawn(MSE(), name="loss")
    opt_ref = torch.optim.SGD(list(mix.parameters()) + list(net.parameters()), lr=0.1)
    for _ in range(2):  # no zero_grad on the leaves: their .grad accumulates over steps, as in PyTorch
        opt_ref.zero_grad()
        l1 = mix([a_ref, b_ref], {"b": a_ref})
        l2 = F.mse_loss(net(a_ref), target)
        l1.backward()
        l2.backward()
        opt_ref.step()

        p1 = W1([a, b], extra={"b": a}).backward()  # a twice in one call
        p2 = loss(W2(a), target).backward()  # and in a second call, a second pass
        p1.wait()
        p2.wait()
        ag.step()
        assert _close(a.grad, a_ref.grad) and _close(b.grad, b_ref.grad)
    for k, v in mix.state_dict().items():
        assert _close(W1.state_dict()[k], v)


def test_no_grad_and_detached_use_give_no_grad(backend):
    w = ag.spawn(_net(), optimizer=ag.Optim(torch.optim.SGD, lr=0.1), name="enc")
    loss = ag.spawn(MSE(), name="loss")
    x = torch.randn(2, 8, requires_grad=True)
    with ag.no_grad():
        w(x).value()
    loss(w(x.detach()), torch.zeros(2, 4)).backward().wait()
    ag.step()
    assert x.grad is None


def test_non_leaf_caller_tensor_passes_its_gradient_on(backend):
    """A caller tensor computed from a caller leaf: the gradient goes on through the caller's graph."""
    net = _frozen(_net())
    p_ref = torch.randn(3, 8, requires_grad=True)
    p = p_ref.detach().clone().requires_grad_(True)
    F.mse_loss(net(p_ref * 2.0), torch.ones(3, 4)).backward()
    enc, loss = ag.spawn(copy.deepcopy(net), name="enc"), ag.spawn(MSE(), name="loss")
    loss(enc(p * 2.0), torch.ones(3, 4)).backward().wait()
    ag.step()
    assert _close(p.grad, p_ref.grad)


class Doubling(ag.Module):
    """A custom backward (returns gradients for routed inputs only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def backward(self, inputs, outputs, grad_outputs):
        return [None if g is None else g * 2 for g in grad_outputs], {}


def test_leaf_into_custom_backward_is_refused(backend):
    w = ag.spawn(Doubling(), name="dbl")
    with pytest.raises(E.ConfigError, match="custom backward") as info:
        w(torch.randn(2, requires_grad=True))
    assert info.value.worker == "dbl"
