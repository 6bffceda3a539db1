"""What an operation on Nodes costs: fused into its consumer, materialized, or a worker of its own.

Three ways to put ``y = 2 * h(x) + 1`` between two workers ``h`` and ``g``, and a loss scaled by
``1/K``, timed per step (median) on one backend:

- ``none``: ``g(h(x))``, no operation (the floor);
- ``fused``: ``g(2 * h(x) + 1)``: the operation runs in ``g``'s worker before its module;
- ``worker``: ``g(affine(h(x)))`` with the operation in a parameterless worker of its own (what
  the port needed before operations on Nodes existed);
- ``materialized``: ``(mse(g(h(x)), t) / K).backward()`` against ``mse(...).backward()``: the scaled
  loss is computed by a call with no module in ``mse``'s worker.

Usage: ``python -m bench.node_ops --backend local`` (or ``ray``); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import actorgrad as ag


class Affine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x + 1


def timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    """Median wall ms per step, and this process's CPU ms per step (every thread: on backend="local"
    the workers' too, and steadier than wall time on a shared machine)."""
    times = []
    for i in range(steps + warmup):
        if i == warmup:
            cpu0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        ag.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, (time.process_time() - cpu0) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", default="local")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    ag.init(backend=args.backend)
    torch.manual_seed(0)
    opt = ag.Optim(torch.optim.SGD, lr=1e-3)
    h = ag.spawn(nn.Linear(args.d, args.d), name="h", optimizer=opt)
    g = ag.spawn(nn.Linear(args.d, args.d), name="g", optimizer=opt)
    affine = ag.spawn(Affine(), name="affine")
    mse = ag.spawn(nn.MSELoss(), name="mse")
    x, t = torch.randn(32, args.d), torch.randn(32, args.d)
    runs = {
        "none": lambda: mse(g(h(x)), t).backward(),
        "fused": lambda: mse(g(2 * h(x) + 1), t).backward(),
        "worker": lambda: mse(g(affine(h(x))), t).backward(),
        "materialized": lambda: (mse(g(h(x)), t) / 4).backward(),
    }
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(3):  # interleaved rounds: the machine's noise falls on every row alike
        for name, fn in runs.items():
            rows.setdefault(name, []).append(timed(fn, args.steps // 3, 10))
    wall = {k: statistics.median(w for w, _ in v) for k, v in rows.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in rows.items()}
    print(f"| {args.backend}, d={args.d} | wall ms/step | vs none | caller-process CPU ms/step | vs none |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in rows:
        print(f"| {name} | {wall[name]:.2f} | {wall[name] / wall['none']:.2f}x | {cpu[name]:.2f} | "
              f"{cpu[name] / cpu['none']:.2f}x |")
    ag.shutdown()


if __name__ == "__main__":
    main()
