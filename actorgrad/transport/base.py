"""The transport seam, and the Host loop that every transport runs a WorkerCore in.

A transport moves encoded messages ("frames": sender, sequence number, bytes)
between the caller and workers and between workers. The Host restores each
sender's order (Ray's async actors do not keep it), feeds messages to the core
one at a time on a compute thread, so that the event loop keeps receiving
while a module computes, and hands the core's outbox back to the transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Protocol

from .. import errors as E
from ..core import codec
from ..core import messages as m
from ..core.worker import WorkerCore, WorkerSpec

log = logging.getLogger("actorgrad.transport")

CALLER = "caller"

SendFn = Callable[[str, str, int, bytes], None]  # (to, sender, seq, data)
ReplyFn = Callable[[bytes], None]


class Transport(Protocol):
    """What the Runtime needs from a transport; one implementation per backend."""

    name: str

    def spawn(self, spec: WorkerSpec, options: dict[str, Any]) -> Any:
        """Start a worker hosting ``spec``; return its backend handle (or None)."""

    def post(self, worker: str, seq: int, data: bytes) -> None:
        """Send a one-way message from the caller."""

    def request(self, worker: str, seq: int, data: bytes) -> cf.Future:
        """Send a request from the caller; the future yields the encoded reply."""

    def probe(self, worker: str, timeout: float) -> list[str]:
        """Ask a worker what it still waits for (best effort, bounded by ``timeout``)."""

    def kill(self, worker: str) -> None:
        """Stop one worker."""

    def close(self) -> None:
        """Stop every worker and release the backend."""


class Host:
    """Runs one WorkerCore: ordered inbox, compute thread, outbox delivery."""

    def __init__(self, core: WorkerCore, send: SendFn, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.name = core.name
        self._send = send
        self._loop = loop
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._next_in: dict[str, int] = {}
        self._held: dict[str, dict[int, tuple[bytes, Optional[ReplyFn]]]] = {}
        self._next_out: dict[str, int] = {}
        self._replies: dict[int, ReplyFn] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ag-{core.name}")
        self.task = loop.create_task(self._run())

    def accept(self, sender: str, seq: int, data: bytes, reply: Optional[ReplyFn] = None) -> None:
        """Take one frame (on the loop thread); release it once its predecessors have arrived."""
        expected = self._next_in.get(sender, 0)
        if seq < expected:
            log.warning("%s: duplicate frame %d from %s dropped", self.name, seq, sender)
            return
        held = self._held.setdefault(sender, {})
        held[seq] = (data, reply)
        while expected in held:
            self._inbox.put_nowait(held.pop(expected))
            expected += 1
        self._next_in[sender] = expected

    async def drain(self) -> None:
        """Wait until every message accepted so far has been handled."""
        await self._inbox.join()

    async def _run(self) -> None:
        while True:
            data, reply = await self._inbox.get()
            try:
                await self._handle(data, reply)
            finally:
                self._inbox.task_done()

    async def _handle(self, data: bytes, reply: Optional[ReplyFn]) -> None:
        try:
            msg = codec.decode(data)
        except E.DecodeError as err:
            err.worker = self.name
            log.error("%s: dropped a malformed message: %s", self.name, err.message)
            if reply is not None:
                reply(codec.encode(m.Failure(-1, E.to_info(E.DecodeError(err.message, worker=self.name)))))
            return
        if reply is not None:
            self._replies[getattr(msg, "req", -1)] = reply
        if self.core.tracer.enabled:
            self.core.tracer.instant("recv", type=type(msg).__name__)
        try:
            out = await self._loop.run_in_executor(self._executor, self.core.handle, msg)
        except Exception as exc:  # a bug in the core: answer the request, keep serving
            log.exception("%s: internal error handling %s", self.name, type(msg).__name__)
            out = []
            req = getattr(msg, "req", None)
            if req is not None:
                err = E.ActorgradError(f"internal error handling {type(msg).__name__}: {exc!r}", worker=self.name)
                out.append((None, m.Failure(req, E.to_info(err))))
        for to, out_msg in out:
            if to is None:
                self._reply(out_msg)
            else:
                self.send(to, out_msg)

    def _reply(self, msg: m.Message) -> None:
        fn = self._replies.pop(getattr(msg, "req", -1), None)
        if fn is None:
            log.debug("%s: reply to unknown request %s dropped", self.name, getattr(msg, "req", None))
            return
        try:
            fn(codec.encode(msg))
        except Exception:
            log.exception("%s: could not deliver a reply", self.name)

    def send(self, to: str, msg: m.Message) -> None:
        """Encode and send one message to a peer, numbering it on this channel."""
        seq = self._next_out.get(to, 0)
        self._next_out[to] = seq + 1
        if self.core.tracer.enabled:
            self.core.tracer.instant("send", to=to, type=type(msg).__name__)
        data = codec.encode(msg)
        if to == self.name:
            self.accept(self.name, seq, data)
        else:
            self._send(to, self.name, seq, data)

    def describe_missing(self) -> list[str]:
        """What the core still waits for; read from the loop thread, tolerant of races."""
        try:
            return self.core.describe_missing()
        except Exception as exc:  # the compute thread may be mutating the state
            return [f"(state unavailable: {exc!r})"]

    def stop(self) -> None:
        """Stop the loop task and the compute thread."""
        self.task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
