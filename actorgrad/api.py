"""The public functions: thin calls into the process-wide Runtime."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from . import errors as E
from . import recovery
from .handles import Node, Pass, StepHandle, StepReport, Worker, as_nodes
from .runtime import DEFAULT_TIMEOUT, Runtime
from .transport import backends, create_transport

log = logging.getLogger("actorgrad")

_runtime: Optional[Runtime] = None
_init_args: Optional[tuple] = None
_lock = threading.Lock()



def init(address: Optional[str] = None, *, backend: str = "ray", timeout: float = DEFAULT_TIMEOUT,
         trace: Optional[str] = None, recover: bool = False, checkpoint_every: int = 10,
         checkpoint_dir: Optional[str] = None, max_restarts: int = 3, keep_checkpoints: int = 2,
         check_finite: bool = False, worker_timeout: Optional[float] = None, seed: Optional[int] = None,
         data_plane: str = "auto", **ray_kwargs: Any) -> Runtime:
    """Start or join the runtime (idempotent); ``backend="local"`` runs every worker in this process.

    ``timeout`` is the default deadline of every wait in the caller; ``worker_timeout`` (default
    ``max(600, 5 * timeout)``) bounds how long a step may hold state in a worker without progress.
    ``trace="run.json"`` records a timeline of every worker and writes it at ``ag.shutdown()``.
    ``recover=True`` checkpoints every ``checkpoint_every`` steps into ``checkpoint_dir`` (a
    temporary directory if None; the last ``keep_checkpoints`` are kept), lets Ray restart a dead
    worker up to ``max_restarts`` times, and then restores every worker to the last checkpoint
    (see ``ag.train`` for replaying the lost steps). ``check_finite=True`` makes every worker check
    its outputs and gradients and raise NonFiniteError where NaN or Inf first appears. ``seed``
    (default: ``torch.initial_seed()`` now) seeds every worker's own random generator, combined
    with the worker's name: the same program and seed draw the same numbers on both backends.
    Ray: ``workers_per_process=k`` lets up to k workers share one process (filled in spawn order; a
    worker that asks for CPUs, GPUs, resources, restarts or a placement group keeps its own), which
    saves each worker's start-up (torch alone is about 2 CPU-seconds and 130 MB per process).
    ``data_plane`` picks how large tensors move between two Ray workers, beside their envelope on the
    channel: ``"auto"`` (per pair: NCCL between CUDA workers, the authenticated channel otherwise),
    ``"channel"`` (always the channel), ``"gloo"`` or ``"nccl"``
    (forced, for measurement); a transfer's deadline is half of ``timeout``, so that its error (naming
    both workers and the step) comes before the caller's own deadline. See the README's "Data plane".
    ``backend="local"`` ignores it: its workers share one process and hand tensors over without a copy.
    """
    global _runtime, _init_args
    with _lock:
        if backend not in backends():
            raise E.ConfigError(f"backend must be one of {backends()}, got {backend!r}")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise E.ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        from .transport.dataplane import check_mode

        check_mode(data_plane)
        if _runtime is not None and not _runtime.closed:
            if _runtime.backend != backend:
                raise E.ConfigError(
                    f"actorgrad is already running with backend={_runtime.backend!r}; call ag.shutdown() first")
            return _runtime
        if backend == "ray":
            ray_kwargs.update(data_plane=data_plane, data_plane_timeout=float(timeout) / 2)
        transport = create_transport(backend, address, **ray_kwargs)
        _runtime = Runtime(transport, timeout=float(timeout), trace=trace, check_finite=check_finite,
                           worker_timeout=worker_timeout, seed=seed)
        if recover:
            _runtime.enable_recovery(checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir,
                                     max_restarts=max_restarts, keep=keep_checkpoints)
        _init_args = (address, backend)
        log.info("actorgrad started (backend=%s)", backend)
        return _runtime


def shutdown() -> None:
    """Stop every worker (and the local Ray instance, if init started it); idempotent."""
    global _runtime
    with _lock:
        rt, _runtime = _runtime, None
    if rt is not None:
        rt.shutdown()


def is_initialized() -> bool:
    """Whether a runtime is running."""
    return _runtime is not None and not _runtime.closed


def runtime() -> Runtime:
    """The running Runtime; starts the default one (embedded Ray) if there is none."""
    rt = _runtime
    if rt is None or rt.closed:
        log.info("ag.init() was not called; starting the default runtime")
        rt = init()
    return rt


def _current() -> Runtime:
    rt = _runtime
    if rt is None or rt.closed:
        raise E.ConfigError("actorgrad is not running; call ag.init() first")
    return rt


def spawn(module: torch.nn.Module, *, optimizer: Any = None, name: Optional[str] = None, update: Any = "step",
          max_staleness: int = 0, num_cpus: Optional[float] = None, num_gpus: Optional[float] = None,
          resources: Optional[dict[str, float]] = None, device: Any = None,
          max_restarts: Optional[int] = None, replicas: int = 1,
          replica_placement: Optional[str] = None) -> Worker:
    """Place any torch.nn.Module in its own worker.

    ``replicas=n`` runs it in n workers (n processes on Ray) that act as one: a step's calls go to
    them in turn, each call's backward runs where its forward ran, and at the end of the step they
    sum their gradients and apply the same update, so that the parameters stay identical and equal
    to one module trained on every call. ``replica_placement`` ("spread", "strict_spread", ...)
    places the replicas as one placement group with that strategy (e.g. on different nodes).

    ``max_restarts`` (Ray backend) lets Ray restart this worker's process that many times; a value
    above 0 switches the runtime's recovery on (see ``ag.init(recover=True)``); None takes the
    runtime's default (``max_restarts`` of ag.init with recovery on, else 0).
    """
    return runtime().spawn(module, optimizer=optimizer, name=name, update=update, max_staleness=max_staleness,
                           num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, device=device,
                           max_restarts=max_restarts, replicas=replicas, replica_placement=replica_placement)


def ready(workers: Optional[Sequence[Union[Worker, str]]] = None, *, timeout: Optional[float] = None,
          progress: Optional[bool] = None) -> list[str]:
    """Wait until every worker (or the given ones) has started, all at once; returns their names.

    Workers start as soon as they are spawned; this waits for all of them together. A worker whose
    start-up fails (its module raises while unpickling, its process dies) raises WorkerDied naming it
    at once. ``timeout`` None waits up to ``runtime.START_LIMIT`` (600 s), else DeadlineExceeded names
    the workers still starting. A start-up longer than 5 s logs "12/32 workers ready" lines (INFO, logger
    ``actorgrad``) every 5 s; ``progress=True`` shows a tqdm bar instead (or the lines as WARNING when
    tqdm is not installed), ``progress=False`` nothing.
    """
    from . import readiness

    names = None
    if workers is not None:
        if isinstance(workers, (Worker, str)):
            workers = [workers]
        names = [w.name if isinstance(w, Worker) else w for w in workers]
        if not all(isinstance(n, str) for n in names):
            raise E.ConfigError("workers must be Worker handles or worker names")
    return readiness.wait_ready(_current(), names, timeout, progress)


def train(step_fn: Callable[[int], Any], steps: int, *, timeout: Optional[float] = None) -> list[StepReport]:
    """Run ``step_fn(s)`` and ``ag.step()`` for every step ``s`` up to ``steps`` (step ids count from 1).

    ``step_fn`` issues one step's calls and backward passes for step ``s``; it must depend only on
    ``s`` (e.g. take batch ``s`` of a fixed data order), so that a step can be run again. When a
    worker dies and the runtime recovered (``ag.init(recover=True)``), the loop goes back to the
    restored checkpoint and replays the lost steps, so the result equals an uninterrupted run.
    Returns one StepReport per step, in step order.
    """
    rt = _current()
    reports: dict[int, StepReport] = {}
    while rt.step.id <= steps:
        s = rt.step.id
        try:
            step_fn(s)
            rep = rt.close_step(True, timeout)
        except E.WorkerDied as err:
            if not err.recovered:
                raise
            log.warning("step %d: %s; replaying steps %s from the checkpoint of step %d",
                        s, err.message, err.replay, err.restored_step)
            continue
        reports[rep.step] = rep
    return [reports[k] for k in sorted(reports)]  # a replayed step's report replaced the lost one


def backward(*nodes: Union[Node, Sequence[Node]], gradients: Optional[Sequence[Any]] = None,
             inputs: Any = None) -> Pass:
    """Start one backward pass seeded at these nodes; returns at once.

    ``inputs``: the Workers whose parameters accumulate this pass's gradient (as ``inputs=`` of
    ``torch.autograd.backward``); the others only pass gradients on. Default: every worker.
    """
    flat = as_nodes(nodes)
    rt = flat[0]._runtime if flat and isinstance(flat[0], Node) else _current()
    return rt.backward(flat, None if gradients is None else list(gradients), inputs)


def step(wait: bool = True, timeout: Optional[float] = None) -> Union[StepReport, StepHandle]:
    """Close the current step; with ``wait`` return once every worker has applied its update."""
    return _current().close_step(wait, timeout)


def set_training(mode: bool = True, workers: Optional[Sequence[Union[Worker, str]]] = None,
                 timeout: Optional[float] = None) -> None:
    """Switch every worker (or the given ones) to training or evaluation mode, as ``model.train(mode)``."""
    if not isinstance(mode, bool):
        raise E.ConfigError(f"mode must be True or False, got {mode!r}")
    rt = _current()
    if workers is None:
        names = sorted(rt.workers)
    else:
        if isinstance(workers, (Worker, str)):
            workers = [workers]
        names = [w.name if isinstance(w, Worker) else w for w in workers]
        if not all(isinstance(n, str) for n in names):
            raise E.ConfigError("workers must be Worker handles or worker names")
    rt.set_training(names, mode, timeout)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Calls inside save nothing for backward (evaluation, inference)."""
    rt = _current()
    rt.push_no_grad(1)
    try:
        yield
    finally:
        rt.push_no_grad(-1)


