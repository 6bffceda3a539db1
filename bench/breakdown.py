"""Where a small step's CPU goes, per process and thread (README "Performance").

Runs the small bench chain (4 stages Linear(64, 64) + tanh, MSE, SGD; batch 32) on one backend and reads,
from ``/proc`` before and after the measured steps, the CPU time (user + system) of every thread of the
driver and, on Ray, of every worker process. On 2 cores a small step is bounded by the CPU all of them
spend, so this says which part of the system to make cheaper; it also prints the messages per step.
Threads of a Ray worker process carry kernel names: its event loop, where actorgrad runs, is the
thread started before the process took its actor's title (``ray::IDLE``).

    python -m bench.breakdown --backend local
    python -m bench.breakdown --backend ray --steps 400
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Optional

import torch

import actorgrad as ag
from bench.bench import TanhLinear
from bench.peers import make_data, make_params

_TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of every thread of ``pid``: {tid: (kernel thread name, seconds)}; {} if it is gone."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def _python_names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def run(backend: str, steps: int, warmup: int) -> dict:
    """Train the chain; return wall and CPU per step by process and thread, and messages per step."""
    params = make_params(4, 64, seed=0)
    data = make_data(warmup + steps, 32, 64, seed=1)
    kwargs: dict = {"backend": backend}
    if backend == "ray":
        kwargs["ignore_reinit_error"] = True
    ag.init(**kwargs)
    try:
        workers = []
        for i, sd in enumerate(params):
            mod = TanhLinear(64, 64)
            mod.load_state_dict(sd)
            workers.append(ag.spawn(mod, name=f"stage{i}", optimizer=ag.Optim(torch.optim.SGD, lr=0.01)))
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")
        everyone = [*workers, mse]

        def step(x: torch.Tensor, y: torch.Tensor) -> ag.StepReport:
            h = x
            for w in workers:
                h = w(h)
            ag.backward(mse(h, y))
            return ag.step()

        for x, y in data[:warmup]:
            step(x, y)
        pids = {"caller": os.getpid()}
        if backend == "ray":
            transport = ag.api._current().transport
            for w in everyone:
                ident = transport.identity(w.name)
                if ident is not None:
                    pids[w.name] = int(ident["pid"])
        before = {who: thread_cpu(pid) for who, pid in pids.items()}
        t0 = time.perf_counter()
        messages = replies = 0
        for x, y in data[warmup:]:
            report = step(x, y)
            messages += report.messages
            replies += report.replies
        wall = time.perf_counter() - t0
        after = {who: thread_cpu(pid) for who, pid in pids.items()}
        names = _python_names()
        rows = []
        for who, threads in after.items():
            for tid, (kname, sec) in threads.items():
                spent = sec - before[who].get(tid, (kname, 0.0))[1]
                if spent <= 0:
                    continue
                label = names.get(tid, kname) if who == "caller" else kname
                rows.append((who, label, 1000.0 * spent / steps))
        return {"wall_ms": 1000.0 * wall / steps, "rows": rows, "messages": messages / steps,
                "replies": replies / steps}
    finally:
        ag.shutdown()


def render(backend: str, result: dict) -> str:
    """A markdown table: CPU ms per step by process and thread, busiest first, with totals."""
    by_process: dict[str, float] = {}
    for who, _, ms in result["rows"]:
        by_process[who] = by_process.get(who, 0.0) + ms
    total = sum(by_process.values())
    lines = [f"backend {backend}: {result['wall_ms']:.2f} ms per step (wall); CPU {total:.2f} ms per step in all; "
             f"{result['messages']:.0f} caller messages and {result['replies']:.0f} replies per step", "",
             "| process | thread | CPU ms / step |", "| --- | --- | ---: |"]
    for who, label, ms in sorted(result["rows"], key=lambda r: -r[2]):
        if ms >= 0.05:
            lines.append(f"| {who} | {label} | {ms:.2f} |")
    for who, ms in sorted(by_process.items(), key=lambda r: -r[1]):
        lines.append(f"| {who} | (all threads) | {ms:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the breakdown on the backends asked for and print one table each."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["local", "ray"], action="append")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="a quick run (for tests): 40 steps, local unless --backend")
    p.add_argument("--out", help="also write the tables to this file")
    args = p.parse_args(argv)
    if not os.path.isdir("/proc/self/task"):
        print("bench.breakdown reads /proc: Linux only", file=sys.stderr)
        return 2
    if args.tiny:
        args.steps, args.warmup = 40, 3  # enough for /proc's 10 ms ticks
    backends = args.backend or (["local"] if args.tiny else ["local", "ray"])
    tables = [render(backend, run(backend, args.steps, args.warmup)) for backend in backends]
    text = "\n\n".join(tables) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
