"""Peer baselines for the actorgrad benchmark: plain PyTorch and torch.distributed.rpc.

The benchmark model is a chain of S stages, each ``Linear(d, d)`` followed by ``tanh``,
trained with an MSE loss and plain SGD. Every peer starts from the parameters given by
:func:`make_params` and sees the batches given by :func:`make_data`, so the final
parameters of different peers can be compared.

Try it standalone with ``python -m bench.peers``.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

# Loopback only: TensorPipe and Gloo must not probe other interfaces.
_LOOPBACK_ENV = {
    "MASTER_ADDR": "127.0.0.1",
    "TP_SOCKET_IFNAME": "lo",
    "GLOO_SOCKET_IFNAME": "lo",
}
_RPC_TIMEOUT_S = 120.0
_RPC_WORKER_THREADS = 8
_MASTER_NAME = "master"


# --------------------------------------------------------------------------- model and data


def make_params(S: int, d: int, seed: int) -> list[StateDict]:
    """Initial state_dicts ({"weight", "bias"}) for the S Linear(d, d) stages."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d)  # nn.Linear's default init range for weight and bias
    params = []
    for _ in range(S):
        weight = (torch.rand(d, d, generator=gen) * 2.0 - 1.0) * bound
        bias = (torch.rand(d, generator=gen) * 2.0 - 1.0) * bound
        params.append({"weight": weight, "bias": bias})
    return params


def make_data(steps: int, batch: int, d: int, seed: int) -> list[Batch]:
    """(x, y) for every step."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(steps):
        x = torch.randn(batch, d, generator=gen)
        y = torch.rand(batch, d, generator=gen) * 2.0 - 1.0  # inside tanh's range
        data.append((x, y))
    return data


class _Stage(nn.Module):
    """One stage: Linear(d, d) then tanh; accepts a tensor or an RRef to one."""

    def __init__(self, state: StateDict) -> None:
        """Build the Linear layer from a state_dict."""
        super().__init__()
        d_out, d_in = state["weight"].shape
        self.linear = nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.linear.weight.copy_(state["weight"])
            self.linear.bias.copy_(state["bias"])

    def forward(self, x: Any) -> torch.Tensor:
        """tanh(linear(x)), fetching x first when it is an RRef."""
        if not isinstance(x, torch.Tensor):
            x = x.to_here()
        return torch.tanh(self.linear(x))

    def state(self) -> StateDict:
        """A detached copy of the Linear layer's state_dict."""
        return {k: v.detach().clone() for k, v in self.linear.state_dict().items()}


# --------------------------------------------------------------------------- plain PyTorch


