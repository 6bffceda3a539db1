"""The learning-rule toolkit (actorgrad.nn) against hand computations, on both backends."""

from __future__ import annotations

import pytest
import torch

import actorgrad as ag
from actorgrad.errors import ConfigError

LR = 0.1


def sgd(**kw) -> ag.Optim:
    return ag.Optim(torch.optim.SGD, lr=LR, **kw)


def linear(n_in: int, n_out: int) -> torch.nn.Linear:
    return torch.nn.Linear(n_in, n_out)


# --- feedback alignment ---------------------------------------------------------


def test_feedback_alignment_sends_grad_at_B_and_updates_like_linear(backend):
    """The producer receives g @ B; the layer's own update is that of a plain nn.Linear."""
    src_mod, fa_mod = linear(3, 4), ag.FeedbackAlignment(4, 2, seed=7)
    src_w0, src_b0 = src_mod.weight.detach().clone(), src_mod.bias.detach().clone()
    B = fa_mod.feedback.clone()
    assert B.shape == (2, 4) and not any(B is p for p in fa_mod.parameters())
    assert not torch.allclose(B, fa_mod.weight.detach())  # a random matrix, not W
    # A plain nn.Linear with the same weights, given the same output gradient in plain PyTorch.
    oracle = linear(4, 2)
    oracle.load_state_dict({"weight": fa_mod.weight.detach(), "bias": fa_mod.bias.detach()})
    src = ag.spawn(src_mod, optimizer=sgd(), name="src")
    fa = ag.spawn(fa_mod, optimizer=sgd(), name="fa")

    x, g = torch.randn(5, 3), torch.randn(5, 2)
    h = src(x)
    y = fa(h)
    ag.backward(y, gradients=[g]).wait()
    hv = h.value()
    assert torch.allclose(y.value(), hv @ fa_mod.weight.detach().T + fa_mod.bias.detach(), atol=1e-6)
    ag.step()

    g_in = g @ B  # feedback alignment: not g @ W
    assert not torch.allclose(g_in, g @ fa_mod.weight.detach(), atol=1e-3)
    sd_src = src.state_dict()
    assert torch.allclose(sd_src["weight"], src_w0 - LR * g_in.T @ x, atol=1e-6)
    assert torch.allclose(sd_src["bias"], src_b0 - LR * g_in.sum(0), atol=1e-6)

    opt = torch.optim.SGD(oracle.parameters(), lr=LR)
    (oracle(hv) * g).sum().backward()
    opt.step()
    sd_fa = fa.state_dict()
    assert torch.allclose(sd_fa["weight"], oracle.weight.detach(), atol=1e-6)
    assert torch.allclose(sd_fa["bias"], oracle.bias.detach(), atol=1e-6)
    assert torch.equal(sd_fa["feedback"], B)


def test_feedback_alignment_B_is_fixed_and_seeded():
    """B is a buffer drawn from the seed, scaled like nn.Linear's weights, and never trained."""
    a, b = ag.FeedbackAlignment(16, 8, seed=3), ag.FeedbackAlignment(16, 8, seed=3)
    assert torch.equal(a.feedback, b.feedback)
    assert not torch.equal(a.feedback, ag.FeedbackAlignment(16, 8, seed=4).feedback)
    assert a.feedback.abs().max() <= 1 / 16 ** 0.5
    assert "feedback" in a.state_dict() and "feedback" not in dict(a.named_parameters())
    assert isinstance(a, ag.Module) and isinstance(a, torch.nn.Linear)
    assert ag.nn.FeedbackAlignment is ag.FeedbackAlignment


def test_feedback_alignment_stale_and_recurrent_matches_linear(backend):
    """Several calls per step and max_staleness=1: the layer's parameters follow a plain Linear's exactly.

    The layer reads a constant input, so its input gradient plays no part: both runs must end
    with the same weights, which needs the FA backward to use the stale weights its forward used.
    """
    torch.manual_seed(1)
    plain_mod = linear(4, 2)
    fa_mod = ag.FeedbackAlignment(4, 2, seed=0)
    fa_mod.load_state_dict({**fa_mod.state_dict(), "weight": plain_mod.weight.detach(), "bias": plain_mod.bias.detach()})
    layers = [ag.spawn(mod, optimizer=sgd(momentum=0.5), max_staleness=1, name=f"{tag}-layer")
              for tag, mod in (("fa", fa_mod), ("plain", plain_mod))]
    mse = ag.spawn(torch.nn.MSELoss(), max_staleness=1, name="mse")  # parameterless: shared by both runs
    handles = []
    for _ in range(4):
        x1, x2, y = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 2)
        for layer in layers:
            ag.backward(mse(layer(x1), y), mse(layer(x2), y))
        handles.append(ag.step(wait=False))
    for hd in handles:
        hd.wait()
    sd_fa, sd_plain = layers[0].state_dict(), layers[1].state_dict()
    assert not torch.allclose(sd_plain["weight"], plain_mod.weight.detach())  # it trained
    assert torch.allclose(sd_fa["weight"], sd_plain["weight"], atol=1e-6)
    assert torch.allclose(sd_fa["bias"], sd_plain["bias"], atol=1e-6)


