"""The call table: forward queue order, early values, dropping, retained outputs."""

import torch

from actorgrad.core import messages as m
from actorgrad.core.calls import CallStatus, CallTable


def fwd(call, step=1, n_inputs=1):
    refs = tuple(m.RefSpec("up", 100 + i, 0, True) for i in range(n_inputs))
    return m.Forward(call, call, step, [m.Slot(i) for i in range(n_inputs)], {}, refs, True)


def test_a_value_before_its_forward_waits_and_is_merged():
    t = CallTable("w")
    x = torch.ones(2)
    t.add_value(m.Value(1, 10, 0, 100, x))
    assert 10 in t.early
    c = t.add(fwd(10), 0.0)
    assert c.ready() and c.values[0] is x and not t.early


def test_forwards_run_in_issue_order_and_a_waiting_call_blocks_later_ones():
    t = CallTable("w")
    t.add(fwd(10), 0.0)
    t.add(fwd(11), 0.0)
    t.add_value(m.Value(1, 11, 0, 100, torch.ones(1)))
    assert list(t.pop_ready(lambda step: True)) == []  # 10 waits: 11 must too
    t.add_value(m.Value(1, 10, 0, 100, torch.ones(1)))
    assert [c.id for c in t.pop_ready(lambda step: True)] == [10, 11] and not t.queue


def test_the_gate_holds_a_ready_call():
    t = CallTable("w")
    t.add(fwd(10, n_inputs=0), 0.0)
    assert list(t.pop_ready(lambda step: False)) == [] and list(t.queue) == [10]


def test_duplicate_values_are_ignored():
    t = CallTable("w")
    c = t.add(fwd(10), 0.0)
    a, b = torch.ones(1), torch.zeros(1)
    t.add_value(m.Value(1, 10, 0, 100, a))
    t.add_value(m.Value(1, 10, 0, 100, b))
    assert c.values[0] is a
    c.status = CallStatus.DONE
    t.add_value(m.Value(1, 10, 1, 100, b))
    assert 1 not in c.values


def test_drop_returns_the_live_records_and_cleans_the_queue():
    t = CallTable("w")
    t.add(fwd(10), 0.0)
    t.add(fwd(11), 0.0)
    gone = t.drop([10, 99])
    assert [c.id for c in gone] == [10] and list(t.queue) == [11]


def test_forget_early_drops_only_that_steps_values():
    t = CallTable("w")
    t.add_value(m.Value(1, 10, 0, 100, torch.ones(1)))
    t.add_value(m.Value(2, 20, 0, 100, torch.ones(1)))
    t.forget_early(1)
    assert list(t.early) == [20]


def test_retained_outputs_live_until_a_later_step_closes():
    t = CallTable("w")
    c = t.add(fwd(10, n_inputs=0), 0.0)
    c.outputs = [torch.ones(1), torch.zeros(1)]
    t.retain(1, [10], {(10, 1)})
    assert t.kept(10, 1) is c.outputs[1] and t.kept(10, 0) is None
    t.retain(2, [], set())
    assert t.kept(10, 1) is None
    assert t.stats() == {"calls": 1, "saved": 0, "retained": 0, "queued_forwards": 1}
