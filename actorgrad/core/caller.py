"""The caller's protocol as a state machine without I/O: steps, calls, passes, requests, close and commit.

[Note: caller core] Like ``WorkerCore`` on the other side, ``CallerCore``
never sends, waits, locks or reads a clock. Commands (``call``, ``backward``,
``close``, ``fetch``, ``state``) return the messages to send as ``Send``
records, each numbered on its worker's channel and, for a request, carrying
the ``Request`` record its reply will complete. Replies come back in as
events (``on_reply``) and may produce more messages (a Commit once every
worker of a step is ready, an Abort when something failed). The runtime
drives it: it holds the lock, encodes and hands the sends to the transport,
feeds replies back in, and owns every deadline.

A step's life as the caller sees it::

    open --close()--> closing --every CloseReady--> committed --every UpdateReport--> done
      \\________________ any failure: Abort to every participant, error kept ________/

The close -> ready -> commit sequence: ``Close`` asks each participant to
finish its passes and report; a worker answers once it could apply its
update (``CloseReady``) but applies nothing yet. When every participant is
ready, and only then, the caller sends ``Commit`` to each: a step that fails
anywhere before that applies nothing anywhere (exactness of failed steps).
Workers whose report needs the applied update (``final`` is False) are asked
for it right behind their Commit (an ``UPDATE`` request).

Caller leaves (argument tensors with requires_grad): a worker returns their
gradients in its Plan reply; such a worker stays pending in its pass until that
reply came, even after its CloseReady, and a completed pass is queued in
``leaves_ready`` for the driver to add into the tensors' ``.grad``. The caller
consumes these gradients; it never relays one worker's gradient to another.
"""

from __future__ import annotations

import enum
import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .. import errors as E
from . import messages as m
from .graph import CallRecord, Graph
from .structure import describe

log = logging.getLogger("actorgrad.caller")

# Failed steps stay findable this many steps back, so that old nodes can name their error.
KEEP_FAILED_STEPS = 32


class Kind(enum.Enum):
    """What a request asks for; decides what its reply means to the protocol."""

    FORWARD = "forward"  # one call; the reply is the output metadata (ForwardDone)
    PLAN = "plan"  # one worker's part of a pass; the reply says the part is done
    CLOSE = "close"  # close a step; the reply says the worker is ready to commit (CloseReady)
    UPDATE = "update"  # after Commit: what the applied update did (UpdateReport)
    FETCH = "fetch"  # an output's value
    STATE = "state"  # get or set state, stats, traces

    @property
    def of_step(self) -> bool:
        """Whether a failure of this request fails its step."""
        return self in (Kind.FORWARD, Kind.PLAN, Kind.CLOSE, Kind.UPDATE)


# The reply each kind of request expects (besides Failure); the others are answered with an Ack.
_REPLY: dict[Kind, type] = {Kind.FORWARD: m.ForwardDone, Kind.CLOSE: m.CloseReady, Kind.UPDATE: m.UpdateReport}


@dataclass(eq=False)
class PassRecord:
    """A pass as the caller tracks it."""

    id: int
    step: "StepRecord"
    workers: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    error: Optional[E.ActorgradError] = None
    seeds: list[tuple[int, int]] = field(default_factory=list)  # (call, output) per seed
    # Workers whose Plan reply carries gradients of caller leaves: they stay pending until it comes,
    # even after their CloseReady (Ray does not order replies).
    leaves: set[str] = field(default_factory=set)
    leaf_grads: list[tuple[int, int, Any]] = field(default_factory=list)  # (call, leaf position, gradient)
    leaf_inputs: Optional[list[Any]] = None  # backward(inputs=...): the caller tensors that may accumulate


