"""Update bookkeeping and rules: capabilities, pending gradients freed at commit, register_rule."""

import pytest
import torch

import actorgrad as ag
from actorgrad import errors as E
from actorgrad.core.rules import UPDATE_RULES, CallableRule, PassRule, Rule, StepRule, make_rule, register_rule
from actorgrad.core.updates import Updates


def updates(update="step", optimizer=True):
    torch.manual_seed(0)
    mod = torch.nn.Linear(2, 1)
    opt = ag.Optim(torch.optim.SGD, lr=1.0) if optimizer else None
    return mod, Updates("w", mod, opt, update, lambda step, passes: None)


def grads(mod, value=1.0):
    return {n: torch.full_like(p, value) for n, p in mod.named_parameters()}


def test_rules_declare_what_they_need():
    assert (StepRule.accumulates, StepRule.stashes_weights, StepRule.needs_optimizer) == (True, False, True)
    assert (PassRule.accumulates, PassRule.stashes_weights) == (False, True)
    assert not CallableRule.needs_optimizer and CallableRule.decides_at_commit and CallableRule.stashes_weights


def test_step_rule_sums_passes_and_applies_once_at_commit():
    mod, u = updates("step")
    w0 = mod.weight.detach().clone()
    assert not u.pass_done(1, 100, grads(mod)) and not u.pass_done(1, 101, grads(mod))
    pending, version, final, _ = u.ready_report(1)
    assert pending and version == 1 and final
    assert u.commit(1)
    torch.testing.assert_close(mod.weight, w0 - 2.0)
    assert u.pending.by_step == {} and u.version == 1


def test_pass_rule_applies_per_pass_and_keeps_nothing_pending():
    mod, u = updates("pass")
    assert u.pass_done(1, 100, grads(mod)) and u.pending.by_step.get(1, {}) == {}
    assert not u.commit(1) and u.version == 1


def test_pending_gradients_are_freed_even_when_the_rule_raises_at_commit():
    class Boom(Rule):
        def on_close(self, ctx):
            raise RuntimeError("boom")

    mod, u = updates(Boom())
    u.pass_done(1, 100, grads(mod))
    with pytest.raises(RuntimeError):
        u.commit(1)
    assert u.pending.by_step == {}


def test_gradients_without_an_optimizer_are_refused_unless_the_rule_does_without():
    mod, u = updates("step", optimizer=False)
    assert u.lacks_optimizer(grads(mod)) and not u.lacks_optimizer({})
    mod, u = updates(lambda ctx: False, optimizer=False)
    assert not u.lacks_optimizer(grads(mod))


def test_register_rule_adds_a_name_and_refuses_it_twice():
    class Never(Rule):
        pass

    register_rule("test-never", Never)
    try:
        assert isinstance(make_rule("test-never"), Never)
        with pytest.raises(E.ConfigError, match="already registered"):
            register_rule("test-never", Never)
        with pytest.raises(E.ConfigError, match="already registered"):
            register_rule("step", Never)
    finally:
        del UPDATE_RULES["test-never"]


def test_an_unknown_rule_name_lists_the_known_ones():
    with pytest.raises(E.ConfigError, match=r"known rules: \['pass', 'step'\]"):
        make_rule("nope")


def test_a_factory_must_return_a_rule():
    register_rule("test-bad", lambda: object())
    try:
        with pytest.raises(E.ConfigError, match="not a Rule"):
            make_rule("test-bad")
    finally:
        del UPDATE_RULES["test-bad"]
