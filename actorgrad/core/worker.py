"""WorkerCore: one module's state machine. ``handle(msg)`` returns what to send.

Rules this file keeps:

1. A worker runs its forward calls in the order the caller issued them (so
   buffers and RNG advance deterministically), each once all of its input
   slots have arrived and its step is within ``max_staleness`` of the last
   applied update.
2. A call's VJP for a pass runs once every edge the pass's Plan lists for
   that call's outputs has delivered one gradient message; it then sends one
   message (maybe empty) to the producer of every input that carries a
   gradient, so the producers' counts always complete.
3. A pass is complete here when every call it plans here has run its VJP;
   the update rule then sees its gradients (see rules.py).
4. A step closes in two phases (steps.py has its lifecycle). On Close, once
   all its calls ran and all its passes completed here, the worker answers
   that it is ready (and what it would apply). Only on Commit, which the
   caller sends once every worker is ready, does the rule apply what it holds
   and the step's state get freed: a step that fails anywhere before that
   applies nothing anywhere.
5. An aborted step leaves nothing behind and applies nothing.

The state is held by parts, each owning one concern: calls.py (calls,
forward queue, early values, retained outputs), passes.py (passes, arrived
gradients), steps.py (the step lifecycle), weights.py (stashes and
snapshots), updates.py (rule and pending gradients), diagnose.py (errors).
This class routes messages between them.

Nothing here does IO: the host delivers the outbox. ``(None, msg)`` in the
outbox is a reply to the caller.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from .. import errors as E
from . import messages as m
from . import module_state
from .calls import CALL_DONE, CALL_FAILED, CALL_WAITING, CallState, CallTable
from .diagnose import Diagnosis, describe_missing, fmt_edges
from .leaves import mark_leaves
from .ledger import Arrival
from .optim import OptimizerSpec
from .passes import PASS_COMPLETE, PASS_FAILED, Arrived, PassState, PassTable, sum_arrived
from .rng import WorkerRng
from .rules import Rule, add_grads
from .replicas import ReplicaSync
from .structure import TypeResolver
from .steps import ABORTED, CLOSED, CLOSING, COMMITTING, OPEN, READY, Phase, StepState, StepTable
from .trace import MESSAGE_TID, Tracer, now_us
from .updates import Updates
from .vjp import default_vjp, make_leaves, map_leaves, run_forward
from .weights import WeightVersions

log = logging.getLogger("actorgrad.worker")

Out = tuple[Optional[str], m.Message]


@dataclass
class WorkerSpec:
    """Everything a host needs to build a WorkerCore."""

    name: str
    module: torch.nn.Module
    optimizer: Optional[OptimizerSpec] = None
    update: Union[str, Callable[..., Any], Rule] = "step"
    max_staleness: int = 0
    device: Optional[str] = None
    num_threads: Optional[int] = None
    trace: bool = False
    check_finite: bool = False  # fail with NonFiniteError where NaN/Inf first appears
    deadline: Optional[float] = None  # seconds a step may hold state here without progress
    custom_backward: bool = False  # the module overrides ag.Module.backward: call it for each VJP
    seed: Optional[int] = None  # the runtime's seed: this worker's generator is seeded from it and the name
    replicas: tuple[str, ...] = ()  # a replicated worker: every replica's name, in replica order (core/replicas.py)


class WorkerCore:
    """The state machine of one worker; see the rules at the top of this file."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.name = spec.name
        self.device = torch.device(spec.device) if spec.device else torch.device("cpu")
        self.module = spec.module.to(self.device)
        # The mode (train/eval) that calls arriving from now on run in: worker.train()/eval() set it.
        self.training = bool(self.module.training)
        self.rng = WorkerRng(spec.seed, self.name, self.device)
        self.sync = ReplicaSync(self.name, spec.replicas)
        # Classes the caller's arguments name are looked up in the module's own globals too: there
        # cloudpickle rebuilt the user's script's classes that the module uses.
        self.types = TypeResolver(_namespaces(self.module))
        self.max_staleness = int(spec.max_staleness)
        self.custom_backward = bool(spec.custom_backward)
        self.check_finite = bool(spec.check_finite)
        self.deadline = spec.deadline
        self.tracer = Tracer(self.name, spec.trace)
        self.diagnosis = Diagnosis(self.name, self.module)
        self.updates = Updates(self.name, self.module, spec.optimizer, spec.update, self._oldest_weights)
        self.weights = WeightVersions(self.module, self.updates.updater, self.max_staleness,
                                      self.updates.rule.stashes_weights)
        # What the hosting transport holds for this worker (frames out of order), for stats().
        self.host_stats: Callable[[], dict[str, int]] = dict
        self._out: list[Out] = []
        self.messages_in = 0  # counted for stats(): a regression in messages per step shows there
        self.messages_out = 0
        self._init_steps()

    def _init_steps(self) -> None:
        """Every piece of per-step state, empty; the one place that lists it (init and reset)."""
        self.call_table = CallTable(self.name)
        self.pass_table = PassTable()
        self.step_table = StepTable()
        # The tables' dicts under short names: hosts and tests read them, and the message path uses them often.
        self.calls: dict[int, CallState] = self.call_table.calls
        self.passes: dict[int, PassState] = self.pass_table.passes
        self.steps: dict[int, StepState] = self.step_table.live

    @property
    def aborted(self) -> Any:
        """Ids of the steps aborted here."""
        return self.step_table.aborted

    @property
    def top_step(self) -> int:
        """The latest step the caller has sent a call, plan or close of."""
        return self.step_table.top_step

    @property
    def pending(self) -> Any:
        """Gradients computed here and not yet applied, per step."""
        return self.updates.pending

    # --- entry point --------------------------------------------------------

    def handle(self, msg: m.Message, defer: bool = False) -> list[Out]:
        """Process one message; return the messages to send and replies to make.

        With ``defer``, closing steps (updates) waits for ``poll()``: a host sends the outbox
        first, so that gradients leave before this worker spends time on its update.
        """
        self._out = []
        self.messages_in += 1
        match msg:
            case m.Forward():
                self.step_table.seen(msg.step)
                self._on_forward(msg)
            case m.Value():
                if msg.step not in self.step_table.aborted:
                    self.call_table.add_value(msg)
            case m.Route():
                self._on_route(msg)
            case m.Plan():
                self.step_table.seen(msg.step)
                self._on_plan(msg)
            case m.Gradient():
                self._on_gradient(msg)
            case m.Close():
                self.step_table.seen(msg.step)
                self._on_close(msg)
            case m.Commit():
                if not self.step_table.on_commit(msg.step) and msg.step in self.steps:
                    log.warning("%s: commit of step %d before it was ready here ignored", self.name, msg.step)
            case m.Abort():
                if msg.step > self.top_step:
                    log.warning("%s: abort of step %d refused: no call of it has come here (latest: %d)",
                                self.name, msg.step, self.top_step)
                else:
                    self._on_abort(msg)
            case m.Fetch():
                self._on_fetch(msg)
            case m.Release():
                self._on_release(msg)
            case m.Shard():
                why = self.sync.accept(msg, self.step_table.ended)
                if why is not None:
                    log.warning("%s: refused %s", self.name, why)
            case m.GetState():
                self._on_get_state(msg)
            case m.SetState():
                self._on_set_state(msg)
            case _:
                raise E.DecodeError(f"a worker cannot handle a {type(msg).__name__} message", worker=self.name)
        self._advance(closes=not defer)
        out, self._out = self._out, []
        return out

    def poll(self) -> list[Out]:
        """Do deferred work (steps ready to close: their updates); return what to send."""
        self._out = []
        self._advance(closes=True)
        out, self._out = self._out, []
        return out

    def has_deferred(self) -> bool:
        """Whether some step has its Close and may be ready to close."""
        return self.step_table.has_close()

    # --- small helpers ------------------------------------------------------

    def _send(self, to: str, msg: m.Message) -> None:
        self.messages_out += 1
        self._out.append((to, msg))

    def _ack(self, req: int, data: Any) -> None:
        self._out.append((None, m.Ack(req, data)))

    def _fail(self, req: int, err: E.ActorgradError) -> None:
        self._out.append((None, m.Failure(req, E.to_info(err))))

    def _gate_open(self, step: int) -> bool:
        """A forward of ``step`` may run when no earlier step more than k behind is still open."""
        return not self.step_table.oldest_open_below(step - self.max_staleness)

    # --- forward --------------------------------------------------------------

    def _on_forward(self, msg: m.Forward) -> None:
        if self.step_table.ended(msg.step):
            self._fail(msg.req, self.diagnosis.error(
                E.StepAborted, "forward of a step that was already aborted or closed", msg.call, msg.step))
            return
        if msg.call in self.calls:
            log.warning("%s: duplicate forward for call %d ignored", self.name, msg.call)
            return
        self.call_table.add(msg, now_us() if self.tracer.enabled else 0.0).training = self.training
        self.step_table.open(msg.step).calls.append(msg.call)

    def _run_forward(self, c: CallState) -> None:
        msg = c.msg
        values = [c.values[i].to(self.device) for i in range(len(msg.refs))]
        leaves = make_leaves(values, [r.grad and msg.save for r in msg.refs])
        params = self.weights.for_forward(c)
        t0 = now_us() if self.tracer.enabled else 0.0
        args, kwargs, caller = msg.args, msg.kwargs, []
        if msg.leaves and msg.save:
            try:
                (args, kwargs), caller = mark_leaves((args, kwargs), msg.leaves)
            except (IndexError, TypeError) as exc:
                self.weights.release(c)
                self._fail_call(c, self.diagnosis.error(E.DecodeError, f"Forward.leaves: {exc}", c.id, c.step))
                return
        try:
            args = _to_device(args, self.device)
            kwargs = _to_device(kwargs, self.device)
            # Caller leaves go after the routed inputs: their gradients are the VJP's extra input gradients.
            if self.module.training != c.training and not msg.expr:
                self.module.train(c.training)
            with self.rng:
                outputs, structure, saved = run_forward(self.module, args, kwargs, leaves + caller, params, msg.save,
                                                        self.types, msg.expr)
        except Exception as exc:  # the user's module raised
            self.weights.release(c)
            self._fail_call(c, self.diagnosis.forward_raised(c, exc, values))
            return
        if self.check_finite:
            err = self.diagnosis.nonfinite_forward(c, outputs, values)
            if err is not None:
                self.weights.release(c)
                self._fail_call(c, err)
                return
        if self.tracer.enabled:
            c.done_us = now_us()
            if t0 - c.arrived_us > 50:
                self.tracer.span("wait", c.arrived_us, t0, tid=MESSAGE_TID, call=c.id, step=c.step, waits="inputs")
            self.tracer.span("forward", t0, c.done_us, call=c.id, step=c.step)
        c.status = CALL_DONE
        c.outputs = [o.detach() for o in outputs]
        c.saved = saved
        self._out.append((None, m.ForwardDone(
            msg.req, structure,
            tuple(m.OutputMeta(tuple(o.shape), str(o.dtype).removeprefix("torch."), bool(o.requires_grad))
                  for o in outputs),
            self.weights.forward_version(c))))
        for route in c.routes:
            self._route(c, route)
        c.routes.clear()
        for req, out in c.fetches:
            self._answer_fetch(c, req, out)
        c.fetches.clear()
        if c.released:
            self._free_call(c)

    def _fail_call(self, c: CallState, err: E.ActorgradError) -> None:
        c.status = CALL_FAILED
        c.error = E.to_info(err)
        self._out.append((None, m.Failure(c.msg.req, c.error)))
        for req, _ in c.fetches:
            self._out.append((None, m.Failure(req, c.error)))
        c.fetches.clear()
        c.routes.clear()

    def _on_release(self, msg: m.Release) -> None:
        c = self.calls.get(msg.call)
        st = self.steps.get(msg.step)
        # Only a call that saved nothing, of a step still open: a closing step frees it anyway.
        if c is None or c.step != msg.step or c.msg.save or st is None or st.phase is not OPEN:
            return
        if c.status is CALL_WAITING:
            c.released = True  # its routes and fetches are answered when it runs; then it goes
        elif c.status is CALL_DONE:
            self._free_call(c)

    def _free_call(self, c: CallState) -> None:
        """Drop a released call (ag.no_grad(), no Node left in the caller) before its step closes."""
        st = self.steps.get(c.step)
        if st is None or st.phase is not OPEN:
            return
        if c.id in st.calls:
            st.calls.remove(c.id)
        for gone in self.call_table.drop([c.id]):
            self.weights.release(gone)

    def _on_route(self, msg: m.Route) -> None:
        c = self.calls.get(msg.call)
        if c is None:
            log.debug("%s: route for unknown call %d dropped (its step ended)", self.name, msg.call)
            return
        if c.status is CALL_DONE:
            self._route(c, msg)
        elif c.status is CALL_WAITING:
            c.routes.append(msg)

    def _route(self, c: CallState, r: m.Route) -> None:
        if r.out >= len(c.outputs):
            err = self.diagnosis.error(E.ConfigError, f"output {r.out} requested but the call returned "
                                       f"{len(c.outputs)}", c.id, c.step)
            self._out.append((None, m.Failure(c.msg.req, E.to_info(err))))
            return
        self._send(r.to_worker, m.Value(c.step, r.to_call, r.slot, c.id, c.outputs[r.out]))

    # --- backward -------------------------------------------------------------

    def _on_plan(self, msg: m.Plan) -> None:
        if msg.step in self.step_table.aborted:
            self._fail(msg.req, self.diagnosis.error(E.StepAborted, "pass of an aborted step", step=msg.step))
            return
        ps = self.pass_table.add(msg, now_us() if self.tracer.enabled else 0.0)
        self.step_table.open(msg.step).passes.append(msg.pass_id)
        for e in msg.expect:
            c = self.calls.get(e.call)
            if c is None or c.step != msg.step:
                self._fail_pass(ps, self.diagnosis.error(E.ActorgradError, f"pass {msg.pass_id} plans call "
                                                         f"{e.call}, which this worker does not hold", e.call, msg.step))
                return
            ps.ledger.expect(e.call, e.out, e.edges)
        for s in msg.seeds:
            self._arrive(ps, s.call, s.out, Arrived((m.SEED, s.index), "caller", s.tensor, seed=True))
            if not ps.open:
                return
        for g in self.pass_table.take_early(msg.pass_id):
            self._on_gradient(g)
        for call in ps.ledger.calls():
            self._try_vjp(ps, call)

    def _on_gradient(self, msg: m.Gradient) -> None:
        ps = self.passes.get(msg.pass_id)
        if ps is None:
            if self.step_table.ended(msg.step):
                log.debug("%s: gradient of ended step %d dropped", self.name, msg.step)
            else:
                self.pass_table.keep_early(msg)
            return
        if not ps.open:
            return
        self._arrive(ps, msg.call, msg.out, Arrived((msg.from_call, msg.slot), msg.from_worker, msg.tensor))
        self._try_vjp(ps, msg.call)

    def _arrive(self, ps: PassState, call: int, out: int, a: Arrived) -> None:
        if call not in self.calls:
            self._fail_pass(ps, self.diagnosis.error(
                E.ActorgradError,
                f"gradient for unknown call {call} (output {out}) from worker '{a.from_worker}' "
                f"call {a.edge[0]} slot {a.edge[1]} in pass {ps.id}", call, ps.step))
            return
        arrival = ps.ledger.arrive(call, out, a.edge)
        if arrival is Arrival.DUPLICATE:
            log.warning("%s: duplicate gradient for call %d output %d from %s %s ignored",
                        self.name, call, out, a.from_worker, a.edge)
            return
        if arrival is Arrival.UNEXPECTED:
            self._fail_pass(ps, self.diagnosis.error(
                E.ActorgradError,
                f"unexpected gradient for output {out} from worker '{a.from_worker}' call {a.edge[0]} "
                f"slot {a.edge[1]} in pass {ps.id}; the plan expects {fmt_edges(ps.ledger.missing(call))}",
                call, ps.step))
            return
        ps.arrived.setdefault((call, out), []).append(a)

    def _try_vjp(self, ps: PassState, call: int) -> None:
        if not ps.open or call in ps.done_calls or not ps.ledger.is_complete(call):
            return
        c = self.calls[call]
        if c.status is CALL_WAITING:
            return  # a seed may arrive before its forward ran; the forward will retry
        if c.status is CALL_FAILED:
            self._fail_pass(ps, E.from_info(c.error or {}))
            return
        t0 = now_us() if self.tracer.enabled else 0.0
        try:
            grad_outputs = sum_arrived(ps, c, self.custom_backward and not c.msg.expr, self.diagnosis.error)
            # Outside the worker's generator: autograd's backward draws nothing (Dropout kept its mask),
            # and holding the process-wide generator lock here would serialize independent passes.
            input_grads, param_grads = self._vjp(c, grad_outputs, ps.accumulate)
            if self.tracer.enabled:
                ready = max(ps.created_us, c.done_us)
                if t0 - ready > 50:
                    self.tracer.span("wait", ready, t0, tid=MESSAGE_TID, call=call, pass_id=ps.id, waits="gradients")
                self.tracer.span("backward", t0, now_us(), call=call, pass_id=ps.id, step=ps.step)
        except E.ActorgradError as err:
            self._fail_pass(ps, err)
            return
        except Exception as exc:
            self._fail_pass(ps, self.diagnosis.error(E.WorkerError, f"backward raised {type(exc).__name__}: {exc}",
                                                     call, ps.step, exc))
            return
        if self.check_finite:
            err = self.diagnosis.nonfinite_backward(ps, call, grad_outputs, input_grads, param_grads)
            if err is not None:
                self._fail_pass(ps, err)
                return
        if self.updates.lacks_optimizer(param_grads):
            self._fail_pass(ps, self.diagnosis.error(
                E.ConfigError, "parameters received gradients but the worker has no optimizer; pass "
                "optimizer=ag.Optim(...) to ag.spawn, or set requires_grad=False on them", call, ps.step))
            return
        add_grads(ps.param_grads, param_grads, ps.owned)
        # Input gradients past the routed inputs belong to caller leaves: they go back with the Plan's reply.
        default = not self.custom_backward or c.msg.expr
        for k, pos in enumerate(c.msg.leaves if c.saved is not None and default else ()):
            g = input_grads[len(c.msg.refs) + k]
            if g is not None:
                ps.leaf_grads.append([call, pos, g.detach()])
        for slot, ref in enumerate(c.msg.refs):
            if ref.grad:
                g = input_grads[slot]
                self._send(ref.worker, m.Gradient(ps.id, ps.step, ref.call, ref.out, self.name, call, slot,
                                                  None if g is None else g.detach()))
        ps.done_calls.add(call)
        if ps.all_done():
            self._complete_pass(ps)

    def _vjp(self, c: CallState, grad_outputs: list[Optional[torch.Tensor]],
             accumulate: bool = True) -> tuple[list, dict[str, torch.Tensor]]:
        """Input and parameter gradients of one call; ``accumulate`` False: input gradients only
        (a partial backward that leaves this worker's parameters out)."""
        saved = c.saved
        if saved is None:
            raise self.diagnosis.error(E.ConfigError, "this call ran under ag.no_grad(); it has nothing saved for "
                                       "backward", c.id, c.step)
        if not self.custom_backward or c.msg.expr:
            return default_vjp(saved.inputs, saved.outputs, grad_outputs, saved.params if accumulate else {})
        # ag.Module.call_parameters() reads the weights this call's forward used from here.
        object.__setattr__(self.module, "_actorgrad_params", saved.params)
        try:
            result = self.module.backward(tuple(saved.inputs), tuple(saved.outputs), tuple(grad_outputs))
        finally:
            self.module.__dict__.pop("_actorgrad_params", None)
        input_grads, param_grads = self.diagnosis.check_custom(c, saved, result)
        return input_grads, (param_grads if accumulate else {})

    def _complete_pass(self, ps: PassState) -> None:
        try:
            t0 = now_us() if self.tracer.enabled else 0.0
            applied = self.updates.pass_done(ps.step, ps.id, ps.param_grads)
            if applied:
                self.tracer.span("update", t0, now_us(), step=ps.step, pass_id=ps.id)
        except E.ActorgradError as err:
            self._fail_pass(ps, err)
            return
        except Exception as exc:
            self._fail_pass(ps, self.diagnosis.error(E.WorkerError, f"update raised {type(exc).__name__}: {exc}",
                                                     step=ps.step, exc=exc))
            return
        ps.status = PASS_COMPLETE
        if applied:
            self.step_table.open(ps.step).applied = True
        ps.arrived.clear()
        ps.param_grads = {}
        reply = {"worker": self.name, "calls": len(ps.done_calls), "applied": applied}
        if ps.leaf_grads:
            reply["leaves"] = ps.leaf_grads
            ps.leaf_grads = []
        self._ack(ps.req, reply)

    def _fail_pass(self, ps: PassState, err: E.ActorgradError) -> None:
        if ps.status is PASS_FAILED:
            return
        ps.status = PASS_FAILED
        ps.arrived.clear()
        self._fail(ps.req, err)

    def _oldest_weights(self, step: int, passes: Optional[list[int]]) -> Optional[int]:
        """The oldest weight version the forwards behind these passes' gradients used (for staleness)."""
        st = self.steps.get(step)
        pids = passes if passes is not None else (st.passes if st is not None else [])
        oldest: Optional[int] = None
        for pid in pids:
            ps = self.passes.get(pid)
            for call in (ps.done_calls if ps is not None else ()):
                c = self.calls.get(call)
                if c is not None:
                    v = self.weights.version_of(c)
                    oldest = v if oldest is None else min(oldest, v)
        return oldest

    # --- steps ----------------------------------------------------------------

    def _on_close(self, msg: m.Close) -> None:
        if msg.step in self.step_table.aborted:
            self._fail(msg.req, self.diagnosis.error(E.StepAborted, "close of an aborted step", step=msg.step))
            return
        st = self.step_table.get(msg.step)
        if st is not None and st.phase is not OPEN:
            log.warning("%s: second close of step %d ignored", self.name, msg.step)
            return
        self.step_table.on_close(msg, time.monotonic())

    def _advance(self, closes: bool = True) -> None:
        """Run whatever became possible: ready forwards, their VJPs, closable steps (in order)."""
        progress = True
        while progress:
            progress = False
            for c in self.call_table.pop_ready(self._gate_open):
                self._run_forward(c)
                progress = True
            if progress:
                # Gradients are tried as they arrive; only a call whose forward just ran (a seed can
                # come before it) may have become ready without a message of its own.
                for ps in self.pass_table.open_passes():
                    for call in ps.ledger.calls():
                        if call not in ps.done_calls:
                            self._try_vjp(ps, call)
            # Updates land in step order: only the earliest open step may close.
            for step in (sorted(self.steps) if closes else ()):
                st = self.steps.get(step)
                if st is None:  # ended while an earlier one closed
                    continue
                if st.phase is OPEN or not self._try_close(st):
                    break
                progress = True

    def _try_close(self, st: StepState) -> bool:
        """Phase 1 (answer Close once ready) and phase 2 (apply on Commit); True once the step ended."""
        if st.phase is CLOSING:
            self._try_ready(st)
            if st.phase is ABORTED:
                return True
        if st.phase is not COMMITTING:
            return False
        self._commit(st)
        return True

    def _try_ready(self, st: StepState) -> None:
        msg = st.close
        assert msg is not None
        step = st.id
        for call in msg.calls:
            c = self.calls.get(call)
            if c is None:
                self._fail(msg.req, self.diagnosis.error(E.ActorgradError, f"close names call {call}, unknown here",
                                                         call, step))
                self._drop_step(step, ABORTED, remember=False)
                return
            if c.status is CALL_WAITING:
                return
        failed = None
        for pid in msg.passes:
            ps = self.passes.get(pid)
            if ps is None:
                failed = self.diagnosis.error(E.ActorgradError, f"close names pass {pid}, unknown here", step=step)
                break
            if ps.status is PASS_FAILED:
                failed = self.diagnosis.error(E.StepAborted, f"pass {pid} failed in this step", step=step)
                break
            if ps.open:
                return
        if failed is None:
            failed = self.updates.take_commit_error()
        if failed is None:
            for call in st.calls:
                c = self.calls.get(call)
                if c is not None and c.status is CALL_FAILED:
                    failed = E.from_info(c.error or {})
                    break
        if failed is not None:
            self._fail(msg.req, failed)
            self._drop_step(step, ABORTED)
            return
        if self.sync.active:
            # Replicas agree on one update: send this one's gradients, wait for the others', apply the sum.
            own = self.updates.pending.by_step.get(step) or {}
            for peer, shard in self.sync.outgoing(step, own):
                self._send(peer, shard)
            total = self.sync.total(step, own)
            if total is None:
                return
            self.updates.pending.by_step[step] = total
        pending, version, final, metrics = self.updates.ready_report(step)
        st.to(READY)
        self._out.append((None, m.CloseReady(msg.req, step, len(st.calls), len(st.passes),
                                             bool(st.applied or pending), version, final, metrics)))

    def _commit(self, st: StepState) -> None:
        msg = st.close
        assert msg is not None
        step = st.id
        try:
            t0 = now_us() if self.tracer.enabled else 0.0
            applied = self.updates.commit(step)
            if applied:
                self.tracer.span("update", t0, now_us(), step=step)
            self.weights.committed(step)
        except Exception as exc:
            # The caller already has this step's report: the error is raised with the next step.
            err = exc if isinstance(exc, E.ActorgradError) else self.diagnosis.error(
                E.WorkerError, f"update raised {type(exc).__name__}: {exc}", step=step, exc=exc)
            log.error("%s: the update of step %d failed: %s", self.name, step, err)
            self.updates.commit_error = err
        self.call_table.retain(step, st.calls, set(map(tuple, msg.retain)))
        self._drop_step(step, CLOSED)

    def _drop_step(self, step: int, end: Phase, remember: bool = True) -> None:
        """End ``step`` (CLOSED or ABORTED) and free everything it holds: calls, saved graphs, passes, gradients.

        ``remember=False``: free it without recording its id as ended (a Close that named a call
        unknown here: the step may still be aborted by the caller).
        """
        self.sync.forget(step)
        st = self.step_table.end(step, end, remember)
        if st is None:
            return
        for c in self.call_table.drop(st.calls):
            self.weights.release(c)
        self.pass_table.drop(st.passes)
        self.updates.pending.pop(step)

    def _on_abort(self, msg: m.Abort) -> None:
        err = self.diagnosis.error(E.StepAborted, f"step aborted: {msg.reason}", step=msg.step)
        st = self.steps.get(msg.step)
        if st is not None:
            for call in st.calls:
                c = self.calls.get(call)
                if c is None:
                    continue
                if c.status is CALL_WAITING:
                    self._fail(c.msg.req, err)
                for req, _ in c.fetches:
                    self._fail(req, err)
            for pid in st.passes:
                ps = self.passes.get(pid)
                if ps is not None and ps.open:
                    self._fail(ps.req, err)
            if st.close is not None:
                self._fail(st.close.req, err)
        self._drop_step(msg.step, ABORTED)
        self.call_table.forget_early(msg.step)
        self.pass_table.forget_early(msg.step)

    def reset(self) -> None:
        """Forget every step, call and pass (recovery): the caller restores state next.

        Messages of the old epoch never reach a reset core (the host drops them), so step ids may
        be used again.
        """
        self._init_steps()
        self.weights.reset()
        self.updates.reset()
        self.sync.reset()
        for p in self.module.parameters():
            p.grad = None

    def expire(self, now: Optional[float] = None) -> list[Out]:
        """Fail and drop every step that has waited here longer than the worker's deadline."""
        self._out = []
        if self.deadline is None:
            return []
        now = time.monotonic() if now is None else now
        limit = now - self.deadline
        for step in sorted(self.steps):
            st = self.steps[step]
            stale = [c for c in (self.calls.get(i) for i in st.calls)
                     if c is not None and c.status is CALL_WAITING and c.since < limit]
            stale_p = [ps for ps in (self.passes.get(i) for i in st.passes)
                       if ps is not None and ps.open and ps.since < limit]
            stuck_close = st.phase is CLOSING and st.close_since < limit
            if not (stale or stale_p or stuck_close):
                continue
            missing = [line for line in self.describe_missing() if f"(step {step})" in line
                       or any(f"(pass {ps.id})" in line for ps in stale_p)]
            text = (f"this worker waited more than {self.deadline:g}s for step {step}; still missing: "
                    + ("; ".join(missing) or "the caller's Close/Commit"))
            err = self.diagnosis.error(E.DeadlineExceeded, text, step=step)
            log.warning("%s: %s", self.name, text)
            first = len(self._out)
            self._on_abort(m.Abort(step, text))
            # _on_abort answered this step's waiting requests with StepAborted; say why instead.
            self._out[first:] = [(to, msg if to is not None or not isinstance(msg, m.Failure)
                                  else m.Failure(msg.req, E.to_info(err))) for to, msg in self._out[first:]]
        out, self._out = self._out, []
        return out

    # --- state --------------------------------------------------------------

    def _on_fetch(self, msg: m.Fetch) -> None:
        c = self.calls.get(msg.call)
        if c is None:
            kept = self.call_table.kept(msg.call, msg.out)
            if kept is not None:
                self._ack(msg.req, kept)
            else:
                self._fail(msg.req, self.diagnosis.error(
                    E.StepClosedError, f"the value of output {msg.out} was freed when its step closed; "
                    "fetch it with .value() before the next step closes", msg.call))
            return
        if c.status is CALL_FAILED:
            self._fail(msg.req, E.from_info(c.error or {}))
        elif c.status is CALL_WAITING:
            c.fetches.append((msg.req, msg.out))
        else:
            self._answer_fetch(c, msg.req, msg.out)

    def _answer_fetch(self, c: CallState, req: int, out: int) -> None:
        if out >= len(c.outputs):
            self._fail(req, self.diagnosis.error(E.ConfigError, f"output {out} requested but the call returned "
                                                 f"{len(c.outputs)}", c.id, c.step))
        else:
            self._ack(req, c.outputs[out])

    def stats(self) -> dict[str, int]:
        """Counts of what this worker holds: calls, saved graphs, weight copies, passes, steps."""
        calls = self.call_table.stats()
        return {
            "calls": calls["calls"],
            "saved": calls["saved"],
            **self.weights.stats(),
            "retained": calls["retained"],
            "passes": len(self.passes),
            "open_steps": len(self.steps),
            "queued_forwards": calls["queued_forwards"],
            "early_messages": len(self.call_table.early) + len(self.pass_table.early),
            "pending_grads": len(self.updates.pending.by_step),
            "version": self.updates.version,
            # Messages handled here, and sent to other workers (replies to the caller not counted).
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            **self.host_stats(),
        }

    def memory(self) -> dict[str, int]:
        """This process's resident memory and live tensor count (process-wide: on backend="local"
        every worker shares one process)."""
        return {**process_memory(), **self.stats()}

    def _on_get_state(self, msg: m.GetState) -> None:
        if msg.what == "stats":
            self._ack(msg.req, self.stats())
            return
        if msg.what == "memory":
            self._ack(msg.req, self.memory())
            return
        if msg.what == "trace":
            self._ack(msg.req, self.tracer.take())
            return
        if msg.what == "update":
            step, applied, version, metrics = self.updates.updater.take_closed()
            self._out.append((None, m.UpdateReport(msg.req, step, applied, version, metrics)))
            return
        if msg.what == "tensors":  # worker.named_parameters() and friends: one round trip for all
            self._ack(msg.req, module_state.tensors_of(self.module))
            return
        sd = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        if msg.what == "module":
            self._ack(msg.req, sd)
            return
        try:
            data = {"module": sd, **self.updates.state(), **self.weights.state(), "rng": self.rng.state()}
        except E.ActorgradError as err:
            self._fail(msg.req, err)
            return
        self._ack(msg.req, data)

    def _on_set_state(self, msg: m.SetState) -> None:
        state = msg.state
        if msg.what == "trace":
            self.tracer.enabled = bool(state)
            self._ack(msg.req, None)
            return
        if msg.what == "training":
            # Calls that arrived before keep their mode: it is applied when each forward runs.
            self.training = bool(state)
            self._ack(msg.req, None)
            return
        keys = None
        try:
            if msg.what == "load":  # worker.load_state_dict(sd, strict): as nn.Module, but all or nothing
                keys = module_state.load(self.module, state, self.name)
            elif msg.what == "module":
                self.module.load_state_dict(state)
            else:
                self.module.load_state_dict(state["module"])
                self.updates.load(state)
                self.rng.load(state.get("rng"))
        except E.ActorgradError as err:
            self._fail(msg.req, err)
            return
        except Exception as exc:
            cls = E.ShapeError if "size mismatch" in str(exc) else E.ConfigError
            self._fail(msg.req, self.diagnosis.error(cls, f"could not load state: {exc}", exc=exc))
            return
        # New weights: forwards from here on must not reuse a stash or snapshot of the old ones.
        self.updates.updater.version += 1
        self.weights.loaded(state if msg.what == "full" else None, self.device)
        self._ack(msg.req, keys)

    # --- introspection ------------------------------------------------------

    def describe_missing(self) -> list[str]:
        """Human-readable lines: what this worker is still waiting for."""
        lines = describe_missing(self.call_table.waiting(), self.pass_table.open_passes(), self._gate_open)
        for step, st in sorted(self.steps.items()):
            if st.phase is CLOSING and step in self.sync.sent and self.sync.missing(step):
                lines.append(f"step {step}: the gradients of replica(s) {', '.join(self.sync.missing(step))}")
        return lines


