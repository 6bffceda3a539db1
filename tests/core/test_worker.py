"""WorkerCore driven by hand-made messages: no transport, no Ray."""

from __future__ import annotations

import pytest
import torch

from actorgrad import errors as E
from actorgrad.core import messages as m
from actorgrad.core.worker import WorkerCore, WorkerSpec
from actorgrad.optim import Optim


def linear_core(name="lin", update="step", lr=0.1, staleness=0):
    torch.manual_seed(0)
    mod = torch.nn.Linear(3, 2)
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(mod.state_dict())
    core = WorkerCore(WorkerSpec(name, mod, Optim(torch.optim.SGD, lr=lr), update, staleness))
    return core, ref


def acks(out):
    """Replies that succeeded: an Ack's data, or the typed reply itself (ForwardDone, CloseReady, UpdateReport)."""
    return {msg.req: msg.data if isinstance(msg, m.Ack) else msg for to, msg in out
            if to is None and isinstance(msg, (m.Ack, m.ForwardDone, m.CloseReady, m.UpdateReport))}


def failures(out):
    return {msg.req: E.from_info(msg.error) for to, msg in out if to is None and isinstance(msg, m.Failure)}


def sends(out, cls=m.Gradient):
    return [(to, msg) for to, msg in out if to is not None and isinstance(msg, cls)]


def forward_from_peer(call=10, step=1, req=1, producer="up", pcall=5):
    """A call whose single input arrives from worker `producer` (with gradient)."""
    return m.Forward(req, call, step, [m.Slot(0)], {}, (m.RefSpec(producer, pcall, 0, True),), True)


def test_forward_with_constant_input_acks_with_shapes():
    core, ref = linear_core()
    x = torch.randn(4, 3)
    out = core.handle(m.Forward(1, 10, 1, [x], {}, (), True))
    meta = acks(out)[1]
    assert meta.structure == m.Slot(0)  # a single tensor
    assert meta.outputs == (m.OutputMeta((4, 2), "float32", True),)
    got = core.handle(m.Fetch(2, 10, 0))
    torch.testing.assert_close(acks(got)[2], ref(x))


def test_value_before_forward_is_kept_until_the_forward_arrives():
    core, ref = linear_core()
    x = torch.randn(4, 3)
    assert core.handle(m.Value(1, 10, 0, 5, x)) == []
    out = core.handle(forward_from_peer())
    assert 1 in acks(out)
    torch.testing.assert_close(core.calls[10].outputs[0], ref(x).detach())


def test_one_pass_sends_input_gradient_and_step_applies_update():
    core, ref = linear_core()
    x = torch.randn(4, 3)
    core.handle(m.Value(1, 10, 0, 5, x))
    core.handle(forward_from_peer())
    g = torch.randn(4, 2)
    plan = m.Plan(2, 100, 1, (m.Expect(10, 0, ((20, 0),)),), ())
    assert core.handle(plan) == []  # waits for its one gradient
    out = core.handle(m.Gradient(100, 1, 10, 0, "down", 20, 0, g))
    assert 2 in acks(out)
    (to, grad_msg), = sends(out)
    assert to == "up" and grad_msg.call == 5 and grad_msg.from_call == 10
    xr = x.clone().requires_grad_()
    ref(xr).backward(g)
    torch.testing.assert_close(grad_msg.tensor, xr.grad)
    out = core.handle(m.Close(3, 1, (10,), (100,), ()))
    report = acks(out)[3]
    assert isinstance(report, m.CloseReady) and report.applied is True and report.step == 1
    torch.testing.assert_close(core.module.weight, ref.weight)  # ready, but nothing applied before Commit
    core.handle(m.Commit(1))
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    torch.testing.assert_close(core.module.weight, ref.weight)
    assert core.calls == {} and core.passes == {}  # everything of the step freed


