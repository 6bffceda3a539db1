"""A picture of the model: the worker graph of one step, as Graphviz DOT (and PNG, SVG or PDF via ``dot``).

The runtime keeps the last closed step's call records; ``from_runtime`` turns
them into a ``StepGraph`` of plain data (workers, calls with their input
references, passes with their seeds and the workers they reach), and
``StepGraph.to_dot`` draws it with one node per worker and one edge per
producer -> consumer worker pair, however many calls went along it, so that
recurrence and weight sharing stay readable.
"""

from __future__ import annotations

import html
import inspect
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Optional, Union

from . import errors as E

log = logging.getLogger("actorgrad.viz")

__all__ = ["WorkerView", "CallView", "PassView", "EdgeView", "StepGraph", "from_runtime", "snapshot", "write"]

# Dark shades draw the gradient edges and loss outlines of a loss; light ones fill its workers.
_DARK = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_LIGHT = ("#c6dbef", "#fcc5c0", "#c7e9c0", "#fdd0a2", "#dadaeb", "#e7cbbc", "#fbcfe8", "#c4ecf0")
_NO_GRAD_FILL = "#f2f2f2"
_PLAIN_EDGE = "#555555"
_CUT_EDGE = "#8c8c8c"

RENDER_FORMATS = ("png", "svg", "pdf")
DOT_SUFFIXES = ("dot", "gv")
_RENDER_TIMEOUT = 120.0

GRAD, DETACHED, NO_GRAD = "grad", "detached", "no_grad"


@dataclass(frozen=True)
class WorkerView:
    """A worker as drawn: its name and how it was spawned."""

    name: str
    module_class: str
    optimizer: Optional[str]  # e.g. "SGD lr=0.1"; None without an optimizer
    update: str  # "step", "pass" or "callable"
    max_staleness: int


@dataclass(frozen=True)
class CallView:
    """One call of a step: its worker, where its inputs came from, and its output shapes once known."""

    id: int
    worker: str
    refs: tuple[tuple[int, int, bool], ...]  # per input slot: (producer call, output, carries gradient)
    saved: bool  # False under ag.no_grad()
    shapes: Optional[tuple[tuple[int, ...], ...]] = None


@dataclass(frozen=True)
class PassView:
    """One backward pass: where it was seeded and which workers it reaches."""

    id: int
    seeds: tuple[tuple[int, int], ...]  # (call, output)
    workers: tuple[str, ...]


@dataclass(frozen=True)
class EdgeView:
    """Every input reference from one worker's calls to another's, of one kind, drawn as one edge."""

    producer: str
    consumer: str
    kind: str  # GRAD (gradients can flow back), DETACHED (node.detach()) or NO_GRAD (under ag.no_grad())
    calls: int  # consumer calls that read along this edge
    shapes: tuple[tuple[int, ...], ...]  # distinct shapes of the activations sent along it (known ones)
    losses: tuple[int, ...]  # indices into StepGraph.losses() whose gradients flow back along it


