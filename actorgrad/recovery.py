"""Saving, loading and recovery: what the runtime does around checkpoints.

``checkpoint.py`` is the on-disk format only (write, read, verify); this
module decides when to take a checkpoint, gathers and restores the workers'
states through the runtime, and after a worker died (or a user's ``ag.load``)
resets every worker and the caller's protocol into a new epoch before the
restored state is loaded, so that nothing of the abandoned steps reaches it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol

from . import errors as E
from .checkpoint import MUST_MATCH, Entry, Key, open_checkpoint, write_checkpoint

log = logging.getLogger("actorgrad.recovery")


@dataclass
class Recovery:
    """Recovery settings and the checkpoints taken so far (oldest first)."""

    every: int
    directory: str
    max_restarts: int
    keep: int
    temporary: bool
    checkpoints: list[tuple[int, str]] = field(default_factory=list)  # (step, path)
    workers_seen: int = -1  # Runtime.workers_changed at the last checkpoint
    recoveries: int = 0

    @classmethod
    def create(cls, every: int = 10, directory: Optional[str] = None, max_restarts: int = 3,
               keep: int = 2) -> "Recovery":
        """Check the settings; a temporary directory when none is given."""
        for label, val, low in (("checkpoint_every", every, 1), ("keep_checkpoints", keep, 1),
                                ("max_restarts", max_restarts, -1)):
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise E.ConfigError(f"{label} must be an integer >= {low}, got {val!r}")
        temporary = directory is None
        path = tempfile.mkdtemp(prefix="actorgrad-ckpt-") if temporary else os.path.abspath(str(directory))
        os.makedirs(path, exist_ok=True)
        log.info("recovery on: a checkpoint every %d steps in %s", every, path)
        return cls(every, path, max_restarts, keep, temporary)

    def discard(self) -> None:
        """At shutdown: remove the checkpoints of a temporary directory."""
        if self.temporary:
            shutil.rmtree(self.directory, ignore_errors=True)


class Runtime(Protocol):
    """What saving, loading and recovery use of the runtime (which imports this module)."""

    lock: Any
    timeout: float
    closed: bool
    workers: dict[str, Any]  # name -> WorkerInfo (module_class, options, placed)
    recovery: Optional[Recovery]
    recovering: bool
    workers_changed: int
    core: Any  # core.caller.CallerCore
    step: Any  # the open core.caller.StepRecord

    def _check_open(self) -> None: ...
    def wait_closing(self, timeout: Optional[float]) -> None: ...
    def get_state(self, worker: str, what: str, timeout: Optional[float]) -> Any: ...
    def set_state(self, worker: str, what: str, state: Any, timeout: Optional[float]) -> None: ...
    def set_training(self, workers: list[str], mode: bool, timeout: Optional[float]) -> None: ...
    def members(self, worker: str) -> tuple[str, ...]: ...
    group_of: dict[str, str]  # replica -> the replicated worker it belongs to
    def new_epoch(self, first_step: int) -> None: ...


def _plain_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is None or isinstance(v, (bool, int, float, str, dict))}


def save(rt: Runtime, path: str, timeout: Optional[float] = None, key: Key = None) -> None:
    """Write a consistent checkpoint of every worker, between steps, atomically."""
    with rt.lock:
        rt._check_open()
        rt.wait_closing(timeout)
        if rt.step.participants():
            raise E.CheckpointError(
                f"step {rt.step.id} has calls in flight; call ag.step() before ag.save()", step=rt.step.id)
        step = rt.step.id - 1
        workers = sorted(_primaries(rt).items())

        def gather() -> Iterable[Entry]:
            for name, info in workers:  # one state at a time: only one module's copy is in memory
                yield name, info.module_class, _plain_options(info.options), rt.get_state(name, "full", timeout)

        # Waiting for another saver counts against the deadline too: a hung saver must not hang us forever.
        lock_timeout = rt.timeout if timeout is None else timeout
        write_checkpoint(path, step, gather(), key=key, lock_timeout=lock_timeout)
        log.info("saved checkpoint of %d workers at step %d to %s", len(workers), step, path)


def _read(rt: Runtime, path: str, key: Key) -> tuple[int, dict[str, Any]]:
    """The checkpoint's step and every worker's state, checked against this runtime's workers."""
    with open_checkpoint(path, key) as snap:
        meta = snap.meta
        entries = {w["name"]: w for w in meta["workers"]}
        primaries = _primaries(rt)
        missing = sorted(set(primaries) - set(entries))
        extra = sorted(set(entries) - set(primaries))
        if missing:
            raise E.CheckpointError(f"the checkpoint has no entry for worker(s) {missing}", worker=missing[0])
        if extra:
            raise E.CheckpointError(f"the checkpoint holds worker(s) {extra} that this runtime has not spawned",
                                    worker=extra[0])
        for name, entry in sorted(entries.items()):
            info = rt.workers[name]
            if entry.get("class") != info.module_class:
                raise E.CheckpointError(
                    f"the checkpoint holds a {entry.get('class')} for this worker, but it runs a "
                    f"{info.module_class}", worker=name)
            saved_opts = entry.get("options") if isinstance(entry.get("options"), dict) else {}
            for opt in MUST_MATCH:
                if opt in saved_opts and opt in info.options and saved_opts[opt] != info.options[opt]:
                    raise E.CheckpointError(
                        f"the checkpoint was taken with {opt}={saved_opts[opt]!r} for this worker, but it runs "
                        f"with {opt}={info.options[opt]!r}", worker=name)
        # Every state is read (and checked) before any worker changes: a bad file leaves all as they were.
        # A replicated worker's entry (one, whatever its replica count) goes to each of its replicas.
        states = {name: snap.state(name) for name in sorted(entries)}
        return meta["step"], {m: state for name, state in states.items() for m in rt.members(name)}


