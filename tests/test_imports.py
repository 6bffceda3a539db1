"""The package's import structure: no cycles, and every layer imports only the layers below it.

Layers, bottom up: ``errors``; ``core/`` (protocols without I/O: codec, caller, worker); ``transport/``
(hosts the cores); ``checkpoint`` (the on-disk format); handles, runtime, recovery and the public API.
Imports under TYPE_CHECKING and inside functions count: a reader has to follow them too.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "actorgrad")

# Module (or package prefix) -> what it must never import (prefixes).
FORBIDDEN = {
    "actorgrad.errors": ["actorgrad."],
    "actorgrad.core": ["actorgrad.transport", "actorgrad.runtime", "actorgrad.api", "actorgrad.handles",
                       "actorgrad.recovery", "actorgrad.checkpoint", "actorgrad.optim", "actorgrad.module",
                       "actorgrad.trace", "actorgrad.nn", "actorgrad.viz"],
    "actorgrad.transport": ["actorgrad.runtime", "actorgrad.api", "actorgrad.handles", "actorgrad.recovery",
                            "actorgrad.checkpoint"],
    "actorgrad.checkpoint": ["actorgrad.runtime", "actorgrad.api", "actorgrad.handles", "actorgrad.recovery",
                             "actorgrad.transport", "actorgrad.core.caller"],
    "actorgrad.handles": ["actorgrad.runtime", "actorgrad.api", "actorgrad.recovery"],
    "actorgrad.recovery": ["actorgrad.runtime", "actorgrad.api"],
}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                with open(path) as fh:
                    found[name] = ast.parse(fh.read(), path)
    return found


def _edges(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    graph = {}
    for name, tree in mods.items():
        pkg = name if any(k.startswith(name + ".") for k in mods) else name.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        graph[name] = {t for t in out if t in mods and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    return found


def test_there_is_no_import_cycle_inside_the_package():
    cycles = _cycles(_edges(_modules()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_layer_imports_only_the_layers_below_it():
    bad = []
    for mod, targets in sorted(_edges(_modules()).items()):
        for layer, banned in FORBIDDEN.items():
            if mod == layer or mod.startswith(layer + "."):
                bad += [f"{mod} -> {t}" for t in sorted(targets) if any(t == b or t.startswith(b) for b in banned)]
    assert not bad, "upward imports: " + "; ".join(bad)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    # The checker itself must be able to fail.
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    mods = {"actorgrad.core.x": ast.parse("from ..runtime import Runtime"), "actorgrad.runtime": ast.parse(""),
            "actorgrad.core": ast.parse("")}
    assert _edges(mods)["actorgrad.core.x"] == {"actorgrad.runtime"}
