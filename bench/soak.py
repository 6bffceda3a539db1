"""`make soak`: thousands of small steps; every worker's memory must stay flat.

A small model of six workers that between them use every kind of per-step
state a worker keeps:

- ``enc``    Linear, SGD with momentum, ``update="pass"`` (updates once per pass: stashed weights)
- ``act``    Tanh, no parameters, called three times per step
- ``cell``   Linear, Adam, ``max_staleness=1`` (weight snapshots), called twice per step (recurrence)
- ``head_a`` Linear, SGD with momentum, called twice per step (two losses)
- ``head_b`` Linear, Adam
- ``mse``    MSELoss, called three times per step

Each step runs two or three backward passes at once (the third loss is left
without a backward on odd steps: outputs no pass needs), fetches a loss now
and then while the passes are in flight, keeps an activation past its step's
close and fetches it from the closed step now and then, runs an
``ag.no_grad()`` evaluation now and then, and alternates blocks of
synchronous steps with blocks pipelined by ``ag.step(wait=False)``.

After a warm-up (allocators, optimizer state and caches grow at first) it
samples every worker's ``memory()`` (its process's RSS and live tensor count,
and what the worker holds) right after a synchronous step, and reports per
worker RSS and live tensors before and after, the RSS slope over the second
half of the run, and what every worker held at each sample (nothing of a
closed step may remain).

    python -m bench.soak --steps 20000 --backend ray --out bench/soak.md
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import actorgrad as ag  # noqa: E402
from actorgrad.core.worker import process_memory  # noqa: E402

log = logging.getLogger("bench.soak")

D_IN = 16
PIPE_BLOCK = 50  # steps per block; odd blocks are pipelined
EVERY_FETCH = 10  # a loss value fetched while its passes are in flight
EVERY_KEEP = 50  # an activation kept past its step's close, fetched afterwards
EVERY_EVAL = 50  # an ag.no_grad() evaluation
# What must be back to zero in every worker once every step has closed.
ZERO_KEYS = ("calls", "saved", "passes", "open_steps", "queued_forwards", "early_messages", "pending_grads",
             "stashed_versions")
HELD_KEYS = ZERO_KEYS + ("snapshots", "retained")
MB = 1024 * 1024


def build(hidden: int) -> dict[str, ag.Worker]:
    """Spawn the soak model's six workers (see the module docstring)."""
    sgd = ag.Optim(torch.optim.SGD, lr=0.01, momentum=0.9)
    adam = ag.Optim(torch.optim.Adam, lr=1e-3)
    return {
        "enc": ag.spawn(torch.nn.Linear(D_IN, hidden), name="enc", optimizer=sgd, update="pass"),
        "act": ag.spawn(torch.nn.Tanh(), name="act"),
        "cell": ag.spawn(torch.nn.Linear(hidden, hidden), name="cell", optimizer=adam, max_staleness=1),
        "head_a": ag.spawn(torch.nn.Linear(hidden, 1), name="head_a", optimizer=sgd),
        "head_b": ag.spawn(torch.nn.Linear(hidden, 1), name="head_b", optimizer=adam),
        "mse": ag.spawn(torch.nn.MSELoss(), name="mse"),
    }