@dataclass(frozen=True)
class StepGraph:
    """The worker graph of one step, as plain data."""

    step: int
    workers: tuple[WorkerView, ...]  # in order of their first call
    calls: tuple[CallView, ...]  # in call order
    passes: tuple[PassView, ...]  # in the order backward() was called
    closed: bool = True
    error: Optional[str] = None  # why the step failed, if it did

    # Derived lookups, computed once per graph. A frozen dataclass without __slots__ still has an
    # instance __dict__, which is where cached_property stores its value (bypassing __setattr__).

    @cached_property
    def _by_id(self) -> dict[int, CallView]:
        """Calls by id."""
        return {c.id: c for c in self.calls}

    @cached_property
    def _by_worker(self) -> dict[str, tuple[CallView, ...]]:
        """Per worker, its calls in order."""
        acc: dict[str, list[CallView]] = {}
        for c in self.calls:
            acc.setdefault(c.worker, []).append(c)
        return {w: tuple(cs) for w, cs in acc.items()}

    @cached_property
    def _call_index(self) -> dict[CallView, int]:
        """Each call's position among its worker's calls (the first, for equal calls, as list.index)."""
        out: dict[CallView, int] = {}
        for cs in self._by_worker.values():
            for i, c in enumerate(cs):
                out.setdefault(c, i)
        return out

    @cached_property
    def _loss_groups(self) -> tuple[tuple[PassView, ...], ...]:
        """The groups of ``losses()``."""
        groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[PassView]] = {}
        by_id = self._by_id
        for p in self.passes:
            seeded = tuple(sorted({by_id[c].worker for c, _ in p.seeds if c in by_id}))
            groups.setdefault((seeded, tuple(sorted(p.workers))), []).append(p)
        return tuple(tuple(g) for g in groups.values())

    def calls_of(self, worker: str) -> list[CallView]:
        """The calls of one worker in this step, in order."""
        return list(self._by_worker.get(worker, ()))

    def losses(self) -> list[tuple[PassView, ...]]:
        """Passes grouped as drawn: passes seeded in the same workers that reach the same workers are one loss."""
        return list(self._loss_groups)

    def reached_by(self) -> dict[str, list[int]]:
        """Per worker, the indices (into ``losses()``) of the losses whose gradients reach it."""
        out: dict[str, list[int]] = {w.name: [] for w in self.workers}
        for i, group in enumerate(self._loss_groups):
            for w in sorted({w for p in group for w in p.workers}):
                out.setdefault(w, []).append(i)
        return out

    def _pass_calls(self, p: PassView) -> set[int]:
        """Calls on a gradient path to one of the pass's seeds (the calls whose inputs get gradients)."""
        by_id = self._by_id
        seen: set[int] = set()
        stack = [c for c, _ in p.seeds]
        while stack:
            c = stack.pop()
            if c in seen or c not in by_id:
                continue
            seen.add(c)
            stack.extend(prod for prod, _, grad in by_id[c].refs if grad)
        return seen

    def edges(self) -> list[EdgeView]:
        """One edge per (producer worker, consumer worker, kind), in order of first use."""
        by_id = self._by_id
        losses = self._loss_groups
        loss_of = {p.id: i for i, group in enumerate(losses) for p in group}
        on_path = {p.id: self._pass_calls(p) for p in self.passes}
        acc: dict[tuple[str, str, str], dict[str, set]] = {}
        for c in self.calls:
            for prod, out, grad in c.refs:
                src = by_id.get(prod)
                if src is None:
                    continue
                if grad:
                    kind = GRAD
                elif not c.saved or not src.saved:
                    kind = NO_GRAD
                else:
                    kind = DETACHED
                e = acc.setdefault((src.worker, c.worker, kind), {"calls": set(), "shapes": set(), "losses": set()})
                e["calls"].add(c.id)
                if src.shapes is not None and out < len(src.shapes):
                    e["shapes"].add(src.shapes[out])
                if grad:
                    e["losses"].update(loss_of[pid] for pid, calls in on_path.items() if c.id in calls)
        return [EdgeView(p, q, k, len(v["calls"]), tuple(sorted(v["shapes"])), tuple(sorted(v["losses"])))
                for (p, q, k), v in acc.items()]

    def to_dot(self) -> str:
        """The graph as Graphviz DOT source."""
        losses = self._loss_groups
        reached = self.reached_by()
        names = {w.name for w in self.workers}
        lines = [
            "digraph actorgrad {",
            f"  graph [rankdir=LR, labelloc=t, fontname=Helvetica, fontsize=13, nodesep=0.3, ranksep=0.55, "
            f"label={_q(self._title())}];",
            "  node [fontname=Helvetica, fontsize=10, margin=\"0.12,0.06\"];",
            "  edge [fontname=Helvetica, fontsize=9, arrowsize=0.7];",
        ]
        lines.append("  // workers: one node each; the bottom row names the losses whose gradients reach it")
        for w in self.workers:
            lines.append(f"  {_q(w.name)} [shape=plain, label=<{self._worker_label(w, reached.get(w.name, []))}>];")
        loss_ids = _loss_ids(len(losses), names)
        if losses:
            lines.append("  // losses: one node per backward pass (passes with the same seeds and reach are merged)")
        for i, group in enumerate(losses):
            dark, light = _DARK[i % len(_DARK)], _LIGHT[i % len(_LIGHT)]
            lines.append(f"  {_q(loss_ids[i])} [shape=octagon, style=filled, color={_q(dark)}, "
                         f"fillcolor={_q(light)}, penwidth=1.5, label={_q(self._loss_label(i, group))}];")
        lines.append("  // edges: one per producer -> consumer worker pair and kind")
        for e in self.edges():
            attrs = [f"label={_q(_edge_label(e))}"]
            if e.kind == GRAD:
                colors = [_DARK[i % len(_DARK)] for i in e.losses]
                attrs.append(f"color={_q(':'.join(colors) if colors else _PLAIN_EDGE)}")
                attrs.append("penwidth=1.4")
            elif e.kind == DETACHED:
                attrs += ["style=dashed", f"color={_q(_CUT_EDGE)}", f"fontcolor={_q(_CUT_EDGE)}"]
            else:
                attrs += ["style=dotted", f"color={_q(_CUT_EDGE)}", f"fontcolor={_q(_CUT_EDGE)}"]
            lines.append(f"  {_q(e.producer)} -> {_q(e.consumer)} [{', '.join(attrs)}];")
        by_id = self._by_id
        for i, group in enumerate(losses):
            seeded: dict[str, int] = {}
            for p in group:
                for c, _ in p.seeds:
                    if c in by_id:
                        seeded[by_id[c].worker] = seeded.get(by_id[c].worker, 0) + 1
            dark = _DARK[i % len(_DARK)]
            for w, n in seeded.items():
                label = f", label={_q(f'{n} seeds')}" if n > 1 else ""
                lines.append(f"  {_q(w)} -> {_q(loss_ids[i])} [color={_q(dark)}, penwidth=2{label}];")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _title(self) -> str:
        state = "" if self.closed else " (open)"
        n = len(self.passes)
        text = (f"actorgrad: step {self.step}{state}, {len(self.workers)} worker{'s' * (len(self.workers) != 1)}, "
                f"{len(self.calls)} call{'s' * (len(self.calls) != 1)}, {n} backward pass{'es' * (n != 1)}")
        if self.error:
            text += f"\nfailed: {self.error}"
        return text

    def _worker_label(self, w: WorkerView, losses: list[int]) -> str:
        """An HTML-like label: name, module and optimizer, update rule, calls, then one cell per loss."""
        calls = self._by_worker.get(w.name, ())
        unsaved = sum(not c.saved for c in calls)
        count = f"{len(calls)} call{'s' * (len(calls) != 1)}" + (f" ({unsaved} no_grad)" if unsaved else "")
        span = max(1, len(losses))
        rows = [
            f"<B>{_h(w.name)}</B>",
            _h(f"{w.module_class}, {w.optimizer or 'no optimizer'}"),
            _h(f"update={w.update}, max_staleness={w.max_staleness}"),
            _h(count),
        ]
        body = "".join(f'<TR><TD COLSPAN="{span}">{r}</TD></TR>' for r in rows)
        if losses:
            # Many losses: numbers only, so that the node stays about as wide as its text.
            names = [f"loss {i + 1}" if len(losses) <= 3 else str(i + 1) for i in losses]
            cells = "".join(f'<TD BGCOLOR="{_LIGHT[i % len(_LIGHT)]}"><FONT POINT-SIZE="9">{n}</FONT></TD>'
                            for i, n in zip(losses, names))
        else:
            cells = f'<TD BGCOLOR="{_NO_GRAD_FILL}"><FONT POINT-SIZE="9">no gradient</FONT></TD>'
        return ('<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="0" CELLPADDING="2" STYLE="ROUNDED" BGCOLOR="white">'
                f"{body}<TR>{cells}</TR></TABLE>")

    def _loss_label(self, i: int, group: tuple[PassView, ...]) -> str:
        by_id = self._by_id
        seeds = [(c, o) for p in group for c, o in p.seeds]
        if len(group) == 1:
            which = f"pass {group[0].id}"
        else:
            ids = ", ".join(str(p.id) for p in group[:4]) + (", ..." if len(group) > 4 else "")
            which = f"{len(group)} passes ({ids})"
        if len(seeds) <= 3:
            where = "seed: " + ", ".join(self._call_name(by_id[c], o) if c in by_id else f"call {c}"
                                         for c, o in seeds)
        else:
            per: dict[str, int] = {}
            for c, _ in seeds:
                w = by_id[c].worker if c in by_id else "?"
                per[w] = per.get(w, 0) + 1
            where = f"{len(seeds)} seeds: " + ", ".join(f"{n} in {w}" for w, n in per.items())
        return f"loss {i + 1}\n{which}\n{where}"

    def _call_name(self, call: CallView, out: int) -> str:
        mine = self._by_worker.get(call.worker, ())
        name = call.worker if len(mine) == 1 else f"{call.worker} #{self._call_index[call] + 1}"
        return name if call.shapes is None or len(call.shapes) <= 1 else f"{name} out {out}"