def test_gradients_from_two_consumers_in_any_order_are_summed():
    results = []
    for order in ((0, 1), (1, 0)):
        core, _ = linear_core()
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
        core.handle(m.Value(1, 10, 0, 5, x))
        core.handle(forward_from_peer())
        gs = [torch.full((4, 2), 1.0), torch.full((4, 2), 2.0)]
        core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((20, 0), (21, 0))),), ()))
        out = core.handle(m.Gradient(100, 1, 10, 0, "a", 20 + order[0], 0, gs[order[0]]))
        assert sends(out) == []  # not complete with one of two
        out = core.handle(m.Gradient(100, 1, 10, 0, "b", 20 + order[1], 0, gs[order[1]]))
        results.append(sends(out)[0][1].tensor)
    torch.testing.assert_close(results[0], results[1])
    expected = torch.full((4, 2), 3.0) @ linear_core()[0].module.weight
    torch.testing.assert_close(results[0], expected)


def test_gradient_before_its_plan_is_held_until_the_plan():
    core, _ = linear_core()
    core.handle(m.Value(1, 10, 0, 5, torch.randn(4, 3)))
    core.handle(forward_from_peer())
    early = core.handle(m.Gradient(100, 1, 10, 0, "down", 20, 0, torch.ones(4, 2)))
    assert early == []
    out = core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((20, 0),)),), ()))
    assert 2 in acks(out) and len(sends(out)) == 1


def test_duplicate_gradient_is_counted_once():
    core, _ = linear_core()
    core.handle(m.Value(1, 10, 0, 5, torch.randn(4, 3)))
    core.handle(forward_from_peer())
    core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((20, 0), (21, 0))),), ()))
    dup = m.Gradient(100, 1, 10, 0, "a", 20, 0, torch.ones(4, 2))
    core.handle(dup)
    assert core.handle(dup) == []  # ignored, still waiting for (21, 0)
    out = core.handle(m.Gradient(100, 1, 10, 0, "b", 21, 0, torch.ones(4, 2)))
    torch.testing.assert_close(sends(out)[0][1].tensor, torch.full((4, 2), 2.0) @ core.module.weight)


def test_gradient_for_unknown_call_fails_the_pass_with_a_clear_error():
    core, _ = linear_core()
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((20, 0),)),), ()))
    out = core.handle(m.Gradient(100, 1, 99, 0, "down", 20, 0, torch.ones(4, 2)))
    err = failures(out)[2]
    assert "unknown call 99" in str(err) and "lin" in str(err) and "down" in str(err)


def test_unexpected_edge_fails_the_pass():
    core, _ = linear_core()
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((20, 0),)),), ()))
    out = core.handle(m.Gradient(100, 1, 10, 0, "other", 77, 3, torch.ones(4, 2)))
    assert "unexpected gradient" in str(failures(out)[2])


def test_gradient_of_wrong_shape_is_a_shape_error_naming_the_sender():
    core, _ = linear_core()
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((20, 0),)),), ()))
    out = core.handle(m.Gradient(100, 1, 10, 0, "down", 20, 0, torch.ones(5, 2)))
    err = failures(out)[2]
    assert isinstance(err, E.ShapeError)
    assert "'down'" in str(err) and "(5, 2)" in str(err) and err.worker == "lin" and err.call == 10


def test_forward_error_is_a_worker_error_and_the_worker_stays_usable():
    core, _ = linear_core()
    out = core.handle(m.Forward(1, 10, 1, [torch.randn(4, 7)], {}, (), True))
    err = failures(out)[1]
    assert isinstance(err, E.WorkerError) and isinstance(err, E.ShapeError)
    assert err.call == 10 and "mat1 and mat2" in str(err)
    core.handle(m.Abort(1, "test"))
    out = core.handle(m.Forward(2, 11, 2, [torch.randn(4, 3)], {}, (), True))
    assert 2 in acks(out)


def test_abort_drops_the_step_and_applies_nothing():
    core, ref = linear_core()
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, torch.ones(4, 2)),)))
    out = core.handle(m.Abort(1, "another worker failed"))
    assert core.calls == {} and core.passes == {} and core.pending.by_step == {}
    torch.testing.assert_close(core.module.weight, ref.weight)
    core.handle(m.Commit(1))  # a stray commit of an aborted step changes nothing
    torch.testing.assert_close(core.module.weight, ref.weight)
    assert core.handle(m.Close(3, 1, (10,), (100,), ())) and isinstance(
        failures(core.handle(m.Close(4, 1, (), (), ())))[4], E.StepAborted)


