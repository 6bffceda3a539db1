"""Partial backward: ``backward(inputs=[workers])`` (GAN, actor-critic) against plain PyTorch's ``inputs=``.

Only the named workers' parameters accumulate a pass's gradient; the others pass gradients
through to their producers and, with no accumulating pass in a step, do not step their optimizer.
Modules are defined at module level: Ray workers receive them by pickling.
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
STEPS = 5


class DLoss(nn.Module):
    """The discriminator's loss: real as 1, fake as 0."""

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


class GLoss(nn.Module):
    """The generator's loss: its fakes as 1."""

    def forward(self, fake: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    d = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    return g, d


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, generator=gen), torch.randn(6, 2, generator=gen) * 0.5 + 1.0) for _ in range(STEPS)]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=ATOL, rtol=RTOL)


def test_gan_equals_pytorch_with_inputs(backend):
    g_ref, d_ref = _nets()
    g_mod, d_mod = copy.deepcopy(g_ref), copy.deepcopy(d_ref)
    opt_g = torch.optim.Adam(g_ref.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(d_ref.parameters(), lr=0.1, momentum=0.5)
    G = ag.spawn(g_mod, optimizer=ag.Optim(torch.optim.Adam, lr=0.01), name="G")
    D = ag.spawn(d_mod, optimizer=ag.Optim(torch.optim.SGD, lr=0.1, momentum=0.5), name="D")
    dloss, gloss = ag.spawn(DLoss(), name="dloss"), ag.spawn(GLoss(), name="gloss")
    for z, real in _batches():
        # Plain PyTorch: both losses at the same weights, each into its own network only.
        opt_g.zero_grad()
        opt_d.zero_grad()
        fake = g_ref(z)
        loss_d = DLoss()(d_ref(real), d_ref(fake.detach()))
        loss_g = GLoss()(d_ref(fake))
        loss_d.backward(inputs=list(d_ref.parameters()))
        loss_g.backward(inputs=list(g_ref.parameters()))
        opt_d.step()
        opt_g.step()

        fake_n = G(z)
        ld = dloss(D(real), D(fake_n.detach()))
        lg = gloss(D(fake_n))
        ld.backward(inputs=[D])
        ag.backward(lg, inputs=[G])
        rep = ag.step()
        assert rep.workers["D"].applied and rep.workers["G"].applied
        assert _close(ld.value(), loss_d.detach()) and _close(lg.value(), loss_g.detach())
    for name, ref in (("G", g_ref), ("D", d_ref)):
        got = (G if name == "G" else D).state_dict()
        for k, v in ref.state_dict().items():
            assert _close(got[k], v), f"{name}.{k} differs from plain PyTorch"


def test_without_inputs_every_worker_accumulates(backend):
    """The contrast: without inputs=, D also learns from G's loss (all of PyTorch's loss_g.backward())."""
    g_ref, d_ref = _nets()
    G = ag.spawn(copy.deepcopy(g_ref), optimizer=ag.Optim(torch.optim.SGD, lr=0.1), name="G")
    D = ag.spawn(copy.deepcopy(d_ref), optimizer=ag.Optim(torch.optim.SGD, lr=0.1), name="D")
    gloss = ag.spawn(GLoss(), name="gloss")
    z, _ = _batches()[0]
    gloss(D(G(z))).backward()
    ag.step()
    opt = torch.optim.SGD(list(g_ref.parameters()) + list(d_ref.parameters()), lr=0.1)
    GLoss()(d_ref(g_ref(z))).backward()
    opt.step()
    for k, v in d_ref.state_dict().items():
        assert _close(D.state_dict()[k], v)


def test_worker_left_out_does_not_step_its_optimizer(backend):
    g_ref, d_ref = _nets()
    G = ag.spawn(copy.deepcopy(g_ref), optimizer=ag.Optim(torch.optim.SGD, lr=0.1), name="G")
    # Weight decay would move D's parameters even with a zero gradient: an optimizer step must not happen.
    D = ag.spawn(copy.deepcopy(d_ref), optimizer=ag.Optim(torch.optim.SGD, lr=0.1, weight_decay=0.5), name="D")
    gloss = ag.spawn(GLoss(), name="gloss")
    z, _ = _batches()[0]
    gloss(D(G(z))).backward(inputs=[G]).wait()
    rep = ag.step()
    assert rep.workers["G"].applied and not rep.workers["D"].applied
    for k, v in d_ref.state_dict().items():
        assert torch.equal(D.state_dict()[k], v)
    # G's gradient flowed through D: it equals PyTorch's with D left out.
    GLoss()(d_ref(g_ref(z))).backward(inputs=list(g_ref.parameters()))
    torch.optim.SGD(g_ref.parameters(), lr=0.1).step()
    for k, v in g_ref.state_dict().items():
        assert _close(G.state_dict()[k], v)


def test_inputs_validated(backend):
    _, d_ref = _nets()
    D = ag.spawn(d_ref, optimizer=ag.Optim(torch.optim.SGD, lr=0.1), name="D")
    node = ag.spawn(GLoss(), name="gloss")(D(torch.randn(2, 2)))
    with pytest.raises(E.ConfigError, match="empty"):
        node.backward(inputs=[])
    with pytest.raises(E.ConfigError, match="Workers"):
        node.backward(inputs=["D"])
    with pytest.raises(E.ConfigError, match="Workers"):
        ag.backward(node, inputs=[torch.zeros(2)])  # a tensor that does not require grad
    node.backward(inputs=D).wait()  # one Worker alone is accepted, as torch accepts one tensor
    ag.step()