# --- straight-through -----------------------------------------------------------


def test_straight_through_forward_and_gradient(backend):
    """Forward is fn(x); the producer receives the output gradient, clipped to |x| <= clip where asked."""
    src_mod = linear(3, 4)
    w0, b0 = src_mod.weight.detach().clone(), src_mod.bias.detach().clone()
    src = ag.spawn(src_mod, optimizer=sgd(), name="src")
    plain = ag.spawn(ag.StraightThrough(torch.sign), name="ste")
    clipped = ag.spawn(ag.StraightThrough(torch.sign, clip=1.0), name="ste-clip")

    x = 3 * torch.randn(8, 3)  # wide enough that some |h| > 1
    h = src(x)
    outs = [plain(h), clipped(h)]
    g1, g2 = torch.randn(8, 4), torch.randn(8, 4)
    ag.backward(*outs, gradients=[g1, g2]).wait()
    hv = h.value()
    assert (hv.abs() > 1).any() and (hv.abs() <= 1).any()
    assert torch.equal(outs[0].value(), torch.sign(hv))
    assert torch.equal(outs[1].value(), torch.sign(hv))
    report = ag.step()
    assert not report.workers["ste"].applied

    g_in = g1 + g2 * (hv.abs() <= 1).float()
    sd = src.state_dict()
    assert torch.allclose(sd["weight"], w0 - LR * g_in.T @ x, atol=1e-5)
    assert torch.allclose(sd["bias"], b0 - LR * g_in.sum(0), atol=1e-5)


def test_straight_through_checks_its_arguments():
    with pytest.raises(ConfigError):
        ag.StraightThrough("sign")
    with pytest.raises(ConfigError):
        ag.StraightThrough(torch.sign, clip=0)
    with pytest.raises(ValueError, match="shape"):
        ag.StraightThrough(lambda t: t.sum())(torch.randn(3))
    assert "clip=1.0" in repr(ag.StraightThrough(torch.sign, clip=1))
    # Called directly (no worker): fn forward, gradient straight through, clipped where asked.
    st = ag.StraightThrough(torch.round, clip=2.0)
    x = torch.tensor([-3.0, -0.6, 0.4, 1.5, 2.5])
    x_leaf = x.clone().requires_grad_()
    y = st(x_leaf)
    assert torch.equal(y, torch.round(x))
    g = torch.arange(5.0)
    (gx,), params = st.backward((x_leaf,), (y,), (g,))
    assert params == {} and torch.equal(gx, torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0]))
    assert st.backward((x_leaf,), (y,), (None,)) == ([None], {})


# --- detached edges -------------------------------------------------------------


def test_detached_edge_sends_nothing_back(backend):
    """A producer whose only consumer reads node.detach() gets no gradient and does not step."""
    # weight_decay would move the weights even for a zero gradient, had the optimizer stepped.
    prod = ag.spawn(linear(3, 4), optimizer=sgd(weight_decay=0.5), name="prod")
    cons = ag.spawn(linear(4, 1), optimizer=sgd(), name="cons")
    before_p, before_c = prod.state_dict(), cons.state_dict()
    out = cons(prod(torch.randn(5, 3)).detach())
    out.backward(torch.randn(5, 1)).wait()
    report = ag.step()
    assert not report.workers["prod"].applied and report.workers["cons"].applied
    after_p, after_c = prod.state_dict(), cons.state_dict()
    assert all(torch.equal(before_p[k], after_p[k]) for k in before_p)
    assert not torch.equal(before_c["weight"], after_c["weight"])


# --- synthetic gradients --------------------------------------------------------