def test_abort_after_the_close_report_frees_the_previewed_gradients():
    """Close previews the update's gradient norm (a memo keyed by the gradient tensors); an Abort
    before Commit must free those gradients, not leave them held by the memo."""
    import gc
    import weakref

    core, ref = linear_core()
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, torch.ones(4, 2)),)))
    report = acks(core.handle(m.Close(3, 1, (10,), (100,), ())))[3]
    assert isinstance(report, m.CloseReady) and report.metrics["grad_norm"] > 0
    assert core.updates.updater._preview is not None
    refs = [weakref.ref(g) for g in core.pending.by_step[1].values()]
    core.handle(m.Abort(1, "another worker failed"))
    assert core.pending.by_step == {} and core.updates.updater._preview is None
    gc.collect()
    assert refs and all(r() is None for r in refs)
    torch.testing.assert_close(core.module.weight, ref.weight)


def test_pass_rule_applies_after_each_pass_and_keeps_forward_weights_for_later_passes():
    core, ref = linear_core(update="pass")
    x = torch.randn(4, 3)
    core.handle(m.Forward(1, 10, 1, [x], {}, (), True))
    w0 = core.module.weight.detach().clone()
    g1, g2 = torch.randn(4, 2), torch.randn(4, 2)
    out = core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, g1),)))
    assert acks(out)[2]["applied"] is True
    assert not torch.equal(core.module.weight, w0)  # updated after pass 1
    core.handle(m.Plan(3, 101, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, g2),)))
    # The oracle: both gradients at the forward's weights, applied one after the other.
    gw = g1.t() @ x + g2.t() @ x
    torch.testing.assert_close(core.module.weight, w0 - 0.1 * gw)


def test_staleness_gate_holds_a_forward_until_the_previous_step_closes():
    core, _ = linear_core()
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, torch.ones(4, 2)),)))
    out = core.handle(m.Forward(3, 11, 2, [torch.randn(4, 3)], {}, (), True))
    assert 3 not in acks(out)  # step 1 is not closed yet
    out = core.handle(m.Close(4, 1, (10,), (100,), ()))
    assert 4 in acks(out) and 3 not in acks(out)  # ready, but step 1's update has not landed
    out = core.handle(m.Commit(1))
    assert 3 in acks(out)  # committing step 1 released step 2's forward


def test_seed_without_gradient_on_non_scalar_output_is_a_shape_error():
    core, _ = linear_core()
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    out = core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, None),)))
    assert isinstance(failures(out)[2], E.ShapeError)


def test_missing_optimizer_is_a_config_error():
    core = WorkerCore(WorkerSpec("noopt", torch.nn.Linear(3, 2)))
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    out = core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, torch.ones(4, 2)),)))
    err = failures(out)[2]
    assert isinstance(err, E.ConfigError) and "no optimizer" in str(err)


def test_retained_output_is_fetchable_after_close_until_the_next_close():
    core, _ = linear_core()
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    core.handle(m.Close(2, 1, (10,), (), ((10, 0),)))
    core.handle(m.Commit(1))
    assert isinstance(acks(core.handle(m.Fetch(3, 10, 0)))[3], torch.Tensor)
    core.handle(m.Forward(4, 11, 2, [torch.randn(4, 3)], {}, (), True))
    core.handle(m.Close(5, 2, (11,), (), ()))
    core.handle(m.Commit(2))
    assert isinstance(failures(core.handle(m.Fetch(6, 10, 0)))[6], E.StepClosedError)


def test_custom_backward_is_used():
    import actorgrad as ag

    class Scale(ag.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return x * self.w

        def backward(self, inputs, outputs, grad_outputs):
            return [grad_outputs[0] * 10.0], {"w": torch.tensor(1.0)}

    core = WorkerCore(WorkerSpec("s", Scale(), Optim(torch.optim.SGD, lr=1.0), custom_backward=True))
    core.handle(m.Value(1, 10, 0, 5, torch.ones(3)))
    core.handle(forward_from_peer())
    out = core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, torch.ones(3)),)))
    torch.testing.assert_close(sends(out)[0][1].tensor, torch.full((3,), 10.0))
    core.handle(m.Close(3, 1, (10,), (100,), ()))
    core.handle(m.Commit(1))
    assert core.module.w.item() == pytest.approx(1.0)