def _data(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, D_IN, generator=gen)
    s = x[:, : D_IN // 2].sum(1, keepdim=True)
    return x, torch.sin(s), torch.cos(s)


def _forward_backward(w: dict[str, ag.Worker], i: int, gen: torch.Generator, batch: int) -> tuple[int, Any]:
    """One step's forward and passes; returns (passes started, a node to keep past the close or None).

    The nodes are locals, so they are gone when this returns: at the close, the workers keep no
    value for them, except the one node handed back.
    """
    x, ya, yb = _data(gen, batch)
    h0 = w["act"](w["enc"](x))
    h1 = w["act"](w["cell"](h0))
    h2 = w["act"](w["cell"](h1))  # the same cell again: recurrence
    la = w["mse"](w["head_a"](h2), ya)
    lb = w["mse"](w["head_b"](h2), yb)
    lc = w["mse"](w["head_a"](h0), ya)  # a short path through the same head
    la.backward()
    lb.backward()
    passes = 2
    if i % 2 == 0:
        lc.backward()
        passes += 1
    # On odd steps lc gets no pass: its calls must block nothing and be freed at the close all the same.
    if i % EVERY_FETCH == 0:
        la.item()
    return passes, (h2 if i % EVERY_KEEP == EVERY_KEEP // 2 else None)


def _evaluate(w: dict[str, ag.Worker], gen: torch.Generator, batch: int) -> float:
    x, _, yb = _data(gen, batch)
    with ag.no_grad():
        h = w["act"](w["cell"](w["act"](w["enc"](x))))
        return w["mse"](w["head_b"](h), yb).item()


def _sample(w: dict[str, ag.Worker], step: int, backend: str) -> dict[str, Any]:
    # ag.step() returns once every worker is ready; each applies the update (and frees the step)
    # on the Commit that follows, and answers a request only after it. On Ray each memory() round
    # trip measures its own process after its own Commit. On backend="local" the workers share
    # one process: the stats() round trip to every worker comes first, so none is still freeing
    # when the one process-wide scan runs.
    held = {name: worker.stats() for name, worker in w.items()} if backend == "local" else None
    # Cyclic garbage is not live memory (the caller's request records are freed by the cycle
    # collector): collect it here, which on backend="local" covers the workers too. Ray workers
    # hold no tensors in cycles; their counts are exact without it.
    gc.collect()
    if held is not None:
        # One process: one RSS and one tensor count, the same for every worker; one scan is enough.
        proc = process_memory()
        return {"step": step, "workers": {name: {**st, **proc} for name, st in held.items()}, "caller": proc}
    workers = {name: worker.memory() for name, worker in w.items()}
    return {"step": step, "workers": workers, "caller": process_memory()}


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, value) points, per step (0 for fewer than two points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def summarize(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per worker (and the caller): RSS and live tensors before/after, second-half slopes, held state."""
    names = list(samples[0]["workers"]) + ["caller"]
    mid = samples[0]["step"] + (samples[-1]["step"] - samples[0]["step"]) / 2
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        series = [(s["step"], s["caller"] if name == "caller" else s["workers"][name]) for s in samples]
        rss = [(st, mem["rss_bytes"]) for st, mem in series]
        tensors = [(st, mem["live_tensors"]) for st, mem in series]
        second = [(st, v) for st, v in rss if st >= mid]
        row: dict[str, Any] = {
            "rss_before_mb": rss[0][1] / MB,
            "rss_after_mb": rss[-1][1] / MB,
            "rss_growth_mb": (rss[-1][1] - rss[0][1]) / MB,
            "rss_max_growth_mb": (max(v for _, v in rss) - rss[0][1]) / MB,
            "rss_slope_kb_per_1000": _slope(second) * 1000 / 1024,
            "tensors_before": tensors[0][1],
            "tensors_after": tensors[-1][1],
            "tensors_max": max(v for _, v in tensors),
            "tensors_min": min(v for _, v in tensors),
            "tensor_slope_per_1000": _slope(tensors) * 1000,
        }
        if name != "caller":
            row["held_max"] = {k: max(s["workers"][name].get(k, 0) for s in samples) for k in HELD_KEYS}
            row["final"] = {k: samples[-1]["workers"][name].get(k, 0) for k in HELD_KEYS + ("version",)}
        out[name] = row
    return out


def run(steps: int = 2000, backend: str = "local", *, samples: int = 20, warmup: float = 0.1, batch: int = 128,
        hidden: int = 32, seed: int = 0, timeout: Optional[float] = None) -> dict[str, Any]:
    """Run the soak; return the samples, per-worker summary and run figures.

    Uses the running actorgrad runtime if there is one (of this backend), else starts one and
    shuts it down at the end. Samples are taken after ``warmup`` of the steps, every
    ``(steps - warm-up) / samples`` steps, each right after a synchronous ``ag.step()``.
    """
    if steps < 20:
        raise ValueError(f"a soak needs at least 20 steps, got {steps}")
    started = not ag.is_initialized()
    # Idempotent on a running runtime of this backend; one of another backend is a ConfigError.
    ag.init(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        w = build(hidden)
        warm = max(1, int(steps * warmup))
        every = max(1, (steps - warm) // max(1, samples))
        sample_at = set(range(warm, steps + 1, every)) | {steps}
        # One sample half-way through the warm-up, thrown away: the first gc scan of the objects in
        # each worker's thread makes its allocator keep a few MB, once, which is no leak.
        prime_at = max(1, warm // 2)
        records: list[dict[str, Any]] = []
        passes = evals = pipelined = kept_fetches = 0
        t0 = time.perf_counter()
        t_warm = t0
        for i in range(1, steps + 1):
            n, kept = _forward_backward(w, i, gen, batch)
            passes += n
            if i % EVERY_EVAL == 0:
                _evaluate(w, gen, batch)
                evals += 1
            # Samples need every earlier step closed: their steps are synchronous.
            if (i // PIPE_BLOCK) % 2 == 1 and i not in sample_at and i != prime_at and i != steps:
                ag.step(wait=False)
                pipelined += 1
            else:
                ag.step()
            if kept is not None:
                kept.value()  # from the closed step: the worker kept it because the node was alive
                kept_fetches += 1
                del kept
            if i == prime_at and i not in sample_at:
                _sample(w, i, backend)
            if i in sample_at:
                if i == warm:
                    t_warm = time.perf_counter()
                records.append(_sample(w, i, backend))
                if len(records) == 1 or i == steps or len(records) % 5 == 0:
                    mems = {**records[-1]["workers"], "caller": records[-1]["caller"]}
                    log.info("step %d: RSS (MB) / live tensors: %s", i, ", ".join(
                        f"{k} {v['rss_bytes'] / MB:.1f}/{v['live_tensors']}" for k, v in mems.items()))
        t_end = time.perf_counter()
        seconds = t_end - t0
        result = {
            "backend": backend, "steps": steps, "warmup_steps": warm, "batch": batch, "hidden": hidden,
            "passes": passes, "pipelined_steps": pipelined, "evaluations": evals, "kept_fetches": kept_fetches,
            "seconds": seconds, "ms_per_step_after_warmup": 1000 * (t_end - t_warm) / max(1, steps - warm),
            "samples": records, "summary": summarize(records),
        }
        log.info("soak: %d steps (%d passes) on %s in %.1f s", steps, passes, backend, seconds)
        for name, row in result["summary"].items():
            log.info("  %-7s RSS %.1f -> %.1f MB (slope %+.1f KB/1000 steps), tensors %d -> %d%s", name,
                     row["rss_before_mb"], row["rss_after_mb"], row["rss_slope_kb_per_1000"], row["tensors_before"],
                     row["tensors_after"], f", holds {row['final']}" if "final" in row else "")
        return result
    finally:
        if started:
            ag.shutdown()


def leftovers(result: dict[str, Any]) -> list[str]:
    """Per-step state some worker still held at a sample, i.e. after every earlier step closed (empty: none)."""
    bad = []
    for s in result["samples"]:
        for name, mem in s["workers"].items():
            held = {k: mem[k] for k in ZERO_KEYS if mem.get(k)}
            if held:
                bad.append(f"{name} at step {s['step']}: {held}")
    return bad


def markdown(result: dict[str, Any]) -> str:
    """The result as Markdown: run figures, then one row per worker and the caller."""
    r = result
    shared = " (all workers and the caller share one process: one RSS, one tensor count)" \
        if r["backend"] == "local" else " (one process per worker; the caller is the driver process)"
    lines = [
        f"Soak: {r['steps']} steps on backend={r['backend']}{shared}; {r['passes']} backward passes "
        f"(2-3 concurrent per step), {r['pipelined_steps']} steps pipelined with `ag.step(wait=False)`, "
        f"{r['evaluations']} `ag.no_grad()` evaluations, {r['kept_fetches']} values fetched from closed steps; "
        f"batch {r['batch']}, hidden {r['hidden']}; warm-up {r['warmup_steps']} steps; {len(r['samples'])} samples; "
        f"{r['seconds']:.0f} s ({r['ms_per_step_after_warmup']:.1f} ms/step after warm-up); "
        f"{os.cpu_count()} cores; torch {torch.__version__}; Python {platform.python_version()}",
        "",
        "Before = first sample after warm-up; after = after the last step. Slope: least squares over the "
        "samples of the second half. Held at end: calls / saved graphs / passes / open steps / queued "
        "forwards / early messages / pending gradients / stashed weight versions / snapshots / retained values.",
        "",
        "| worker | RSS before (MB) | RSS after (MB) | growth (MB) | RSS slope, 2nd half (KB/1000 steps) "
        "| live tensors before | after | max | held at end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, row in r["summary"].items():
        if "final" in row:
            f = row["final"]
            held = " / ".join(str(f[k]) for k in HELD_KEYS)
        else:
            held = "(caller)"
        lines.append(
            f"| {name} | {row['rss_before_mb']:.1f} | {row['rss_after_mb']:.1f} | {row['rss_growth_mb']:+.2f} "
            f"| {row['rss_slope_kb_per_1000']:+.1f} | {row['tensors_before']} | {row['tensors_after']} "
            f"| {row['tensors_max']} | {held} |")
    # RSS along the run, at up to 9 evenly spaced samples: where growth happened, if it did.
    samples = r["samples"]
    picks = sorted({round(k * (len(samples) - 1) / 8) for k in range(9)})
    names = list(r["summary"])
    lines += ["", "RSS (MB) along the run:", "",
              "| step | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
    for k in picks:
        s = samples[k]
        mems = [s["caller"] if n == "caller" else s["workers"][n] for n in names]
        lines.append(f"| {s['step']} | " + " | ".join(f"{m['rss_bytes'] / MB:.1f}" for m in mems) + " |")
    bad = leftovers(r)
    lines += ["", f"At each of the {len(samples)} samples (each right after a synchronous step, so after every "
              "earlier step closed) and after the last step, every worker held no calls, saved graphs, passes, "
              "open steps, queued forwards, early messages, pending gradients or stashed weights."
              if not bad else "LEFTOVERS: " + "; ".join(bad)]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """Run the soak; write the Markdown table; exit 1 if some worker still holds per-step state."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--backend", choices=("ray", "local"), default="ray")
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak.md"))
    p.add_argument("--json", default=None, help="also write the result, every sample included, as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.steps, args.backend, samples=args.samples, batch=args.batch, hidden=args.hidden)
    text = markdown(result)
    with open(args.out, "w") as f:
        f.write(text)
    log.info("wrote %s", args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if leftovers(result) else 0


if __name__ == "__main__":
    sys.exit(main())
