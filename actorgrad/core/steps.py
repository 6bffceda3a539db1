"""The step lifecycle at one worker: an explicit phase per step, its legal transitions in one place.

::

    OPEN ──Close──> CLOSING ──all calls and passes done, answered──> READY ──Commit──> COMMITTING ──applied──> CLOSED
      └──────────────┴──────────────────── Abort / failure / deadline ───────┴──────────────┴────> ABORTED

A step is created OPEN by its first call, plan or close. CLOSED and ABORTED are final: the
step's state is freed and only its id is remembered (``EndedSteps``), so that late messages of
an ended step are recognised and dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ActorgradError
from . import messages as m


class Phase(enum.Enum):
    """Where one step stands at one worker."""

    OPEN = "open"  # calls and passes may arrive; no Close yet
    CLOSING = "closing"  # Close arrived; waiting for its calls and passes to finish here
    READY = "ready"  # answered Close: everything of the step is done here; waiting for Commit
    COMMITTING = "committing"  # Commit arrived: apply the update at the next chance
    CLOSED = "closed"  # the update was applied and the state freed
    ABORTED = "aborted"  # dropped: nothing of it applied

    # Members are singletons, so identity hashing is exact, and C-fast (Enum's own hashes the name in Python).
    __hash__ = object.__hash__


# Module-level names for the message path: attribute access on an Enum class costs ~0.2 us on Python 3.11.
OPEN, CLOSING, READY, COMMITTING, CLOSED, ABORTED = (Phase.OPEN, Phase.CLOSING, Phase.READY, Phase.COMMITTING,
                                                     Phase.CLOSED, Phase.ABORTED)

# The one table of legal transitions; ``StepState.to`` refuses anything else.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.OPEN: frozenset({Phase.CLOSING, Phase.ABORTED}),
    Phase.CLOSING: frozenset({Phase.READY, Phase.ABORTED}),
    Phase.READY: frozenset({Phase.COMMITTING, Phase.ABORTED}),
    Phase.COMMITTING: frozenset({Phase.CLOSED, Phase.ABORTED}),
    Phase.CLOSED: frozenset(),
    Phase.ABORTED: frozenset(),
}


class IllegalTransition(ActorgradError):
    """A step was asked to move to a phase its current phase cannot reach (a bug, not user error)."""


@dataclass
class StepState:
    """One step at this worker: its calls and passes here, its Close, and its phase."""

    id: int
    calls: list[int] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    close: Optional[m.Close] = None
    close_since: float = 0.0  # when its Close arrived (monotonic)
    applied: bool = False  # an update landed during the step (rules that apply per pass, callables)
    phase: Phase = OPEN

    def to(self, new: Phase) -> None:
        """Move to phase ``new``; IllegalTransition unless the table above allows it."""
        if new not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"step {self.id} cannot go from {self.phase.value} to {new.value}", step=self.id)
        self.phase = new


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


class StepTable:
    """The live steps of a worker by id, and the ids of those that ended (closed or aborted)."""

    def __init__(self) -> None:
        self.live: dict[int, StepState] = {}
        self.aborted = EndedSteps()
        self.closed = EndedSteps()
        # The latest step the caller has sent a call, plan or close of: an Abort beyond it is refused,
        # so that no message can mark steps that have not begun as ended (their ids would be lost).
        self.top_step = 0

    def seen(self, step: int) -> None:
        """The caller sent something of ``step``."""
        if step > self.top_step:
            self.top_step = step

    def get(self, step: int) -> Optional[StepState]:
        """The live step ``step``, or None."""
        return self.live.get(step)

    def open(self, step: int) -> StepState:
        """The live step ``step``, created OPEN if new."""
        st = self.live.get(step)
        if st is None:
            st = self.live[step] = StepState(step)
        return st

    def ended(self, step: int) -> bool:
        """Whether ``step`` closed or aborted here."""
        return step in self.aborted or step in self.closed

    def on_close(self, msg: m.Close, now: float) -> StepState:
        """Close of ``msg.step`` arrived: the step waits for its calls and passes."""
        st = self.open(msg.step)
        st.close = msg
        st.close_since = now
        st.to(CLOSING)
        return st

    def on_commit(self, step: int) -> bool:
        """Commit of ``step`` arrived; False when it is not READY here (nothing to commit)."""
        st = self.live.get(step)
        if st is None or st.phase is not READY:
            return False
        st.to(COMMITTING)
        return True

    def end(self, step: int, phase: Phase, remember: bool = True) -> Optional[StepState]:
        """Take ``step`` out of the live table as CLOSED or ABORTED; return its state.

        With ``remember``, its id is recorded as ended, so that late messages of it are dropped.
        """
        st = self.live.pop(step, None)
        if st is not None:
            st.to(phase)
        if remember:
            (self.closed if phase is CLOSED else self.aborted).add(step)
        return st

    def has_close(self) -> bool:
        """Whether some live step has its Close."""
        return any(st.phase is not OPEN for st in self.live.values())

    def oldest_open_below(self, limit: int) -> bool:
        """Whether a live step with id below ``limit`` exists (max_staleness gate)."""
        return any(s < limit for s in self.live)
