"""`make bench`: actorgrad against plain PyTorch and torch.distributed.rpc, same data, same run.

Model: a chain of S stages (Linear(d, d) + tanh) and an MSE loss, SGD. Sizes:
small (d=64, batch 32: latency-bound) and large (d=2048, batch 256:
compute-bound), plus two independent passes on branches of a shared trunk, and
the MNIST-1D MLP of examples/mnist1d_compare.py (bench/mnist1d.py): backprop
through workers, and decoupled greedy learning pipelined, each against the same
rule in plain PyTorch. Prints a table of median step times and ratios, and
writes it as Markdown. ``--tiny``: the small chain only, at a tiny size (tests).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import actorgrad as ag  # noqa: E402
from actorgrad.transport.startup import POOL_ENV  # noqa: E402
from bench import mnist1d  # noqa: E402
from bench.peers import make_data, make_params, run_plain, run_rpc  # noqa: E402

log = logging.getLogger("bench")

LR = 0.01
# The large model's MSE averages over batch * d elements: a larger rate makes its updates big
# enough (about 1e-3 per step) that the 1e-5 parameter check means something.
LR_BY_SIZE = {"small": 0.01, "large": 5.0}


class TanhLinear(torch.nn.Linear):
    """One stage: Linear(d, d) then tanh (state_dict keys: weight, bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


class SlowBranch(torch.nn.Linear):
    """A branch whose backward does real work: k extra matmuls of its input gradient."""

    def __init__(self, d: int, work: int) -> None:
        super().__init__(d, d)
        self.work = work

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        for _ in range(self.work):
            y = torch.tanh(y @ self.weight.t()) + y
        return y


def median_ms(times: list[float], skip: int) -> float:
    """Median of per-step times after the first ``skip`` warm-up steps, in ms."""
    return 1000.0 * statistics.median(times[skip:] if len(times) > skip else times)


def run_actorgrad(backend: str, params: list[dict], data: list, lr: float, staleness: int = 0, micro: int = 1,
                  threads: Optional[int] = None, skip: int = 1, **init: Any) -> tuple[list[float], list[dict]]:
    """The chain on actorgrad: per-step wall times and final state_dicts (``init``: more ag.init options)."""
    kwargs: dict[str, Any] = {"backend": backend, **init}
    if backend == "ray":
        kwargs["ignore_reinit_error"] = True
    ag.init(**kwargs)
    try:
        d = params[0]["weight"].shape[0]
        workers = []
        for i, sd in enumerate(params):
            mod = TanhLinear(d, d)
            mod.load_state_dict(sd)
            workers.append(ag.spawn(mod, name=f"stage{i}", optimizer=ag.Optim(torch.optim.SGD, lr=lr),
                                    max_staleness=staleness, num_cpus=threads))
        mse = ag.spawn(torch.nn.MSELoss(), name="mse", max_staleness=staleness)
        # Warm up at full size outside the timed steps (kernels, allocator, channels). The seed is
        # zero, so plain SGD leaves every parameter as it was and the runs stay comparable.
        def forward(x: torch.Tensor, y: torch.Tensor) -> list:
            losses = []
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                h = xm
                for w in workers:
                    h = w(h)
                losses.append(mse(h, ym))
            return losses

        warm = forward(*data[0])
        ag.backward(*warm, gradients=[torch.zeros(()) for _ in warm])
        ag.step()
        times = []
        handles = []
        t_mark = time.perf_counter()
        for i, (x, y) in enumerate(data):
            if i == skip:
                for h in handles:  # warm-up steps still in flight must not be billed to measured ones
                    h.wait()
                t_mark = time.perf_counter()
            t0 = time.perf_counter()
            ag.backward(*forward(x, y))  # one pass over all micro-batches of the step
            if staleness:
                handles.append(ag.step(wait=False))
            else:
                ag.step()
            times.append(time.perf_counter() - t0)
        if handles:
            for h in handles:
                h.wait()
            # Pipelined steps overlap, so one step's wall time means nothing: report the steady-state
            # throughput, from the first measured step until the pipeline has drained.
            steady = (time.perf_counter() - t_mark) / max(1, len(data) - skip)
            times = [steady] * len(data)
        return times, [w.state_dict() for w in workers]
    finally:
        ag.shutdown()


def run_two_branches(backend: str, d: int, batch: int, work: int, steps: int) -> tuple[list[float], list[float]]:
    """Trunk + two branches with heavy backward: step times with the passes overlapped and one after the
    other, alternating in one runtime (so that both see the same machine; a shared 2-core box drifts
    between runs by more than the difference measured)."""
    ag.init(backend=backend, ignore_reinit_error=True) if backend == "ray" else ag.init(backend=backend)
    try:
        torch.manual_seed(0)
        trunk = ag.spawn(TanhLinear(d, d), name="trunk", optimizer=ag.Optim(torch.optim.SGD, lr=LR))
        a = ag.spawn(SlowBranch(d, work), name="branch_a", optimizer=ag.Optim(torch.optim.SGD, lr=LR))
        b = ag.spawn(SlowBranch(d, work), name="branch_b", optimizer=ag.Optim(torch.optim.SGD, lr=LR))
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")
        x, y = torch.randn(batch, d), torch.randn(batch, d)
        mse(a(trunk(x)), y).value(), mse(b(trunk(x)), y).value()
        ag.step()
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(2 * steps):
            together = i % 4 in (0, 3)  # ABBA order: neither kind always runs first or after the other
            h = trunk(x)
            la, lb = mse(a(h), y), mse(b(h), y)
            la.value(), lb.value()  # forward done: time the backward passes only
            t0 = time.perf_counter()
            if together:
                la.backward()
                lb.backward()
            else:
                la.backward().wait()
                lb.backward().wait()
            ag.step()
            times[together].append(time.perf_counter() - t0)
        return times[True], times[False]
    finally:
        ag.shutdown()


def transport_floor(rounds: int) -> dict[str, float]:
    """One no-op Ray actor round trip, one actor-to-actor hop, one actorgrad request round trip (ms)."""
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        def noop(self) -> None:
            return None

        def hop(self, other: Any, n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                ray.get(other.noop.remote())
            return (time.perf_counter() - t0) / n

    ag.init(backend="ray", ignore_reinit_error=True)
    try:
        e1, e2 = Echo.remote(), Echo.remote()
        ray.get([e1.noop.remote(), e2.noop.remote()])
        t0 = time.perf_counter()
        for _ in range(rounds):
            ray.get(e1.noop.remote())
        rt = (time.perf_counter() - t0) / rounds
        hop = ray.get(e1.hop.remote(e2, rounds))
        w = ag.spawn(torch.nn.Identity(), name="echo")
        w.stats()
        t0 = time.perf_counter()
        for _ in range(rounds):
            w.stats()
        agrt = (time.perf_counter() - t0) / rounds
        ray.kill(e1)
        ray.kill(e2)
    finally:
        ag.shutdown()
    return {"ray_round_trip_ms": 1000 * rt, "ray_actor_hop_ms": 1000 * hop, "actorgrad_request_ms": 1000 * agrt}


def max_diff(a: list[dict], b: list[dict]) -> float:
    """Largest absolute difference between two lists of state_dicts."""
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in x)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark and print and write the table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true", help="a quick end-to-end run with tiny sizes (for tests)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md"))
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--skip-rpc", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    S = args.stages
    if args.tiny:
        sizes = {"small": (8, 4, 4, 1)}
        branch = (16, 8, 2, 2)
        rounds, micros = 20, (2,)
        mlp = (16, 2, 8, 4, 1)
    else:
        sizes = {"small": (64, 32, 40, 5), "large": (2048, 256, 10, 2)}  # d, batch, steps, warm-up
        branch = (1024, 256, 6, 10)  # d, batch, work, steps of each kind
        rounds, micros = 300, (1, 2, 4)
        mlp = (256, 3, 100, 60, 10)  # the example's hidden width, depth and batch; steps, warm-up
    if args.tiny:
        # The smoke run of the tests times nothing that start-up would change: its runtimes take each
        # other's worker processes (README "Backends"). Measured runs start their own, as users do.
        os.environ.setdefault(POOL_ENV, "1")
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="ERROR", include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    rows: list[tuple[str, str, float, str]] = []
    checks: list[str] = []
    ratios: dict[str, float] = {}
    for size, (d, batch, steps, skip) in sizes.items():
        params = make_params(S, d, seed=0)
        data = make_data(steps, batch, d, seed=1)
        lr = LR_BY_SIZE[size]
        res: dict[str, tuple[list[float], Optional[list[dict]]]] = {}
        res["plain, 1 thread"] = run_plain(params, data, lr, threads=1)
        res["plain, default threads"] = run_plain(params, data, lr, threads=None)
        if not args.skip_rpc:
            res["torch.distributed.rpc"] = run_rpc(params, data, lr, threads_per_worker=1)
        res["actorgrad local"] = run_actorgrad("local", params, data, lr, skip=skip)
        res["actorgrad ray, synchronous"] = run_actorgrad("ray", params, data, lr, skip=skip)
        for m in micros:
            res[f"actorgrad ray, pipelined (k=1, {m} micro-batch{'es' if m > 1 else ''})"] = run_actorgrad(
                "ray", params, data, lr, staleness=1, micro=m, skip=skip)
        base = median_ms(res["plain, 1 thread"][0], skip)
        for name, (times, _) in res.items():
            med = median_ms(times, skip)
            rows.append((size, name, med, f"{med / base:.2f}x"))
        ref = res["plain, 1 thread"][1]
        moved = max_diff(ref, params)
        checks.append(f"{size}: largest parameter change over the run (plain): {moved:.2e}")
        for name in ("plain, default threads", "torch.distributed.rpc", "actorgrad local", "actorgrad ray, synchronous"):
            if name in res:
                diff = max_diff(res[name][1], ref)
                checks.append(f"{size}: {name} vs plain: max |diff| = {diff:.2e} ({'OK' if diff <= 1e-5 else 'MISMATCH'})")
        sync = median_ms(res["actorgrad ray, synchronous"][0], skip)
        ratios[f"{size}: local / plain 1 thread"] = median_ms(res["actorgrad local"][0], skip) / base
        ratios[f"{size}: ray sync / plain 1 thread"] = sync / base
        if "torch.distributed.rpc" in res:
            ratios[f"{size}: ray sync / rpc"] = sync / median_ms(res["torch.distributed.rpc"][0], skip)
        for m in micros:
            pipe = median_ms(res[f"actorgrad ray, pipelined (k=1, {m} micro-batch{'es' if m > 1 else ''})"][0], skip)
            ratios[f"{size}: pipelined ({m} mb) throughput / sync throughput"] = sync / pipe
            ratios[f"{size}: pipelined ({m} mb) throughput / plain default-threads throughput"] = (
                median_ms(res["plain, default threads"][0], skip) / pipe)
    hidden, depth, batch, steps, skip = mlp
    setup = mnist1d.make_setup(hidden, depth, batch, steps)
    times, ref = mnist1d.plain_backprop(setup)
    base = median_ms(times, skip)
    rows.append(("mnist1d", "plain, backprop (1 process)", base, "1.00x"))
    for backend in ("local", "ray"):
        times, got = mnist1d.workers_backprop(backend, setup)
        med = median_ms(times, skip)
        rows.append(("mnist1d", f"actorgrad {backend}, backprop through workers", med, f"{med / base:.2f}x"))
        ratios[f"mnist1d: {backend} backprop / plain backprop"] = med / base
        diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        checks.append(f"mnist1d: actorgrad {backend}, backprop vs plain: max |diff| = {diff:.2e} "
                      f"({'OK' if diff <= 1e-5 else 'MISMATCH'})")
    greedy = median_ms(mnist1d.plain_greedy(setup), skip)
    rows.append(("mnist1d", "plain, decoupled greedy (1 process)", greedy, f"{greedy / base:.2f}x"))
    for backend in ("local", "ray"):
        med = median_ms(mnist1d.workers_greedy(backend, setup, pipelined=True), skip)
        rows.append(("mnist1d", f"actorgrad {backend}, decoupled greedy pipelined (k=1)", med, f"{med / base:.2f}x"))
        ratios[f"mnist1d: {backend} greedy pipelined / plain greedy"] = med / greedy
    d, batch, work, steps = branch
    both, one_by_one = run_two_branches("ray", d, batch, work, steps)
    together, apart = median_ms(both, 1), median_ms(one_by_one, 1)
    rows.append(("two branches", "ray, passes one after the other", apart, "1.00x"))
    rows.append(("two branches", "ray, passes together", together, f"{together / apart:.2f}x"))
    ratios["two branches: together / one after the other"] = together / apart
    floor = transport_floor(rounds)

    lines = ["| case | runner | median step (ms; pipelined: steady-state) | vs first row of case |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {c} | {n} | {t:.2f} | {r} |" for c, n, t, r in rows]
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines += ["", "| transport floor | ms |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in floor.items()]
    lines += ["", "Same final parameters:", ""] + [f"- {c}" for c in checks]
    header = (f"S={S} stages, SGD (lr {LR_BY_SIZE['small']} small, {LR_BY_SIZE['large']} large); "
              + "; ".join(f"{k} d={v[0]} batch {v[1]}" for k, v in sizes.items())
              + f"; mnist1d: MLP {mnist1d.FEATURES}-{'-'.join([str(mlp[0])] * mlp[1])}-{mnist1d.CLASSES}, "
              f"batch {mlp[2]}, Adam, random data of MNIST-1D's shape; pipelined: max_staleness=1, "
              f"{'/'.join(map(str, micros))} micro-batches per step; {os.cpu_count()} cores; "
              f"torch {torch.__version__}")
    text = header + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if not args.tiny or args.out:
        with open(args.out, "w") as f:
            f.write(text)
    ray.shutdown()
    return 1 if any("MISMATCH" in c for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