def run_plain(
    params: Sequence[StateDict], data: Sequence[Batch], lr: float, threads: int | None
) -> tuple[list[float], list[StateDict]]:
    """Plain PyTorch in this process (torch.set_num_threads(threads) when given, restored after): per-step wall times (s) and final state_dicts."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        stages = [_Stage(p) for p in params]
        model = nn.Sequential(*stages)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        times = []
        for x, y in data:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return times, [s.state() for s in stages]
    finally:
        torch.set_num_threads(old_threads)


# --------------------------------------------------------------------------- torch.distributed.rpc


def _free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage_name(i: int) -> str:
    """RPC name of the worker holding stage i."""
    return f"stage{i}"


def _rpc_init(
    name: str, rank: int, world_size: int, port: int, threads: int, transports: list[str] | None
) -> None:
    """Loopback-only environment, thread count and init_rpc for one process."""
    from torch.distributed import rpc

    for k, v in _LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    opts = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=_RPC_WORKER_THREADS,
        init_method=f"tcp://127.0.0.1:{port}",
        rpc_timeout=_RPC_TIMEOUT_S,
        _transports=transports,
    )
    rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=opts)


def _rpc_worker(
    i: int, world_size: int, port: int, threads: int, transports: list[str] | None
) -> None:
    """Process body of stage worker i: serve RPCs until the graceful shutdown."""
    _rpc_init(_stage_name(i), i + 1, world_size, port, threads, transports)
    from torch.distributed import rpc

    rpc.shutdown()


def _stage_forward(stage_rref: Any, x: Any) -> torch.Tensor:
    """Run the stage owned by this worker on x (a tensor or an RRef to one)."""
    return stage_rref.local_value()(x)


def _stage_param_rrefs(stage_rref: Any) -> list[Any]:
    """RRefs to the parameters of the stage owned by this worker."""
    from torch.distributed import rpc

    return [rpc.RRef(p) for p in stage_rref.local_value().parameters()]


def _stage_state(stage_rref: Any) -> StateDict:
    """state_dict of the stage owned by this worker."""
    return stage_rref.local_value().state()


def _rpc_master(
    params: list[StateDict],
    data: list[Batch],
    lr: float,
    world_size: int,
    port: int,
    threads: int,
    transports: list[str] | None,
    out_path: str,
) -> None:
    """Process body of the master: build the pipeline, train, save (times, states) or the error to out_path."""
    from torch.distributed import autograd as dist_autograd
    from torch.distributed import rpc
    from torch.distributed.optim import DistributedOptimizer

    result: dict[str, Any]
    _rpc_init(_MASTER_NAME, 0, world_size, port, threads, transports)
    try:
        stages = [
            rpc.remote(_stage_name(i), _Stage, args=(p,)) for i, p in enumerate(params)
        ]
        param_rrefs = []
        for s in stages:
            param_rrefs.extend(rpc.rpc_sync(s.owner(), _stage_param_rrefs, args=(s,)))
        dist_opt = DistributedOptimizer(torch.optim.SGD, param_rrefs, lr=lr)
        times = []
        for x, y in data:
            t0 = time.perf_counter()
            with dist_autograd.context() as ctx:
                h: Any = x
                for s in stages[:-1]:  # activations travel worker to worker as RRefs
                    h = rpc.remote(s.owner(), _stage_forward, args=(s, h))
                last = stages[-1]
                out = rpc.rpc_sync(last.owner(), _stage_forward, args=(last, h))
                loss = F.mse_loss(out, y)
                dist_autograd.backward(ctx, [loss])
                dist_opt.step(ctx)
            times.append(time.perf_counter() - t0)
            del h, out, loss
        states = [rpc.rpc_sync(s.owner(), _stage_state, args=(s,)) for s in stages]
        del stages, param_rrefs, dist_opt
        result = {"times": times, "states": states}
    except BaseException:
        result = {"error": traceback.format_exc()}
    tmp = out_path + ".tmp"
    torch.save(result, tmp)
    os.replace(tmp, out_path)
    rpc.shutdown(graceful="error" not in result)


def _stop(procs: Sequence[multiprocessing.process.BaseProcess], grace_s: float) -> None:
    """Join the processes for up to grace_s, then terminate and finally kill the stragglers."""
    procs = [p for p in procs if p.pid is not None]  # skip the ones never started
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)


def run_rpc(
    params: Sequence[StateDict],
    data: Sequence[Batch],
    lr: float,
    threads_per_worker: int = 1,
    *,
    transports: Sequence[str] | None = None,
    timeout_s: float = 900.0,
) -> tuple[list[float], list[StateDict]]:
    """torch.distributed.rpc with distributed autograd and DistributedOptimizer, one process per stage."""
    # transports: TensorPipe's _transports (None: its default, which picks "shm" on one host;
    # ["uv"]: TCP on loopback only). timeout_s bounds the whole run; children are killed past it.
    # Spawned children re-import the caller's __main__: callers need the `if __name__ == "__main__":` guard.
    ctx = multiprocessing.get_context("spawn")
    S = len(params)
    world_size = S + 1
    port = _free_port()
    tp = None if transports is None else list(transports)
    params = [{k: v.detach().clone() for k, v in p.items()} for p in params]
    data = [(x.detach().clone(), y.detach().clone()) for x, y in data]
    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        out_path = os.path.join(tmp, "result.pt")
        master = ctx.Process(
            target=_rpc_master,
            args=(params, data, lr, world_size, port, threads_per_worker, tp, out_path),
            name="rpc-master",
            daemon=True,
        )
        workers = [
            ctx.Process(
                target=_rpc_worker,
                args=(i, world_size, port, threads_per_worker, tp),
                name=f"rpc-{_stage_name(i)}",
                daemon=True,
            )
            for i in range(S)
        ]
        procs = [master, *workers]
        logger.debug("run_rpc: %d processes, port %d", len(procs), port)
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout_s
            while not os.path.exists(out_path):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_rpc: no result after {timeout_s:.0f}s")
                dead = [p for p in procs if p.exitcode is not None]
                if dead and not os.path.exists(out_path):
                    codes = {p.name: p.exitcode for p in dead}
                    raise RuntimeError(f"run_rpc: process exited before the result: {codes}")
                master.join(0.05)
            result = torch.load(out_path, weights_only=True)
            if "error" in result:
                raise RuntimeError("run_rpc: master failed:\n" + result["error"])
            _stop(procs, grace_s=_RPC_TIMEOUT_S)
            codes = {p.name: p.exitcode for p in procs if p.exitcode != 0}
            if codes:
                logger.warning("run_rpc: unclean exit after the result: %s", codes)
            return result["times"], result["states"]
        finally:
            _stop(procs, grace_s=0.0)  # no-op after success; kills the children on any error


# --------------------------------------------------------------------------- standalone run


def params_match(a: Sequence[StateDict], b: Sequence[StateDict], atol: float = 1e-5) -> bool:
    """Whether two lists of state_dicts agree key by key within atol."""
    return len(a) == len(b) and all(
        pa.keys() == pb.keys() and all(torch.allclose(pa[k], pb[k], atol=atol) for k in pa)
        for pa, pb in zip(a, b)
    )


def max_abs_diff(a: Sequence[StateDict], b: Sequence[StateDict]) -> float:
    """Largest absolute difference between corresponding tensors."""
    return max(float((pa[k] - pb[k]).abs().max()) for pa, pb in zip(a, b) for k in pa)


def update_rel_diff(
    init: Sequence[StateDict], a: Sequence[StateDict], b: Sequence[StateDict]
) -> float:
    """Largest difference between the two runs' parameter updates (final - init), relative to the largest update."""
    num = max_abs_diff(a, b)
    den = max_abs_diff(a, init)
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def median_ms(times: Sequence[float], skip: int) -> float:
    """Median of times after the first skip warm-up steps, in milliseconds."""
    kept = list(times[skip:]) or list(times)
    return 1000.0 * statistics.median(kept)


