"""The caller core driven by hand, like tests/core/test_worker.py drives the worker: no transport, no clock."""

from __future__ import annotations

import torch

from actorgrad import errors as E
from actorgrad.core import messages as m
from actorgrad.core.caller import CallerCore, Kind, Send


def ack(send: Send, data):
    return send.request, m.Ack(send.msg.req, data)


def done(send: Send, shape=(4, 2), single=True, n=1):
    structure = m.Slot(0) if single else tuple(m.Slot(i) for i in range(n))
    return send.request, m.ForwardDone(send.msg.req, structure, (m.OutputMeta(shape, "float32", True),) * n, 0)


def ready(send: Send, final=True, applied=True):
    return send.request, m.CloseReady(send.msg.req, send.msg.step, 1, 1, applied, 1, final, {"updates": 1})


def two_calls(core: CallerCore):
    """enc(x) -> head(h): two calls, one gradient edge."""
    step = core.step_for_call(0.0)
    enc, s1 = core.call("enc", step, [torch.ones(4, 3)], {}, [], True)
    ref = m.RefSpec("enc", enc.id, 0, True)
    head, s2 = core.call("head", step, [m.Slot(0)], {}, [ref], True)
    return step, enc, head, s1, s2


def test_a_call_sends_its_forward_and_routes_numbered_per_worker():
    core = CallerCore()
    step, enc, head, s1, s2 = two_calls(core)
    assert [(s.worker, s.seq, type(s.msg).__name__) for s in s1 + s2] == [
        ("enc", 0, "Forward"), ("head", 0, "Forward"), ("enc", 1, "Route")]
    assert s1[0].request.kind is Kind.FORWARD and s2[1].request is None
    assert s2[1].msg == m.Route(enc.id, 0, "head", head.id, 0)
    assert step.participants() == {"enc", "head"}


def test_replies_out_of_order_and_the_close_ready_commit_sequence():
    core = CallerCore()
    step, enc, head, s1, s2 = two_calls(core)
    prec, plans = core.backward(step, [(head.id, 0)], [None])
    assert sorted(s.worker for s in plans) == ["enc", "head"] and prec.pending == {"enc", "head"}
    # Replies come in any order: head's forward after enc's plan.
    assert core.on_reply(*ack(plans[0] if plans[0].worker == "enc" else plans[1], True)) == []
    assert core.on_reply(*done(s2[0])) == []
    assert core.on_reply(*done(s1[0], (4, 8))) == []
    assert head.meta.outputs[0].shape == (4, 2) and core.structures == {("enc",): m.Slot(0), ("head",): m.Slot(0)}
    closed, closes = core.close({"head": ((head.id, 0),)}, now=1.0)
    assert closed is step and core.step.id == 2 and step.closing
    assert [(s.worker, type(s.msg).__name__) for s in closes] == [("enc", "Close"), ("head", "Close")]
    assert closes[1].msg.retain == ((head.id, 0),)
    by_worker = {s.worker: s for s in closes}
    # One worker ready: nothing is committed yet.
    assert core.on_reply(*ready(by_worker["head"])) == []
    assert not step.committed and step.close_pending == {"enc"}
    assert prec.pending == {"enc"} or prec.pending == set()  # head's part is done once it closed
    # The last ready: Commit to every participant; enc reports its update after it (final=False).
    after = core.on_reply(*ready(by_worker["enc"], final=False))
    assert [(s.worker, type(s.msg).__name__) for s in after] == [("enc", "Commit"), ("enc", "GetState"),
                                                                 ("head", "Commit")]
    assert step.committed and step.close_pending == {"enc"} and after[1].request.kind is Kind.UPDATE
    assert not step.closed
    core.on_reply(after[1].request, m.UpdateReport(after[1].msg.req, step.id, True, 2, {"grad_norm": 2.5}))
    assert step.closed and step.reports["enc"]["grad_norm"] == 2.5 and step.reports["enc"]["calls"] == 1
    assert step.reports["enc"]["version"] == 2
    core.finish(step)
    assert core.closing == [] and core.graph.calls == {}


def test_a_failure_fails_the_step_once_and_aborts_every_participant():
    core = CallerCore()
    step, enc, head, s1, s2 = two_calls(core)
    err = E.from_info(E.to_info(E.ShapeError("bad shape", worker="head", call=head.id)))
    sends = core.on_reply(s2[0].request, m.Failure(s2[0].msg.req, E.to_info(err)))
    assert [(s.worker, type(s.msg).__name__) for s in sends] == [("enc", "Abort"), ("head", "Abort")]
    assert isinstance(step.error, E.ShapeError) and step.error.step == step.id
    # A second failure of the same step adds nothing: the first error is the step's error.
    assert core.on_reply(s1[0].request, None, E.WorkerDied("gone", worker="enc")) == []
    assert isinstance(step.error, E.ShapeError)
    # Calls into a failed step send nothing; once its error was raised, the next call opens a new step.
    rec, none = core.call("enc", step, [], {}, [], True)
    assert none == [] and core.step is step
    step.delivered = True
    assert core.step_for_call(2.0).id == step.id + 1