def _q(text: str) -> str:
    """A DOT double-quoted string; line breaks become centred DOT line breaks."""
    body = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + body.replace("\r\n", "\\n").replace("\n", "\\n") + '"'


def _h(text: str) -> str:
    """Text escaped for a Graphviz HTML-like label."""
    return html.escape(str(text), quote=True)


def _loss_ids(n: int, taken: set[str]) -> list[str]:
    """Node ids for the loss nodes that no worker name already uses."""
    ids = []
    for i in range(n):
        cand = f"loss {i + 1}"
        while cand in taken:
            cand += "'"
        ids.append(cand)
    return ids


def _edge_label(e: EdgeView) -> str:
    parts = [f"{e.calls} call{'s' * (e.calls != 1)}"]
    if len(e.shapes) == 1:
        parts.append("[" + ", ".join(str(d) for d in e.shapes[0]) + "]")
    if e.kind != GRAD:
        parts.append(e.kind)
    return "\n".join(parts)


def describe_optimizer(spec: Any) -> Optional[str]:
    """A short text for an optimizer recipe: ``"SGD lr=0.1"`` (and its LR schedule), or the callable's name."""
    if spec is None:
        return None
    cls, kwargs = getattr(spec, "cls", None), getattr(spec, "kwargs", None)
    if isinstance(cls, type) and isinstance(kwargs, dict):
        lr = kwargs.get("lr", inspect.Parameter.empty)
        if lr is inspect.Parameter.empty:
            try:
                lr = inspect.signature(cls).parameters["lr"].default
            except (KeyError, TypeError, ValueError):
                pass
        numeric = isinstance(lr, (int, float)) and not isinstance(lr, bool)
        text = f"{cls.__name__} lr={lr:g}" if numeric else cls.__name__
        sched = getattr(getattr(spec, "schedule", None), "cls", None)
        if sched is not None:
            text += f", {getattr(sched, '__name__', type(sched).__name__)}"
        return text
    return f"{getattr(spec, '__name__', type(spec).__name__)} (callable)"


