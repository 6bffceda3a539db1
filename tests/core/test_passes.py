"""The pass table and the summing of arrived gradients."""

import pytest
import torch

from actorgrad import errors as E
from actorgrad.core import messages as m
from actorgrad.core.calls import CallState, CallStatus
from actorgrad.core.passes import Arrived, PassStatus, PassTable, sum_arrived
from actorgrad.core.vjp import Saved


def error(cls, text, call=None, step=None, exc=None):
    return cls(text, worker="w", call=call, step=step)


def plan(pid, step=1):
    return m.Plan(pid, pid, step, (), ())


def done_call(outputs, requires_grad=True):
    c = CallState(m.Forward(1, 10, 1, [], {}, (), True), status=CallStatus.DONE, outputs=outputs)
    c.saved = Saved([], [o.detach().requires_grad_(requires_grad) for o in outputs])
    return c


def test_early_gradients_wait_for_their_plan_and_go_with_their_step():
    t = PassTable()
    g1 = m.Gradient(100, 1, 10, 0, "down", 20, 0, None)
    g2 = m.Gradient(200, 2, 10, 0, "down", 20, 0, None)
    t.keep_early(g1)
    t.keep_early(g2)
    t.forget_early(2)
    assert t.take_early(100) == [g1] and t.take_early(200) == []


def test_open_passes_and_drop():
    t = PassTable()
    a, b = t.add(plan(100), 0.0), t.add(plan(101), 0.0)
    b.status = PassStatus.FAILED
    assert [p.id for p in t.open_passes()] == [100] and a.open and not b.open
    t.keep_early(m.Gradient(102, 1, 10, 0, "down", 20, 0, None))
    t.drop([100, 102])
    assert list(t.passes) == [101] and not t.early


def test_all_done_once_every_planned_call_ran_its_vjp():
    ps = PassTable().add(plan(100), 0.0)
    ps.ledger.expect(10, 0, {(20, 0)})
    ps.ledger.expect(11, 0, {(21, 0)})
    ps.done_calls.add(10)
    assert not ps.all_done()
    ps.done_calls.add(11)
    assert ps.all_done()


def test_sum_arrived_sums_each_outputs_gradients_and_fills_a_scalar_seed():
    ps = PassTable().add(plan(100), 0.0)
    c = done_call([torch.zeros(2), torch.zeros(())])
    ps.arrived[(10, 0)] = [Arrived((20, 0), "a", torch.ones(2)), Arrived((21, 0), "b", torch.full((2,), 2.0))]
    ps.arrived[(10, 1)] = [Arrived((m.SEED, 0), "caller", None, seed=True)]
    got = sum_arrived(ps, c, False, error)
    torch.testing.assert_close(got[0], torch.full((2,), 3.0))
    torch.testing.assert_close(got[1], torch.ones(()))


@pytest.mark.parametrize("tensor, cls", [(torch.ones(3), E.ShapeError), (torch.ones(2, dtype=torch.long), E.DTypeError)])
def test_sum_arrived_rejects_wrong_shapes_and_dtypes(tensor, cls):
    ps = PassTable().add(plan(100), 0.0)
    c = done_call([torch.zeros(2)])
    ps.arrived[(10, 0)] = [Arrived((20, 0), "a", tensor)]
    with pytest.raises(cls, match="from worker 'a' call 20 slot 0"):
        sum_arrived(ps, c, False, error)


def test_a_seed_on_an_output_without_grad_is_a_config_error_unless_backward_is_custom():
    ps = PassTable().add(plan(100), 0.0)
    c = done_call([torch.zeros(())], requires_grad=False)
    ps.arrived[(10, 0)] = [Arrived((m.SEED, 0), "caller", None, seed=True)]
    with pytest.raises(E.ConfigError):
        sum_arrived(ps, c, False, error)
    assert sum_arrived(ps, c, True, error)[0] is not None
