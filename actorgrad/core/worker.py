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
4. A step closes in two phases. On Close, once all its calls ran and all its
   passes completed here, the worker answers that it is ready (and what it
   would apply). Only on Commit, which the caller sends once every worker is
   ready, does the rule apply what it holds and the step's state get freed:
   a step that fails anywhere before that applies nothing anywhere.
5. An aborted step leaves nothing behind and applies nothing.

Nothing here does IO: the host delivers the outbox. ``(None, msg)`` in the
outbox is a reply to the caller.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .. import errors as E
from ..module import has_custom_backward
from ..optim import OptimizerSpec, build_optimizer, build_schedule, update_options
from . import messages as m
from .ledger import Arrival, Ledger
from .rules import CallableRule, PendingGrads, Rule, Updater, Weights, add_grads, make_rule
from .vjp import Saved, default_vjp, make_leaves, map_leaves, run_forward
from ..trace import MESSAGE_TID, Tracer, now_us

log = logging.getLogger("actorgrad.worker")

Out = tuple[Optional[str], m.Message]

_DTYPE_WORDS = re.compile(
    r"dtype|scalar type|expected .*(Float|Double|Half|Long|Int)|(Float|Double|Half|Long|Int|Bool) and "
    r"(Float|Double|Half|Long|Int|Bool)|not implemented for '(Long|Int|Bool|Byte)'",
)

_SHAPE_WORDS = re.compile(
    r"shape|size mismatch|sizes? of tensor|must match the size|cannot be multiplied|dimension|"
    r"expected input|expected .* channels|input size|out of bounds",
    re.IGNORECASE,
)


@dataclass
class WorkerSpec:
    """Everything a host needs to build a WorkerCore."""

    name: str
    module: torch.nn.Module
    optimizer: Optional[OptimizerSpec] = None
    update: Union[str, Callable[..., Any]] = "step"
    max_staleness: int = 0
    device: Optional[str] = None
    num_threads: Optional[int] = None
    trace: bool = False
    check_finite: bool = False  # fail with NonFiniteError where NaN/Inf first appears
    deadline: Optional[float] = None  # seconds a step may hold state here without progress