@dataclass(eq=False)
class StepRecord:
    """A step as the caller tracks it."""

    id: int
    started: float = 0.0  # the driver's clock when the step opened
    calls: dict[str, list[int]] = field(default_factory=dict)
    pass_workers: dict[str, list[int]] = field(default_factory=dict)
    passes: dict[int, PassRecord] = field(default_factory=dict)
    nodes: "weakref.WeakSet[Any]" = field(default_factory=weakref.WeakSet)  # handles the user may still fetch
    error: Optional[E.ActorgradError] = None
    delivered: bool = False  # the error was raised to the user
    close_pending: set[str] = field(default_factory=set)
    closing: bool = False
    committed: bool = False
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    landing: set[str] = field(default_factory=set)  # workers that report their update after Commit
    report: Any = None  # the driver's StepReport, once built
    seeded: dict[tuple[int, int], int] = field(default_factory=dict)  # (call, output) -> pass that seeded it
    released: set[int] = field(default_factory=set)  # calls its worker freed early (Release)
    # Workers closed with the step although it gave them no call or plan (a schedule stepped every step).
    bystanders: set[str] = field(default_factory=set)
    messages: int = 0  # messages the caller sent to workers for this step (requests and one-way)
    replies: int = 0  # replies to this step's requests that came back

    def participants(self) -> set[str]:
        """Workers that got a call, a plan or a close of this step: the ones to close, commit or abort."""
        return set(self.calls) | set(self.pass_workers) | self.bystanders

    @property
    def closed(self) -> bool:
        """Every participant answered the close (and, after Commit, reported its update), and every
        caller leaf's gradient has come."""
        return self.closing and not self.close_pending and not any(p.leaves for p in self.passes.values())


@dataclass(eq=False)
class Request:
    """One request in flight, completed by its reply."""

    req: int
    kind: Kind
    worker: str
    step: Optional[StepRecord]
    obj: Any = None  # the CallRecord, PassRecord or StepRecord the reply updates
    epoch: int = 0  # replies of another epoch (before a recovery) complete nothing
    done: bool = False
    data: Any = None
    error: Optional[E.ActorgradError] = None


@dataclass(eq=False)
class Send:
    """A message for the driver to send: one-way when ``request`` is None."""

    worker: str
    seq: int
    msg: m.Message
    request: Optional[Request] = None


