"""`make bench-scale`: what dozens of small workers cost to start, to hold and to step.

For each N (8, 32, 64 by default) and each shape, a fresh runtime spawns N
``Linear(16, 16)`` workers (SGD) and an ``MSELoss`` worker:

- ``chain``: ``x -> w1 -> w2 -> ... -> wN -> mse``
- ``fan``:   ``x -> w_i`` for every i, ``torch.stack`` of the outputs summed into ``mse`` (a wide fan-out)

and reports, per run: the time ``ag.spawn`` of all took, the time until every
worker was ready (``ag.ready``), the first step, the steady step (median of the
next steps) and that per worker, and per worker process the CPU-seconds it used
from its start to after the first step and its unique memory (USS) and
proportional share (PSS), read from ``/proc`` of each worker's process. The
memory of every process of the run (Ray's own included: GCS, raylet, idle
workers) is summed as USS, PSS and RSS (RSS counts shared libraries once per
process, so it overstates).

``--breakdown`` runs the stages of a worker process's start-up one after the
other in a fresh interpreter and reports CPU-seconds and USS after each: the
interpreter and Ray, torch, actorgrad, the module, the optimizer, a step.

    python -m bench.scale --n 8 32 64 --out bench/scale.md
    python -m bench.scale --breakdown
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

log = logging.getLogger("bench.scale")

MB = 1024 * 1024
D = 16
BATCH = 8


def proc_stats(pid: int) -> Optional[dict[str, float]]:
    """CPU-seconds, USS, PSS and RSS (bytes) of one process from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        mem: dict[str, int] = {}
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    mem[parts[0][:-1]] = int(parts[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return {"cpu_s": cpu, "uss": mem.get("Private_Clean", 0) + mem.get("Private_Dirty", 0),
            "pss": mem.get("Pss", 0), "rss": mem.get("Rss", 0)}


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (an embedded Ray's GCS, raylet, workers, agents)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _model(shape: str, n: int) -> tuple[list[Any], Any]:
    import torch

    import actorgrad as ag

    opt = ag.Optim(torch.optim.SGD, lr=0.01)
    workers = [ag.spawn(torch.nn.Linear(D, D), name=f"w{i}", optimizer=opt) for i in range(n)]
    return workers, ag.spawn(torch.nn.MSELoss(), name="mse")


def _step(shape: str, workers: list[Any], mse: Any, x: Any, y: Any) -> None:
    import torch

    import actorgrad as ag

    if shape == "chain":
        h = x
        for w in workers:
            h = w(h)
        out = h
    else:
        # One operation over every output (fused into the loss's call); a chain of `+` would nest N deep.
        out = torch.stack([w(x) for w in workers]).sum(0)
    mse(out, y).backward()
    ag.step()


def run_one(shape: str, n: int, steps: int, backend: str, init_kwargs: dict[str, Any]) -> dict[str, Any]:
    """One fresh runtime: spawn, ready, first step, steady steps, and what every worker process costs."""
    import torch

    import actorgrad as ag

    rt = ag.init(backend=backend, **init_kwargs)
    try:
        t0 = time.perf_counter()
        workers, mse = _model(shape, n)
        t_spawn = time.perf_counter() - t0
        ready = getattr(ag, "ready", None)
        if ready is not None:
            ready()
        t_ready = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(BATCH, D, generator=gen), torch.randn(BATCH, D, generator=gen)
        t1 = time.perf_counter()
        _step(shape, workers, mse, x, y)
        t_first = time.perf_counter() - t0
        first_only = time.perf_counter() - t1
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            _step(shape, workers, mse, x, y)
            times.append(time.perf_counter() - t)
        steady = statistics.median(times) if times else float("nan")
        per: list[dict[str, float]] = []
        pids: set[int] = set()
        if backend == "ray":
            for w in workers + [mse]:
                ident = rt.transport.identity(w.name) or {}
                pid = ident.get("pid")
                if pid is not None and pid not in pids:
                    pids.add(pid)
                    st = proc_stats(pid)
                    if st is not None:
                        per.append(st)
        every = [s for s in (proc_stats(p) for p in descendants(os.getpid())) if s is not None]
        mem = workers[0].memory()
        return {
            "shape": shape, "n": n, "backend": backend, "options": init_kwargs,
            "spawn_s": t_spawn, "ready_s": t_ready, "first_step_s": t_first, "first_step_only_s": first_only,
            "steady_step_ms": steady * 1e3, "steady_per_worker_ms": steady * 1e3 / n,
            "worker_processes": len(per),
            "cpu_s_per_process": statistics.mean(p["cpu_s"] for p in per) if per else float("nan"),
            "uss_mb_per_process": statistics.mean(p["uss"] for p in per) / MB if per else float("nan"),
            "pss_mb_per_process": statistics.mean(p["pss"] for p in per) / MB if per else float("nan"),
            "cpu_s_per_worker": sum(p["cpu_s"] for p in per) / (n + 1) if per else float("nan"),
            "uss_mb_per_worker": sum(p["uss"] for p in per) / (n + 1) / MB if per else float("nan"),
            "all_processes": len(every),
            "all_uss_gb": sum(p["uss"] for p in every) / 1024 / MB,
            "all_pss_gb": sum(p["pss"] for p in every) / 1024 / MB,
            "all_rss_gb": sum(p["rss"] for p in every) / 1024 / MB,
            "all_cpu_s": sum(p["cpu_s"] for p in every),
            "worker_memory": {k: v for k, v in mem.items() if k.endswith("_bytes")},
        }
    finally:
        ag.shutdown()


BREAKDOWN = r"""
import os, resource, sys, time, pickle
def mem():
    d = {}
    for line in open('/proc/self/smaps_rollup'):
        p = line.split()
        if len(p) >= 2 and p[1].isdigit():
            d[p[0][:-1]] = int(p[1]) * 1024
    return d
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
rows = []
def mark(stage):
    d = mem()
    rows.append({"stage": stage, "cpu_s": cpu(), "uss": d.get("Private_Clean", 0) + d.get("Private_Dirty", 0),
                 "pss": d.get("Pss", 0), "rss": d.get("Rss", 0)})
mark("interpreter")
import ray, ray.actor
mark("ray")
import torch
mark("torch")
from actorgrad.transport import ray as agray
from actorgrad.core.worker import WorkerCore
mark("actorgrad")
import actorgrad as ag
from actorgrad import spawning
s = spawning.build(torch.nn.Linear(16, 16), "w0", optimizer=ag.Optim(torch.optim.SGD, lr=0.01), update="step",
                   max_staleness=0, num_cpus=None, num_gpus=None, resources=None, device=None, max_restarts=None,
                   defaults=spawning.Defaults(places_gpus=False, trace=False, check_finite=False, deadline=600.0,
                                              seed=0, max_restarts=0))
data = pickle.dumps(s.spec)
if LEAN:
    from actorgrad.transport.startup import worker_process_setup
    worker_process_setup()
mark("(spec built in the caller)")
spec = pickle.loads(data)
mark("module (unpickled)")
core = WorkerCore(spec)
mark("worker core + optimizer built")
m = spec.module
out = m(torch.randn(4, 16))
# As a worker's VJP: autograd.grad with the consumer's gradient, then the optimizer's step.
grads = torch.autograd.grad(out, list(m.parameters()), torch.ones_like(out))
for p, g in zip(m.parameters(), grads):
    p.grad = g
opt = core.updates.optimizer
opt.step(); opt.zero_grad()
mark("one step")
rows.append({"dynamo": "torch._dynamo" in sys.modules and type(sys.modules["torch._dynamo"]).__name__})
print("BREAKDOWN " + __import__("json").dumps(rows))
"""


def breakdown(lean: bool) -> list[dict[str, Any]]:
    """The stages of a worker process's start-up in a fresh interpreter: CPU-seconds and memory after each."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"LEAN = {lean!r}\n" + BREAKDOWN
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    for line in out.stdout.splitlines():
        if line.startswith("BREAKDOWN "):
            return json.loads(line[len("BREAKDOWN "):])
    raise RuntimeError(out.stderr[-3000:])


def _breakdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | CPU-s (stage) | CPU-s (total) | USS MB | PSS MB | RSS MB |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    prev = 0.0
    for r in rows:
        if "stage" not in r:
            lines.append(f"\ntorch._dynamo in the process: {r['dynamo']}")
            continue
        lines.append(f"| {r['stage']} | {r['cpu_s'] - prev:.2f} | {r['cpu_s']:.2f} | {r['uss'] / MB:.0f} | "
                     f"{r['pss'] / MB:.0f} | {r['rss'] / MB:.0f} |")
        prev = r["cpu_s"]
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    """The scale runs as a markdown table."""
    head = ("| shape | N | per process | spawn s | ready s | first step s | steady step ms | per worker ms | "
            "CPU-s / process | USS MB / process | PSS MB / process | CPU-s / worker | USS MB / worker | "
            "all processes: count, USS / PSS / RSS GiB |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        wpp = r["options"].get("workers_per_process", 1)
        lines.append(
            f"| {r['shape']} | {r['n']} | {wpp} | {r['spawn_s']:.1f} | {r['ready_s']:.1f} | {r['first_step_s']:.1f} | "
            f"{r['steady_step_ms']:.0f} | {r['steady_per_worker_ms']:.1f} | {r['cpu_s_per_process']:.2f} | "
            f"{r['uss_mb_per_process']:.0f} | {r['pss_mb_per_process']:.0f} | {r['cpu_s_per_worker']:.2f} | "
            f"{r['uss_mb_per_worker']:.0f} | {r['all_processes']}: {r['all_uss_gb']:.1f} / {r['all_pss_gb']:.1f} / "
            f"{r['all_rss_gb']:.1f} |")
    return "\n".join(lines)


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()
    except OSError:
        return "?"


def main(argv: Optional[list[str]] = None) -> None:
    """Run the scale benchmark (or the start-up breakdown) and print / write the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--shape", nargs="+", default=["chain", "fan"], choices=["chain", "fan"])
    p.add_argument("--steps", type=int, default=10, help="steady steps after the first (median reported)")
    p.add_argument("--backend", default="ray")
    p.add_argument("--workers-per-process", type=int, nargs="+", default=[1],
                   help="Ray: workers sharing one process (1: one Ray actor per worker, the default)")
    p.add_argument("--breakdown", action="store_true", help="only the per-stage start-up cost of one worker process")
    p.add_argument("--out", default=None, help="write the tables (markdown) here")
    p.add_argument("--json", default=None, help="write the raw rows here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parts = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
             f"load average before: {_load()}"]
    if args.breakdown:
        for lean in (False, True):
            rows = breakdown(lean)
            title = "with actorgrad's worker-process set-up" if lean else "plain (what a worker process paid before)"
            parts.append(f"### Start-up of one worker process, {title}\n\n" + _breakdown_table(rows))
    else:
        rows = []
        for wpp in args.workers_per_process:
            opts = {"workers_per_process": wpp} if wpp != 1 else {}
            for shape in args.shape:
                for n in args.n:
                    log.info("%s, N=%d, %d worker(s) per process: starting (load %s)", shape, n, wpp, _load())
                    r = run_one(shape, n, args.steps, args.backend, opts)
                    log.info("%s", json.dumps(r))
                    rows.append(r)
        parts.append(table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    parts.append(f"load average after: {_load()}")
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
