"""``ag.ready()``: wait until every worker has started, all together, with progress for long start-ups.

A worker starts as soon as it is spawned (Ray places its process, which imports
torch and unpickles the module); the first step would wait for each worker as
its calls reach it. ``ready`` waits for all of them at once instead, and a
worker whose start-up fails is named as soon as it fails, whatever the others
still do. Progress is logged (logger ``actorgrad``) every ``PROGRESS_EVERY``
seconds once a wait has lasted that long, so short start-ups stay quiet;
``progress=True`` shows a tqdm bar instead when tqdm is installed.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

from . import errors as E
from . import runtime as runtime_mod

log = logging.getLogger("actorgrad")

PROGRESS_EVERY = 5.0  # seconds between progress lines, and before the first one
_POLL = 0.05


def _bar(total: int, done: int) -> Any:
    """A tqdm bar, or None when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc="workers ready", unit="worker", leave=False)


def wait_ready(rt: Any, workers: Optional[Sequence[str]] = None, timeout: Optional[float] = None,
               progress: Optional[bool] = None) -> list[str]:
    """Wait until the workers (default: every placed worker) have started; returns their names.

    ``timeout`` None waits up to ``runtime.START_LIMIT``; past the deadline DeadlineExceeded names the
    workers still starting. A worker that failed to start raises WorkerDied naming it and why, at once.
    """
    with rt.lock:
        rt._check_open()
        names = sorted(n for n, info in rt.workers.items() if info.placed) if workers is None else list(workers)
        for n in names:
            if n not in rt.workers:
                raise E.ConfigError("no such worker in this runtime", worker=n)
    transport = rt.transport
    failure = getattr(transport, "start_failure", None)
    limit = runtime_mod.START_LIMIT if timeout is None else float(timeout)
    t0 = time.monotonic()
    next_report = t0 + PROGRESS_EVERY
    bar = None
    waiting = list(names)
    try:
        while True:
            still = []
            for n in waiting:
                if transport.starting(n) is not None:
                    still.append(n)
                    continue
                why = failure(n) if failure is not None else None
                if why is not None:
                    raise E.WorkerDied(f"the worker could not start: {why}", worker=n)
            waiting = still
            done = len(names) - len(waiting)
            if bar is not None:
                bar.n = done
                bar.refresh()
            if not waiting:
                if time.monotonic() - t0 > PROGRESS_EVERY and progress is not False:
                    log.info("%d/%d workers ready after %.1fs", done, len(names), time.monotonic() - t0)
                return names
            now = time.monotonic()
            if now - t0 > limit:
                shown = ", ".join(repr(n) for n in waiting[:10]) + (" ..." if len(waiting) > 10 else "")
                raise E.DeadlineExceeded(
                    f"{len(waiting)} of {len(names)} workers still starting after {limit:g}s: {shown}",
                    worker=waiting[0])
            if now >= next_report and progress is not False:
                next_report = now + PROGRESS_EVERY
                if progress and bar is None:
                    bar = _bar(len(names), done)
                if bar is None:
                    log.log(logging.WARNING if progress else logging.INFO,
                            "%d/%d workers ready after %.0fs; still starting: %s", done, len(names), now - t0,
                            ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""))
            time.sleep(_POLL)
    finally:
        if bar is not None:
            bar.close()
