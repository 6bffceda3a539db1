"""Tracer: a worker's own event log (spans and message events); the clock it stamps them with.

Kept apart from actorgrad.trace (which assembles and draws trace files) so that the
worker core depends on nothing outside core/.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("actorgrad.trace")

COMPUTE_TID = 1
MESSAGE_TID = 2
MAX_EVENTS = 2_000_000


def now_us() -> float:
    """Wall-clock time in microseconds (comparable across processes on one machine)."""
    return time.time_ns() / 1000.0


class Tracer:
    """Collects one process's events; disabled tracers cost one attribute check."""

    def __init__(self, track: str, enabled: bool = False) -> None:
        self.track = track
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []
        self.dropped = 0

    def _add(self, ev: dict[str, Any]) -> None:
        if len(self.events) >= MAX_EVENTS:
            self.dropped += 1
            return
        self.events.append(ev)

    def span(self, kind: str, start_us: float, end_us: float, tid: int = COMPUTE_TID, **args: Any) -> None:
        """Record a complete span of ``kind`` ("forward", "backward", "update", "wait")."""
        if not self.enabled:
            return
        self._add({"name": kind, "cat": kind, "ph": "X", "ts": start_us, "dur": max(0.0, end_us - start_us),
                   "tid": tid, "args": args})

    def instant(self, kind: str, tid: int = MESSAGE_TID, **args: Any) -> None:
        """Record a point event (a message sent or received)."""
        if not self.enabled:
            return
        self._add({"name": kind, "cat": kind, "ph": "i", "s": "t", "ts": now_us(), "tid": tid, "args": args})

    def take(self) -> list[dict[str, Any]]:
        """Hand over and clear the collected events."""
        events, self.events = self.events, []
        if self.dropped:
            log.warning("%s: %d trace events dropped (limit %d)", self.track, self.dropped, MAX_EVENTS)
            self.dropped = 0
        return events