def snapshot(step: Any, calls: Iterable[Any], workers: Mapping[str, Any], *, closed: bool = True,
             group_of: Optional[Mapping[str, str]] = None) -> StepGraph:
    """Plain data from the runtime's records of one step: its call records, passes and the workers' infos.

    ``group_of``: replica -> replicated worker; a replicated worker is drawn as one worker.
    """
    one = (lambda w: group_of.get(w, w)) if group_of else (lambda w: w)
    views = []
    for rec in sorted(calls, key=lambda r: r.id):
        meta = rec.meta
        shapes = None
        if meta is not None:
            shapes = tuple(tuple(out.shape) for out in meta.outputs)
        views.append(CallView(rec.id, one(rec.worker), tuple((int(p), int(o), bool(g)) for p, o, g in rec.refs),
                              bool(rec.saved), shapes))
    order: dict[str, None] = {}
    for v in views:
        order.setdefault(v.worker, None)
    wviews = []
    for name in order:
        info = workers.get(name)
        if info is None:
            wviews.append(WorkerView(name, "?", None, "?", 0))
            continue
        opts = info.options or {}
        wviews.append(WorkerView(name, info.module_class, describe_optimizer(getattr(info, "optimizer", None)),
                                 str(opts.get("update", "step")), int(opts.get("max_staleness", 0))))
    passes = tuple(
        PassView(p.id, tuple((int(c), int(o)) for c, o in getattr(p, "seeds", ())),
                 tuple(sorted({one(w) for w in p.workers})))
        for _, p in sorted(step.passes.items()))
    err = step.error
    error = None if err is None else f"{type(err).__name__}" + (f" in '{err.worker}'" if err.worker else "")
    return StepGraph(step.id, tuple(wviews), tuple(views), passes, closed, error)