def process_memory() -> dict[str, int]:
    """This process's memory in bytes (RSS; USS and PSS on Linux) and its count of live torch.Tensor objects.

    RSS counts every shared library in full in every process that maps it; USS (the pages only this
    process holds: what ending it frees) and PSS (each shared page divided among its processes) add up
    across processes. Workers that share a process (``workers_per_process``) report that process's.
    """
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS is the best there is
        import resource

        rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    out = {"rss_bytes": rss}
    out.update(_smaps_rollup())
    # issubclass on the type: isinstance would touch lazy torch objects and warn.
    out["live_tensors"] = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
    return out


def _smaps_rollup() -> dict[str, int]:
    """USS and PSS of this process from /proc/self/smaps_rollup (Linux 4.14+); empty where there is none."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kb = {p[0][:-1]: int(p[1]) for p in (line.split() for line in f) if len(p) >= 2 and p[1].isdigit()}
    except (OSError, ValueError):
        return {}
    if "Pss" not in kb:
        return {}
    return {"uss_bytes": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) * 1024, "pss_bytes": kb["Pss"] * 1024}


def _namespaces(module: torch.nn.Module) -> list[dict]:
    """The global namespaces of the module's classes' ``forward`` functions (each once)."""
    found: dict[int, dict] = {}
    for sub in module.modules():
        g = getattr(getattr(type(sub), "forward", None), "__globals__", None)
        if isinstance(g, dict):
            found.setdefault(id(g), g)
    return list(found.values())


def _to_device(tree: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return tree
    return map_leaves(tree, lambda x: x.to(device) if isinstance(x, torch.Tensor) else x)