def test_a_reply_of_the_wrong_type_fails_its_step():
    core = CallerCore()
    step, enc, head, s1, s2 = two_calls(core)
    core.on_reply(*ack(s1[0], {"single": True}))  # an untyped Ack where ForwardDone belongs
    assert isinstance(step.error, E.DecodeError) and "ForwardDone" in step.error.message


def test_a_changed_output_structure_fails_the_step():
    core = CallerCore()
    step = core.step_for_call(0.0)
    _, a = core.call("w", step, [], {}, [], True)
    _, b = core.call("w", step, [], {}, [], True)
    core.on_reply(*done(a[0]))
    sends = core.on_reply(*done(b[0], (1,), single=False, n=2))
    assert isinstance(step.error, E.ConfigError) and "output structure" in step.error.message
    assert [type(s.msg).__name__ for s in sends] == ["Abort"]


def test_a_late_reply_of_an_earlier_epoch_completes_nothing():
    core = CallerCore()
    step, enc, head, s1, s2 = two_calls(core)
    core.new_epoch(first_step=7, now=3.0)
    assert core.step.id == 7 and isinstance(step.error, E.StepAborted) and step.delivered
    assert core.on_reply(*done(s1[0])) == []
    assert enc.meta is None and core.requests == {}
    # Channel numbering starts over with the epoch.
    _, sends = core.call("enc", core.step_for_call(3.0), [], {}, [], True)
    assert sends[0].seq == 0 and sends[0].request.epoch == 1


def test_a_lost_worker_fails_its_requests_and_their_step():
    core = CallerCore()
    step, enc, head, s1, s2 = two_calls(core)
    died = core.lost(core.in_flight(step)[:1], lambda r: E.WorkerDied("its process died", worker=r.worker))
    assert isinstance(step.error, E.WorkerDied) and {s.worker for s in died} == {"enc", "head"}
    assert core.open_steps() == [step]


def test_fetch_and_state_requests_do_not_belong_to_a_step():
    core = CallerCore()
    step, enc, head, s1, s2 = two_calls(core)
    r, sends = core.fetch(head, 0)
    assert r.kind is Kind.FETCH and sends[0].msg == m.Fetch(r.req, head.id, 0)
    core.on_reply(r, None, E.WorkerError("boom", worker="head"))
    assert step.error is None and r.error.worker == "head"
    r2, sends2 = core.state("enc", "module", {"w": torch.zeros(1)}, set_=True)
    assert isinstance(sends2[0].msg, m.SetState) and sends2[0].seq == 2  # after Forward and Route
    core.on_reply(r2, m.Ack(r2.req, None))
    assert r2.done and r2.error is None


def test_inputs_mark_plans_that_do_not_accumulate():
    core = CallerCore()
    step, enc, head, s1, s2 = two_calls(core)
    _, plans = core.backward(step, [(head.id, 0)], [None], accumulate={"enc"})
    assert {s.worker: s.msg.accumulate for s in plans} == {"enc": True, "head": False}


def test_caller_leaf_gradients_come_with_the_plan_reply_and_hold_the_close():
    core = CallerCore()
    step = core.step_for_call(0.0)
    x = torch.ones(4, 3, requires_grad=True)
    enc, s1 = core.call("enc", step, [x.detach()], {}, [], True, (0,), (x,))
    assert s1[0].msg.leaves == (0,) and enc.leaves == ((0, x),)
    prec, plans = core.backward(step, [(enc.id, 0)], [None])
    assert prec.leaves == {"enc"}
    _, closes = core.close({}, now=1.0)
    core.on_reply(*ready(closes[0]))  # the CloseReady overtook the Plan's reply
    assert prec.pending == {"enc"} and not step.closed
    core.on_reply(*ack(plans[0], {"leaves": [[enc.id, 0, torch.full((4, 3), 2.0)]]}))
    assert core.leaves_ready == [prec] and prec.leaf_grads[0][:2] == (enc.id, 0) and step.closed


def test_always_closed_workers_join_every_step():
    core = CallerCore()
    step, enc, head, s1, s2 = two_calls(core)
    closed, closes = core.close({}, now=1.0, always=["sched", "enc"])
    assert [s.worker for s in closes] == ["enc", "head", "sched"]
    assert closed.bystanders == {"sched"} and closes[2].msg.calls == ()
    empty, closes = core.close({}, now=2.0, always=["sched"])
    assert [s.worker for s in closes] == ["sched"]


def test_release_of_a_no_grad_call_leaves_it_out_of_the_close():
    core = CallerCore()
    step = core.step_for_call(0.0)
    rec, _ = core.call("enc", step, [torch.ones(2)], {}, [], False)
    kept, _ = core.call("enc", step, [torch.ones(2)], {}, [], False)
    (send,) = core.release(rec)
    assert send.msg == m.Release(step.id, rec.id) and send.request is None
    assert core.release(rec) == []  # once
    _, closes = core.close({}, now=1.0)
    assert closes[0].msg.calls == (kept.id,)
    assert core.release(kept) == []  # its step is closing: the close frees it