@contextlib.contextmanager
def placement(strategy: str = "pack", timeout: Optional[float] = None) -> Iterator[None]:
    """Workers spawned inside are reserved together as one Ray placement group when the block ends.

    ``strategy`` is "pack" (few nodes), "spread" (many nodes), "strict_pack" or "strict_spread";
    if Ray cannot reserve the group within ``timeout`` seconds, PlacementError names the workers
    and what they asked for. On backend="local" the block changes nothing.
    """
    rt = runtime()
    rt.begin_placement(strategy)
    try:
        yield
    except BaseException:
        rt.end_placement(timeout, abandon=True)
        raise
    rt.end_placement(timeout)


@contextlib.contextmanager
def trace(path: str) -> Iterator[str]:
    """Record a timeline of every worker inside the block; write it to ``path`` (Chrome trace JSON)."""
    rt = _current()
    was = rt.tracer.enabled
    rt.set_tracing(True)
    try:
        yield path
    finally:
        rt.collect_trace(path)
        if not was:
            rt.set_tracing(False)


def graph(path: Optional[Union[str, os.PathLike]] = None, *, step: Optional[int] = None) -> str:
    """The worker graph of the last closed step as Graphviz DOT; also written to ``path`` when given.

    ``path`` ending in .dot or .gv gets the DOT source; .png, .svg or .pdf is rendered with
    Graphviz's ``dot`` (ConfigError if it is not installed). Before any step closed, the current
    step is drawn; ``step=`` picks the last closed step or the current one by number.
    """
    from . import viz

    dot = _current().graph_of(step).to_dot()
    if path is not None:
        viz.write(dot, path)
    return dot


def save(path: str, timeout: Optional[float] = None, key: Optional[Union[str, bytes]] = None) -> None:
    """Checkpoint every worker (module state, optimizer state, step counter) to a directory; ``key`` signs it."""
    recovery.save(_current(), path, timeout, key=key)


def load(path: str, timeout: Optional[float] = None, key: Optional[Union[str, bytes]] = None) -> None:
    """Restore every worker from a checkpoint directory written by ag.save; ``key`` checks its signature.

    Steps still open are abandoned; training goes on from the checkpoint's step (a rewind works too).
    """
    recovery.load(_current(), path, timeout, key=key)
