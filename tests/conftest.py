"""Shared fixtures: every end-to-end test runs once per backend.

Ray is started once per session (tests start it themselves; CI has none
running) and every test gets a fresh actorgrad runtime on it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

import actorgrad as ag
from actorgrad.transport.startup import POOL_ENV

BACKENDS = ["local", "ray"]


def ray_init_args() -> dict:
    """How the tests start Ray: two CPUs, and workers that can import the test modules."""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here, os.path.dirname(here)] + [p for p in sys.path if p and os.path.isdir(p)]
    return {
        "address": "local",  # our own instance, even if a `ray start` cluster runs on this machine
        "num_cpus": 2,
        "logging_level": "ERROR",
        "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}},
    }


def free_port() -> int:
    """A TCP port that nothing listens on now (for a test cluster's dashboard)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench_module(module: str, out: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m <module> --tiny --out <out> [extra...]` from the repository root and assert it succeeds.

    The repository root is put on PYTHONPATH so `bench` imports. On a non-zero exit the
    assertion shows the command, the exit status and the tail of stdout and stderr; a run
    past `timeout` seconds fails with the output it had produced so far.
    """
    cmd = [sys.executable, "-m", module, "--tiny", "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        def text(b: Optional[bytes | str]) -> str:
            return (b.decode(errors="replace") if isinstance(b, bytes) else b or "")[-3000:]

        raise AssertionError(f"{' '.join(cmd)} ran past {timeout:g}s\n--- stdout ---\n{text(e.stdout)}"
                             f"\n--- stderr ---\n{text(e.stderr)}") from None
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return proc


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie no longer runs
    except FileNotFoundError:
        return True


def worker_pid(actor, timeout: float = 60.0) -> int:
    """The process id of a Ray worker."""
    import ray

    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=timeout)


def wait_process_gone(pid: int, timeout: float = 60.0) -> None:
    """Return once the process has exited (a zombie counts as exited)."""
    deadline = time.monotonic() + timeout
    while not _process_gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still runs after {timeout:g}s")
        time.sleep(0.005)


def kill_worker(actor, no_restart: bool = True, timeout: float = 60.0) -> None:
    """Kill a worker's process with ray.kill and return once the process has really exited.

    Ray reports the actor dead (ActorDiedError) about 30 ms before its process exits, and
    workers talk over their own sockets, so a step started in that window can still
    complete on the dying process: waiting on Ray's view alone made kill tests flaky.
    """
    import ray

    pid = worker_pid(actor, timeout)
    ray.kill(actor, no_restart=no_restart)
    wait_process_gone(pid, timeout)


def actor_nodes(names: list[str]) -> dict[str, str]:
    """Worker name -> node id, from Ray's state API (what `ray list actors` shows)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 30
    while True:
        found = {a.name: a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                 if a.name in names}
        if len(found) == len(names) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by the session; (re)started when a test module shut it down."""
    import ray

    def ensure():
        if not ray.is_initialized():
            ray.init(**ray_init_args())
        return ray

    ensure()
    yield ensure
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend name; a runtime on it is running for the duration of the test."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")()
        # Tests of both backends check what the workers compute, not how their processes start: they
        # take plain workers' processes from a pool the session's runtimes share (transport/ray.py,
        # [Note: process pool]); tests of start-up, death and recovery start their own, as users do.
        request.getfixturevalue("monkeypatch").setenv(POOL_ENV, "1")
    ag.init(backend=request.param, timeout=60)
    torch.manual_seed(0)
    yield request.param
    ag.shutdown()


@pytest.fixture
def local():
    """A local-backend runtime, for tests that need only one backend."""
    ag.init(backend="local", timeout=30)
    torch.manual_seed(0)
    yield "local"
    ag.shutdown()
