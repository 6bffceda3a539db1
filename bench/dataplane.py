"""`make bench-dataplane`: the tensor data plane (gloo) against the channel, same run, on Ray.

(a) The large chain of bench.py (S=4 stages Linear(2048, 2048) + tanh, batch 256, SGD): median step
time with every peer tensor over the channel (``data_plane="channel"``), over gloo (``"gloo"``) and
as ``"auto"`` chooses, against plain PyTorch in one process; final parameters must match.
(b) One worker-to-worker hop of a payload from 8 KiB to 64 MiB on each path: a source worker returns
a slice of a buffer it holds, a sink worker takes it and returns one element; the caller's messages
are tiny, so the difference between the paths is the hop. Writes a Markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import actorgrad as ag  # noqa: E402
from actorgrad.transport.startup import POOL_ENV  # noqa: E402
from bench.bench import LR_BY_SIZE, max_diff, median_ms, run_actorgrad  # noqa: E402
from bench.peers import make_data, make_params, run_plain  # noqa: E402

SIZES = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 1 << 20, 2 << 20, 8 << 20, 32 << 20, 64 << 20]
PATHS = ("channel", "gloo")


class Source(torch.nn.Module):
    """Holds a payload; returns its first ``n`` bytes (as float32) for a tiny input."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.register_buffer("payload", torch.randn(nbytes // 4))

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return self.payload[: n // 4]


class Sink(torch.nn.Module):
    """Takes the payload; returns one element of it."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:1].clone()


def hop_times(path: str, sizes: list[int], repeats: int) -> dict[int, float]:
    """Median ms of caller -> source -> (payload hop) -> sink -> caller, per payload size."""
    os.environ["ACTORGRAD_DATA_PLANE_MIN_BYTES"] = "1"  # forced gloo: every size takes it
    ag.init(backend="ray", ignore_reinit_error=True, data_plane=path)
    try:
        src = ag.spawn(Source(max(sizes)), name="source")
        sink = ag.spawn(Sink(), name="sink")
        x = torch.zeros(1)
        out = {}
        with ag.no_grad():
            for n in [sizes[0], sizes[0]] + sizes:  # the first calls open channels and groups
                sink(src(x, n)).value()
            for n in sizes:
                reps = repeats if n <= (2 << 20) else max(3, repeats // 4)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    sink(src(x, n)).value()
                    times.append(time.perf_counter() - t0)
                    ag.step()
                out[n] = 1000.0 * statistics.median(times)
        return out
    finally:
        ag.shutdown()
        os.environ.pop("ACTORGRAD_DATA_PLANE_MIN_BYTES", None)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main(argv: Optional[list[str]] = None) -> int:
    """Run both parts and print and write the tables."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "dataplane.md"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip-chain", action="store_true")
    p.add_argument("--tiny", action="store_true", help="small sizes, a few repeats (tests)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tiny:
        # The smoke run of the tests times nothing that start-up would change: its runtimes take each
        # other's worker processes (README "Backends"). Measured runs start their own, as users do.
        os.environ.setdefault(POOL_ENV, "1")
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="ERROR", include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    lines = []
    status = 0
    if not args.skip_chain:
        S, (d, batch, steps, skip) = 4, ((64, 32, 4, 1) if args.tiny else (2048, 256, args.steps, 2))
        params, data = make_params(S, d, seed=0), make_data(steps, batch, d, seed=1)
        lr = LR_BY_SIZE["large"]
        times, ref = run_plain(params, data, lr, threads=1)
        base = median_ms(times, skip)
        lines += [f"(a) chain: S={S} stages Linear({d}, {d}) + tanh, batch {batch}, SGD lr {lr}, "
                  f"{steps} steps (median after {skip}); activations {_size(batch * d * 4)} per hop", "",
                  "| runner | median step (ms) | vs plain | max abs diff vs plain |", "| --- | ---: | ---: | ---: |",
                  f"| plain, 1 thread | {base:.1f} | 1.00x | - |"]
        for path in ("channel", "gloo", "auto"):
            t, got = run_actorgrad("ray", params, data, lr, skip=skip, data_plane=path)
            med, diff = median_ms(t, skip), max_diff(got, ref)
            status |= diff > 1e-5
            lines.append(f"| actorgrad ray, data_plane={path!r} | {med:.1f} | {med / base:.2f}x | {diff:.1e} |")
        lines.append("")
    sizes = SIZES[:3] if args.tiny else SIZES
    repeats = 3 if args.tiny else args.repeats
    hops = {path: hop_times(path, sizes, repeats) for path in PATHS}
    lines += ["(b) one worker-to-worker hop (caller -> source -> payload -> sink -> caller), median ms", "",
              "| payload | channel | gloo | gloo / channel | faster |", "| ---: | ---: | ---: | ---: | --- |"]
    for n in sizes:
        c, g = hops["channel"][n], hops["gloo"][n]
        lines.append(f"| {_size(n)} | {c:.2f} | {g:.2f} | {g / c:.2f} | {'gloo' if g < c else 'channel'} |")
    header = f"{os.cpu_count()} cores; torch {torch.__version__}; one node; Ray"
    text = header + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    ray.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