def test_synthetic_gradient_updates_before_the_true_gradient(backend):
    """The synthetic pass updates the module (and sends J^T g_hat upstream) before loss.backward() runs;
    the true gradient then trains the predictor only."""
    torch.manual_seed(2)
    inner, pred = linear(3, 4), linear(4, 4)  # a non-zero predictor, so the first update is visible
    sg_mod = ag.SyntheticGradient(inner, pred)
    A0, a0 = inner.weight.detach().clone(), inner.bias.detach().clone()
    P0, p0 = pred.weight.detach().clone(), pred.bias.detach().clone()
    src_mod = linear(2, 3)
    s0, sb0 = src_mod.weight.detach().clone(), src_mod.bias.detach().clone()
    head_mod = linear(4, 1)
    hw0 = head_mod.weight.detach().clone()

    src = ag.spawn(src_mod, optimizer=sgd(), name="src")
    sg = ag.spawn(sg_mod, update="pass", optimizer=sg_mod.optim(torch.optim.SGD, lr=LR, predictor={"lr": 0.5}),
                  name="sg")
    head = ag.spawn(head_mod, optimizer=sgd(), name="head")

    x, g_y = torch.randn(5, 2), torch.randn(5, 1)
    u = src(x)
    h, synthetic = ag.nn.synthetic_call(sg, u)
    synthetic.wait()
    uv, hv = u.value(), h.value()
    g_hat = hv @ P0.T + p0
    mid = sg.state_dict()  # before loss.backward() is even called
    assert torch.allclose(mid["module.weight"], A0 - LR * g_hat.T @ uv, atol=1e-6)
    assert torch.allclose(mid["module.bias"], a0 - LR * g_hat.sum(0), atol=1e-6)
    assert torch.equal(mid["predictor.weight"], P0)
    assert torch.isnan(mid["sg_loss"])

    head(h).backward(g_y)
    report = ag.step()
    assert report.workers["sg"].applied

    g_true = g_y @ hw0
    end = sg.state_dict()
    # The true gradient does not touch the module: the module keeps its synthetic update.
    assert torch.equal(end["module.weight"], mid["module.weight"])
    # The predictor takes one SGD step (lr 0.5) on mse(predictor(h), g_true), at the weights its forward used.
    P = P0.clone().requires_grad_()
    pb = p0.clone().requires_grad_()
    sg_loss = torch.nn.functional.mse_loss(hv @ P.T + pb, g_true)
    gP, gpb = torch.autograd.grad(sg_loss, [P, pb])
    assert torch.allclose(end["predictor.weight"], P0 - 0.5 * gP, atol=1e-6)
    assert torch.allclose(end["predictor.bias"], p0 - 0.5 * gpb, atol=1e-6)
    assert torch.allclose(end["sg_loss"], sg_loss.detach(), atol=1e-7)
    # Upstream got the synthetic gradient through the module (forward weights A0), not the true one.
    g_u = g_hat @ A0
    sd_src = src.state_dict()
    assert torch.allclose(sd_src["weight"], s0 - LR * g_u.T @ x, atol=1e-6)
    assert torch.allclose(sd_src["bias"], sb0 - LR * g_u.sum(0), atol=1e-6)


def test_synthetic_gradient_predictor_learns(backend):
    """On a regression task whose only trainable layer learns from synthetic gradients, the
    predictor's loss falls, the task loss falls, and the prediction aligns with the true gradient."""
    torch.manual_seed(0)
    sg_mod = ag.SyntheticGradient(linear(4, 8))
    assert torch.count_nonzero(sg_mod.predictor.weight) == 0  # the default predictor starts at zero
    sg = ag.spawn(sg_mod, update="pass", optimizer=sg_mod.optim(torch.optim.Adam, lr=1e-2, predictor={"lr": 1e-2}),
                  name="sg")
    head_mod = linear(8, 1).requires_grad_(False)
    head = ag.spawn(head_mod, name="head")
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    w_true = torch.randn(4, 1)

    task, sg_losses = [], []
    for _ in range(40):
        x = torch.randn(32, 4)
        h, _ = ag.nn.synthetic_call(sg, x)
        loss = mse(head(h), x @ w_true)
        loss.backward()
        ag.step()
        task.append(loss.item())
        sg_losses.append(float(sg.state_dict()["sg_loss"]))

    def mean(v):
        return sum(v) / len(v)

    assert mean(sg_losses[-5:]) < 0.2 * mean(sg_losses[:5])
    assert mean(task[-5:]) < 0.8 * mean(task[:5])
    # The predicted gradient now points where the true one does.
    sd = sg.state_dict()
    x = torch.randn(256, 4)
    hv = (x @ sd["module.weight"].T + sd["module.bias"]).requires_grad_()
    torch.nn.functional.mse_loss(head_mod(hv), x @ w_true).backward()
    g_hat = hv.detach() @ sd["predictor.weight"].T + sd["predictor.bias"]
    assert torch.nn.functional.cosine_similarity(g_hat.flatten(), hv.grad.flatten(), dim=0) > 0.8


def test_synthetic_gradient_construction():
    """Predictor width is inferred from the wrapped module; optim() puts the predictor in its own group."""
    seq = torch.nn.Sequential(linear(4, 6), torch.nn.Tanh())
    sg = ag.SyntheticGradient(seq)
    assert sg.predictor.in_features == sg.predictor.out_features == 6
    with pytest.raises(ConfigError, match="features"):
        ag.SyntheticGradient(torch.nn.Tanh())
    assert ag.SyntheticGradient(torch.nn.Tanh(), features=5).predictor.out_features == 5
    recipe = sg.optim(torch.optim.SGD, lr=0.1, predictor={"lr": 0.01})
    assert isinstance(recipe, ag.Optim)
    opt = recipe.build(sg.parameters())
    lrs = [(g["lr"], sum(p.numel() for p in g["params"])) for g in opt.param_groups]
    assert lrs == [(0.1, 4 * 6 + 6), (0.01, 6 * 6 + 6)]
    h, s = sg(torch.randn(3, 4))
    assert h.shape == (3, 6) and s.shape == () and float(s.detach()) == 0.0  # zero predictor: zero seed
