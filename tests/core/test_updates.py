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


def test_discarding_a_steps_gradients_lets_the_preview_memo_go():
    """The Close report previews the gradient norm (memoized on the gradient tensors); an aborted step's
    gradients are popped unapplied, and the memo must not keep them alive until the next preview."""
    import gc
    import weakref

    mod, u = updates("step")
    u.pass_done(1, 100, grads(mod, 3.0))
    pending, _, _, metrics = u.ready_report(1)
    assert pending and metrics["grad_norm"] == pytest.approx(3.0 * 3 ** 0.5)  # weight (1x2) and bias (1)
    assert u.updater._preview is not None  # the memo holds step 1's gradients
    refs = [weakref.ref(g) for g in u.pending.by_step[1].values()]
    u.pending.pop(1)  # what the worker's abort does (WorkerCore._drop_step)
    assert u.updater._preview is None
    gc.collect()
    assert all(r() is None for r in refs)


def test_discarding_another_steps_gradients_keeps_the_preview_memo():
    mod, u = updates("step")
    u.pass_done(1, 100, grads(mod, 1.0))
    u.pass_done(2, 101, grads(mod, 2.0))
    u.ready_report(2)
    memo = u.updater._preview
    assert memo is not None
    u.pending.pop(1)  # step 1 aborted: step 2's preview stays
    assert u.updater._preview is memo
    assert u.commit(2) and u.updater._preview is None  # applied: let go as before


def test_recovery_reset_drops_the_preview_memo():
    mod, u = updates("step")
    u.pass_done(1, 100, grads(mod))
    u.ready_report(1)
    assert u.updater._preview is not None
    u.reset()
    assert u.updater._preview is None
