"""Runtime: one Transport plus the caller's Graph; opens and closes steps; owns every deadline.

The caller never relays activations or gradients: it sends each worker the
calls it must run (Forward), tells producers where their outputs go (Route),
tells each worker of a pass which gradient messages to expect (Plan), and
closes steps (Close). Workers answer requests; the answers arrive on futures
whose completions land in one queue that ``_pump`` drains while it waits.
A step in which anything fails is aborted everywhere and its error is raised
at the next place the caller waits for that step.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import shutil
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from . import errors as E
from .core import codec
from .core import messages as m
from .core.graph import CallRecord, Graph
from .core.worker import WorkerSpec
from .handles import Node, Pass, StepHandle, StepReport, Worker, WorkerReport
from .trace import Tracer, now_us, write_trace

log = logging.getLogger("actorgrad.runtime")

DEFAULT_TIMEOUT = 120.0
_PROBE_TIMEOUT = 2.0


@dataclass
class WorkerInfo:
    """What the caller knows of a worker without asking it."""

    name: str
    module_class: str
    trainable: bool
    has_optimizer: bool
    custom_rule: bool
    custom_backward: bool
    options: dict[str, Any]
    handle: Worker
    arity: Optional[tuple[bool, int]] = None  # (returns a single tensor, number of outputs)
    placed: bool = True  # False while its ag.placement block is open
    optimizer: Any = None  # the optimizer recipe, for ag.graph


@dataclass
class PassRecord:
    """A pass as the caller tracks it."""

    id: int
    step: "StepRecord"
    workers: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    error: Optional[E.ActorgradError] = None
    seeds: list[tuple[int, int]] = field(default_factory=list)  # (call, output) per seed


@dataclass
class StepRecord:
    """A step as the caller tracks it."""

    id: int
    calls: dict[str, list[int]] = field(default_factory=dict)
    pass_workers: dict[str, list[int]] = field(default_factory=dict)
    passes: dict[int, PassRecord] = field(default_factory=dict)
    nodes: "weakref.WeakSet[Node]" = field(default_factory=weakref.WeakSet)
    error: Optional[E.ActorgradError] = None
    delivered: bool = False
    close_pending: set[str] = field(default_factory=set)
    closing: bool = False
    committed: bool = False
    reports: dict[str, WorkerReport] = field(default_factory=dict)
    landing: set[str] = field(default_factory=set)  # workers that report their update after Commit
    report: Optional[StepReport] = None
    started: float = field(default_factory=time.perf_counter)
    seeded: dict[tuple[int, int], int] = field(default_factory=dict)  # (call, output) -> pass that seeded it

    def participants(self) -> set[str]:
        return set(self.calls) | set(self.pass_workers)


@dataclass
class Recovery:
    """Recovery settings and the checkpoints taken so far (oldest first)."""

    every: int
    directory: str
    max_restarts: int
    keep: int
    temporary: bool
    checkpoints: list[tuple[int, str]] = field(default_factory=list)  # (step, path)
    workers_seen: int = -1  # Runtime._workers_changed at the last checkpoint
    recoveries: int = 0


@dataclass
class Pending:
    """One request in flight."""

    req: int
    kind: str  # forward | plan | close | fetch | state
    worker: str
    step: Optional[StepRecord]
    obj: Any = None
    future: Any = None
    done: bool = False
    data: Any = None
    error: Optional[E.ActorgradError] = None
    epoch: int = 0  # the recovery epoch it was sent in; replies of earlier epochs are ignored


def _optimizer_name(opt: Any) -> Optional[str]:
    if opt is None:
        return None
    cls = getattr(opt, "cls", None)
    return cls.__name__ if cls is not None else getattr(opt, "__name__", type(opt).__name__)


class Runtime:
    """The caller's side of actorgrad."""

    def __init__(self, transport: Any, timeout: float = DEFAULT_TIMEOUT, trace: Optional[str] = None,
                 check_finite: bool = False, worker_timeout: Optional[float] = None) -> None:
        self.transport = transport
        self.check_finite = bool(check_finite)
        if worker_timeout is not None and (not isinstance(worker_timeout, (int, float)) or worker_timeout <= 0):
            raise E.ConfigError(f"worker_timeout must be a positive number of seconds, got {worker_timeout!r}")
        self.worker_timeout = float(worker_timeout) if worker_timeout is not None else max(600.0, 5 * float(timeout))
        self.recovery: Optional[Recovery] = None
        self._epoch = 0
        self._recovering = False
        self._workers_changed = 0
        self.trace_path = trace
        self.tracer = Tracer("caller", enabled=trace is not None)
        self.backend = transport.name
        self.timeout = float(timeout)
        self.workers: dict[str, WorkerInfo] = {}
        self.graph = Graph()
        self.closed = False
        self._ids = itertools.count(1)
        self._seq: dict[str, int] = {}
        self._lock = threading.RLock()
        self._events: "queue.SimpleQueue[Pending]" = queue.SimpleQueue()
        self._pending: dict[int, Pending] = {}
        self._class_counts: dict[str, int] = {}
        self._steps: dict[int, StepRecord] = {}
        self._closing: list[StepRecord] = []
        self._group: Optional[tuple[str, list[tuple[WorkerSpec, dict[str, Any]]]]] = None
        self.step = self._open_step(1)
        self._local = threading.local()
        # The last closed step and its calls, kept past Graph.drop_step for ag.graph().
        self.last_graph: Optional[tuple[StepRecord, list[CallRecord]]] = None

    # --- plumbing -------------------------------------------------------------

    def _open_step(self, step_id: int) -> StepRecord:
        rec = StepRecord(step_id)
        self._steps[step_id] = rec
        # Failed steps stay findable a while, so old nodes can name their error.
        for old in [s for s in self._steps if s < step_id - 32]:
            del self._steps[old]
        return rec

    def _next_seq(self, worker: str) -> int:
        seq = self._seq.get(worker, 0)
        self._seq[worker] = seq + 1
        return seq

    def _post(self, worker: str, msg: m.Message) -> None:
        self.transport.post(worker, self._next_seq(worker), codec.encode(msg))

    def _request(self, worker: str, msg: m.Message, kind: str, step: Optional[StepRecord], obj: Any = None) -> Pending:
        p = Pending(msg.req, kind, worker, step, obj, epoch=self._epoch)
        data = codec.encode(msg)
        try:
            p.future = self.transport.request(worker, self._next_seq(worker), data)
        except E.ActorgradError as err:
            p.done, p.error = True, err
            if step is not None and kind in ("forward", "plan", "close"):
                self._fail_step(step, err)
            return p
        self._pending[p.req] = p
        p.future.add_done_callback(lambda _f, p=p: self._events.put(p))
        return p

    def _check_open(self) -> None:
        if self.closed:
            raise E.ConfigError("actorgrad was shut down; call ag.init() again and spawn new workers")

    @property
    def grad_enabled(self) -> bool:
        """False inside ag.no_grad() on this thread."""
        return getattr(self._local, "no_grad", 0) == 0

    def push_no_grad(self, delta: int) -> None:
        """Enter (+1) or leave (-1) an ag.no_grad() block on this thread."""
        self._local.no_grad = getattr(self._local, "no_grad", 0) + delta

    # --- completions -----------------------------------------------------------

    def _complete(self, p: Pending) -> None:
        if p.done or p.epoch != self._epoch:
            return
        self._pending.pop(p.req, None)
        p.done = True
        future, p.future = p.future, None  # breaks the cycle request -> future -> callback -> request
        try:
            reply = codec.decode(future.result())
        except E.ActorgradError as err:
            p.error = err
        except Exception as exc:
            p.error = E.WorkerError(f"no reply: {type(exc).__name__}: {exc}", worker=p.worker)
        else:
            if isinstance(reply, m.Ack):
                p.data = reply.data
                self._on_ack(p)
            elif isinstance(reply, m.Failure):
                p.error = E.from_info(reply.error)
            else:
                p.error = E.DecodeError(f"a reply must be Ack or Failure, got {type(reply).__name__}", worker=p.worker)
        if p.error is not None:
            self._on_failure(p)

    def _on_ack(self, p: Pending) -> None:
        if p.kind == "forward":
            rec: CallRecord = p.obj
            rec.meta = p.data
            info = self.workers.get(p.worker)
            arity = (bool(p.data["single"]), len(p.data["outputs"]))
            if info is not None and info.arity is None:
                info.arity = arity
            elif info is not None and info.arity != arity and p.step is not None:
                self._fail_step(p.step, E.ConfigError(
                    f"the module returned {arity[1]} output(s) (single={arity[0]}), but its first call returned "
                    f"{info.arity[1]} (single={info.arity[0]}); a worker's output structure must not change",
                    worker=p.worker, call=rec.id, step=rec.step))
        elif p.kind == "plan":
            rec_p: PassRecord = p.obj
            rec_p.pending.discard(p.worker)
        elif p.kind == "close":
            step: StepRecord = p.obj
            d = p.data
            if step.committed:
                # The second reply of a close: what the update applied at Commit did (see below).
                old = step.reports.get(p.worker)
                if old is not None and d.get("step") == step.id:
                    step.reports[p.worker] = old.merged(d)
                step.close_pending.discard(p.worker)
                return
            step.reports[p.worker] = WorkerReport.from_dict(p.worker, d)
            if d.get("final") is False:
                step.landing.add(p.worker)
            step.close_pending.discard(p.worker)
            if not step.close_pending and step.error is None and not step.committed:
                # Every worker is ready: now, and only now, they apply the step's updates.
                step.committed = True
                for w in sorted(step.participants()):
                    if w in self.workers:
                        self._post(w, m.Commit(step.id))
                        if w in step.landing:
                            # Its report needs the update applied (its norm): ask right behind the Commit.
                            step.close_pending.add(w)
                            self._request(w, m.GetState(next(self._ids), "update"), "close", step, step)
            # A worker closes a step only after finishing all of its passes; its pass
            # replies may still be on their way (Ray does not order replies).
            for pid in step.pass_workers.get(p.worker, []):
                prec = step.passes.get(pid)
                if prec is not None:
                    prec.pending.discard(p.worker)

    def _on_failure(self, p: Pending) -> None:
        err = p.error
        assert err is not None
        if err.worker is None:
            err.worker = p.worker
        if err.step is None and p.step is not None and p.kind in ("forward", "plan", "close"):
            err.step = p.step.id
        if p.kind == "plan" and p.obj.error is None:
            p.obj.error = err
        if p.step is not None and p.kind in ("forward", "plan", "close"):
            self._fail_step(p.step, err)

    def _fail_step(self, step: StepRecord, err: E.ActorgradError) -> None:
        """Abort a step everywhere; the first error is the step's error."""
        if step.error is not None:
            return
        if isinstance(err, E.StepAborted) and step.error is None:
            log.debug("step %d aborted by a worker: %s", step.id, err)
        step.error = err
        log.warning("step %d failed: %s", step.id, err.message if hasattr(err, "message") else err)
        reason = f"{type(err).__name__} in worker '{err.worker}'"
        for w in step.participants():
            if w in self.workers:
                try:
                    self._post(w, m.Abort(step.id, reason))
                except E.ActorgradError:
                    pass
        for prec in step.passes.values():
            if prec.error is None:
                prec.error = err

    def _drain(self) -> None:
        while True:
            try:
                p = self._events.get_nowait()
            except queue.Empty:
                return
            self._complete(p)

    def poll(self) -> None:
        """Process whatever replies have arrived, without waiting."""
        with self._lock:
            self._drain()

    def _deliver(self, step: StepRecord) -> E.ActorgradError:
        step.delivered = True
        assert step.error is not None
        if isinstance(step.error, E.WorkerDied):
            self._maybe_recover(step.error)
        return step.error

    def _deadline(self, timeout: Optional[float]) -> float:
        t = self.timeout if timeout is None else float(timeout)
        return time.monotonic() + t

    def _pump(
        self,
        done: Callable[[], bool],
        deadline: float,
        step: Optional[StepRecord],
        what: Callable[[], tuple[str, list[tuple[str, Optional[int]]]]],
        timeout: Optional[float],
    ) -> None:
        """Process replies until ``done()``; raise the step's error, or DeadlineExceeded."""
        if not self.tracer.enabled:
            return self._pump_loop(done, deadline, step, what, timeout)
        t0 = now_us()
        try:
            return self._pump_loop(done, deadline, step, what, timeout)
        finally:
            if now_us() - t0 > 50:
                self.tracer.span("wait", t0, now_us(), what=what()[0])

    def _pump_loop(self, done, deadline, step, what, timeout) -> None:
        while True:
            self._drain()
            if step is not None and step.error is not None:
                raise self._deliver(step)
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._deadline_error(step, what, timeout)
            try:
                p = self._events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            self._complete(p)

    def _deadline_error(self, step, what, timeout) -> E.DeadlineExceeded:
        text, waiting = what()
        lines = []
        for worker, call in waiting:
            label = f"worker '{worker}'" + (f" call {call}" if call is not None else "")
            missing = self.transport.probe(worker, _PROBE_TIMEOUT)
            if missing:
                lines.extend(f"{label}: {line}" for line in missing)
            else:
                lines.append(f"{label}: busy (computing, or its process is stuck)")
        t = self.timeout if timeout is None else timeout
        first = waiting[0] if waiting else (None, None)
        # A worker whose process is still starting (Ray placing it, torch importing, a big module
        # unpickling) is the cause, not the step: say so first, and name that worker.
        starting = getattr(self.transport, "starting", None)
        slow = [n for n in sorted(self.workers) if starting is not None and starting(n) is not None]
        if slow:
            who = f"workers {', '.join(repr(n) for n in slow)} were" if len(slow) > 1 else f"worker '{slow[0]}' was"
            text = f"{who} still starting, before the step could run there ({text})"
            lines += [f"worker '{n}': still starting" for n in slow if all(w != n for w, _ in waiting)]
            if first[0] not in slow:
                first = (slow[0], None)
        err = E.DeadlineExceeded(
            f"deadline of {t:g}s passed while {text}; still missing:\n    " + "\n    ".join(lines or ["(nothing reported)"]),
            worker=first[0], call=first[1], step=step.id if step is not None else None)
        if step is not None:
            self._fail_step(step, err)
            step.delivered = True
        return err

    # --- workers ---------------------------------------------------------------

    def spawn(self, module: torch.nn.Module, *, optimizer: Any, name: Optional[str], update: Any, max_staleness: int,
              num_cpus: Optional[float], num_gpus: Optional[float], resources: Optional[dict], device: Any,
              max_restarts: Optional[int] = None) -> Worker:
        """Place ``module`` in a worker of its own."""
        from .core.rules import make_rule
        from .module import has_custom_backward
        from .optim import normalize_optimizer

        with self._lock:
            self._check_open()
            if not isinstance(module, torch.nn.Module):
                raise E.ConfigError(f"ag.spawn needs a torch.nn.Module, got {type(module).__name__}")
            cls = type(module).__name__
            if name is None:
                n = self._class_counts.get(cls, 0)
                while f"{cls}-{n}" in self.workers:
                    n += 1
                name = f"{cls}-{n}"
                self._class_counts[cls] = n + 1
            if not isinstance(name, str) or not name or name == "caller":
                raise E.ConfigError(f"a worker name must be a non-empty string other than 'caller', got {name!r}")
            if name in self.workers:
                raise E.ConfigError(f"a worker named '{name}' already exists; worker names must be unique", worker=name)
            opt = normalize_optimizer(optimizer, name)
            try:
                rule = make_rule(update)
            except E.ConfigError as err:
                err.worker = name
                raise
            if not isinstance(max_staleness, int) or isinstance(max_staleness, bool) or max_staleness < 0:
                raise E.ConfigError(f"max_staleness must be an integer >= 0, got {max_staleness!r}", worker=name)
            params = list(module.parameters())
            if opt is not None and not params:
                raise E.ConfigError("the module has no parameters, so it cannot have an optimizer", worker=name)
            for label, val in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
                if val is not None and (not isinstance(val, (int, float)) or val < 0):
                    raise E.ConfigError(f"{label} must be a number >= 0, got {val!r}", worker=name)
            if device is not None:
                try:
                    device = str(torch.device(device))
                except (RuntimeError, TypeError) as exc:
                    raise E.ConfigError(f"invalid device {device!r}: {exc}", worker=name) from None
            # A GPU worker: device="cuda" needs a GPU from Ray (which hides GPUs from actors that
            # did not ask for one), and num_gpus >= 1 means the module lives on it.
            if device is not None and device.startswith("cuda") and not num_gpus and self.backend == "ray":
                num_gpus = 1
            if device is None and num_gpus and num_gpus >= 1:
                device = "cuda"
            if device is not None and device.startswith("cuda") and self.backend == "local" \
                    and not torch.cuda.is_available():
                raise E.PlacementError(f"device={device!r} asked for, but this process has no CUDA device",
                                       worker=name)
            if max_restarts is not None and (not isinstance(max_restarts, int) or isinstance(max_restarts, bool)
                                             or max_restarts < -1):
                raise E.ConfigError(f"max_restarts must be an integer >= 0 (or -1: no limit), got {max_restarts!r}",
                                    worker=name)
            if max_restarts and self.recovery is None:
                log.info("worker %s may be restarted: switching recovery on with its defaults", name)
                self.enable_recovery()
            if max_restarts is None:
                max_restarts = self.recovery.max_restarts if self.recovery is not None else 0
            options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources, "device": device,
                       "update": update if isinstance(update, str) else "callable", "max_staleness": max_staleness,
                       "optimizer": _optimizer_name(opt), "max_restarts": max_restarts}
            if resources is not None and not (isinstance(resources, dict) and all(
                    isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in resources.items())):
                raise E.ConfigError(f"resources must map names to amounts >= 0, got {resources!r}", worker=name)
            threads = int(num_cpus) if num_cpus else None
            # A named rule travels as the rule itself: a worker process may not have the user's register_rule.
            spec = WorkerSpec(name=name, module=module, optimizer=opt,
                              update=rule if isinstance(update, str) else update, max_staleness=max_staleness,
                              device=device, num_threads=threads, trace=self.tracer.enabled,
                              check_finite=self.check_finite, deadline=self.worker_timeout,
                              custom_backward=has_custom_backward(module))
            check = getattr(self.transport, "check_feasible", None)
            if check is not None:
                check(name, {"CPU": num_cpus or 0, "GPU": num_gpus or 0, **(resources or {})})
            deferred = self._group is not None and hasattr(self.transport, "place_group")
            actor = None
            if deferred:
                self._group[1].append((spec, options))
            else:
                actor = self.transport.spawn(spec, options)
            handle = Worker(self, name, actor, cls)
            self.workers[name] = WorkerInfo(
                name=name, module_class=cls, trainable=any(p.requires_grad for p in params),
                has_optimizer=opt is not None, custom_rule=not rule.needs_optimizer,
                custom_backward=has_custom_backward(module),
                options=options, handle=handle, placed=not deferred, optimizer=opt)
            self._workers_changed += 1
            log.info("spawned worker %s (%s) on %s", name, cls, self.backend)
            return handle

    PLACEMENT_STRATEGIES = ("pack", "spread", "strict_pack", "strict_spread")

    def begin_placement(self, strategy: str) -> None:
        """Start collecting spawned workers into one placement group."""
        with self._lock:
            self._check_open()
            if strategy not in self.PLACEMENT_STRATEGIES:
                raise E.ConfigError(f"placement strategy must be one of {self.PLACEMENT_STRATEGIES}, got {strategy!r}")
            if self._group is not None:
                raise E.ConfigError("ag.placement blocks cannot be nested")
            self._group = (strategy, [])

    def end_placement(self, timeout: Optional[float], abandon: bool = False) -> None:
        """Reserve the collected workers together (one bundle each), then start them in their bundles."""
        with self._lock:
            group, self._group = self._group, None
            if group is None or not group[1]:
                return
            strategy, members = group
            names = [spec.name for spec, _ in members]
            if abandon:
                for n in names:
                    self.workers.pop(n, None)
                return
            bundles = []
            for spec, options in members:
                bundle = {"CPU": float(options.get("num_cpus") or 0.01)}
                if options.get("num_gpus"):
                    bundle["GPU"] = float(options["num_gpus"])
                bundle.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
                bundles.append(bundle)
            try:
                pg = self.transport.place_group(strategy, bundles, names, self.timeout if timeout is None else timeout)
            except E.ActorgradError:
                for n in names:
                    self.workers.pop(n, None)
                raise
            for i, ((spec, options), bundle) in enumerate(zip(members, bundles)):
                options = dict(options, placement_group=pg, bundle_index=i, bundle_cpus=bundle["CPU"])
                actor = self.transport.spawn(spec, options)
                info = self.workers[spec.name]
                info.handle.actor = actor
                info.placed = True
            log.info("placed workers %s as a %s group", names, strategy)

    def _info(self, name: str) -> WorkerInfo:
        self._check_open()
        info = self.workers.get(name)
        if info is None:
            raise E.ConfigError("no such worker in this runtime (was it spawned before the last ag.init()?)",
                                worker=name)
        if not info.placed:
            raise E.ConfigError("this worker starts when its ag.placement block ends; call it after the block",
                                worker=name)
        return info

    # --- forward ---------------------------------------------------------------

    def _step_for_call(self) -> StepRecord:
        """The step a new call joins: a failed step ends once its error was raised to the user."""
        if self.step.error is not None and self.step.delivered:
            self.graph.drop_step(self.step.id)
            self.step = self._open_step(self.step.id + 1)
        self._auto_checkpoint()
        return self.step

    def track(self, node: Node) -> None:
        """Remember a node so that its value is kept for fetching after its step closes."""
        rec = self._steps.get(node.call.step)
        if rec is not None:
            rec.nodes.add(node)

    def call(self, worker: str, args: tuple, kwargs: dict) -> Any:
        """Issue one call of a worker's module; return its Node(s) at once."""
        with self._lock:
            info = self._info(worker)
            step = self._step_for_call()
            grad_on = self.grad_enabled
            refs: list[m.RefSpec] = []
            keys: list[tuple[int, int, bool]] = []

            def convert(x: Any, where: str) -> Any:
                if isinstance(x, Node):
                    self._check_input_node(x, step, worker, where)
                    grad = grad_on and not x.detached and x.call.saved
                    refs.append(m.RefSpec(x.call.worker, x.call.id, x.out, grad))
                    keys.append((x.call.id, x.out, grad))
                    return m.Slot(len(refs) - 1)
                if isinstance(x, torch.Tensor):
                    return x.detach()
                if isinstance(x, list):
                    return [convert(v, f"{where}[{i}]") for i, v in enumerate(x)]
                if isinstance(x, tuple):
                    return tuple(convert(v, f"{where}[{i}]") for i, v in enumerate(x))
                if isinstance(x, dict):
                    return {k: convert(v, f"{where}[{k!r}]") for k, v in x.items()}
                return x

            args_t = [convert(a, f"argument {i}") for i, a in enumerate(args)]
            kwargs_t = {k: convert(v, f"argument {k!r}") for k, v in kwargs.items()}
            try:
                codec.check_value_tree(args_t)
                codec.check_value_tree(kwargs_t)
            except TypeError as exc:
                raise E.ConfigError(f"cannot send the arguments of this call: {exc}; pass Nodes, tensors, "
                                    "numbers, strings, None, or lists/tuples/dicts of them", worker=worker) from None
            cid, req = next(self._ids), next(self._ids)
            rec = CallRecord(cid, worker, step.id, req, keys, grad_on)
            self.graph.add(rec)
            if step.error is not None:
                # The step already failed (its error is not raised yet): nothing is sent for it.
                single, n = info.arity or (True, 1)
                nodes = [Node(self, rec, k) for k in range(n)]
                return nodes[0] if single else tuple(nodes)
            step.calls.setdefault(worker, []).append(cid)
            msg = m.Forward(req, cid, step.id, args_t, kwargs_t, tuple(refs), grad_on)
            p = self._request(worker, msg, "forward", step, rec)
            for slot, r in enumerate(refs):
                self._post(r.worker, m.Route(r.call, r.out, worker, cid, slot))
            if info.arity is None:
                # The first call tells how many outputs this module returns.
                self._pump(lambda: p.done or step.error is not None, self._deadline(None), None,
                           lambda: (f"waiting for the first forward of '{worker}'", [(worker, cid)]), None)
            single, n = info.arity or (True, 1)
            nodes = [Node(self, rec, k) for k in range(n)]
            for nd in nodes:
                step.nodes.add(nd)
            return nodes[0] if single else tuple(nodes)

    def _check_input_node(self, node: Node, step: StepRecord, worker: str, where: str) -> None:
        if node._runtime is not self:
            raise E.ConfigError(f"{where} is a Node of another runtime (from before ag.shutdown()?)", worker=worker)
        if node.call.step != step.id or self.graph.calls.get(node.call.id) is not node.call:
            raise E.StepClosedError(
                f"{where} is output {node.out} of call {node.call.id} of worker '{node.call.worker}' from step "
                f"{node.call.step}, which is closed; a call can only use nodes of the current step "
                f"({step.id}); pass node.value() to use the value as a constant",
                worker=worker, step=node.call.step)

    # --- backward --------------------------------------------------------------

    def backward(self, nodes: list[Any], gradients: Optional[list[Any]]) -> Pass:
        """Start one backward pass seeded at ``nodes``; returns once the plan is sent."""
        with self._lock:
            self._check_open()
            if not nodes:
                raise E.ConfigError("backward needs at least one node")
            for n in nodes:
                if not isinstance(n, Node):
                    raise E.ConfigError(f"backward needs Nodes, got {type(n).__name__}")
                if n._runtime is not self:
                    raise E.ConfigError("backward on a Node of another runtime (from before ag.shutdown()?)",
                                        worker=n.call.worker, call=n.call.id)
            if gradients is None:
                gradients = [None] * len(nodes)
            if not isinstance(gradients, (list, tuple)) or len(gradients) != len(nodes):
                raise E.ConfigError(f"gradients must be a list aligned with the {len(nodes)} node(s)")
            step = self.step
            for n in nodes:
                if n.call.step != step.id or self.graph.calls.get(n.call.id) is not n.call:
                    old = self._steps.get(n.call.step)
                    if old is not None and old.error is not None and old is step:
                        raise self._deliver(old)
                    raise E.StepClosedError(
                        f"backward() on output {n.out} of call {n.call.id}, whose step {n.call.step} is closed; "
                        f"the current step is {step.id}", worker=n.call.worker, call=n.call.id, step=n.call.step)
            if step.error is not None:
                raise self._deliver(step)
            for n in nodes:
                if n.detached:
                    raise E.ConfigError("backward() on a detached node: no gradient flows from it",
                                        worker=n.call.worker, call=n.call.id, step=step.id)
                if not n.call.saved:
                    raise E.ConfigError("backward() on a node computed under ag.no_grad(): nothing was saved for it",
                                        worker=n.call.worker, call=n.call.id, step=step.id)
            self._drain()
            if step.error is not None:
                raise self._deliver(step)
            for n in nodes:
                earlier = step.seeded.get((n.call.id, n.out))
                if earlier is not None:
                    raise E.ConfigError(
                        f"backward() was already called on output {n.out} of call {n.call.id} in this step (pass "
                        f"{earlier}); a second pass from the same seed would count its gradient twice. Seed it "
                        "once (ag.backward(node, gradients=[g]) scales it)",
                        worker=n.call.worker, call=n.call.id, step=step.id)
            # backward() returns at once: seeds whose forward already reported its output are
            # checked here; the others are checked by their worker (errors then come from the pass).
            grads = [self._check_seed(n, g) for n, g in zip(nodes, gradients)]
            seeds = [(n.call.id, n.out) for n in nodes]
            for cid in self.graph.ancestors(seeds):
                rec = self.graph.calls[cid]
                info = self.workers[rec.worker]
                if info.trainable and not info.has_optimizer and not info.custom_rule:
                    raise E.ConfigError(
                        "this worker's parameters would receive gradients but it has no optimizer; pass "
                        "optimizer=ag.Optim(...) to ag.spawn, or set requires_grad=False on its parameters",
                        worker=rec.worker, call=cid, step=step.id)
            plan = self.graph.plan(seeds)
            prec = PassRecord(next(self._ids), step, seeds=seeds)
            step.passes[prec.id] = prec
            for n in nodes:
                step.seeded[(n.call.id, n.out)] = prec.id
            for worker, expects in plan.items():
                here = tuple(m.SeedGrad(c, o, i, g) for i, ((c, o), g) in enumerate(zip(seeds, grads))
                             if self.graph.calls[c].worker == worker)
                msg = m.Plan(next(self._ids), prec.id, step.id, tuple(expects), here)
                prec.workers.add(worker)
                prec.pending.add(worker)
                step.pass_workers.setdefault(worker, []).append(prec.id)
                self._request(worker, msg, "plan", step, prec)
            return Pass(self, prec)

    def _check_seed(self, n: Node, g: Any) -> Optional[torch.Tensor]:
        if g is not None and not isinstance(g, torch.Tensor):
            raise E.ConfigError(f"a gradient must be a tensor, got {type(g).__name__}",
                                worker=n.call.worker, call=n.call.id, step=n.call.step)
        if n.call.meta is None:
            return None if g is None else g.detach()
        shape, dtype, requires_grad = n.call.meta["outputs"][n.out]
        info = self.workers[n.call.worker]
        if g is None:
            if math.prod(shape) != 1:
                raise E.ShapeError(
                    f"backward() without a gradient needs a scalar, but output {n.out} has shape {tuple(shape)}; "
                    "pass gradient= (as in PyTorch: grad can be implicitly created only for scalar outputs)",
                    worker=n.call.worker, call=n.call.id, step=n.call.step)
        else:
            if not isinstance(g, torch.Tensor):
                raise E.ConfigError(f"a gradient must be a tensor, got {type(g).__name__}",
                                    worker=n.call.worker, call=n.call.id, step=n.call.step)
            if tuple(g.shape) != tuple(shape):
                raise E.ShapeError(
                    f"gradient of shape {tuple(g.shape)} for output {n.out} of shape {tuple(shape)}",
                    worker=n.call.worker, call=n.call.id, step=n.call.step)
            g = g.detach()
        if not requires_grad and not (info.custom_rule or info.custom_backward):
            raise E.ConfigError(
                f"output {n.out} does not require grad: nothing that produced it is differentiable",
                worker=n.call.worker, call=n.call.id, step=n.call.step)
        return g

    def wait_pass(self, prec: PassRecord, timeout: Optional[float]) -> None:
        """Wait until every worker has finished its part of a pass."""
        with self._lock:
            step = prec.step

            def what():
                return (f"waiting for pass {prec.id} of step {step.id}",
                        [(w, None) for w in sorted(prec.pending)])

            self._pump(lambda: not prec.pending, self._deadline(timeout), step, what, timeout)
            if prec.error is not None:
                raise prec.error

    # --- steps -----------------------------------------------------------------

    def close_step(self, wait: bool, timeout: Optional[float]) -> Any:
        """Close the current step; with ``wait`` return its report once every update has landed."""
        with self._lock:
            self._check_open()
            self._drain()
            step = self.step
            if step.calls:  # an empty step keeps the previous picture
                self.last_graph = (step, self.step_calls(step))
            if step.error is not None:
                self.step = self._open_step(step.id + 1)
                self.graph.drop_step(step.id)
                raise self._deliver(step)
            for w in sorted(step.participants()):
                retain = tuple((n.call.id, n.out) for n in list(step.nodes)
                               if n.call.worker == w and n._value is None)
                msg = m.Close(next(self._ids), step.id, tuple(step.calls.get(w, [])),
                              tuple(step.pass_workers.get(w, [])), retain)
                step.close_pending.add(w)
                self._request(w, msg, "close", step, step)
            step.closing = True
            self._closing.append(step)
            self.step = self._open_step(step.id + 1)
            handle = StepHandle(self, step)
            if not wait:
                # Back-pressure: at most (largest max_staleness + 1) steps may be closing at once.
                limit = 1 + max((w.options.get("max_staleness", 0) for w in self.workers.values()), default=0)
                while len(self._closing) > limit:
                    self.wait_step(self._closing[0], timeout)
                return handle
            for earlier in list(self._closing):
                if earlier is not step:
                    self.wait_step(earlier, timeout)
            report = self.wait_step(step, timeout)
            self._auto_checkpoint()
            return report

    def step_calls(self, step: StepRecord) -> list[CallRecord]:
        """The call records of ``step`` that the graph still holds, worker by worker in call order."""
        known = self.graph.calls
        return [known[c] for cs in step.calls.values() for c in cs if c in known]

    def graph_of(self, step: Optional[int] = None) -> Any:
        """A snapshot (viz.StepGraph) of the worker graph of the last closed step, the current one, or ``step``."""
        from . import viz

        with self._lock:
            self._drain()
            return viz.from_runtime(self, step)

    def wait_step(self, step: StepRecord, timeout: Optional[float]) -> StepReport:
        """Wait until every worker has applied a closed step's update."""
        with self._lock:
            if step.report is not None:
                return step.report

            def what():
                return (f"closing step {step.id}", [(w, None) for w in sorted(step.close_pending)])

            try:
                self._pump(lambda: not step.close_pending, self._deadline(timeout), step, what, timeout)
            finally:
                if step.error is not None and step in self._closing:
                    self._closing.remove(step)
                    self.graph.drop_step(step.id)
            step.report = StepReport(step=step.id, workers=dict(sorted(step.reports.items())),
                                     passes=len(step.passes), seconds=time.perf_counter() - step.started)
            if step in self._closing:
                self._closing.remove(step)
            self.graph.drop_step(step.id)
            return step.report

    # --- values and state ------------------------------------------------------

    def fetch(self, node: Node, timeout: Optional[float]) -> torch.Tensor:
        """Fetch a node's value to the caller."""
        with self._lock:
            if node._value is not None:
                return node._value
            self._check_open()
            if node._runtime is not self:
                raise E.ConfigError("value() of a Node of another runtime (from before ag.shutdown()?)",
                                    worker=node.call.worker, call=node.call.id)
            step = self._steps.get(node.call.step)
            if step is not None and step.error is not None:
                raise self._deliver(step)
            msg = m.Fetch(next(self._ids), node.call.id, node.out)
            p = self._request(node.call.worker, msg, "fetch", None)
            watch = step if step is not None and not step.closing else None
            self._pump(lambda: p.done, self._deadline(timeout), watch,
                       lambda: (f"fetching output {node.out} of call {node.call.id}",
                                [(node.call.worker, node.call.id)]), timeout)
            if p.error is not None:
                if step is not None and step.error is not None:
                    raise self._deliver(step)
                if p.error.call is None:
                    p.error.call = node.call.id
                if isinstance(p.error, E.WorkerDied):
                    self._maybe_recover(p.error)
                raise p.error
            node._value = p.data
            return p.data

    def _simple_request(self, worker: str, msg: m.Message, timeout: Optional[float], text: str) -> Any:
        with self._lock:
            self._info(worker)
            p = self._request(worker, msg, "state", None)
            self._pump(lambda: p.done, self._deadline(timeout), None, lambda: (text, [(worker, None)]), timeout)
            if p.error is not None:
                if isinstance(p.error, E.WorkerDied):
                    self._maybe_recover(p.error)
                raise p.error
            return p.data

    def get_state(self, worker: str, what: str, timeout: Optional[float]) -> Any:
        """Fetch a worker's state ("module": its state_dict; "full": module, optimizer, version)."""
        return self._simple_request(worker, m.GetState(next(self._ids), what), timeout,
                                    f"fetching the state of '{worker}'")

    def set_state(self, worker: str, what: str, state: Any, timeout: Optional[float]) -> None:
        """Replace a worker's state."""
        try:
            codec.check_value_tree(state)
        except TypeError as exc:
            raise E.ConfigError(f"cannot send this state: {exc}", worker=worker) from None
        self._simple_request(worker, m.SetState(next(self._ids), what, state), timeout,
                             f"loading state into '{worker}'")

    # --- recovery --------------------------------------------------------------

    def enable_recovery(self, checkpoint_every: int = 10, checkpoint_dir: Optional[str] = None,
                        max_restarts: int = 3, keep: int = 2) -> None:
        """Checkpoint every ``checkpoint_every`` steps; restore and report lost steps when a worker dies."""
        import tempfile

        for label, val, low in (("checkpoint_every", checkpoint_every, 1), ("keep_checkpoints", keep, 1),
                                ("max_restarts", max_restarts, -1)):
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise E.ConfigError(f"{label} must be an integer >= {low}, got {val!r}")
        temporary = checkpoint_dir is None
        directory = tempfile.mkdtemp(prefix="actorgrad-ckpt-") if temporary else os.path.abspath(checkpoint_dir)
        os.makedirs(directory, exist_ok=True)
        self.recovery = Recovery(checkpoint_every, directory, max_restarts, keep, temporary)
        log.info("recovery on: a checkpoint every %d steps in %s", checkpoint_every, directory)

    def _auto_checkpoint(self) -> None:
        """Take the periodic checkpoint when it is due and the current step has no calls yet."""
        rec = self.recovery
        if rec is None or self._recovering or not self.workers or self.step.calls or self.step.pass_workers:
            return
        if any(not w.placed for w in self.workers.values()):
            return
        done = self.step.id - 1
        last = rec.checkpoints[-1][0] if rec.checkpoints else None
        changed = rec.workers_seen != self._workers_changed
        if not changed and last is not None and (done == last or done % rec.every != 0):
            return
        from .checkpoint import save_checkpoint

        path = os.path.join(rec.directory, f"step-{done:08d}")
        save_checkpoint(self, path)
        rec.checkpoints = [c for c in rec.checkpoints if c[0] != done] + [(done, path)]
        rec.workers_seen = self._workers_changed
        while len(rec.checkpoints) > rec.keep:
            _, old = rec.checkpoints.pop(0)
            shutil.rmtree(old, ignore_errors=True)

    def _maybe_recover(self, err: E.WorkerDied) -> None:
        """A worker died: with recovery on, restart it, restore every worker, annotate ``err``."""
        if self.recovery is None or self._recovering or err.recovered or self.closed:
            return
        rec = self.recovery
        if not rec.checkpoints:
            log.error("a worker died before the first checkpoint; nothing to restore")
            return
        lost = [s.id for s in self._steps.values() if s.participants() and not s.committed]
        committed = [s.id for s in self._steps.values() if s.committed]
        self._recovering = True
        try:
            log.warning("recovering from: %s", err.message)
            self._epoch += 1
            self.transport.reset(self._epoch, self.timeout)
            self._pending.clear()
            self._drain()  # replies still queued are of the old epoch: _complete ignores them
            self._seq = {}
            self.graph = Graph()
            for old in self._steps.values():
                if old.error is None:
                    old.error = E.StepAborted("the runtime recovered from a dead worker", step=old.id)
                old.delivered = True
            self._closing.clear()
            from .checkpoint import load_checkpoint

            errors = []
            for step_id, path in reversed(rec.checkpoints):
                self._steps = {}
                self.step = self._open_step(step_id + 1)
                try:
                    load_checkpoint(self, path)
                except E.CheckpointError as bad:  # e.g. torn by the crash: try the one before
                    errors.append(bad)
                    continue
                rec.recoveries += 1
                last_lost = max(lost + committed + [step_id])
                err.recovered = True
                err.restored_step = step_id
                err.replay = list(range(step_id + 1, last_lost + 1))
                log.warning("recovered: every worker restored to step %d; steps %s must be replayed",
                            step_id, err.replay)
                return
            log.error("no checkpoint could be restored: %s", errors)
        except E.ActorgradError as failed:
            log.error("recovery failed: %s", failed)
            err.message += f" (recovery failed: {failed.message})"
        finally:
            self._recovering = False

    # --- lifecycle -------------------------------------------------------------

    def set_tracing(self, enabled: bool) -> None:
        """Switch recording of timeline events on or off, here and in every worker."""
        with self._lock:
            self.tracer.enabled = enabled
            for name in list(self.workers):
                self._simple_request(name, m.SetState(next(self._ids), "trace", enabled), None,
                                     f"switching tracing in '{name}'")

    def collect_trace(self, path: str) -> str:
        """Gather every worker's timeline events and write them to ``path`` (Chrome trace JSON)."""
        with self._lock:
            tracks = {"caller": self.tracer.take()}
            for name in sorted(self.workers):
                try:
                    tracks[name] = self.get_state(name, "trace", 30.0)
                except E.ActorgradError as err:
                    log.warning("no trace from worker %s: %s", name, err)
                    tracks[name] = []
            return write_trace(path, tracks)

    def shutdown(self) -> None:
        """Stop every worker and the transport (writing the trace first, if one was asked for)."""
        with self._lock:
            if self.closed:
                return
            if self.trace_path is not None:
                try:
                    self.collect_trace(self.trace_path)
                except Exception:
                    log.exception("could not write the trace to %s", self.trace_path)
            self.closed = True
            try:
                self.transport.close()
            finally:
                self.workers.clear()
                if self.recovery is not None and self.recovery.temporary:
                    shutil.rmtree(self.recovery.directory, ignore_errors=True)
