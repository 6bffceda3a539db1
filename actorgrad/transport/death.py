"""Why a worker's process died, in one phrase for WorkerDied messages.

Ray records the cause in texts meant for its logs (the actor's death cause, the worker's exit
detail, an ActorDiedError's message); this module turns them into what a user needs: a kill by
Ray's memory monitor with its memory figures, ray.kill, a lost node, a signal or exit code, a
constructor that raised. Pure functions of the texts, so they are tested with Ray's real strings.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Optional

__all__ = ["describe", "describe_exit_status", "GENERIC"]

# What is left to say when Ray tells nothing.
GENERIC = "its process died or could not start"

_OOM = re.compile(r"killed due to the node running low on memory|OUT_OF_MEMORY|NODE_OUT_OF_MEMORY")
_NODE = re.compile(r"Memory on the node \(IP: ([^,)]+)")
# 2.60: "was 7.50GB used / 7.77GB limit (0.965)"; 2.55-2.58: "was 110.69GB / 124.35GB (0.89)";
# before 2.55: "... was running was 27.71GB / 28.80GB (0.962273)".
_NUM = r"(\d+(?:\.\d+)?)"
_USAGE = re.compile(rf"was {_NUM}GB(?: used)? / {_NUM}GB(?: limit)? \({_NUM}\)")
_THRESHOLD = re.compile(rf"memory usage threshold of {_NUM}")
_OOM_REASON = re.compile(r"OOM kill reason: ([^\n;]+)")
_WORKER_MEM = re.compile(rf"pid=(\d+), (?:actual )?memory used={_NUM}GB")
_SIGNAL = re.compile(r"receives a (SIG[A-Z0-9]+)")
_EXIT_CODE = re.compile(r"[Ee]xit code:? (-?\d+)")
_NODE_DIED = re.compile(r"its node has died(?:\. Node Id: ([0-9a-f]+))?|NODE_DIED")


def describe_exit_status(status: int) -> str:
    """A waitpid(2)-style status in words: the signal that killed the process, or its exit code."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"its process was killed by {name} ({sig})"
    if os.WIFEXITED(status):
        return f"its process exited with code {os.WEXITSTATUS(status)}"
    return f"its process ended with status {status}"


def _oom(text: str, pid: Optional[int]) -> str:
    parts = ["Ray's memory monitor killed its process: the node ran low on memory"]
    node = _NODE.search(text)
    usage = _USAGE.search(text)
    if usage:
        used, total, frac = usage.groups()
        where = f"node {node.group(1)}" if node else "the node"
        parts.append(f"{where} used {used}GB of {total}GB ({float(frac):.0%})")
    threshold = _THRESHOLD.search(text)
    if threshold:
        parts.append(f"above the kill threshold of {float(threshold.group(1)):.0%} (RAY_memory_usage_threshold)")
    reason = _OOM_REASON.search(text)
    if reason:
        parts.append(f"reason: {reason.group(1).strip()}")
    # A report lists every worker it considered; ours is the one with our pid, else the first selected.
    mems = _WORKER_MEM.findall(text)
    mine = [m for p, m in mems if pid is not None and int(p) == pid] or [m for _, m in mems[:1]]
    if mine:
        parts.append(f"the worker itself used {mine[0]}GB")
    return "; ".join(parts)


def describe(text: Optional[str], pid: Optional[int] = None, exit_status: Optional[int] = None) -> Optional[str]:
    """Ray's death-cause text (and, where known, the process's exit status) as one phrase; None if unknown."""
    if exit_status is not None and not text:
        return describe_exit_status(exit_status)
    if not text:
        return None
    if _OOM.search(text):
        return _oom(text, pid)
    if "ray.kill" in text or "RAY_KILL" in text:
        return "it was killed with ray.kill (by this program or another Ray client)"
    node = _NODE_DIED.search(text)
    if node:
        where = f" (node {node.group(1)})" if node.group(1) else ""
        detail = re.search(r"node death reason: ([^\n]+)", text)
        return f"the node it ran on died{where}" + (f": {detail.group(1).strip()}" if detail else "")
    unreachable = re.search(r"NODE_UNREACHABLE: the raylet of node (\w+) at ([^ ]+) does not answer", text)
    if unreachable:
        return (f"the node it ran on ({unreachable.group(2).rsplit(':', 1)[0]}, node {unreachable.group(1)}) "
                "stopped answering: the node was probably lost (Ray has not declared it dead yet)")
    if "error raised in its creation task" in text or "creation_task_failure" in text:
        # The constructor (unpickling the module, building the optimizer) raised: say what it raised.
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if re.match(r"[\w.]+(Error|Exception)\b", ln)), lines[-1])
        return f"it failed while starting: {last}"
    if "its owner has died" in text or "OWNER_DIED" in text:
        return "its owner (the process that created it) died"
    if exit_status is not None:
        return describe_exit_status(exit_status)
    sig = _SIGNAL.search(text)
    code = _EXIT_CODE.search(text)
    if sig:
        return f"its process received {sig.group(1)}" + (f" and exited with code {code.group(1)}" if code else "")
    if "sys.exit is called" in text and code:
        return f"its process called sys.exit({code.group(1)})"
    if "connection error code 2" in text or "End of file" in text:
        # Ray only saw the worker's socket close: SIGKILL, the kernel's OOM killer, a crash and
        # os._exit all look alike to it.
        return ("its process ended abruptly: killed by a signal (SIGKILL, e.g. by the kernel's OOM killer), "
                "crashed (e.g. SIGSEGV) or called os._exit; Ray does not record which")
    if code:
        return f"its process exited with code {code.group(1)}"
    if "unschedulable" in text.lower() or "cannot be scheduled" in text:
        return f"Ray could not schedule it: {text.strip().splitlines()[-1]}"
    return None
