"""In-process transport: every worker on one asyncio loop in a background thread.

The reference behaviour: the same WorkerCore and Host as on Ray, the same
encoded messages, so results match bit for bit; only the delivery differs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import copy
import logging
import threading
from typing import Any

from .. import errors as E
from ..core.worker import WorkerCore, WorkerSpec
from .base import CALLER, Host, epoch_of, sender_key

log = logging.getLogger("actorgrad.transport.local")


class LocalTransport:
    """All workers in this process; calls return at once and deadlines hold."""

    name = "local"

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="actorgrad-local", daemon=True)
        self._thread.start()
        self._hosts: dict[str, Host] = {}
        self.caller = CALLER  # the sender field of our frames; changes with each recovery epoch

    def _call(self, fn, *args, timeout: float = 30.0):
        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def spawn(self, spec: WorkerSpec, options: dict[str, Any]) -> Any:
        """Build the worker's core here, on a private copy of the module (as Ray would)."""
        spec = copy.copy(spec)
        spec.module = copy.deepcopy(spec.module)
        core = WorkerCore(spec)

        def make() -> None:
            self._hosts[spec.name] = Host(core, self._deliver, self._loop, epoch=epoch_of(self.caller))

        self._call(make)
        return None

    def _deliver(self, to: str, sender: str, seq: int, data: bytes) -> None:
        host = self._hosts.get(to)
        if host is None:
            log.error("message from %s to unknown worker %s dropped", sender, to)
            return
        host.accept(sender, seq, data)

    def _host(self, worker: str) -> Host:
        host = self._hosts.get(worker)
        if host is None:
            raise E.WorkerDied("the worker is not running", worker=worker)
        return host

    def post(self, worker: str, seq: int, data: bytes) -> None:
        """Send a one-way message from the caller."""
        host = self._host(worker)
        self._loop.call_soon_threadsafe(host.accept, self.caller, seq, data)

    def request(self, worker: str, seq: int, data: bytes) -> cf.Future:
        """Send a request from the caller; the future yields the encoded reply."""
        host = self._host(worker)
        fut: cf.Future = cf.Future()

        def reply(payload: bytes) -> None:
            if not fut.done():
                fut.set_result(payload)

        self._loop.call_soon_threadsafe(host.accept, self.caller, seq, data, reply)
        return fut

    def probe(self, worker: str, timeout: float) -> list[str]:
        """Ask a worker what it still waits for."""
        host = self._hosts.get(worker)
        if host is None:
            return ["(not running)"]
        try:
            return self._call(host.describe_missing, timeout=timeout)
        except Exception as exc:
            return [f"(no answer: {exc!r})"]

    def reset(self, epoch: int, timeout: float) -> None:
        """Recovery: reset every worker into ``epoch`` (frames of earlier epochs are dropped)."""

        async def reset_all() -> None:
            for name, host in list(self._hosts.items()):
                await host.quiesce()
                host.core.reset()
                self._hosts[name] = Host(host.core, self._deliver, self._loop, epoch=epoch)

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
