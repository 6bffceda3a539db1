"""``python -m actorgrad``: version, runtime info and trace rendering."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from ._version import __version__


def _info(_: argparse.Namespace) -> int:
    import platform

    import torch

    import actorgrad

    lines = {
        "actorgrad": actorgrad.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import ray

        lines["ray"] = ray.__version__
    except ImportError:
        lines["ray"] = "not installed"
    for k, v in lines.items():
        print(f"{k:14} {v}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from .trace import load_spans, render_png

    spans = load_spans(args.path)
    summary = {}
    for name, evs in sorted(spans.items()):
        per_kind: dict[str, float] = {}
        for ev in evs:
            per_kind[ev["cat"]] = per_kind.get(ev["cat"], 0.0) + ev["dur"] / 1000.0
        summary[name] = {k: round(v, 3) for k, v in sorted(per_kind.items())}
    if args.png:
        render_png(args.path, args.png, title=args.title)
        print(f"wrote {args.png}")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'worker':24} " + " ".join(f"{k:>10}" for k in ("forward", "backward", "update", "wait")) + "  (ms)")
        for name, kinds in summary.items():
            print(f"{name:24} " + " ".join(f"{kinds.get(k, 0.0):10.2f}" for k in ("forward", "backward", "update", "wait")))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m actorgrad``."""
    parser = argparse.ArgumentParser(prog="python -m actorgrad")
    parser.add_argument("--version", action="version", version=f"actorgrad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions of actorgrad, torch and ray").set_defaults(fn=_info)
    tr = sub.add_parser("trace", help="summarise a trace file; --png renders a per-worker Gantt chart")
    tr.add_argument("path")
    tr.add_argument("--png", help="write a timeline picture here")
    tr.add_argument("--title")
    tr.add_argument("--json", action="store_true", help="print the per-worker summary as JSON")
    tr.set_defaults(fn=_trace)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
