"""ag.register_rule: a named rule used through ag.spawn(update=name) behaves as the rule says."""

import pytest
import torch

import actorgrad as ag
from actorgrad import errors as E
from actorgrad.core.rules import UPDATE_RULES


class HalfStep(ag.Rule):
    """Apply once per step, at half the summed gradient."""

    def on_close(self, ctx):
        return ctx.apply({n: 0.5 * g for n, g in ctx.grads.items()})


@pytest.fixture
def half_step():
    ag.register_rule("half_step", HalfStep)
    yield
    del UPDATE_RULES["half_step"]


def test_a_registered_rule_is_used_by_name_on_local(half_step):
    torch.manual_seed(0)
    mod = torch.nn.Linear(3, 1)
    ref = torch.nn.Linear(3, 1)
    ref.load_state_dict(mod.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    ag.init(backend="local")
    try:
        lin = ag.spawn(mod, name="lin", update="half_step", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")
        for _ in range(3):
            mse(lin(x), y).backward()
            report = ag.step()
            assert "lin" in report.updated
            opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            for p in ref.parameters():
                p.grad.mul_(0.5)
            opt.step()
        for name, t in lin.state_dict().items():
            torch.testing.assert_close(t, ref.state_dict()[name])
    finally:
        ag.shutdown()


def test_unknown_and_duplicate_names_are_config_errors(half_step):
    ag.init(backend="local")
    try:
        with pytest.raises(E.ConfigError, match=r"known rules: \['half_step', 'pass', 'step'\]"):
            ag.spawn(torch.nn.Linear(3, 1), update="nope", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    finally:
        ag.shutdown()
    with pytest.raises(E.ConfigError, match="already registered"):
        ag.register_rule("half_step", HalfStep)