class CallerCore:
    """The caller's side of the protocol, fed with commands and replies; returns what to send."""

    def __init__(self, now: float = 0.0) -> None:
        self.epoch = 0
        self.graph = Graph()
        self.steps: dict[int, StepRecord] = {}
        self.closing: list[StepRecord] = []
        self.requests: dict[int, Request] = {}
        # What a module returns (a wire structure, Slot(i) at tensor i), by call key: (worker, the
        # arguments' flags). A call whose key is here gets its Nodes before its forward ran.
        self.structures: dict[Any, Any] = {}
        self._ids = itertools.count(1)
        self._seq: dict[str, int] = {}
        self.leaves_ready: list[PassRecord] = []  # completed passes whose caller-leaf gradients the driver adds
        self.step = self.open_step(1, now)

    # --- plumbing -----------------------------------------------------------------

    def next_id(self) -> int:
        """A fresh id for a call, a pass or a request (unique in this runtime)."""
        return next(self._ids)

    def open_step(self, step_id: int, now: float) -> StepRecord:
        """Make ``step_id`` the current step."""
        rec = StepRecord(step_id, started=now)
        self.steps[step_id] = rec
        for old in [s for s in self.steps if s < step_id - KEEP_FAILED_STEPS]:
            del self.steps[old]
        self.step = rec
        return rec

    def next_seq(self, worker: str) -> int:
        """Take the next sequence number of the channel to ``worker`` (every frame needs one, in order)."""
        seq = self._seq.get(worker, 0)
        self._seq[worker] = seq + 1
        return seq

    def _send(self, worker: str, msg: m.Message, request: Optional[Request] = None) -> Send:
        step = getattr(msg, "step", None)
        if isinstance(msg, m.Route):  # of the step of the call whose output it routes
            call = self.graph.calls.get(msg.call)
            step = call.step if call is not None else None
        rec = self.steps.get(step) if type(step) is int else None
        if rec is not None:
            rec.messages += 1
        return Send(worker, self.next_seq(worker), msg, request)

    def _request(self, worker: str, msg: Any, kind: Kind, step: Optional[StepRecord], obj: Any = None) -> Send:
        r = Request(msg.req, kind, worker, step, obj, epoch=self.epoch)
        self.requests[r.req] = r
        return self._send(worker, msg, r)

    def post(self, worker: str, msg: m.Message) -> Send:
        """A one-way message (numbered on the worker's channel)."""
        return self._send(worker, msg)

    # --- commands -------------------------------------------------------------------

    def step_for_call(self, now: float) -> StepRecord:
        """The step a new call joins: a failed step ends once its error was raised to the user."""
        if self.step.error is not None and self.step.delivered:
            self.graph.drop_step(self.step.id)
            self.open_step(self.step.id + 1, now)
        return self.step

    def call(self, worker: str, step: StepRecord, args: Any, kwargs: Any, refs: list[m.RefSpec],
             grad_on: bool, leaves: tuple[int, ...] = (), leaf_tensors: tuple = (), key: Any = None,
             expr: bool = False) -> tuple[CallRecord, list[Send]]:
        """One call of ``worker`` in ``step``: its Forward, and a Route to each producer of an input.

        ``leaves``: positions of caller leaves among the argument tensors; ``leaf_tensors``: the caller's
        tensors there (their .grad receives what the passes return). ``key``: what the call's result
        structure is recorded under (``structures``); ``expr``: an operation on Nodes, not a module call.
        """
        cid, req = self.next_id(), self.next_id()
        keys = [(r.call, r.out, r.grad) for r in refs]
        rec = CallRecord(cid, worker, step.id, req, keys, grad_on, leaves=tuple(zip(leaves, leaf_tensors)),
                         key=(worker,) if key is None else key)
        self.graph.add(rec)
        if step.error is not None:
            return rec, []  # the step already failed (its error is not raised yet): nothing is sent for it
        step.calls.setdefault(worker, []).append(cid)
        sends = [self._request(worker, m.Forward(req, cid, step.id, args, kwargs, tuple(refs), grad_on, tuple(leaves),
                                                 expr),
                               Kind.FORWARD, step, rec)]
        sends += [self.post(r.worker, m.Route(r.call, r.out, worker, cid, slot)) for slot, r in enumerate(refs)]
        return rec, sends

    def backward(self, step: StepRecord, seeds: list[tuple[int, int]], grads: list[Any],
                 accumulate: Optional[set[str]] = None,
                 leaf_inputs: Optional[list[Any]] = None) -> tuple[PassRecord, list[Send]]:
        """One pass seeded at ``seeds`` (call, output) with ``grads``: a Plan to each worker it reaches.

        ``accumulate``: the workers whose parameters take this pass's gradient (None: every one);
        ``leaf_inputs``: the caller leaves that do (None: every one).
        """
        plan = self.graph.plan(seeds)
        prec = PassRecord(self.next_id(), step, seeds=list(seeds), leaf_inputs=leaf_inputs)
        step.passes[prec.id] = prec
        for seed in seeds:
            step.seeded[seed] = prec.id
        sends = []
        for worker, expects in plan.items():
            here = tuple(m.SeedGrad(c, o, i, g) for i, ((c, o), g) in enumerate(zip(seeds, grads))
                         if self.graph.calls[c].worker == worker)
            prec.workers.add(worker)
            prec.pending.add(worker)
            if any(self.graph.calls[e.call].leaves for e in expects):
                prec.leaves.add(worker)
            step.pass_workers.setdefault(worker, []).append(prec.id)
            take = accumulate is None or worker in accumulate
            sends.append(self._request(worker, m.Plan(self.next_id(), prec.id, step.id, tuple(expects), here, take),
                                       Kind.PLAN, step, prec))
        return prec, sends

    def close(self, retain: dict[str, tuple[tuple[int, int], ...]], now: float,
              always: Iterable[str] = ()) -> tuple[StepRecord, list[Send]]:
        """Close the current step (a Close to each participant) and open the next one.

        ``retain``: per worker, the outputs (call, out) the user may still fetch after the close.
        ``always``: workers to close with every step, even one that gave them nothing (their LR
        schedule steps with every ag.step()).
        """
        step = self.step
        if step.error is None:
            step.bystanders = set(always) - step.participants()
        sends = []
        for w in sorted(step.participants()):
            calls = tuple(c for c in step.calls.get(w, []) if c not in step.released)
            msg = m.Close(self.next_id(), step.id, calls, tuple(step.pass_workers.get(w, [])),
                          retain.get(w, ()))
            step.close_pending.add(w)
            sends.append(self._request(w, msg, Kind.CLOSE, step, step))
        step.closing = True
        self.closing.append(step)
        self.open_step(step.id + 1, now)
        return step, sends

    def end_failed_step(self, now: float) -> StepRecord:
        """The current step failed before its close: drop it and open the next one; return it."""
        step = self.step
        self.graph.drop_step(step.id)
        self.open_step(step.id + 1, now)
        return step

    def finish(self, step: StepRecord) -> None:
        """A closed step is over (done, or its error raised): forget its calls."""
        if step in self.closing:
            self.closing.remove(step)
        self.graph.drop_step(step.id)

    def release(self, rec: CallRecord) -> list[Send]:
        """No Node of ``rec`` (a call under ag.no_grad()) is left: let its worker free it before the step closes.

        Only while its step is open: a closing step frees it anyway, and the Close must not name a
        call the worker has already dropped. Routes of the call went out before (on the same channel),
        because a Node passed to another call lived until that call's Route was sent.
        """
        step = self.steps.get(rec.step)
        if rec.saved or step is None or step is not self.step or step.closing or step.error is not None:
            return []
        calls = step.calls.get(rec.worker)
        if calls is None or rec.id not in calls or rec.id in step.released:
            return []
        step.released.add(rec.id)  # still in the step's picture (ag.graph), no longer in its Close
        return [self.post(rec.worker, m.Release(rec.step, rec.id))]

    def fetch(self, call: CallRecord, out: int) -> tuple[Request, list[Send]]:
        """Ask for the value of output ``out`` of ``call``."""
        send = self._request(call.worker, m.Fetch(self.next_id(), call.id, out), Kind.FETCH, None)
        assert send.request is not None
        return send.request, [send]

    def state(self, worker: str, what: str, state: Any = None, *, set_: bool = False) -> tuple[Request, list[Send]]:
        """Get (or with ``set_``, replace) one kind of a worker's state."""
        msg: Any = m.SetState(self.next_id(), what, state) if set_ else m.GetState(self.next_id(), what)
        send = self._request(worker, msg, Kind.STATE, None)
        assert send.request is not None
        return send.request, [send]

    # --- events ----------------------------------------------------------------------

    def on_reply(self, r: Request, reply: Optional[m.Message], error: Optional[E.ActorgradError] = None) -> list[Send]:
        """A request's reply (or the error that stands for it) arrived; return what follows from it."""
        if r.done or r.epoch != self.epoch:
            return []  # answered already, or of an epoch before a recovery
        self.requests.pop(r.req, None)
        r.done = True
        if r.step is not None:
            r.step.replies += 1
        sends: list[Send] = []
        expected = _REPLY.get(r.kind, m.Ack)
        if error is not None:
            r.error = error
        elif isinstance(reply, m.Failure):
            r.error = E.from_info(reply.error)
        elif type(reply) is expected:
            r.data = reply.data if isinstance(reply, m.Ack) else reply
            sends = self._on_ack(r)
        else:
            r.error = E.DecodeError(f"the reply to a {r.kind.value} request must be {expected.__name__} or "
                                    f"Failure, got {type(reply).__name__}", worker=r.worker)
        if r.error is not None:
            sends += self._on_failure(r)
        return sends

    def _on_ack(self, r: Request) -> list[Send]:
        if r.kind is Kind.FORWARD:
            return self._forward_done(r)
        if r.kind is Kind.PLAN:
            prec: PassRecord = r.obj
            if prec.error is None and r.worker in prec.leaves:
                data = r.data if isinstance(r.data, dict) else {}
                prec.leaf_grads.extend((int(c), int(k), g) for c, k, g in data.get("leaves", ()))
            prec.leaves.discard(r.worker)
            prec.pending.discard(r.worker)
            self._pass_progress(prec)
        elif r.kind is Kind.CLOSE:
            return self._close_ready(r)
        elif r.kind is Kind.UPDATE:
            self._update_report(r)
        return []

    def _forward_done(self, r: Request) -> list[Send]:
        rec: CallRecord = r.obj
        done: m.ForwardDone = r.data
        rec.meta = done
        known = self.structures.setdefault(rec.key, done.structure)
        if known != done.structure and r.step is not None:
            return self.fail_step(r.step, E.ConfigError(
                f"the module's output structure changed: it returned {describe(done.structure)}, but an earlier call with the same argument "
                f"flags returned {describe(known)}; a call's Nodes are handed out before its forward runs, so a "
                "module must return the same structure (and the same constants) for calls with the same flags "
                "(bool, None and str arguments) and number of arguments; return a tensor where it varies",
                worker=r.worker, call=rec.id, step=rec.step))
        return []

    def _close_ready(self, r: Request) -> list[Send]:
        step: StepRecord = r.obj
        ready: m.CloseReady = r.data
        step.reports[r.worker] = {"calls": ready.calls, "passes": ready.passes, "applied": ready.applied,
                                  "version": ready.version, **ready.metrics}
        if not ready.final:
            step.landing.add(r.worker)
        step.close_pending.discard(r.worker)
        # A worker closes a step only after finishing all of its passes; its pass replies may
        # still be on their way (Ray does not order replies).
        for pid in step.pass_workers.get(r.worker, []):
            prec = step.passes.get(pid)
            if prec is not None and r.worker not in prec.leaves:  # caller-leaf gradients come with the Plan reply
                prec.pending.discard(r.worker)
                self._pass_progress(prec)
        if step.close_pending or step.error is not None or step.committed:
            return []
        # Every worker is ready: now, and only now, they apply the step's updates.
        step.committed = True
        sends = []
        for w in sorted(step.participants()):
            sends.append(self.post(w, m.Commit(step.id)))
            if w in step.landing:
                # Its report needs the update applied (its norm): ask right behind the Commit.
                step.close_pending.add(w)
                sends.append(self._request(w, m.GetState(self.next_id(), "update"), Kind.UPDATE, step, step))
        return sends

    def _pass_progress(self, prec: PassRecord) -> None:
        """A pass that completed without error hands its caller-leaf gradients to the driver."""
        if not prec.pending and prec.error is None and prec.leaf_grads:
            self.leaves_ready.append(prec)

    def _update_report(self, r: Request) -> None:
        step: StepRecord = r.obj
        update: m.UpdateReport = r.data
        old = step.reports.get(r.worker)
        if old is not None and update.step == step.id:
            # The update's metrics; the counts of calls and passes stay those of the close.
            step.reports[r.worker] = {**old, **update.metrics, "applied": update.applied, "version": update.version}
        step.close_pending.discard(r.worker)

    def _on_failure(self, r: Request) -> list[Send]:
        err = r.error
        assert err is not None
        if err.worker is None:
            err.worker = r.worker
        if err.step is None and r.step is not None and r.kind.of_step:
            err.step = r.step.id
        if r.kind is Kind.PLAN and r.obj.error is None:
            r.obj.error = err
        if r.step is not None and r.kind.of_step:
            return self.fail_step(r.step, err)
        return []

    def fail_step(self, step: StepRecord, err: E.ActorgradError) -> list[Send]:
        """Abort a step everywhere; the first error is the step's error."""
        if step.error is not None:
            return []
        step.error = err
        log.warning("step %d failed: %s", step.id, getattr(err, "message", err))
        reason = f"{type(err).__name__} in worker '{err.worker}'"
        sends = [self.post(w, m.Abort(step.id, reason)) for w in sorted(step.participants())]
        for prec in step.passes.values():
            if prec.error is None:
                prec.error = err
        return sends

    def lost(self, requests: Iterable[Request], err_for: Any) -> list[Send]:
        """Requests that can never be answered (their worker is gone): fail each with ``err_for(request)``."""
        sends = []
        for r in list(requests):
            sends += self.on_reply(r, None, err_for(r))
        return sends

    # --- epochs ------------------------------------------------------------------------

    def new_epoch(self, first_step: int, now: float) -> None:
        """Start over after a recovery or a rewind: every step, request and channel number is forgotten.

        Steps still known keep an error (StepAborted) so that their nodes and handles say why they
        cannot be used; replies of the old epoch complete nothing.
        """
        self.epoch += 1
        for r in self.requests.values():
            r.done = True
        self.requests.clear()
        self._seq = {}
        self.graph = Graph()
        for old in self.steps.values():
            if old.error is None:
                old.error = E.StepAborted("the runtime was reset (recovery, or ag.load) while this step was open",
                                          step=old.id)
            old.delivered = True
        self.closing.clear()
        self.leaves_ready.clear()
        self.steps = {}
        self.open_step(first_step, now)

    # --- questions ---------------------------------------------------------------------

    def in_flight(self, step: StepRecord) -> list[Request]:
        """The requests of ``step`` still unanswered."""
        return [r for r in self.requests.values() if r.step is step]

    def open_steps(self) -> list[StepRecord]:
        """Steps with participants that have not committed (what a recovery loses)."""
        return [s for s in self.steps.values() if s.participants() and not s.committed]
