"""Timelines: spans (forward, backward, update, wait) and message events, as Chrome trace JSON.

Each worker keeps its own ``Tracer``; the caller collects every worker's
events when the trace ends and writes one file that opens in Perfetto
(ui.perfetto.dev) or chrome://tracing. One track (Chrome "process") per
worker, with a compute thread and a message thread; times are wall-clock
microseconds, so tracks of processes on one machine line up.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Optional

from .core.trace import COMPUTE_TID, MAX_EVENTS, MESSAGE_TID, Tracer, now_us

__all__ = ["COMPUTE_TID", "MESSAGE_TID", "MAX_EVENTS", "KIND_COLOURS", "Tracer", "now_us", "chrome_trace",
           "write_trace", "load_spans", "render_png"]

log = logging.getLogger("actorgrad.trace")

# Span kinds and their colours in rendered pictures.
KIND_COLOURS = {
    "forward": "#4C72B0",
    "backward": "#DD8452",
    "update": "#55A868",
    "wait": "#C7C7C7",
    "send": "#8172B3",
    "recv": "#937860",
}


def chrome_trace(tracks: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Assemble per-track events into one Chrome trace object (one pid per track)."""
    out: list[dict[str, Any]] = []
    for pid, (name, events) in enumerate(sorted(tracks.items()), start=1):
        out.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": COMPUTE_TID, "args": {"name": "compute"}})
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": MESSAGE_TID, "args": {"name": "messages"}})
        for ev in events:
            ev = dict(ev)
            ev["pid"] = pid
            out.append(ev)
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_trace(path: str, tracks: dict[str, list[dict[str, Any]]]) -> str:
    """Write the trace atomically; return its path."""
    data = chrome_trace(tracks)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    log.info("wrote trace with %d events to %s", len(data["traceEvents"]), path)
    return path


def load_spans(path: str) -> dict[str, list[dict[str, Any]]]:
    """Read a trace file back: per track name, its complete spans ("X" events)."""
    with open(path) as f:
        data = json.load(f)
    names = {ev["pid"]: ev["args"]["name"] for ev in data["traceEvents"]
             if ev.get("ph") == "M" and ev.get("name") == "process_name"}
    spans: dict[str, list[dict[str, Any]]] = {n: [] for n in names.values()}
    for ev in data["traceEvents"]:
        if ev.get("ph") == "X":
            spans[names[ev["pid"]]].append(ev)
    return spans


def render_png(path: str, png: str, kinds: Optional[Iterable[str]] = None, title: Optional[str] = None) -> str:
    """Draw a per-worker Gantt chart of a trace file with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    spans = load_spans(path)
    wanted = set(kinds or ("forward", "backward", "update", "wait"))
    rows = [name for name in sorted(spans) if any(s["cat"] in wanted for s in spans[name])]
    all_spans = [s for name in rows for s in spans[name] if s["cat"] in wanted]
    t0 = min((s["ts"] for s in all_spans), default=0.0)
    fig, ax = plt.subplots(figsize=(12, 0.6 * max(2, len(rows)) + 1.2))
    for y, name in enumerate(rows):
        for kind in ("wait", "forward", "backward", "update"):
            if kind not in wanted:
                continue
            bars = [((s["ts"] - t0) / 1000.0, max(s["dur"] / 1000.0, 0.01)) for s in spans[name] if s["cat"] == kind]
            if bars:
                h = 0.35 if kind == "wait" else 0.7
                ax.broken_barh(bars, (y - h / 2, h), facecolors=KIND_COLOURS[kind], edgecolor="none")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title or os.path.basename(path))
    ax.legend(handles=[Patch(color=KIND_COLOURS[k], label=k) for k in ("forward", "backward", "update", "wait")
                       if k in wanted], loc="upper right", ncol=4, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
