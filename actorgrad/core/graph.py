"""The caller's record of calls, and which gradient edges a pass expects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .messages import SEED, Expect, ForwardDone


@dataclass
class CallRecord:
    """One call as the caller knows it: where its inputs come from, and its outputs once known."""

    id: int
    worker: str
    step: int
    req: int
    refs: list[tuple[int, int, bool]]  # per input slot: (producer call, output, carries gradient)
    saved: bool  # False under ag.no_grad()
    meta: Optional[ForwardDone] = None  # the worker's reply to its Forward: its outputs' shapes and dtypes
    # Caller leaves: (position, tensor) per caller tensor with requires_grad among the arguments, as
    # the Forward lists them; the gradients the worker returns for them are added into their .grad.
    leaves: tuple = ()
    key: Any = None  # what the caller recorded its result's structure under (CallerCore.structures)


class Graph:
    """Calls of the open steps; plans passes over them."""

    def __init__(self) -> None:
        self.calls: dict[int, CallRecord] = {}

    def add(self, rec: CallRecord) -> None:
        """Record a new call."""
        self.calls[rec.id] = rec

    def ancestors(self, seeds: list[tuple[int, int]]) -> list[int]:
        """Calls on a gradient path to any seed, seeds' calls included, in discovery order."""
        seen: dict[int, None] = {}
        stack = [c for c, _ in seeds]
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen[c] = None
            for p, _, grad in self.calls[c].refs:
                if grad and p not in seen:
                    stack.append(p)
        return list(seen)

    def plan(self, seeds: list[tuple[int, int]]) -> dict[str, list[Expect]]:
        """Per worker, the edges each (call, output) waits for in a pass seeded at ``seeds``."""
        expect: dict[tuple[int, int], set[tuple[int, int]]] = {}
        for c in self.ancestors(seeds):
            for slot, (p, o, grad) in enumerate(self.calls[c].refs):
                if grad:
                    expect.setdefault((p, o), set()).add((c, slot))
        for i, (c, o) in enumerate(seeds):
            expect.setdefault((c, o), set()).add((SEED, i))
        by_worker: dict[str, list[Expect]] = {}
        for (c, o), edges in sorted(expect.items()):
            by_worker.setdefault(self.calls[c].worker, []).append(Expect(c, o, tuple(sorted(edges))))
        return by_worker

    def drop_step(self, step: int) -> None:
        """Forget the calls of a step that has ended."""
        for cid in [c for c, r in self.calls.items() if r.step == step]:
            del self.calls[cid]