def main() -> None:
    """Run plain (1 thread, default threads) and rpc (default and uv-only transports) at both sizes and log the results."""
    lr = 0.01
    S = 4
    sizes = [("small", 64, 32, 20, 3), ("large", 2048, 256, 5, 1)]
    default_threads = torch.get_num_threads()
    for label, d, batch, steps, skip in sizes:
        params = make_params(S, d, seed=0)
        data = make_data(steps, batch, d, seed=1)
        t_p1, s_p1 = run_plain(params, data, lr, threads=1)
        t_pd, s_pd = run_plain(params, data, lr, threads=None)
        t_r, s_r = run_rpc(params, data, lr, threads_per_worker=1)
        t_u, s_u = run_rpc(params, data, lr, threads_per_worker=1, transports=["uv"])
        logger.info(
            "%s (S=%d d=%d batch=%d steps=%d, median after %d warm-up): "
            "plain 1 thread %.2f ms | plain %d threads %.2f ms | rpc %.2f ms | rpc uv-only %.2f ms "
            "(1-min load average %.1f)",
            label, S, d, batch, steps, skip,
            median_ms(t_p1, skip), default_threads, median_ms(t_pd, skip),
            median_ms(t_r, skip), median_ms(t_u, skip), os.getloadavg()[0],
        )
        logger.info(
            "%s: params plain(1)==plain(default) %s; plain==rpc %s (max |diff| %.3g, "
            "%.3g of the largest update %.3g)",
            label,
            params_match(s_p1, s_pd),
            params_match(s_p1, s_r) and params_match(s_p1, s_u),
            max(max_abs_diff(s_p1, s_r), max_abs_diff(s_p1, s_u)),
            max(update_rel_diff(params, s_p1, s_r), update_rel_diff(params, s_p1, s_u)),
            max_abs_diff(s_p1, params),
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from bench import peers  # run the importable module so spawned children can find its functions

    peers.main()
