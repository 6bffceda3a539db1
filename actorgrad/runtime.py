"""Runtime: the driver of the caller's protocol. It holds the lock, the transport and every deadline.

The protocol itself (which messages a call, a pass or a close sends, what a
reply means, when a step commits) is ``core.caller.CallerCore``, which does
no I/O. This module checks the user's arguments, hands the core's messages to
the transport, turns replies (futures completing on transport threads) into
events in one queue, and feeds them back to the core while the user's thread
waits, up to a deadline. What ag.spawn checks and builds is in ``spawning.py``;
recovery and checkpoint orchestration are in ``recovery.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import threading
import time
import weakref
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from . import errors as E
from . import recovery, spawning
from .core import codec, structure
from .core import messages as m
from .core.caller import CallerCore, Kind, PassRecord, Request, Send, StepRecord
from .core.leaves import tensors_in
from .core.optim import steps_every_step
from .core.graph import CallRecord, Graph
from .core.worker import WorkerSpec
from .spawning import WorkerInfo
from .handles import DerivedNode, Node, Pass, StepHandle, StepReport, Worker, WorkerReport
from .trace import Tracer, now_us, write_trace
from .transport.base import Transport

log = logging.getLogger("actorgrad.runtime")

DEFAULT_TIMEOUT = 120.0
# How long a deadline error may wait for the workers' own account of what they miss: a deadline
# is raised within timeout + this margin, with whatever the probes answered by then.
PROBE_MARGIN = 0.25
# A worker still starting does not count against a wait's deadline, up to this many seconds of start-up
# (an autoscaling cluster may have to add a node); beyond, the deadline error says it is still starting.
START_LIMIT = 600.0
# A step with more calls than this and 4x the largest step before it draws a warning: ag.step() forgotten?
CALLS_WARN = 256

__all__ = ["Runtime", "WorkerInfo", "DEFAULT_TIMEOUT", "PROBE_MARGIN", "START_LIMIT", "StepRecord", "PassRecord"]


WhatFn = Callable[[], tuple[str, list[tuple[str, Optional[int]]]]]

# What a call's arguments hold that goes to its leaf function as it is (never through pytree).
_LEAVES = (torch.Tensor, Node)

# The structure key of an operation's call (see CallerCore.structures): its result is one tensor.
EXPR_KEY = ("<operation>",)


def _flags(args: tuple, kwargs: dict) -> tuple:
    """What of a call's arguments may change what its module returns: how many there are, and the flags.

    ``mha(q, k, v, need_weights=False)`` and ``need_weights=True`` return different structures; a call
    whose key was seen before gets its Nodes at once, a new key waits for its first forward.
    """
    def flag(v: Any) -> Any:
        return v if v is None or isinstance(v, (bool, str)) else "*"

    return tuple(flag(a) for a in args), tuple(sorted((k, flag(v)) for k, v in kwargs.items()))

_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu")


def _refuse_autocast(worker: str) -> None:
    """A worker's forward runs elsewhere, outside the caller's torch.autocast: say so rather than ignore it."""
    for dev in _AUTOCAST_DEVICES:
        try:
            on = torch.is_autocast_enabled(dev)
        except (RuntimeError, TypeError):  # a device type this torch build does not know
            continue
        if on:
            raise E.ConfigError(
                f"a worker was called inside torch.autocast('{dev}'), but its forward runs in the worker, which "
                "does not see the caller's autocast (it would silently compute in full precision). Put the "
                "autocast inside the module's forward (with torch.autocast(...): ...), or call the worker "
                "outside the autocast block", worker=worker)


class Runtime:
    """The caller's side of actorgrad: drives a CallerCore over a Transport."""

    def __init__(self, transport: Transport, timeout: float = DEFAULT_TIMEOUT, trace: Optional[str] = None,
                 check_finite: bool = False, worker_timeout: Optional[float] = None,
                 seed: Optional[int] = None) -> None:
        self.transport = transport
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise E.ConfigError(f"seed must be an integer, got {seed!r}")
        # Fixed now: workers spawned later draw from generators seeded from this and their names.
        self.seed = int(seed) if seed is not None else torch.initial_seed()
        self.check_finite = bool(check_finite)
        if worker_timeout is not None and (not isinstance(worker_timeout, (int, float)) or worker_timeout <= 0):
            raise E.ConfigError(f"worker_timeout must be a positive number of seconds, got {worker_timeout!r}")
        self.worker_timeout = float(worker_timeout) if worker_timeout is not None else max(600.0, 5 * float(timeout))
        self.recovery: Optional[recovery.Recovery] = None
        self.recovering = False
        self.workers_changed = 0  # bumped by every spawn: a recovery checkpoint must include new workers
        self.trace_path = trace
        self.tracer = Tracer("caller", enabled=trace is not None)
        self.backend = transport.name
        self.timeout = float(timeout)
        self.workers: dict[str, WorkerInfo] = {}
        # Replicated workers: the name a user holds -> every replica's worker name (the first is that name).
        self.replicas: dict[str, tuple[str, ...]] = {}
        self.group_of: dict[str, str] = {}  # replica -> the replicated worker it belongs to
        self._rr: tuple[int, dict[str, int]] = (-1, {})  # (step, calls issued per replicated worker)
        self.closed = False
        self.core = CallerCore(now=time.perf_counter())
        self.core.structures[EXPR_KEY] = m.Slot(0)
        self.types = structure.TypeResolver()  # the classes that workers' results name
        self._lock = threading.RLock()
        self._events: "queue.SimpleQueue[tuple[Request, Any]]" = queue.SimpleQueue()
        # Calls under ag.no_grad(): live Nodes per call, and the calls whose Nodes were collected (queued by
        # finalizers on any thread; sent as Release from the runtime's thread, under its lock).
        self._live: dict[int, int] = {}
        self._gone: "queue.SimpleQueue[CallRecord]" = queue.SimpleQueue()
        self._class_counts: dict[str, int] = {}
        self.owned = spawning.Ownership()  # which worker holds which module, parameter and buffer
        # Calls per step, for the forgotten-ag.step() warning: (open step, its calls, largest earlier, warned at).
        self._step_calls = [-1, 0, 0, 0]
        self._group: Optional[tuple[str, list[tuple[WorkerSpec, dict[str, Any]]]]] = None
        self._local = threading.local()
        # The last closed step and its calls, kept past Graph.drop_step for ag.graph().
        self.last_graph: Optional[tuple[StepRecord, list[CallRecord]]] = None

    # --- the core's state, for readers (viz, checkpoints, ag.train) ---------------------

    @property
    def step(self) -> StepRecord:
        """The open step."""
        return self.core.step

    @property
    def graph(self) -> Graph:
        """The calls of the open and closing steps."""
        return self.core.graph

    @property
    def lock(self) -> threading.RLock:
        """Held while the runtime's state changes (re-entrant)."""
        return self._lock

    # --- sending and receiving -----------------------------------------------------------

    def _send(self, sends: list[Send]) -> None:
        """Hand the core's messages to the transport; a request that cannot leave fails at once."""
        for s in sends:
            if s.worker not in self.workers:
                if s.request is not None:  # e.g. killed: a request would never be answered
                    self._send(self.core.on_reply(s.request, None, E.WorkerDied("the worker is not running",
                                                                                 worker=s.worker)))
                continue
            # In process the message itself goes (the transport copies its tensors); else its encoding.
            frame = s.msg if self.transport.capabilities.messages else codec.encode_frame(s.msg)
            if s.request is None:
                try:
                    self.transport.notify(s.worker, s.seq, frame)
                except E.ActorgradError:
                    pass  # its requests fail on their own
                continue
            r = s.request
            try:
                fut = self.transport.request(s.worker, s.seq, frame)
            except E.ActorgradError as err:
                self._send(self.core.on_reply(r, None, err))
                continue
            fut.add_done_callback(lambda f, r=r: self._events.put((r, f)))

    def _complete(self, r: Request, future: Any) -> None:
        """Decode one reply and feed it to the core."""
        if r.done or r.epoch != self.core.epoch:
            return
        try:
            answer = future.result()
            reply, err = (codec.decode_frame(answer) if isinstance(answer, codec.Frame) else answer), None
        except E.ActorgradError as exc:
            reply, err = None, exc
        except Exception as exc:
            reply, err = None, E.WorkerError(f"no reply: {type(exc).__name__}: {exc}", worker=r.worker)
        self._send(self.core.on_reply(r, reply, err))
        if self.core.leaves_ready:
            self._deliver_leaves()

    def _deliver_leaves(self) -> None:
        """Add the caller-leaf gradients of completed passes into the caller's tensors (.grad, as PyTorch)."""
        ready, self.core.leaves_ready[:] = list(self.core.leaves_ready), []
        for prec in ready:
            grads, prec.leaf_grads = prec.leaf_grads, []
            sums: dict[int, list[Any]] = {}  # id(tensor) -> [tensor, summed gradient]
            for call, pos, g in grads:
                rec = self.graph.calls.get(call)
                t = dict(rec.leaves).get(pos) if rec is not None else None
                if t is None:
                    log.warning("pass %d: gradient for argument %d of call %d, which is not a caller leaf here; "
                                "dropped", prec.id, pos, call)
                    continue
                if prec.leaf_inputs is not None and not any(t is x for x in prec.leaf_inputs):
                    continue  # backward(inputs=...) leaves this tensor out
                entry = sums.setdefault(id(t), [t, None])
                entry[1] = g if entry[1] is None else entry[1] + g
            if not sums:
                continue
            tensors = [t for t, _ in sums.values()]
            total = [g.to(device=t.device, dtype=t.dtype) for t, g in sums.values()]
            try:
                # For a leaf this adds into .grad (creating it); a non-leaf passes it on through the caller's graph.
                torch.autograd.backward(tensors, total, retain_graph=True)
            except RuntimeError as exc:
                raise E.ConfigError(f"could not add the gradient of pass {prec.id} into the caller's tensors: {exc}",
                                    step=prec.step.id) from None

    def _watch(self, node: Node) -> None:
        """Count a Node of a call under ag.no_grad(); once none is left, the worker may free the call."""
        cid = node.call.id
        self._live[cid] = self._live.get(cid, 0) + 1
        # SimpleQueue.put is safe from a finalizer on any thread (even inside the GC).
        weakref.finalize(node, self._gone.put, node.call)

    def _flush_released(self) -> None:
        """Send a Release for each call under ag.no_grad() whose last Node was collected (caller's lock held)."""
        sends: list[Send] = []
        while True:
            try:
                rec = self._gone.get_nowait()
            except queue.Empty:
                break
            left = self._live.get(rec.id, 0) - 1
            if left > 0:
                self._live[rec.id] = left
                continue
            self._live.pop(rec.id, None)
            if not self.closed:
                sends += self.core.release(rec)
        if sends:
            self._send(sends)

    def _drain(self) -> None:
        while True:
            try:
                r, fut = self._events.get_nowait()
            except queue.Empty:
                return
            self._complete(r, fut)

    def poll(self) -> None:
        """Process whatever replies have arrived, without waiting."""
        with self._lock:
            self._flush_released()
            self._drain()

    def _fail_step(self, step: StepRecord, err: E.ActorgradError) -> None:
        self._send(self.core.fail_step(step, err))

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

    # --- waiting ------------------------------------------------------------------------

    def _deliver(self, step: StepRecord) -> E.ActorgradError:
        """The step's error, marked as raised to the user (a dead worker may be recovered first)."""
        step.delivered = True
        assert step.error is not None
        if isinstance(step.error, E.WorkerDied):
            recovery.maybe_recover(self, step.error)
        return step.error

    def _deadline(self, timeout: Optional[float]) -> float:
        return time.monotonic() + (self.timeout if timeout is None else float(timeout))

    def _pump(self, done: Callable[[], bool], deadline: float, step: Optional[StepRecord], what: WhatFn,
              timeout: Optional[float]) -> None:
        """Process replies until ``done()``; raise the step's error, or DeadlineExceeded."""
        t0 = now_us() if self.tracer.enabled else 0
        try:
            while True:
                self._drain()
                if step is not None and step.error is not None:
                    raise self._deliver(step)
                if done():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if self._still_starting(what):
                        # A worker's start-up (Ray placing it, imports, unpickling a big module) is not
                        # the step's time: the deadline counts from when it runs.
                        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
                        continue
                    raise self._deadline_error(step, what, timeout)
                try:
                    r, fut = self._events.get(timeout=min(remaining, 0.5))
                except queue.Empty:
                    continue
                self._complete(r, fut)
        finally:
            if self.tracer.enabled and now_us() - t0 > 50:
                self.tracer.span("wait", t0, now_us(), what=what()[0])

    def _still_starting(self, what: WhatFn) -> bool:
        """Whether a worker this wait depends on is still starting, and may still take its time."""
        for worker, _ in what()[1]:
            started = self.transport.starting(worker)
            if started is not None and started < START_LIMIT:
                return True
        return False

    def _deadline_error(self, step: Optional[StepRecord], what: WhatFn,
                        timeout: Optional[float]) -> E.DeadlineExceeded:
        text, waiting = what()
        # Every probe at once, bounded by a small margin: the error comes within the deadline + PROBE_MARGIN.
        answers = self.transport.probe(sorted({w for w, _ in waiting}), PROBE_MARGIN)
        lines = []
        for worker, call in waiting:
            label = f"worker '{worker}'" + (f" call {call}" if call is not None else "")
            missing = answers.get(worker)
            if missing:
                lines.extend(f"{label}: {line}" for line in missing)
            else:
                lines.append(f"{label}: busy (computing, or its process is stuck)")
        t = self.timeout if timeout is None else timeout
        first = waiting[0] if waiting else (None, None)
        # A worker whose process is still starting (Ray placing it, torch importing, a big module
        # unpickling) is the cause, not the step: say so first, and name that worker.
        slow = [n for n in sorted(self.workers) if self.transport.starting(n) is not None]
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
              max_restarts: Optional[int] = None, replicas: int = 1,
              replica_placement: Optional[str] = None) -> Worker:
        """Place ``module`` in a worker of its own (``replicas`` > 1: in that many, as one worker)."""
        with self._lock:
            self._check_open()
            if not isinstance(module, torch.nn.Module):
                raise E.ConfigError(f"ag.spawn needs a torch.nn.Module, got {type(module).__name__}")
            if name is None:
                name = spawning.default_name(module, self.workers, self._class_counts)
            name = spawning.check_name(name, self.workers)
            members = spawning.replica_names(name, replicas, update, max_staleness, replica_placement, self.workers)
            if max_restarts and self.recovery is None:
                log.info("worker %s may be restarted: switching recovery on with its defaults", name)
                self.enable_recovery()
            implicit = replica_placement is not None and self._group is None
            if implicit:
                self.begin_placement(replica_placement)
            try:
                handle = None
                for rank, member in enumerate(members):
                    # Every replica starts from the same parameters, buffers and (built there) optimizer state.
                    copy_ = module if rank == 0 else copy.deepcopy(module)
                    h = self._spawn_one(copy_, member, members if len(members) > 1 else (), optimizer=optimizer,
                                        update=update, max_staleness=max_staleness, num_cpus=num_cpus,
                                        num_gpus=num_gpus, resources=resources, device=device,
                                        max_restarts=max_restarts)
                    handle = handle or h
            except BaseException:
                if implicit:
                    self.end_placement(None, abandon=True)
                for member in members[1:]:
                    self.workers.pop(member, None)
                raise
            if len(members) > 1:
                self.replicas[name] = members
                for member in members:
                    self.group_of[member] = name
            if implicit:
                self.end_placement(None)
            assert handle is not None
            return handle

    def _spawn_one(self, module: torch.nn.Module, name: str, members: tuple[str, ...], *, optimizer: Any,
                   update: Any, max_staleness: int, num_cpus: Optional[float], num_gpus: Optional[float],
                   resources: Optional[dict], device: Any, max_restarts: Optional[int]) -> Worker:
        defaults = spawning.Defaults(
            places_gpus=self.transport.capabilities.places_gpus, trace=self.tracer.enabled,
            check_finite=self.check_finite, deadline=self.worker_timeout, seed=self.seed,
            max_restarts=self.recovery.max_restarts if self.recovery is not None else 0)
        s = spawning.build(module, name, optimizer=optimizer, update=update, max_staleness=max_staleness,
                           num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, device=device,
                           max_restarts=max_restarts, defaults=defaults)
        s.spec.replicas = members
        if members:
            s.options["replicas"] = len(members)
        self.owned.check(module, name, self.workers)
        opts = s.options
        self.transport.check_feasible(name, {"CPU": opts["num_cpus"] or 0, "GPU": opts["num_gpus"] or 0,
                                             **(opts["resources"] or {})})
        deferred = self._group is not None and self.transport.capabilities.placement_groups
        actor = None
        if deferred:
            assert self._group is not None
            self._group[1].append((s.spec, opts))
        else:
            actor = self.transport.spawn(s.spec, opts)
        handle = Worker(self, name, actor, type(module).__name__, training=module.training)
        self.workers[name] = spawning.info_of(s, handle, placed=not deferred)
        self.workers_changed += 1
        self.owned.own(module, name)
        log.info("spawned worker %s (%s) on %s", name, type(module).__name__, self.backend)
        return handle

    def members(self, worker: str) -> tuple[str, ...]:
        """The workers a name stands for: its replicas, or itself."""
        return self.replicas.get(worker, (worker,))

    def _replica_for(self, worker: str, step: StepRecord) -> str:
        """The replica that runs the next call of a replicated worker in this step: round robin by call."""
        if self._rr[0] != step.id:
            self._rr = (step.id, {})
        members = self.replicas[worker]
        k = self._rr[1].get(worker, 0)
        self._rr[1][worker] = k + 1
        return members[k % len(members)]

    def begin_placement(self, strategy: str) -> None:
        """Start collecting spawned workers into one placement group."""
        with self._lock:
            self._check_open()
            if strategy not in spawning.PLACEMENT_STRATEGIES:
                raise E.ConfigError(
                    f"placement strategy must be one of {spawning.PLACEMENT_STRATEGIES}, got {strategy!r}")
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
            bundles = spawning.bundles(members)
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

    def track(self, node: Node) -> None:
        """Remember a node so that its value is kept for fetching after its step closes."""
        with self._lock:
            rec = self.core.steps.get(node.call.step)
            if rec is not None:
                rec.nodes.add(node)
            if node.call.id in self._live:  # a detached Node of an ag.no_grad() call keeps it too
                self._watch(node)

    def call(self, worker: str, args: tuple, kwargs: dict, expr: bool = False) -> Any:
        """Issue one call of a worker's module; return its result's structure with a Node at each tensor, at once.

        ``expr``: run no module; the result is ``args[0]``, a DerivedNode (an operation on Nodes).
        """
        with self._lock:
            self._info(worker)
            _refuse_autocast(worker)
            self.core.step_for_call(time.perf_counter())
            recovery.auto_checkpoint(self)
            step = self.core.step
            group = worker
            if worker in self.replicas and not expr:
                worker = self._replica_for(worker, step)
            if step.error is not None:
                # An earlier call of this step failed: its error, here, rather than Nodes that stand for nothing.
                raise self._deliver(step)
            # torch.no_grad() / inference_mode() around a call mean what ag.no_grad() means.
            grad_on = self.grad_enabled and torch.is_grad_enabled()
            refs: list[m.RefSpec] = []
            leaf_of: dict[int, torch.Tensor] = {}  # id of the detached copy sent -> the caller's tensor
            # A consumer with its own backward sees its inputs as they arrive: operations are not fused into it.
            fuse = expr or not self.workers[worker].custom_backward

            def leaf(x: Any, where: str) -> Any:
                if isinstance(x, DerivedNode):
                    top = expr and where == "argument 0"  # the operation this call computes
                    if x.real is None and (top or x.several or (fuse and not x.uses)):
                        x.uses += not top
                        op = x.op
                        return m.Op(op.fn, structure.encode(op.args, leaf, f"{where}.args", _LEAVES),
                                    structure.encode(op.kwargs, leaf, f"{where}.kwargs", _LEAVES))
                    x = self.materialize(x)
                if isinstance(x, Node):
                    self._check_input_node(x, step, worker, where)
                    refs.append(m.RefSpec(x.call.worker, x.call.id, x.out, grad_on and not x.detached and x.call.saved))
                    return m.Slot(len(refs) - 1)
                if isinstance(x, torch.Tensor):
                    d = x.detach()
                    if grad_on and x.requires_grad:
                        leaf_of[id(d)] = x  # a caller leaf: its gradient comes back with the passes
                    return d
                raise TypeError(f"{where}: cannot send a value of type {type(x).__name__}")

            try:
                args_t = [structure.encode(a, leaf, f"argument {i}", _LEAVES) for i, a in enumerate(args)]
                kwargs_t = {k: structure.encode(v, leaf, f"argument {k!r}", _LEAVES) for k, v in kwargs.items()}
                codec.check_value_tree(args_t)
                codec.check_value_tree(kwargs_t)
            except TypeError as exc:
                raise E.ConfigError(f"cannot send the arguments of this call: {exc}; pass Nodes, tensors, numbers, "
                                    "strings, None, or tuples/lists/dicts/namedtuples/dataclasses of them",
                                    worker=worker) from None
            finally:
                del leaf  # it refers to itself: without this the caller's tensors would wait for the collector
            leaf_pos: list[int] = []
            leaf_src: list[torch.Tensor] = []
            if leaf_of:
                if self.workers[worker].custom_backward and not expr:
                    raise E.ConfigError(
                        "a tensor with requires_grad=True is passed into a worker with a custom backward, which "
                        "returns gradients for routed inputs only; pass it .detach(), or make it the output of "
                        "a worker", worker=worker)
                for i, t in enumerate(tensors_in((args_t, kwargs_t))):
                    src = leaf_of.get(id(t))
                    if src is not None:
                        leaf_pos.append(i)
                        leaf_src.append(src)
            self._flush_released()
            key = EXPR_KEY if expr else (group, _flags(args, kwargs))
            rec, sends = self.core.call(worker, step, args_t, kwargs_t, refs, grad_on, tuple(leaf_pos),
                                        tuple(leaf_src), key, expr)
            self._send(sends)
            self._note_call(step)
            template = self.core.structures.get(key)
            if template is None and step.error is None:
                # The first call of its kind tells what the module returns.
                fwd = sends[0].request
                assert fwd is not None
                self._pump(lambda: fwd.done or step.error is not None, self._deadline(None), None,
                           lambda: (f"waiting for the first forward of '{worker}'", [(worker, rec.id)]), None)
                template = self.core.structures.get(key)
            if template is None:
                # Its forward failed before telling its structure: a Node that raises that error wherever
                # it is first used (unpacked, indexed, passed on, fetched), and ag.step() raises it too.
                return Node(self, rec, 0)
            nodes: list[Node] = []

            def node(slot: Any) -> Node:
                nodes.append(Node(self, rec, slot.index))
                return nodes[-1]

            result = structure.decode(template, node, self.types)
            for nd in nodes:
                if not grad_on:
                    self._watch(nd)
                step.nodes.add(nd)
            return result

    def materialize(self, node: DerivedNode) -> Node:
        """The Node of an operation's result, computed once, in the worker of its first Node operand."""
        with self._lock:
            if node.real is None:
                assert not node.several, "a several-tensor result is only used through its items"
                node.real = self.call(node.first_base.worker, (node,), {}, expr=True)
            return node.real

    def meta(self, node: Node, timeout: Optional[float] = None) -> tuple[torch.Size, torch.dtype]:
        """A Node's shape and dtype, waiting for its forward to report them."""
        with self._lock:
            node = node.resolved() if isinstance(node, DerivedNode) else node
            rec = node.call
            step = self.core.steps.get(rec.step)
            if rec.meta is None and step is not None:
                self._pump(lambda: rec.meta is not None or step.error is not None, self._deadline(timeout), step,
                           lambda: (f"waiting for the shape of output {node.out} of call {rec.id}",
                                    [(rec.worker, rec.id)]), timeout)
                if step.error is not None:
                    raise self._deliver(step)
            if rec.meta is None:
                raise E.StepClosedError(f"the shape of output {node.out} of call {rec.id} is not known: its step "
                                        "ended before its forward reported", worker=rec.worker, call=rec.id)
            out = rec.meta.outputs[node.out]
            return torch.Size(out.shape), codec.DTYPES[out.dtype]

    def _note_call(self, step: StepRecord) -> None:
        """Warn (once per threshold) when the open step holds far more calls than any step before it."""
        sc = self._step_calls
        if sc[0] != step.id:
            sc[:3] = [step.id, 0, max(sc[2], sc[1])]
        sc[1] += 1
        limit = max(CALLS_WARN, 4 * sc[2])
        if sc[1] > limit and sc[3] < limit:
            sc[3] = limit
            log.warning("step %d holds %d calls, far more than any step before it (at most %d): every call keeps "
                        "its saved state until ag.step() closes the step, and then all their gradients are applied "
                        "as one update. Call ag.step() once per iteration (or ag.train), and evaluate under "
                        "ag.no_grad()", step.id, sc[1], sc[2])

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

    def backward(self, nodes: list[Any], gradients: Optional[list[Any]], inputs: Any = None) -> Pass:
        """Start one backward pass seeded at ``nodes``; returns once the plan is sent.

        ``inputs``: the Workers (and caller tensors) that accumulate this pass's gradient; the other
        workers only pass gradients on (None: every one accumulates).
        """
        with self._lock:
            self._check_open()
            if not nodes:
                raise E.ConfigError("backward needs at least one node")
            nodes = [n.resolved() if isinstance(n, DerivedNode) else n for n in nodes]
            accumulate, leaf_inputs = self._check_inputs(inputs)
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
                    old = self.core.steps.get(n.call.step)
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
                if accumulate is not None and rec.worker not in accumulate:
                    continue  # it only passes gradients on in this pass
                if info.trainable and not info.has_optimizer and not info.custom_rule:
                    raise E.ConfigError(
                        "this worker's parameters would receive gradients but it has no optimizer; pass "
                        "optimizer=ag.Optim(...) to ag.spawn, or set requires_grad=False on its parameters",
                        worker=rec.worker, call=cid, step=step.id)
            prec, sends = self.core.backward(step, seeds, grads, accumulate, leaf_inputs)
            self._send(sends)
            return Pass(self, prec)

    def _check_inputs(self, inputs: Any) -> tuple[Optional[set[str]], Optional[list[torch.Tensor]]]:
        """``backward(inputs=...)`` as (worker names, caller tensors); (None, None) when every one accumulates."""
        if inputs is None:
            return None, None
        items = [inputs] if isinstance(inputs, (Worker, torch.Tensor)) else inputs
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise E.ConfigError(f"inputs= must be Workers (or caller tensors), or a list of them, got "
                                f"{type(inputs).__name__}")
        if not items:
            raise E.ConfigError("inputs= is empty: nothing would accumulate the gradient (as in PyTorch, the "
                                "inputs of backward cannot be empty); leave it out for every worker")
        names: set[str] = set()
        tensors: list[torch.Tensor] = []
        for x in items:
            if isinstance(x, Worker):
                if x._runtime is not self or x.name not in self.workers:
                    raise E.ConfigError("inputs= names a worker of another runtime, or one that is gone (spawned "
                                        "before the last ag.init()?)", worker=x.name)
                names.update(self.members(x.name))
            elif isinstance(x, torch.Tensor) and x.requires_grad:
                tensors.append(x)
            else:
                raise E.ConfigError(f"inputs= must hold Workers of this runtime (or caller tensors with "
                                    f"requires_grad=True), got {type(x).__name__}")
        return names, tensors

    def _check_seed(self, n: Node, g: Any) -> Optional[torch.Tensor]:
        if g is not None and not isinstance(g, torch.Tensor):
            raise E.ConfigError(f"a gradient must be a tensor, got {type(g).__name__}",
                                worker=n.call.worker, call=n.call.id, step=n.call.step)
        if n.call.meta is None:
            return None if g is None else g.detach()
        out = n.call.meta.outputs[n.out]
        shape, requires_grad = out.shape, out.requires_grad
        info = self.workers[n.call.worker]
        if g is None:
            if math.prod(shape) != 1:
                raise E.ShapeError(
                    f"backward() without a gradient needs a scalar, but output {n.out} has shape {tuple(shape)}; "
                    "pass gradient= (as in PyTorch: grad can be implicitly created only for scalar outputs)",
                    worker=n.call.worker, call=n.call.id, step=n.call.step)
        else:
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
            self._flush_released()
            self._drain()
            step = self.step
            if step.calls:  # an empty step keeps the previous picture
                self.last_graph = (step, self.step_calls(step))
            if step.error is not None:
                self.core.end_failed_step(time.perf_counter())
                raise self._deliver(step)
            retain: dict[str, tuple[tuple[int, int], ...]] = {}
            for n in list(step.nodes):
                if n._value is None:
                    retain.setdefault(n.call.worker, ())
                    retain[n.call.worker] += ((n.call.id, n.out),)
            # Workers whose schedule steps with every ag.step() hear of this one even without a call in it.
            always = [n for n, w in self.workers.items() if w.placed and steps_every_step(w.optimizer)]
            # Every replica of a worker the step used takes part in its update, with calls there or not.
            used = step.participants()
            always += [m for members in self.replicas.values() if used.intersection(members) for m in members]
            step, sends = self.core.close(retain, time.perf_counter(), always)
            self._send(sends)
            handle = StepHandle(self, step)
            if not wait:
                # Back-pressure: at most (largest max_staleness + 1) steps may be closing at once.
                limit = 1 + max((w.options.get("max_staleness", 0) for w in self.workers.values()), default=0)
                while len(self.core.closing) > limit:
                    self.wait_step(self.core.closing[0], timeout)
                return handle
            for earlier in list(self.core.closing):
                if earlier is not step:
                    self.wait_step(earlier, timeout)
            report = self.wait_step(step, timeout)
            recovery.auto_checkpoint(self)
            return report

    def wait_closing(self, timeout: Optional[float]) -> None:
        """Wait until every step closed without waiting (ag.step(wait=False)) has finished."""
        with self._lock:
            for earlier in list(self.core.closing):
                self.wait_step(earlier, timeout)

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
                self._pump(lambda: step.closed, self._deadline(timeout), step, what, timeout)
            finally:
                if step.error is not None:
                    self.core.finish(step)
            step.report = StepReport(step=step.id, workers=self._reports(step), passes=len(step.passes),
                                     seconds=time.perf_counter() - step.started, messages=step.messages,
                                     replies=step.replies)
            if self.tracer.enabled:
                self.tracer.instant("step", step=step.id, messages=step.messages, replies=step.replies)
            self.core.finish(step)
            return step.report

    def _reports(self, step: StepRecord) -> dict[str, WorkerReport]:
        """One row per worker of the step; a replicated worker's row sums its replicas' and holds theirs."""
        rows = {w: WorkerReport.from_dict(w, d) for w, d in sorted(step.reports.items())}
        for name, members in self.replicas.items():
            parts = tuple(replace(rows.pop(m), name=f"{name}[{i}]") for i, m in enumerate(members) if m in rows)
            if parts:
                rows[name] = replace(parts[0], name=name, calls=sum(p.calls for p in parts),
                                     passes=sum(p.passes for p in parts), replicas=parts)
        return dict(sorted(rows.items()))

    # --- values and state ------------------------------------------------------

    def fetch(self, node: Node, timeout: Optional[float]) -> torch.Tensor:
        """Fetch a node's value to the caller."""
        if isinstance(node, DerivedNode):
            node = node.resolved()
        with self._lock:
            if node._value is not None:
                return node._value
            self._check_open()
            if node._runtime is not self:
                raise E.ConfigError("value() of a Node of another runtime (from before ag.shutdown()?)",
                                    worker=node.call.worker, call=node.call.id)
            step = self.core.steps.get(node.call.step)
            if step is not None and step.error is not None:
                raise self._deliver(step)
            r, sends = self.core.fetch(node.call, node.out)
            self._send(sends)
            watch = step if step is not None and not step.closing else None
            self._pump(lambda: r.done, self._deadline(timeout), watch,
                       lambda: (f"fetching output {node.out} of call {node.call.id}",
                                [(node.call.worker, node.call.id)]), timeout)
            if r.error is not None:
                if step is not None and step.error is not None:
                    raise self._deliver(step)
                if r.error.call is None:
                    r.error.call = node.call.id
                if isinstance(r.error, E.WorkerDied):
                    recovery.maybe_recover(self, r.error)
                raise r.error
            node._value = r.data
            return r.data

    def _state_request(self, worker: str, what: str, state: Any, set_: bool, timeout: Optional[float],
                       text: str) -> Any:
        with self._lock:
            self._info(worker)
            self._flush_released()
            r, sends = self.core.state(worker, what, state, set_=set_)
            self._send(sends)
            self._pump(lambda: r.done, self._deadline(timeout), None, lambda: (text, [(worker, None)]), timeout)
            if r.error is not None:
                if isinstance(r.error, E.WorkerDied):
                    recovery.maybe_recover(self, r.error)
                raise r.error
            return r.data

    def get_state(self, worker: str, what: str, timeout: Optional[float]) -> Any:
        """Fetch a worker's state ("module": its state_dict; "full": module, optimizer, version)."""
        return self._state_request(worker, what, None, False, timeout, f"fetching the state of '{worker}'")

    def set_state(self, worker: str, what: str, state: Any, timeout: Optional[float]) -> Any:
        """Replace a worker's state; returns what the worker answers ("load": the missing and unexpected keys)."""
        try:
            codec.check_value_tree(state)
        except TypeError as exc:
            raise E.ConfigError(f"cannot send this state: {exc}", worker=worker) from None
        answers = [self._state_request(w, what, state, True, timeout, f"loading state into '{w}'")
                   for w in self.members(worker)]
        return answers[0]

    def set_training(self, workers: list[str], mode: bool, timeout: Optional[float]) -> None:
        """Switch these workers' modules to training (True) or evaluation mode, for the calls issued from now on."""
        mode = bool(mode)
        with self._lock:
            infos = [self._info(m) for w in workers for m in self.members(w)]
            # Every request leaves first: one round trip for all workers. A worker applies the mode to
            # the calls that reach it after this message (calls are delivered in order).
            pending = []
            for info in infos:
                r, sends = self.core.state(info.name, "training", mode, set_=True)
                self._send(sends)
                pending.append((info, r))
            self._pump(lambda: all(r.done for _, r in pending), self._deadline(timeout), None,
                       lambda: ("switching the training mode",
                                [(i.name, None) for i, r in pending if not r.done]), timeout)
            for info, r in pending:
                if r.error is None:
                    info.handle._training = mode
            for info, r in pending:
                if r.error is not None:
                    if isinstance(r.error, E.WorkerDied):
                        recovery.maybe_recover(self, r.error)
                    raise r.error

    # --- epochs, recovery ---------------------------------------------------------

    def new_epoch(self, first_step: int) -> None:
        """Reset every worker and the caller's protocol into a new epoch; the next step is ``first_step``."""
        with self._lock:
            epoch = self.core.epoch + 1
            self.transport.reset(epoch, self.timeout)
            self.core.new_epoch(first_step, time.perf_counter())
            self._drain()  # replies still queued are of the old epoch: they complete nothing

    def enable_recovery(self, checkpoint_every: int = 10, checkpoint_dir: Optional[str] = None,
                        max_restarts: int = 3, keep: int = 2) -> None:
        """Checkpoint every ``checkpoint_every`` steps; restore and report lost steps when a worker dies."""
        self.recovery = recovery.Recovery.create(checkpoint_every, checkpoint_dir, max_restarts, keep)

    # --- lifecycle -------------------------------------------------------------

    def set_tracing(self, enabled: bool) -> None:
        """Switch recording of timeline events on or off, here and in every worker."""
        with self._lock:
            self.tracer.enabled = enabled
            for name in list(self.workers):
                self._state_request(name, "trace", enabled, True, None, f"switching tracing in '{name}'")

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
                if self.recovery is not None:
                    self.recovery.discard()