def from_runtime(rt: Any, step: Optional[int] = None) -> StepGraph:
    """The graph of the last closed step (or of the current one, before any step closed), or of ``step``.

    Call with the runtime's lock held (``Runtime.graph_of`` does).
    """
    last = rt.last_graph
    current = rt.step
    # Without ``step``, the last closed step wins over the current one.
    if last is not None and step in (None, last[0].id):
        return snapshot(last[0], last[1], rt.workers, closed=True, group_of=getattr(rt, "group_of", None))
    if current.calls and step in (None, current.id):
        return snapshot(current, rt.step_calls(current), rt.workers, closed=False,
                        group_of=getattr(rt, "group_of", None))
    if step is None:
        raise E.ConfigError("nothing to draw yet: no step has calls; call some workers (and backward) first")
    have = [f"the last closed step ({last[0].id})"] if last is not None else []
    if current.calls:
        have.append(f"the current step ({current.id})")
    raise E.ConfigError(f"no graph of step {step}: ag.graph keeps " + (" and ".join(have) or "no step yet"),
                        step=step)


def write(dot: str, path: Union[str, "os.PathLike[str]"]) -> str:
    """Write DOT source to ``path``: .dot/.gv as text, .png/.svg/.pdf rendered by Graphviz ``dot``."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix in DOT_SUFFIXES:
        with open(path, "w", encoding="utf-8") as f:
            f.write(dot)
        return path
    if suffix not in RENDER_FORMATS:
        raise E.ConfigError(f"ag.graph writes .dot or .gv (DOT source) or .png, .svg or .pdf (via Graphviz), "
                            f"not {path!r}")
    exe = shutil.which("dot")
    if exe is None:
        raise E.ConfigError(f"writing {path!r} needs Graphviz's 'dot' program, which is not on PATH; install "
                            "graphviz (apt-get install graphviz, brew install graphviz, conda install graphviz) "
                            "or write a .dot file and render it elsewhere")
    try:
        proc = subprocess.run([exe, f"-T{suffix}", "-o", path], input=dot.encode("utf-8"), capture_output=True,
                              timeout=_RENDER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise E.ConfigError(f"Graphviz did not finish rendering {path!r} within {_RENDER_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        raise E.ConfigError(f"Graphviz failed to render {path!r} (exit {proc.returncode}): "
                            f"{proc.stderr.decode('utf-8', 'replace').strip()}")
    if proc.stderr:
        log.debug("graphviz: %s", proc.stderr.decode("utf-8", "replace").strip())
    return path