def test_reset_forgets_the_update_metrics_of_steps_that_never_closed():
    # Recovery rewinds step ids: a step run again after reset() must report only its own updates.
    core, _ = linear_core(update="pass")
    x = torch.randn(4, 3)

    def run_step_1(req):
        core.handle(m.Forward(req, 10, 1, [x], {}, (), True))
        out = core.handle(m.Plan(req + 1, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),),
                                 (m.SeedGrad(10, 0, 0, torch.ones(4, 2)),)))
        assert acks(out)[req + 1]["applied"] is True

    run_step_1(1)  # applied, then the runtime recovers before step 1 closes
    core.reset()
    run_step_1(3)
    report = acks(core.handle(m.Close(5, 1, (10,), (100,), ())))[5]
    assert report.metrics["updates"] == 1


def test_expire_answers_each_stale_step_with_its_own_deadline_error():
    import time

    torch.manual_seed(0)
    core = WorkerCore(WorkerSpec("lin", torch.nn.Linear(3, 2), Optim(torch.optim.SGD, lr=0.1), deadline=5.0))
    core.handle(forward_from_peer(call=10, step=1, req=1, pcall=5))
    core.handle(forward_from_peer(call=11, step=2, req=2, pcall=6))
    errs = failures(core.expire(now=time.monotonic() + 10))
    assert set(errs) == {1, 2}
    for req, step in ((1, 1), (2, 2)):
        assert isinstance(errs[req], E.DeadlineExceeded) and errs[req].step == step
        assert f"for step {step};" in str(errs[req])
    assert not core.calls and not core.steps


def test_a_pass_that_does_not_accumulate_sends_input_gradients_only():
    core, ref = linear_core()
    x = torch.randn(4, 3)
    core.handle(m.Value(1, 10, 0, 5, x))
    core.handle(forward_from_peer())
    g = torch.randn(4, 2)
    core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((20, 0),)),), (), False))
    out = core.handle(m.Gradient(100, 1, 10, 0, "down", 20, 0, g))
    (_, grad_msg), = sends(out)
    torch.testing.assert_close(grad_msg.tensor, g @ ref.weight.detach())  # passed through
    assert acks(out)[2]["applied"] is False
    out = core.handle(m.Close(3, 1, (10,), (100,), ()))
    assert acks(out)[3].applied is False  # nothing pending: the optimizer will not step
    core.handle(m.Commit(1))
    torch.testing.assert_close(core.module.weight, ref.weight)


def test_caller_leaves_get_their_gradient_in_the_plan_reply():
    core, ref = linear_core()
    x = torch.randn(4, 3)
    core.handle(m.Forward(1, 10, 1, [], {"input": x}, (), True, (0,)))
    g = torch.randn(4, 2)
    out = core.handle(m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, g),)))
    call, pos, grad = acks(out)[2]["leaves"][0]
    assert (call, pos) == (10, 0)
    torch.testing.assert_close(grad, g @ ref.weight.detach())


def test_a_leaf_position_beyond_the_arguments_fails_the_call():
    core, _ = linear_core()
    out = core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True, (3,)))
    err = failures(out)[1]
    assert isinstance(err, E.DecodeError) and err.worker == "lin" and "leaf position 3" in str(err)


def test_release_frees_a_no_grad_call_before_its_step_closes():
    core, _ = linear_core()
    core.handle(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), False))
    core.handle(m.Forward(2, 11, 1, [torch.randn(4, 3)], {}, (), True))
    core.handle(m.Release(1, 11))  # saved for backward: not freed
    core.handle(m.Release(1, 10))
    assert set(core.calls) == {11}
    out = core.handle(m.Close(3, 1, (11,), (), ()))
    assert 3 in acks(out)
