"""Which gradient messages one pass still waits for at one worker; no torch here.

A pass's Plan says, for each (call, output), the set of edges that will each
deliver exactly one gradient message: a consumer's (call, slot), or a seed.
A call is ready for its VJP when every output has heard from every edge.
"""

from __future__ import annotations

from enum import Enum

Edge = tuple[int, int]
Key = tuple[int, int]  # (call, output)


class Arrival(Enum):
    """What an arriving gradient message was, relative to the plan."""

    NEW = "new"
    DUPLICATE = "duplicate"
    UNEXPECTED = "unexpected"


class Ledger:
    """Expected and received gradient edges per (call, output) for one pass."""

    def __init__(self) -> None:
        self._expected: dict[Key, frozenset[Edge]] = {}
        self._received: dict[Key, set[Edge]] = {}
        self._calls: dict[int, list[Key]] = {}

    def expect(self, call: int, out: int, edges: frozenset[Edge] | set[Edge] | tuple[Edge, ...]) -> None:
        """Record that output ``out`` of ``call`` waits for one message per edge."""
        key = (call, out)
        self._expected[key] = frozenset(self._expected.get(key, frozenset()) | frozenset(edges))
        self._received.setdefault(key, set())
        keys = self._calls.setdefault(call, [])
        if key not in keys:
            keys.append(key)

    def arrive(self, call: int, out: int, edge: Edge) -> Arrival:
        """Count one arriving message; duplicates and strangers are reported, not counted."""
        key = (call, out)
        expected = self._expected.get(key)
        if expected is None or edge not in expected:
            return Arrival.UNEXPECTED
        got = self._received[key]
        if edge in got:
            return Arrival.DUPLICATE
        got.add(edge)
        return Arrival.NEW

    def calls(self) -> list[int]:
        """Calls this pass involves, in the order they were planned."""
        return list(self._calls)

    def has_call(self, call: int) -> bool:
        """Whether this pass plans anything for ``call``."""
        return call in self._calls

    def is_complete(self, call: int) -> bool:
        """Every planned output of ``call`` has heard from every edge."""
        return all(self._received[k] >= self._expected[k] for k in self._calls.get(call, ()))

    def missing(self, call: int | None = None) -> list[tuple[int, int, Edge]]:
        """(call, output, edge) for every message still expected."""
        keys = self._calls.get(call, []) if call is not None else list(self._expected)
        return [
            (c, o, e)
            for (c, o) in keys
            for e in sorted(self._expected[(c, o)] - self._received[(c, o)])
        ]
