"""`make gpu-check`: GPU workers, trained exactly against single-process PyTorch on the GPU, and timed.

A chain of 4 stages Linear(4096, 4096) + tanh (each a worker with ``device="cuda"``) and an MSE loss,
SGD. Runs plain PyTorch on one GPU, then actorgrad with the host-copy path (``data_plane="channel"``:
GPU -> host -> socket -> host -> GPU) and with NCCL (``data_plane="nccl"``); checks every parameter
against plain PyTorch and prints median step times. Exits 0 and says why when there is no CUDA device;
NCCL needs one GPU per stage (two ranks of NCCL cannot share a GPU), so with fewer than 4 GPUs its row
is skipped with the reason.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import actorgrad as ag  # noqa: E402

S = 4


class TanhLinear(torch.nn.Linear):
    """One stage: Linear(d, d) then tanh."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


def make(d: int, batch: int, steps: int) -> tuple[list[TanhLinear], list]:
    torch.manual_seed(0)
    mods = [TanhLinear(d, d) for _ in range(S)]
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, d, generator=gen), torch.rand(batch, d, generator=gen) * 2 - 1) for _ in range(steps)]
    return mods, data


def run_plain(mods: list, data: list, lr: float) -> tuple[list[float], list[dict]]:
    """One process, one GPU."""
    mods = [copy.deepcopy(m).cuda() for m in mods]
    opt = torch.optim.SGD([p for m in mods for p in m.parameters()], lr=lr)
    times = []
    for x, y in data:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = x.cuda()
        for m in mods:
            h = m(h)
        torch.nn.functional.mse_loss(h, y.cuda()).backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, [{k: v.cpu() for k, v in m.state_dict().items()} for m in mods]


def run_workers(mods: list, data: list, lr: float, path: str) -> tuple[list[float], list[dict], int]:
    """Each stage a GPU worker; returns step times, final parameters, and transfers the data plane made."""
    import ray

    ag.init(backend="ray", ignore_reinit_error=True, data_plane=path, timeout=300)
    try:
        gpus = 1.0 if torch.cuda.device_count() >= S else 1.0 / S
        ws = [ag.spawn(copy.deepcopy(m), name=f"stage{i}", device="cuda", num_gpus=gpus,
                       optimizer=ag.Optim(torch.optim.SGD, lr=lr)) for i, m in enumerate(mods)]
        mse = ag.spawn(torch.nn.MSELoss(), name="mse", device="cuda", num_gpus=gpus)
        times = []
        for x, y in data:
            t0 = time.perf_counter()
            h = x
            for w in ws:
                h = w(h)
            mse(h, y).backward()
            ag.step()
            times.append(time.perf_counter() - t0)

        def sent(host):
            return host._dataplane.sent if host._dataplane is not None else 0

        moved = sum(ray.get(w.actor.__ray_call__.remote(sent)) for w in ws)
        return times, [w.state_dict() for w in ws], moved
    finally:
        ag.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    """Run the check; 0 when it passed or was skipped, 1 on a mismatch."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check skipped: no CUDA device here (CPU-only machine or CPU build of torch)")
        return 0
    import ray

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ray.init(logging_level="ERROR", include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                                       "NVIDIA_TF32_OVERRIDE": "0"}})
    lr = 1.0
    mods, data = make(args.d, args.batch, args.steps)
    med = lambda ts: 1000.0 * statistics.median(ts[args.skip:])  # noqa: E731
    times, ref = run_plain(mods, data, lr)
    base = med(times)
    rows = [("plain PyTorch, one process, one GPU", base, "-", "-")]
    status = 0
    paths = ["channel"] + (["nccl"] if torch.cuda.device_count() >= S else [])
    for path in paths:
        t, got, moved = run_workers(mods, data, lr, path)
        diff = max(float((g[k] - r[k]).abs().max()) for g, r in zip(got, ref) for k in r)
        ok = diff <= 1e-5
        status |= not ok
        rows.append((f"actorgrad, data_plane={path!r} ({moved} NCCL transfers)", med(t), f"{diff:.1e}",
                     "OK" if ok else "MISMATCH"))
    print(f"{S} stages Linear({args.d}, {args.d}) + tanh, batch {args.batch}, SGD; {torch.cuda.device_count()} x "
          f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}\n")
    print("| runner | median step (ms) | vs plain | max abs diff | check |\n| --- | ---: | ---: | ---: | --- |")
    for name, ms, diff, ok in rows:
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {diff} | {ok} |")
    if "nccl" not in paths:
        print(f"\nNCCL row skipped: {torch.cuda.device_count()} GPU(s); NCCL point-to-point needs each stage on a "
              f"GPU of its own ({S})")
    ray.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