def _primaries(rt: Runtime) -> dict[str, Any]:
    """The workers a checkpoint holds: one per replicated worker (its first replica, which has its name)."""
    return {name: info for name, info in rt.workers.items() if rt.group_of.get(name, name) == name}


def _restore(rt: Runtime, states: dict[str, Any], timeout: Optional[float]) -> None:
    for name, state in states.items():
        try:
            rt.set_state(name, "full", state, timeout)
            info = rt.workers.get(name)
            if info is not None:  # a restarted worker starts in its spawn-time mode: give it the caller's
                rt.set_training([name], info.handle.training, timeout)
        except (E.ShapeError, E.ConfigError) as err:
            raise E.CheckpointError(f"the checkpoint does not fit the worker: {err.message}", worker=name) from err


def load(rt: Runtime, path: str, timeout: Optional[float] = None, key: Key = None) -> None:
    """Restore every worker (matched by name) and the step counter; training goes on from there.

    Every worker is reset into a new epoch first, as after a recovery: steps still open or closing
    are abandoned (their handles raise StepAborted), and the next step is the checkpoint's + 1.
    """
    with rt.lock:
        rt._check_open()
        step, states = _read(rt, path, key)  # a refused checkpoint changes nothing
        rt.new_epoch(step + 1)
        _restore(rt, states, timeout)
        log.info("loaded checkpoint of %d workers at step %d from %s", len(states), step, path)


def auto_checkpoint(rt: Runtime) -> None:
    """Take the periodic recovery checkpoint when it is due and the current step has no calls yet."""
    rec = rt.recovery
    if rec is None or rt.recovering or not rt.workers or rt.step.calls or rt.step.pass_workers:
        return
    if any(not w.placed for w in rt.workers.values()):
        return
    done = rt.step.id - 1
    last = rec.checkpoints[-1][0] if rec.checkpoints else None
    changed = rec.workers_seen != rt.workers_changed
    if not changed and last is not None and (done == last or done % rec.every != 0):
        return
    path = os.path.join(rec.directory, f"step-{done:08d}")
    save(rt, path)
    rec.checkpoints = [c for c in rec.checkpoints if c[0] != done] + [(done, path)]
    rec.workers_seen = rt.workers_changed
    while len(rec.checkpoints) > rec.keep:
        _, old = rec.checkpoints.pop(0)
        shutil.rmtree(old, ignore_errors=True)


def maybe_recover(rt: Runtime, err: E.WorkerDied) -> None:
    """A worker died: with recovery on, restart it, restore every worker, annotate ``err``."""
    rec = rt.recovery
    if rec is None or rt.recovering or err.recovered or rt.closed:
        return
    if not rec.checkpoints:
        log.error("a worker died before the first checkpoint; nothing to restore")
        return
    lost = [s.id for s in rt.core.open_steps()]
    committed = [s.id for s in rt.core.steps.values() if s.committed]
    rt.recovering = True
    try:
        log.warning("recovering from: %s", err.message)
        errors = []
        for step_id, path in reversed(rec.checkpoints):
            try:
                _, states = _read(rt, path, None)
            except E.CheckpointError as bad:  # e.g. torn by the crash: try the one before
                errors.append(bad)
                continue
            rt.new_epoch(step_id + 1)
            _restore(rt, states, None)
            rec.recoveries += 1
            last_lost = max(lost + committed + [step_id])
            err.recovered = True
            err.restored_step = step_id
            err.replay = list(range(step_id + 1, last_lost + 1))
            log.warning("recovered: every worker restored to step %d; steps %s must be replayed", step_id, err.replay)
            return
        log.error("no checkpoint could be restored: %s", errors)
    except E.ActorgradError as failed:
        log.error("recovery failed: %s", failed)
        err.message += f" (recovery failed: {failed.message})"
    finally:
        rt.recovering = False