class EndedSteps:
    """Ids of steps that ended here, bounded: below ``floor`` every step counts as ended.

    Steps end roughly in order, so a long run keeps only the most recent ones.
    """

    LIMIT = 1024

    def __init__(self) -> None:
        self.recent: set[int] = set()
        self.floor = 0

    def add(self, step: int) -> None:
        """Record that ``step`` ended."""
        if step < self.floor:
            return
        self.recent.add(step)
        if len(self.recent) > self.LIMIT:
            keep = sorted(self.recent)[self.LIMIT // 2:]
            self.floor = keep[0]
            self.recent = set(keep)

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and (step < self.floor or step in self.recent)


@dataclass
class CallState:
    """One call of the module: its request, arrived inputs, outputs, and what backward needs."""

    msg: m.Forward
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    status: str = "waiting"  # waiting | done | failed
    outputs: list[torch.Tensor] = field(default_factory=list)
    saved: Optional[Saved] = None
    version: Optional[int] = None
    routes: list[m.Route] = field(default_factory=list)
    fetches: list[tuple[int, int]] = field(default_factory=list)  # (req, out)
    error: Optional[dict] = None
    snapshot: Optional[int] = None  # key of the stale weights this call used (max_staleness > 0)
    arrived_us: float = 0.0
    done_us: float = 0.0
    since: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> int:
        return self.msg.call

    @property
    def step(self) -> int:
        return self.msg.step

    def ready(self) -> bool:
        return len(self.values) == len(self.msg.refs)


@dataclass
class Arrived:
    """One gradient message as it arrived, kept until its call's VJP."""

    edge: tuple[int, int]
    from_worker: str
    tensor: Optional[torch.Tensor]
    seed: bool = False


@dataclass
class PassState:
    """One pass at this worker: its ledger, arrived gradients and parameter gradients."""

    id: int
    step: int
    req: int
    ledger: Ledger = field(default_factory=Ledger)
    arrived: dict[tuple[int, int], list[Arrived]] = field(default_factory=dict)
    done_calls: set[int] = field(default_factory=set)
    param_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    complete: bool = False
    failed: bool = False
    created_us: float = 0.0
    owned: set[str] = field(default_factory=set)  # param_grads entries this pass allocated itself
    since: float = field(default_factory=time.monotonic)


@dataclass
class StepState:
    """One step at this worker."""

    calls: list[int] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    close: Optional[m.Close] = None
    applied: bool = False  # an update landed during the step (rules "pass", callables)
    ready: bool = False  # answered its Close: every call and pass of the step is done here
    commit: bool = False  # the caller said every worker is ready: apply
    close_since: float = 0.0  # when its Close arrived


class WorkerCore:
    """The state machine of one worker; see the rules at the top of this file."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.name = spec.name
        self.device = torch.device(spec.device) if spec.device else torch.device("cpu")
        self.module = spec.module.to(self.device)
        self.optimizer = build_optimizer(spec.optimizer, self.module, self.name)
        self.rule: Rule = make_rule(spec.update)
        self.max_staleness = int(spec.max_staleness)
        self.stashes = self.rule.stashes or self.max_staleness > 0
        self.custom_backward = has_custom_backward(self.module)
        options = update_options(spec.optimizer)
        self.updater = Updater(self.name, self.module, self.optimizer, options,
                               build_schedule(options, self.optimizer, self.name), self._oldest_weights)
        self.check_finite = bool(spec.check_finite)
        self.deadline = spec.deadline
        self.tracer = Tracer(self.name, spec.trace)
        # What the hosting transport holds for this worker (frames out of order), for stats().
        self.host_stats: Callable[[], dict[str, int]] = dict
        self._out: list[Out] = []
        self._init_steps()

    def _init_steps(self) -> None:
        """Every piece of per-step state, empty; the one place that lists it (init and reset)."""
        self.pending = PendingGrads()
        self.calls: dict[int, CallState] = {}
        self.queue: deque[int] = deque()  # forward calls not yet run, in issue order
        self.passes: dict[int, PassState] = {}
        self.steps: dict[int, StepState] = {}
        self.early_values: dict[int, dict[int, tuple[int, int, torch.Tensor]]] = {}
        self.early_grads: dict[int, list[m.Gradient]] = {}
        self.aborted = EndedSteps()
        self.closed = EndedSteps()
        # The latest step the caller has sent a call, plan or close of: an Abort beyond it is refused,
        # so that no message can mark steps that have not begun as ended (their ids would be lost).
        self.top_step = 0
        self.retained: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
        self.stash: dict[int, dict[str, torch.Tensor]] = {}
        self.stash_refs: dict[int, int] = {}
        # max_staleness = k > 0: the weights after each recent step's close (0: the initial ones);
        # a forward of step s uses those after step s-1-k. See [Note: weight stashing] in rules.py.
        self.snapshots: dict[int, Weights] = {}
        self.snapshot_refs: dict[int, int] = {}
        if self.max_staleness > 0:
            self.snapshots[0] = self._clone_params()
        self.commit_error: Optional[E.ActorgradError] = None
        self.updater.reset()

    # --- entry point --------------------------------------------------------

    def handle(self, msg: m.Message, defer: bool = False) -> list[Out]:
        """Process one message; return the messages to send and replies to make.

        With ``defer``, closing steps (updates) waits for ``poll()``: a host sends the outbox
        first, so that gradients leave before this worker spends time on its update.
        """
        self._out = []
        match msg:
            case m.Forward():
                self.top_step = max(self.top_step, msg.step)
                self._on_forward(msg)
            case m.Value():
                self._on_value(msg)
            case m.Route():
                self._on_route(msg)
            case m.Plan():
                self.top_step = max(self.top_step, msg.step)
                self._on_plan(msg)
            case m.Gradient():
                self._on_gradient(msg)
            case m.Close():
                self.top_step = max(self.top_step, msg.step)
                self._on_close(msg)
            case m.Commit():
                st = self.steps.get(msg.step)
                if st is not None:
                    st.commit = True
            case m.Abort():
                if msg.step > self.top_step:
                    log.warning("%s: abort of step %d refused: no call of it has come here (latest: %d)",
                                self.name, msg.step, self.top_step)
                else:
                    self._on_abort(msg)
            case m.Fetch():
                self._on_fetch(msg)
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
        return any(st.close is not None for st in self.steps.values())

    # --- small helpers ------------------------------------------------------

    def _send(self, to: str, msg: m.Message) -> None:
        self._out.append((to, msg))

    def _ack(self, req: int, data: Any) -> None:
        self._out.append((None, m.Ack(req, data)))

    def _fail(self, req: int, err: E.ActorgradError) -> None:
        self._out.append((None, m.Failure(req, E.to_info(err))))

    def _error(self, cls: type[E.ActorgradError], text: str, call: Optional[int] = None,
               step: Optional[int] = None, exc: Optional[BaseException] = None) -> E.ActorgradError:
        cause = f"{type(exc).__name__}: {exc}" if exc is not None else None
        tb = "".join(traceback.format_exception(exc)) if exc is not None else None
        err = cls(text, worker=self.name, call=call, step=step, cause=cause, remote_traceback=tb)
        if exc is not None:
            err.__cause__ = exc
        return err

    def _step(self, step: int) -> StepState:
        return self.steps.setdefault(step, StepState())

    # --- forward --------------------------------------------------------------

    def _on_forward(self, msg: m.Forward) -> None:
        if msg.step in self.aborted or msg.step in self.closed:
            self._fail(msg.req, self._error(E.StepAborted, "forward of a step that was already aborted or closed",
                                            msg.call, msg.step))
            return
        if msg.call in self.calls:
            log.warning("%s: duplicate forward for call %d ignored", self.name, msg.call)
            return
        c = CallState(msg, arrived_us=now_us() if self.tracer.enabled else 0.0)
        for slot, (step, from_call, t) in self.early_values.pop(msg.call, {}).items():
            c.values[slot] = t
        self.calls[msg.call] = c
        self.queue.append(msg.call)
        self._step(msg.step).calls.append(msg.call)

    def _on_value(self, msg: m.Value) -> None:
        if msg.step in self.aborted:
            return
        c = self.calls.get(msg.call)
        if c is None:
            # The producer can be faster than the caller's Forward to us.
            self.early_values.setdefault(msg.call, {})[msg.slot] = (msg.step, msg.from_call, msg.tensor)
            return
        if c.status != "waiting" or msg.slot in c.values:
            log.warning("%s: duplicate value for call %d slot %d ignored", self.name, msg.call, msg.slot)
            return
        c.values[msg.slot] = msg.tensor

    def _gate_open(self, step: int) -> bool:
        """A forward of ``step`` may run when no earlier step more than k behind is still open."""
        limit = step - self.max_staleness
        return not any(s < limit for s in self.steps)

    def _run_ready_forwards(self) -> bool:
        ran = False
        while self.queue:
            c = self.calls.get(self.queue[0])
            if c is None:
                self.queue.popleft()
                continue
            if not c.ready() or not self._gate_open(c.step):
                break
            self.queue.popleft()
            self._run_forward(c)
            ran = True
        return ran

    def _stash_params(self) -> dict[str, torch.Tensor]:
        v = self.updater.version
        if v not in self.stash:
            self.stash[v] = {
                n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in self.module.named_parameters()
            }
        self.stash_refs[v] = self.stash_refs.get(v, 0) + 1
        return self.stash[v]

    def _clone_params(self) -> Weights:
        return Weights({n: p.detach().clone().requires_grad_(p.requires_grad)
                        for n, p in self.module.named_parameters()}, self.updater.version)

    def _oldest_weights(self, step: int, passes: Optional[list[int]]) -> Optional[int]:
        """The oldest weight version the forwards behind these passes' gradients used (for staleness)."""
        st = self.steps.get(step)
        pids = passes if passes is not None else (st.passes if st is not None else [])
        oldest: Optional[int] = None
        for pid in pids:
            ps = self.passes.get(pid)
            for call in (ps.done_calls if ps is not None else ()):
                c = self.calls.get(call)
                if c is None:
                    continue
                if c.version is not None:
                    v = c.version
                elif c.snapshot is not None and c.snapshot in self.snapshots:
                    v = self.snapshots[c.snapshot].version
                else:
                    # Live weights: only update="step" with max_staleness=0 runs forwards on them, and
                    # its forwards wait for the previous update, so none lands in between.
                    v = self.updater.version
                oldest = v if oldest is None else min(oldest, v)
        return oldest

    def _snapshot_for(self, step: int) -> int:
        """The snapshot a forward of ``step`` uses: the latest one taken at or before step - 1 - k."""
        target = step - 1 - self.max_staleness
        key = max((k for k in self.snapshots if k <= target), default=min(self.snapshots))
        self.snapshot_refs[key] = self.snapshot_refs.get(key, 0) + 1
        return key

    def _take_snapshot(self, step: int) -> None:
        """After closing ``step``: keep its weights, and drop those no future forward can need."""
        self.snapshots[step] = self._clone_params()
        # Any later forward has step >= step + 1 and so uses a key <= step - k: the newest such key
        # and everything after it stay; older ones go once no live call uses them.
        floor = max((k for k in self.snapshots if k <= step - self.max_staleness), default=None)
        for key in [k for k in self.snapshots if floor is not None and k < floor]:
            if self.snapshot_refs.get(key, 0) <= 0:
                del self.snapshots[key]
                self.snapshot_refs.pop(key, None)

    def _release_call_weights(self, c: CallState) -> None:
        self._release_stash(c.version)
        c.version = None
        if c.snapshot is not None:
            key, c.snapshot = c.snapshot, None
            self.snapshot_refs[key] = self.snapshot_refs.get(key, 1) - 1
            newest = max(self.snapshots, default=None)
            floor = max((k for k in self.snapshots if newest is not None and k <= newest - self.max_staleness),
                        default=None)
            if self.snapshot_refs[key] <= 0 and floor is not None and key < floor:
                self.snapshots.pop(key, None)
                self.snapshot_refs.pop(key, None)

    def _release_stash(self, version: Optional[int]) -> None:
        if version is None or version not in self.stash_refs:
            return
        self.stash_refs[version] -= 1
        if self.stash_refs[version] <= 0:
            del self.stash_refs[version]
            self.stash.pop(version, None)

    def _run_forward(self, c: CallState) -> None:
        msg = c.msg
        values = [c.values[i].to(self.device) for i in range(len(msg.refs))]
        leaves = make_leaves(values, [r.grad and msg.save for r in msg.refs])
        params = None
        if self.max_staleness > 0:
            c.snapshot = self._snapshot_for(c.step)
            params = self.snapshots[c.snapshot]
        elif msg.save and self.stashes:
            params = self._stash_params()
            c.version = self.updater.version
        t0 = now_us() if self.tracer.enabled else 0.0
        try:
            args = _to_device(msg.args, self.device)
            kwargs = _to_device(msg.kwargs, self.device)
            outputs, single, saved = run_forward(self.module, args, kwargs, leaves, params, msg.save)
        except Exception as exc:  # the user's module raised
            self._release_call_weights(c)
            text = f"forward raised {type(exc).__name__}: {exc}"
            if _looks_like_dtype_error(exc):
                cls: type[E.ActorgradError] = E.ForwardDTypeError
                text += _dtype_hint(self.module, values, msg.args)
            elif _looks_like_shape_error(exc):
                cls = E.ForwardShapeError
            else:
                cls = E.WorkerError
            self._fail_call(c, self._error(cls, text, msg.call, msg.step, exc))
            return
        if self.check_finite:
            bad = _first_nonfinite(outputs)
            if bad is not None:
                self._release_call_weights(c)
                src = _first_nonfinite(values)
                consts: list = []
                map_leaves((msg.args, msg.kwargs), lambda x: consts.append(x) if isinstance(x, torch.Tensor) else x)
                if src is not None:
                    where = (f"its input {src} (from worker '{msg.refs[src].worker}' call {msg.refs[src].call}) "
                             "is already not finite")
                elif _first_nonfinite(consts) is not None:
                    where = "a tensor the caller passed in as a constant is already not finite"
                else:
                    where = "its inputs are finite: it appeared here"
                self._fail_call(c, self._error(E.NonFiniteError, f"forward output {bad} contains NaN or Inf; "
                                               f"{where}", msg.call, msg.step))
                return
        if self.tracer.enabled:
            c.done_us = now_us()
            if t0 - c.arrived_us > 50:
                self.tracer.span("wait", c.arrived_us, t0, tid=MESSAGE_TID, call=c.id, step=c.step, waits="inputs")
            self.tracer.span("forward", t0, c.done_us, call=c.id, step=c.step)
        c.status = "done"
        c.outputs = [o.detach() for o in outputs]
        c.saved = saved
        meta = {
            "single": single,
            "outputs": [[list(o.shape), str(o.dtype).removeprefix("torch."), bool(o.requires_grad)] for o in outputs],
            "version": self.updater.version if c.snapshot is None else -c.snapshot - 1,
        }
        self._ack(msg.req, meta)
        for route in c.routes:
            self._route(c, route)
        c.routes.clear()
        for req, out in c.fetches:
            self._answer_fetch(c, req, out)
        c.fetches.clear()

    def _fail_call(self, c: CallState, err: E.ActorgradError) -> None:
        c.status = "failed"
        c.error = E.to_info(err)
        self._out.append((None, m.Failure(c.msg.req, c.error)))
        for req, _ in c.fetches:
            self._out.append((None, m.Failure(req, c.error)))
        c.fetches.clear()
        c.routes.clear()

    def _on_route(self, msg: m.Route) -> None:
        c = self.calls.get(msg.call)
        if c is None:
            log.debug("%s: route for unknown call %d dropped (its step ended)", self.name, msg.call)
            return
        if c.status == "done":
            self._route(c, msg)
        elif c.status == "waiting":
            c.routes.append(msg)

    def _route(self, c: CallState, r: m.Route) -> None:
        if r.out >= len(c.outputs):
            err = self._error(E.ConfigError, f"output {r.out} requested but the call returned {len(c.outputs)}",
                              c.id, c.step)
            self._out.append((None, m.Failure(c.msg.req, E.to_info(err))))
            return
        self._send(r.to_worker, m.Value(c.step, r.to_call, r.slot, c.id, c.outputs[r.out]))

    # --- backward -------------------------------------------------------------

    def _on_plan(self, msg: m.Plan) -> None:
        if msg.step in self.aborted:
            self._fail(msg.req, self._error(E.StepAborted, "pass of an aborted step", step=msg.step))
            return
        ps = PassState(msg.pass_id, msg.step, msg.req, created_us=now_us() if self.tracer.enabled else 0.0)
        self.passes[msg.pass_id] = ps
        self._step(msg.step).passes.append(msg.pass_id)
        for e in msg.expect:
            c = self.calls.get(e.call)
            if c is None or c.step != msg.step:
                self._fail_pass(ps, self._error(E.ActorgradError, f"pass {msg.pass_id} plans call {e.call}, "
                                                "which this worker does not hold", e.call, msg.step))
                return
            ps.ledger.expect(e.call, e.out, e.edges)
        for s in msg.seeds:
            self._arrive(ps, s.call, s.out, Arrived((m.SEED, s.index), "caller", s.tensor, seed=True))
            if ps.failed:
                return
        for g in self.early_grads.pop(msg.pass_id, []):
            self._on_gradient(g)
        for call in ps.ledger.calls():
            self._try_vjp(ps, call)

    def _on_gradient(self, msg: m.Gradient) -> None:
        ps = self.passes.get(msg.pass_id)
        if ps is None:
            if msg.step in self.aborted or msg.step in self.closed:
                log.debug("%s: gradient of ended step %d dropped", self.name, msg.step)
            else:
                self.early_grads.setdefault(msg.pass_id, []).append(msg)
            return
        if ps.failed or ps.complete:
            return
        self._arrive(ps, msg.call, msg.out, Arrived((msg.from_call, msg.slot), msg.from_worker, msg.tensor))
        self._try_vjp(ps, msg.call)

    def _arrive(self, ps: PassState, call: int, out: int, a: Arrived) -> None:
        if call not in self.calls:
            self._fail_pass(ps, self._error(
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
            self._fail_pass(ps, self._error(
                E.ActorgradError,
                f"unexpected gradient for output {out} from worker '{a.from_worker}' call {a.edge[0]} "
                f"slot {a.edge[1]} in pass {ps.id}; the plan expects {_fmt_edges(ps.ledger.missing(call))}",
                call, ps.step))
            return
        ps.arrived.setdefault((call, out), []).append(a)

    def _try_vjp(self, ps: PassState, call: int) -> None:
        if ps.failed or ps.complete or call in ps.done_calls or not ps.ledger.is_complete(call):
            return
        c = self.calls[call]
        if c.status == "waiting":
            return  # a seed may arrive before its forward ran; the forward will retry
        if c.status == "failed":
            self._fail_pass(ps, E.from_info(c.error or {}))
            return
        t0 = now_us() if self.tracer.enabled else 0.0
        try:
            grad_outputs = self._sum_arrived(ps, c)
            input_grads, param_grads = self._vjp(c, grad_outputs)
            if self.tracer.enabled:
                ready = max(ps.created_us, c.done_us)
                if t0 - ready > 50:
                    self.tracer.span("wait", ready, t0, tid=MESSAGE_TID, call=call, pass_id=ps.id, waits="gradients")
                self.tracer.span("backward", t0, now_us(), call=call, pass_id=ps.id, step=ps.step)
        except E.ActorgradError as err:
            self._fail_pass(ps, err)
            return
        except Exception as exc:
            self._fail_pass(ps, self._error(E.WorkerError, f"backward raised {type(exc).__name__}: {exc}",
                                            call, ps.step, exc))
            return
        if self.check_finite:
            bad_in = _first_nonfinite(input_grads)
            i = _first_nonfinite(param_grads.values())
            bad_p = None if i is None else list(param_grads)[i]
            if bad_in is not None or bad_p is not None:
                came = _first_nonfinite(grad_outputs)
                what = f"the gradient for input {bad_in}" if bad_in is not None else f"the gradient of {bad_p!r}"
                where = (f"the gradient that arrived for output {came} is already not finite" if came is not None
                         else "the gradients that arrived are finite: it appeared here")
                self._fail_pass(ps, self._error(E.NonFiniteError, f"backward: {what} contains NaN or Inf; {where}",
                                                call, ps.step))
                return
        if param_grads and self.optimizer is None and not isinstance(self.rule, CallableRule):
            self._fail_pass(ps, self._error(
                E.ConfigError, "parameters received gradients but the worker has no optimizer; pass "
                "optimizer=ag.Optim(...) to ag.spawn, or set requires_grad=False on them", call, ps.step))
            return
        add_grads(ps.param_grads, param_grads, ps.owned)
        for slot, ref in enumerate(c.msg.refs):
            if ref.grad:
                g = input_grads[slot]
                self._send(ref.worker, m.Gradient(ps.id, ps.step, ref.call, ref.out, self.name, call, slot,
                                                  None if g is None else g.detach()))
        ps.done_calls.add(call)
        if all(cc in ps.done_calls for cc in ps.ledger.calls()):
            self._complete_pass(ps)

    def _sum_arrived(self, ps: PassState, c: CallState) -> list[Optional[torch.Tensor]]:
        grads: list[Optional[torch.Tensor]] = []
        for out, o in enumerate(c.outputs):
            total: Optional[torch.Tensor] = None
            for a in ps.arrived.get((c.id, out), []):
                g = a.tensor
                differentiable = c.saved is not None and c.saved.outputs[out].requires_grad
                if a.seed and not differentiable and not self.custom_backward:
                    raise self._error(E.ConfigError, f"backward() seeded at output {out}, which does not require "
                                      "grad: nothing that produced it is differentiable", c.id, ps.step)
                if g is None and a.seed:
                    if o.numel() != 1:
                        raise self._error(E.ShapeError, f"backward() without a gradient needs a scalar, but output "
                                          f"{out} has shape {tuple(o.shape)}; pass gradient=", c.id, ps.step)
                    g = torch.ones_like(o)
                if g is None:
                    continue
                if not (g.is_floating_point() or g.is_complex()):
                    src = "the seed gradient" if a.seed else f"worker '{a.from_worker}' call {a.edge[0]} slot {a.edge[1]}"
                    raise self._error(E.DTypeError, f"gradient for output {out} from {src} has dtype "
                                      f"{str(g.dtype).removeprefix('torch.')}; gradients must be floating point",
                                      c.id, ps.step)
                if tuple(g.shape) != tuple(o.shape):
                    src = "the seed gradient" if a.seed else f"worker '{a.from_worker}' call {a.edge[0]} slot {a.edge[1]}"
                    raise self._error(E.ShapeError, f"gradient for output {out} from {src} has shape "
                                      f"{tuple(g.shape)}, but the output has shape {tuple(o.shape)}", c.id, ps.step)
                g = g.to(device=o.device, dtype=o.dtype)
                total = g if total is None else total + g
            grads.append(total)
        return grads

    def _vjp(self, c: CallState, grad_outputs: list[Optional[torch.Tensor]]):
        saved = c.saved
        if saved is None:
            raise self._error(E.ConfigError, "this call ran under ag.no_grad(); it has nothing saved for backward",
                              c.id, c.step)
        if not self.custom_backward:
            return default_vjp(saved.inputs, saved.outputs, grad_outputs, saved.params)
        object.__setattr__(self.module, "_actorgrad_params", saved.params)
        try:
            result = self.module.backward(tuple(saved.inputs), tuple(saved.outputs), tuple(grad_outputs))
        finally:
            self.module.__dict__.pop("_actorgrad_params", None)
        return self._check_custom(c, saved, result)

    def _check_custom(self, c: CallState, saved: Saved, result: Any):
        if not (isinstance(result, tuple) and len(result) == 2):
            raise self._error(E.WorkerError, "a custom backward must return (input_grads, {name: grad})", c.id, c.step)
        input_grads, param_grads = result
        if isinstance(input_grads, torch.Tensor) or input_grads is None:
            input_grads = [input_grads]
        input_grads = list(input_grads)
        if len(input_grads) != len(saved.inputs):
            raise self._error(E.WorkerError, f"custom backward returned {len(input_grads)} input gradients for "
                              f"{len(saved.inputs)} inputs", c.id, c.step)
        for i, (g, x) in enumerate(zip(input_grads, saved.inputs)):
            if g is not None and tuple(g.shape) != tuple(x.shape):
                raise self._error(E.ShapeError, f"custom backward returned a gradient of shape {tuple(g.shape)} "
                                  f"for input {i} of shape {tuple(x.shape)}", c.id, c.step)
        params = dict(self.module.named_parameters())
        clean = {}
        for name, g in dict(param_grads or {}).items():
            if name not in params:
                raise self._error(E.WorkerError, f"custom backward returned a gradient for unknown parameter "
                                  f"{name!r}", c.id, c.step)
            if g is None:
                continue
            if tuple(g.shape) != tuple(params[name].shape):
                raise self._error(E.ShapeError, f"custom backward returned a gradient of shape {tuple(g.shape)} "
                                  f"for parameter {name!r} of shape {tuple(params[name].shape)}", c.id, c.step)
            clean[name] = g.detach()
        return input_grads, clean

    def _complete_pass(self, ps: PassState) -> None:
        ps.complete = True
        try:
            t0 = now_us() if self.tracer.enabled else 0.0
            applied = self.rule.on_pass(self.updater, self.pending, ps.step, ps.id, ps.param_grads)
            if applied:
                self.tracer.span("update", t0, now_us(), step=ps.step, pass_id=ps.id)
        except E.ActorgradError as err:
            ps.complete = False
            self._fail_pass(ps, err)
            return
        except Exception as exc:
            ps.complete = False
            self._fail_pass(ps, self._error(E.WorkerError, f"update raised {type(exc).__name__}: {exc}",
                                            step=ps.step, exc=exc))
            return
        st = self._step(ps.step)
        if applied:
            st.applied = True
        ps.arrived.clear()
        ps.param_grads = {}
        self._ack(ps.req, {"worker": self.name, "calls": len(ps.done_calls), "applied": applied})

    def _fail_pass(self, ps: PassState, err: E.ActorgradError) -> None:
        if ps.failed:
            return
        ps.failed = True
        ps.arrived.clear()
        self._fail(ps.req, err)

    # --- steps ----------------------------------------------------------------

    def _on_close(self, msg: m.Close) -> None:
        if msg.step in self.aborted:
            self._fail(msg.req, self._error(E.StepAborted, "close of an aborted step", step=msg.step))
            return
        st = self._step(msg.step)
        st.close = msg
        st.close_since = time.monotonic()

    def _try_close(self, step: int, st: StepState) -> bool:
        """Phase 1 (answer Close once ready) and phase 2 (apply on Commit); True once closed."""
        if not st.ready:
            self._try_ready(step, st)
            if step not in self.steps:
                return True  # failed and dropped
        if not (st.ready and st.commit):
            return False
        return self._commit(step, st)

    def _try_ready(self, step: int, st: StepState) -> None:
        msg = st.close
        assert msg is not None
        for call in msg.calls:
            c = self.calls.get(call)
            if c is None:
                self._fail(msg.req, self._error(E.ActorgradError, f"close names call {call}, unknown here", call, step))
                self._drop_step(step)
                return
            if c.status == "waiting":
                return
        failed = None
        for pid in msg.passes:
            ps = self.passes.get(pid)
            if ps is None:
                failed = self._error(E.ActorgradError, f"close names pass {pid}, unknown here", step=step)
                break
            if ps.failed:
                failed = self._error(E.StepAborted, f"pass {pid} failed in this step", step=step)
                break
            if not ps.complete:
                return
        if failed is None and self.commit_error is not None:
            failed, self.commit_error = self.commit_error, None
        if failed is None:
            for call in st.calls:
                c = self.calls.get(call)
                if c is not None and c.status == "failed":
                    failed = E.from_info(c.error or {})
                    break
        if failed is not None:
            self._fail(msg.req, failed)
            self._drop_step(step)
            self.aborted.add(step)
            return
        pending = self.pending.by_step.get(step) or {}
        st.ready = True
        # An update that lands at Commit is reported as it will be; only its norm needs it applied:
        # with track_update_norm the caller then asks for GetState("update") (not final).
        final = not (self.updater.options.track_update_norm and (pending or isinstance(self.rule, CallableRule)))
        self._ack(msg.req, {
            "worker": self.name,
            "calls": len(st.calls),
            "passes": len(st.passes),
            "applied": bool(st.applied or pending),
            "version": self.updater.version + (1 if pending else 0),
            **self.updater.report(step, pending, self.pending.passes.get(step), take=final),
            "final": final,
        })

    def _commit(self, step: int, st: StepState) -> bool:
        msg = st.close
        assert msg is not None
        try:
            t0 = now_us() if self.tracer.enabled else 0.0
            applied = self.rule.on_close(self.updater, self.pending, step)
            if applied:
                self.tracer.span("update", t0, now_us(), step=step)
            if self.max_staleness > 0:
                self._take_snapshot(step)
        except Exception as exc:
            # The caller already has this step's report: the error is raised with the next step.
            err = exc if isinstance(exc, E.ActorgradError) else self._error(
                E.WorkerError, f"update raised {type(exc).__name__}: {exc}", step=step, exc=exc)
            log.error("%s: the update of step %d failed: %s", self.name, step, err)
            self.commit_error = err
        retain = set(map(tuple, msg.retain))
        for key in [k for k, (s, _) in self.retained.items() if s < step]:
            del self.retained[key]
        for call in st.calls:
            c = self.calls.get(call)
            if c is None:
                continue
            for out, t in enumerate(c.outputs):
                if (call, out) in retain:
                    self.retained[(call, out)] = (step, t)
        self._drop_step(step)
        self.closed.add(step)
        return True

    def _drop_step(self, step: int) -> None:
        """Free everything a step holds here: calls, saved graphs, passes, pending gradients."""
        st = self.steps.pop(step, None)
        if st is None:
            return
        for call in st.calls:
            c = self.calls.pop(call, None)
            if c is not None:
                self._release_call_weights(c)
        for pid in st.passes:
            self.passes.pop(pid, None)
            self.early_grads.pop(pid, None)
        self.pending.pop(step)
        if self.queue and self.queue[0] not in self.calls:
            self.queue = deque(c for c in self.queue if c in self.calls)

    def _on_abort(self, msg: m.Abort) -> None:
        self.aborted.add(msg.step)
        err = self._error(E.StepAborted, f"step aborted: {msg.reason}", step=msg.step)
        st = self.steps.get(msg.step)
        if st is not None:
            for call in st.calls:
                c = self.calls.get(call)
                if c is None:
                    continue
                if c.status == "waiting":
                    self._fail(c.msg.req, err)
                for req, _ in c.fetches:
                    self._fail(req, err)
            for pid in st.passes:
                ps = self.passes.get(pid)
                if ps is not None and not ps.complete and not ps.failed:
                    self._fail(ps.req, err)
            if st.close is not None:
                self._fail(st.close.req, err)
        self._drop_step(msg.step)
        for call in [k for k, v in self.early_values.items() if any(s == msg.step for s, _, _ in v.values())]:
            del self.early_values[call]
        for pid in [p for p, gs in self.early_grads.items() if gs and gs[0].step == msg.step]:
            del self.early_grads[pid]

    def reset(self) -> None:
        """Forget every step, call and pass (recovery): the caller restores state next.

        Messages of the old epoch never reach a reset core (the host drops them), so step ids may
        be used again.
        """
        self._init_steps()
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
                     if c is not None and c.status == "waiting" and c.since < limit]
            stale_p = [ps for ps in (self.passes.get(i) for i in st.passes)
                       if ps is not None and not (ps.complete or ps.failed) and ps.since < limit]
            stuck_close = st.close is not None and not st.ready and st.close_since < limit
            if not (stale or stale_p or stuck_close):
                continue
            missing = [line for line in self.describe_missing() if f"(step {step})" in line
                       or any(f"(pass {ps.id})" in line for ps in stale_p)]
            text = (f"this worker waited more than {self.deadline:g}s for step {step}; still missing: "
                    + ("; ".join(missing) or "the caller's Close/Commit"))
            err = self._error(E.DeadlineExceeded, text, step=step)
            log.warning("%s: %s", self.name, text)
            first = len(self._out)
            self._on_abort(m.Abort(step, text))
            # _on_abort answered this step's waiting requests with StepAborted; say why instead.
            self._out[first:] = [(to, msg if to is not None or not isinstance(msg, m.Failure)
                                  else m.Failure(msg.req, E.to_info(err))) for to, msg in self._out[first:]]
        out, self._out = self._out, []
        return out

    def _advance(self, closes: bool = True) -> None:
        """Run whatever became possible: ready forwards, their VJPs, closable steps (in order)."""
        progress = True
        while progress:
            progress = self._run_ready_forwards()
            if progress:
                # Gradients are tried as they arrive; only a call whose forward just ran (a seed can
                # come before it) may have become ready without a message of its own.
                for ps in list(self.passes.values()):
                    if not (ps.failed or ps.complete):
                        for call in ps.ledger.calls():
                            if call not in ps.done_calls:
                                self._try_vjp(ps, call)
            # Updates land in step order: only the earliest open step may close.
            for step in (sorted(self.steps) if closes else ()):
                st = self.steps[step]
                if st.close is None or not self._try_close(step, st):
                    break
                progress = True

    # --- state --------------------------------------------------------------

    def _on_fetch(self, msg: m.Fetch) -> None:
        c = self.calls.get(msg.call)
        if c is None:
            kept = self.retained.get((msg.call, msg.out))
            if kept is not None:
                self._ack(msg.req, kept[1])
            else:
                self._fail(msg.req, self._error(
                    E.StepClosedError, f"the value of output {msg.out} was freed when its step closed; "
                    "fetch it with .value() before the next step closes", msg.call))
            return
        if c.status == "failed":
            self._fail(msg.req, E.from_info(c.error or {}))
        elif c.status == "waiting":
            c.fetches.append((msg.req, msg.out))
        else:
            self._answer_fetch(c, msg.req, msg.out)

    def _answer_fetch(self, c: CallState, req: int, out: int) -> None:
        if out >= len(c.outputs):
            self._fail(req, self._error(E.ConfigError, f"output {out} requested but the call returned "
                                        f"{len(c.outputs)}", c.id, c.step))
        else:
            self._ack(req, c.outputs[out])

    def stats(self) -> dict[str, int]:
        """Counts of what this worker holds: calls, saved graphs, weight copies, passes, steps."""
        return {
            "calls": len(self.calls),
            "saved": sum(1 for c in self.calls.values() if c.saved is not None),
            "stashed_versions": len(self.stash),
            "snapshots": len(self.snapshots),
            "retained": len(self.retained),
            "passes": len(self.passes),
            "open_steps": len(self.steps),
            "queued_forwards": len(self.queue),
            "early_messages": len(self.early_values) + len(self.early_grads),
            "pending_grads": len(self.pending.by_step),
            "version": self.updater.version,
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
            self._ack(msg.req, self.updater.take_closed())
            return
        sd = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        if msg.what == "module":
            self._ack(msg.req, sd)
            return
        data = {
            "module": sd,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "version": self.updater.version,
        }
        if self.updater.scheduler is not None:
            try:
                data["scheduler"] = self.updater.scheduler_state()
            except E.ActorgradError as err:
                self._fail(msg.req, err)
                return
        if self.max_staleness > 0:
            # Stale forwards after a restore must use the same old weights as an uninterrupted run.
            data["snapshots"] = [[k, {n: t.detach().cpu() for n, t in v.items()}]
                                 for k, v in sorted(self.snapshots.items())]
            data["snapshot_versions"] = [[k, v.version] for k, v in sorted(self.snapshots.items())]
        self._ack(msg.req, data)

    def _on_set_state(self, msg: m.SetState) -> None:
        state = msg.state
        if msg.what == "trace":
            self.tracer.enabled = bool(state)
            self._ack(msg.req, None)
            return
        try:
            if msg.what == "module":
                self.module.load_state_dict(state)
            else:
                self.module.load_state_dict(state["module"])
                if self.optimizer is not None and state.get("optimizer") is not None:
                    self.optimizer.load_state_dict(_fix_optimizer_state(state["optimizer"]))
                if self.updater.scheduler is not None and state.get("scheduler") is not None:
                    self.updater.scheduler.load_state_dict(state["scheduler"])
                self.updater.version = int(state.get("version", self.updater.version))
        except Exception as exc:
            cls = E.ShapeError if "size mismatch" in str(exc) else E.ConfigError
            self._fail(msg.req, self._error(cls, f"could not load state: {exc}", exc=exc))
            return
        # New weights: forwards from here on must not reuse a stash or snapshot of the old ones.
        self.updater.version += 1
        if self.max_staleness > 0:
            saved = state.get("snapshots") if msg.what == "full" and isinstance(state, dict) else None
            if saved:
                # Versions go on from the saved ones plus the bump above, so staleness stays exact.
                versions = {int(k): int(v) + 1 for k, v in state.get("snapshot_versions") or ()}
                self.snapshots = {
                    int(k): Weights({n: t.to(self.device).requires_grad_(self.module.get_parameter(n).requires_grad)
                                     for n, t in v.items()}, versions.get(int(k), self.updater.version))
                    for k, v in saved}
            else:
                self.snapshots = {max(self.snapshots, default=0): self._clone_params()}
            self.snapshot_refs = {}
        self._ack(msg.req, None)

    # --- introspection ------------------------------------------------------

    def describe_missing(self) -> list[str]:
        """Human-readable lines: what this worker is still waiting for."""
        lines = []
        for call in list(self.queue):
            c = self.calls.get(call)
            if c is None:
                continue
            missing = [i for i in range(len(c.msg.refs)) if i not in c.values]
            if missing:
                srcs = ", ".join(f"slot {i} from '{c.msg.refs[i].worker}' call {c.msg.refs[i].call}" for i in missing)
                lines.append(f"call {call} (step {c.step}): forward waits for input {srcs}")
            elif not self._gate_open(c.step):
                lines.append(f"call {call} (step {c.step}): forward waits for the update of an earlier step")
        for ps in list(self.passes.values()):
            if ps.complete or ps.failed:
                continue
            for call, out, edge in ps.ledger.missing():
                src = "the seed" if edge[0] == m.SEED else f"call {edge[0]} slot {edge[1]}"
                lines.append(f"call {call} (pass {ps.id}): gradient for output {out} from {src}")
        return lines


def process_memory() -> dict[str, int]:
    """This process's resident memory in bytes and its count of live torch.Tensor objects."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS is the best there is
        import resource

        rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    # issubclass on the type: isinstance would touch lazy torch objects and warn.
    tensors = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
    return {"rss_bytes": rss, "live_tensors": tensors}


def _fmt_edges(missing: list[tuple[int, int, tuple[int, int]]]) -> str:
    if not missing:
        return "nothing more"
    return ", ".join(f"output {o} from call {e[0]} slot {e[1]}" for _, o, e in missing)


def _looks_like_dtype_error(exc: BaseException) -> bool:
    return isinstance(exc, (RuntimeError, TypeError)) and bool(_DTYPE_WORDS.search(str(exc)))


def _dtype_hint(module: torch.nn.Module, values: list, args: Any) -> str:
    """Say which input's dtype differs from the module's parameters."""
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is None:
        return ""
    tensors = list(values) + [a for a in (args if isinstance(args, (list, tuple)) else []) if isinstance(a, torch.Tensor)]
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.dtype != param.dtype:
            return (f" (input {i} has dtype {str(t.dtype).removeprefix('torch.')}, the module's parameters are "
                    f"{str(param.dtype).removeprefix('torch.')}; convert it, e.g. with .to({param.dtype}))")
    return ""


def _first_nonfinite(tensors: Any) -> Optional[int]:
    """Index of the first floating tensor holding NaN or Inf, or None."""
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return i
    return None


def _looks_like_shape_error(exc: BaseException) -> bool:
    return isinstance(exc, (RuntimeError, ValueError, IndexError)) and bool(_SHAPE_WORDS.search(str(exc)))


def _to_device(tree: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return tree
    return map_leaves(tree, lambda x: x.to(device) if isinstance(x, torch.Tensor) else x)


def _fix_optimizer_state(sd: dict) -> dict:
    """msgpack turns tuples (Adam's betas) into lists; optimizers accept both, except where they index."""
    groups = []
    for g in sd.get("param_groups", []):
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": {int(k): v for k, v in sd.get("state", {}).items()}, "param_groups": groups}
