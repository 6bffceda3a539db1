"""In-process transport: every worker on one asyncio loop in a background thread.

The reference behaviour: the same WorkerCore and Host as on Ray, so results match bit for bit; only
the delivery differs. Messages are handed over as objects, never encoded: ``codec.copy_message`` builds,
when a message leaves its sender, what decoding its frame would (every tensor copied once, containers
new), so that nothing a receiver holds is shared with its sender.

[Note: local wake-ups] Every worker runs on one event loop thread. A message costs a few microseconds
of handling; what costs is a thread waking another (tens of microseconds, far more on a loaded
machine, where the woken thread also waits for the GIL). So: cheap messages run on the loop itself
(``Host(inline=True)``), a kind of message never measured, or measured expensive, on the worker's
compute thread; worker-to-worker messages never leave the loop thread; and the caller's messages are
queued and the loop woken once per batch, not once per message.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import copy
import logging
import threading
from typing import Any, Callable, Optional, TypeVar

from .. import errors as E
from .. import pickling
from ..core import codec
from ..core.worker import WorkerCore, WorkerSpec
from .base import CALLER, Capabilities, Host, Outbound, epoch_of, sender_key

log = logging.getLogger("actorgrad.transport.local")

T = TypeVar("T")


class LocalTransport:
    """All workers in this process; calls return at once and deadlines hold."""

    name = "local"
    # Messages, not frames; no copy-free handover: the sender may change its tensors after sending
    # (an optimizer step, a user reusing an input), so each leaves as a copy.
    capabilities = Capabilities(messages=True)

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="actorgrad-local", daemon=True)
        self._thread.start()
        self._hosts: dict[str, Host] = {}
        self.caller = CALLER  # the sender field of our frames; changes with each recovery epoch
        # The caller's messages on their way to the loop, and whether a flush is on its way (see
        # [Note: local wake-ups]).
        self._outbox: collections.deque = collections.deque()
        self._outbox_lock = threading.Lock()
        self._flush_due = False
        self._replies: list[tuple[cf.Future, Any]] = []  # completed at the end of the loop's turn

    def _call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def spawn(self, spec: WorkerSpec, options: dict[str, Any]) -> Any:
        """Build the worker's core here, on a private copy of the module (as Ray would)."""
        spec = copy.copy(spec)
        spec.module = _private_copy(spec)
        core = WorkerCore(spec)

        def make() -> None:
            self._hosts[spec.name] = self._new_host(core, epoch_of(self.caller))

        self._call(make)
        return None

    def _new_host(self, core: WorkerCore, epoch: int) -> Host:
        return Host(core, self._deliver, self._loop, inline=True, epoch=epoch, objects=True, inline_unmeasured=False)

    def _deliver(self, to: str, sender: str, seq: int, frame: Any) -> None:
        # On the loop thread; hosts send private messages (codec.copy_message).
        host = self._hosts.get(to)
        if host is None:
            log.error("message from %s to unknown worker %s dropped", sender, to)
            return
        host.accept(sender, seq, frame)

    def _host(self, worker: str) -> Host:
        host = self._hosts.get(worker)
        if host is None:
            raise E.WorkerDied("the worker is not running", worker=worker)
        return host

    def _post(self, host: Host, seq: int, msg: Any, reply: Any) -> None:
        # The copy now, on the caller's thread: the caller's tensors may change once this returns.
        private = msg.private() if isinstance(msg, codec.Frame) else codec.copy_message(msg)
        item = (host, self.caller, seq, private, reply)
        with self._outbox_lock:
            self._outbox.append(item)
            wake, self._flush_due = not self._flush_due, True
        if wake:
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        """On the loop thread: hand every queued message of the caller to its host, in order."""
        with self._outbox_lock:
            items, self._flush_due = list(self._outbox), False
            self._outbox.clear()
        for host, sender, seq, msg, reply in items:
            host.accept(sender, seq, msg, reply)

    def notify(self, worker: str, seq: int, frame: Outbound) -> None:
        """Send a one-way message from the caller (the message itself: ``capabilities.messages``; a Frame works too)."""
        self._post(self._host(worker), seq, frame, None)

    def request(self, worker: str, seq: int, frame: Outbound) -> cf.Future:
        """Send a request from the caller; the future yields the reply (a message, or a Frame)."""
        host = self._host(worker)
        fut: cf.Future = cf.Future()

        def reply(answer: Any) -> None:
            # On the loop thread: completed once this turn of the loop is done, with every other
            # reply of it, so that the caller wakes once for them all (see [Note: local wake-ups]).
            self._replies.append((fut, answer))
            if len(self._replies) == 1:
                self._loop.call_soon(self._complete_replies)

        self._post(host, seq, frame, reply)
        return fut

    def _complete_replies(self) -> None:
        replies, self._replies = self._replies, []
        for fut, answer in replies:
            if not fut.done():
                fut.set_result(answer)

    def probe(self, workers: list[str], timeout: float) -> dict[str, list[str]]:
        """Ask workers what they still wait for, all in one turn of the loop; a loop that does not
        answer within ``timeout`` gives each one a line saying so."""

        def ask() -> dict[str, list[str]]:
            return {w: self._hosts[w].describe_missing() if w in self._hosts else ["(not running)"]
                    for w in workers}

        try:
            return self._call(ask, timeout=timeout)
        except Exception as exc:  # the loop is busy (a module computing inline) or stopped
            why = f"no answer within {timeout:g}s" if isinstance(exc, cf.TimeoutError) else f"no answer: {exc!r}"
            return {w: [f"({why})"] for w in workers}

    def starting(self, worker: str) -> Optional[float]:
        """None: a local worker runs as soon as spawn returns."""
        return None

    def check_feasible(self, name: str, request: dict[str, float]) -> None:
        """Nothing to check: resources are Ray's to reserve (device="cuda" is checked by the runtime)."""

    def place_group(self, strategy: str, bundles: list[dict[str, float]], names: list[str], timeout: float) -> Any:
        """Nothing to reserve: every worker runs in this process (``capabilities.placement_groups`` is False)."""
        return None

    def reset(self, epoch: int, timeout: float) -> None:
        """Recovery: reset every worker into ``epoch`` (frames of earlier epochs are dropped)."""

        async def reset_all() -> None:
            for name, host in list(self._hosts.items()):
                await host.quiesce()
                host.core.reset()
                self._hosts[name] = self._new_host(host.core, epoch)

        asyncio.run_coroutine_threadsafe(reset_all(), self._loop).result(timeout)
        self.caller = sender_key(CALLER, epoch)

    def kill(self, worker: str) -> None:
        """Stop one worker."""
        host = self._hosts.pop(worker, None)
        if host is not None:
            self._loop.call_soon_threadsafe(host.stop)

    def close(self) -> None:
        """Stop every worker and the loop thread."""
        hosts = list(self._hosts.values())
        self._hosts.clear()

        async def stop_all() -> None:
            for host in hosts:
                host.stop()
            await asyncio.gather(*(h.task for h in hosts), return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(stop_all(), self._loop).result(10)
        except Exception:  # a worker stuck in compute cannot be interrupted; the thread is a daemon
            log.warning("some local workers did not stop in time")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


def _private_copy(spec: WorkerSpec) -> Any:
    """The worker's own copy of its module: a deep copy (one copy of the weights, the cheapest), or, where
    deepcopy refuses what pickling takes (a tensor attribute with autograd history), the cloudpickle round
    trip a Ray worker gets; ConfigError naming the object when neither works."""
    try:
        return copy.deepcopy(spec.module)
    except Exception as exc:
        log.debug("%s: deepcopy of the module failed (%r); copying it as Ray would, by pickling", spec.name, exc)
    cp = pickling.cloudpickle_module()
    try:
        return cp.loads(cp.dumps(spec.module))
    except Exception as exc:
        raise pickling.error(spec, exc) from None
