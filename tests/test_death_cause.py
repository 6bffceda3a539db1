"""Why a worker died, in its WorkerDied message: a signal, an exit, ray.kill, Ray's memory monitor
(with its memory figures), a lost node; and a deadline passed while a worker is still starting says
so instead of blaming the step."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import actorgrad as ag
from actorgrad import errors as E
from actorgrad.transport import death
from conftest import kill_worker, wait_process_gone, worker_pid

# --- Ray's own texts (Ray 2.60 unless said), turned into our phrase -----------------------------

# The memory monitor's report, Ray 2.60 (format strings of src/ray/raylet/node_manager.cc, as the
# raylet binary of this Ray version holds them), as the worker table's exit detail carries it.
OOM_2_60 = (
    "NODE_OUT_OF_MEMORY: 1 worker(s) were killed due to the node running low on memory. \n"
    "Memory on the node (IP: 10.0.0.5, ID: 5f1c9ad0e3b2) was 7.41GB used / 7.77GB limit (0.953616)\n"
    "OOM kill reason: the node's memory usage exceeded the threshold\n"
    "Object store memory usage: [- objects spillable: 0\n- bytes spillable: 0]\n"
    "Ray killed 1 worker(s) based on the killing policy\n"
    "Considered workers: [\n"
    "Selected to kill: (Task: job ID=01000000, lease ID=0600000001000000ffff, task name=RayHost.__init__, "
    "required resources={}, pid=4242, actual memory used=6.90GB, worker ID=3e3d8f80b70d)\n"
    "(Task: job ID=01000000, lease ID=0400000001000000ffff, task name=RayHost.__init__, required resources={}, "
    "pid=4243, actual memory used=0.31GB, worker ID=0e5649d39c15)]\n"
    "To see more information about memory usage on this node, use `ray logs raylet.out -ip 10.0.0.5`\n"
    "Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/...")

# Ray 2.55-2.58 (docs: "How to avoid out-of-memory errors").
OOM_2_58 = (
    "Task hungry_hippo failed due to oom. There are infinite oom retries remaining, so the task will be "
    "retried. Error: 2 worker(s) were killed due to the node running low on memory. Memory on the node "
    "(IP: 10.1.2.3, ID: 92edc4e97e4d) was 110.69GB / 124.35GB (0.890161)\n"
    "  OOM kill reason: user cgroup memory upper bound was met or exceeded\n"
    "  Selected to kill: (Task: job ID=01000000, lease ID=06, task name=hungry_hippo, required resources={CPU: 1}, "
    "pid=3310152, actual memory used=0.67GB, worker ID=3e3d8f80b70d)\n")

# Ray before 2.55 (ray.exceptions.OutOfMemoryError / the worker's exit detail).
OOM_OLD = (
    "Task was killed due to the node running low on memory.\n"
    "Memory on the node (IP: 10.0.62.231, ID: e5d953ef03e5) where the task (task ID: 43534ce9375f, "
    "name=allocate_memory, pid=11362, memory used=1.25GB) was running was 27.71GB / 28.80GB (0.962273), "
    "which exceeds the memory usage threshold of 0.95. Ray killed this worker (ID: 6f2ec5c8b0d5) because it "
    "was the most recently scheduled task; to see more information about memory usage on this node, use "
    "`ray logs raylet.out -ip 10.0.62.231`.")

EOF_TEXT = (
    "SYSTEM_ERROR: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes "
    "include: (1) the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was "
    "called, or (3) the worker crashed unexpectedly due to SIGSEGV or another unexpected error.")
SIGTERM_TEXT = ("SYSTEM_ERROR: Worker exits unexpectedly by a signal. SystemExit is raised (sys.exit is called). "
                "Exit code: 1. The process receives a SIGTERM.")
RAY_KILL_TEXT = "The actor is dead because it was killed by `ray.kill`. (RAY_KILL)"
NODE_TEXT = ("The actor died because its node has died. Node Id: 2f1e6b5c9d\n"
             "node death reason: health check failed due to missing too many heartbeats")
CREATION_TEXT = ("error raised in its creation task:\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "ray.exceptions.ReferenceCountingAssertionError: Failed to retrieve object 00ff.")


def test_memory_monitor_kill_gives_the_figures():
    new = death.describe(OOM_2_60, pid=4242)
    assert new.startswith("Ray's memory monitor killed its process")
    assert "node 10.0.0.5 used 7.41GB of 7.77GB (95%)" in new
    assert "the worker itself used 6.90GB" in new  # ours by pid, not the other one listed
    assert "reason: the node's memory usage exceeded the threshold" in new
    assert "the worker itself used 0.31GB" in death.describe(OOM_2_60, pid=4243)

    mid = death.describe(OOM_2_58)
    assert "node 10.1.2.3 used 110.69GB of 124.35GB (89%)" in mid and "0.67GB" in mid
    assert "user cgroup memory upper bound" in mid

    old = death.describe(OOM_OLD, pid=11362)
    assert "node 10.0.62.231 used 27.71GB of 28.80GB (96%)" in old
    assert "threshold of 95%" in old and "the worker itself used 1.25GB" in old


def test_other_causes_in_words():
    assert "ended abruptly" in death.describe(EOF_TEXT) and "SIGKILL" in death.describe(EOF_TEXT)
    # The generic text lists the OOM killer among possible causes: not a memory-monitor kill.
    assert "memory monitor" not in death.describe(EOF_TEXT)
    assert death.describe(SIGTERM_TEXT) == "its process received SIGTERM and exited with code 1"
    assert "ray.kill" in death.describe(RAY_KILL_TEXT)
    node = death.describe(NODE_TEXT)
    assert node.startswith("the node it ran on died (node 2f1e6b5c9d)") and "heartbeats" in node
    assert "ReferenceCountingAssertionError" in death.describe(CREATION_TEXT)
    # Before Ray's health checks declare a node dead, its raylet refusing connections says it.
    silent = death.describe("NODE_UNREACHABLE: the raylet of node 2f1e at 10.0.0.7:40123 does not answer "
                            "([Errno 111] Connection refused)")
    assert silent.startswith("the node it ran on (10.0.0.7, node 2f1e) stopped answering")
    assert death.describe("") is None and death.describe("something new in Ray") is None
    assert death.describe_exit_status(9) == "its process was killed by SIGKILL (9)"
    assert death.describe_exit_status(3 << 8) == "its process exited with code 3"


# --- real deaths on Ray ---------------------------------------------------------------------------


class ExitIn(torch.nn.Module):
    """A Linear layer whose process calls os._exit(code) in forward while a marker file exists."""

    def __init__(self, marker: str, code: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.marker = marker
        self.code = code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.path.exists(self.marker):
            os._exit(self.code)
        return self.lin(x)


def died(worker) -> E.WorkerDied:
    with pytest.raises(E.WorkerDied) as info:
        worker(torch.ones(1, 2)).value()
        ag.step()
    assert info.value.worker == worker.name and worker.name in str(info.value)
    return info.value


def test_each_death_is_reported_with_its_cause(ray_session, tmp_path):
    ray_session()
    ag.init(backend="ray", timeout=60)
    try:
        marker = str(tmp_path / "exit")
        names = ["sigkill", "sigterm", "raykill"]
        workers = {n: ag.spawn(torch.nn.Linear(2, 2), name=n) for n in names}
        workers["exit3"] = ag.spawn(ExitIn(marker, 3), name="exit3")
        for w in workers.values():
            w(torch.ones(1, 2)).value()  # started, and the first call's output structure known
        ag.step()

        for name, sig in (("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM)):
            pid = worker_pid(workers[name].actor)
            os.kill(pid, sig)
            wait_process_gone(pid)
        kill_worker(workers["raykill"].actor)

        msg = str(died(workers["sigkill"]))
        # Ray only sees the socket close: it cannot tell SIGKILL from os._exit, and says so.
        assert "ended abruptly" in msg and "SIGKILL" in msg and "os._exit" in msg
        assert "received SIGTERM" in str(died(workers["sigterm"]))
        assert "killed with ray.kill" in str(died(workers["raykill"]))

        open(marker, "w").close()
        msg = str(died(workers["exit3"]))
        # Ray 2.60 records no exit code for a process that ends by os._exit: the message says
        # what it can (an abrupt end, os._exit among the causes) instead of "died or could not start".
        assert "ended abruptly" in msg and "os._exit" in msg
    finally:
        ag.shutdown()


def test_cause_is_known_when_ray_restarts_the_worker(ray_session, tmp_path):
    """With recovery on the actor is restarted at once, so its death cause is gone from the actor
    table: the cause comes from the dead process's entry in Ray's worker table."""
    ray_session()
    ag.init(backend="ray", timeout=60, recover=True, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ck"))
    try:
        w = ag.spawn(torch.nn.Linear(2, 2), name="w", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")
        mse(w(torch.ones(1, 2)), torch.zeros(1, 2)).backward()
        ag.step()
        pid = worker_pid(w.actor)
        os.kill(pid, signal.SIGTERM)
        wait_process_gone(pid)
        with pytest.raises(E.WorkerDied) as info:
            mse(w(torch.ones(1, 2)), torch.zeros(1, 2)).backward()
            ag.step()
        assert info.value.recovered and info.value.worker == "w"
        assert "received SIGTERM" in str(info.value)
    finally:
        ag.shutdown()


# --- a deadline while a worker is still starting --------------------------------------------------


class SlowStart(torch.nn.Linear):
    """A Linear layer that takes ``delay`` seconds to unpickle in any process but the one that created it."""

    def __init__(self, delay: float = 3.0) -> None:
        super().__init__(2, 2)
        self.origin = os.getpid()
        self.delay = delay  # 3 s: what importing a big model's code or loading its weights costs

    def __setstate__(self, state: dict) -> None:
        if state.get("origin") != os.getpid():
            time.sleep(state["delay"])
        super().__setstate__(state)


def test_start_up_does_not_count_against_a_deadline(ray_session):
    ray_session()
    ag.init(backend="ray", timeout=1.0)
    try:
        slow = ag.spawn(SlowStart(), name="slow")
        # 3 s of start-up (more on a loaded machine) against a 1 s deadline: the wait counts from the start.
        assert slow(torch.ones(1, 2)).value().shape == (1, 2)
        assert ag.api._current().transport.starting("slow") is None
    finally:
        ag.shutdown()


def test_a_start_up_beyond_the_limit_is_a_deadline_that_says_still_starting(ray_session, monkeypatch):
    from actorgrad import runtime

    monkeypatch.setattr(runtime, "START_LIMIT", 0.5)
    ray_session()
    ag.init(backend="ray", timeout=1.0)
    try:
        slow = ag.spawn(SlowStart(), name="slow")
        with pytest.raises(E.DeadlineExceeded) as info:
            slow(torch.ones(1, 2)).value()
        text = str(info.value)
        assert info.value.worker == "slow"
        assert "worker 'slow' was still starting" in text and "still starting (" in text
        assert "busy" not in text
        transport = ag.api._current().transport
        deadline = time.monotonic() + 60
        while transport.starting("slow") is not None:  # 3 s of unpickling, more on a loaded machine
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Once started, the same runtime and its 1 s deadline work.
        assert slow(torch.ones(1, 2)).value().shape == (1, 2)
    finally:
        ag.shutdown()
