"""The transport seam, and the Host loop that every transport runs a WorkerCore in.

A transport moves encoded messages (``codec.Frame``s, with their sender and
sequence number) between the caller and workers and between workers. The Host restores each
sender's order (Ray's async actors do not keep it), feeds messages to the core
one at a time on a compute thread, so that the event loop keeps receiving
while a module computes, and hands the core's outbox back to the transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Union

from .. import errors as E
from ..core import codec
from ..core import messages as m
from ..core.worker import WorkerCore, WorkerSpec

log = logging.getLogger("actorgrad.transport")

CALLER = "caller"
# Handling cheaper than this (moving average, per kind of message) runs on the event loop: a hop to
# the compute thread and back costs two thread wake-ups, 0.1 ms on a quiet machine and over 1 ms on a
# loaded one, so small modules compute inline; only real compute leaves the loop free to receive.
INLINE_SECONDS = 0.002
# Frames at least this large are decoded on the compute thread: the loop keeps receiving meanwhile.
DECODE_OFF_LOOP_BYTES = 1 << 20
# Frames a sender may have waiting for an earlier one (out of order): beyond, its frames are refused.
MAX_HELD_FRAMES = 4096
MAX_HELD_BYTES = 1 << 30
# What a worker may send to a worker; everything else (calls, plans, closes, aborts, state) is the caller's.
PEER_MESSAGES = (m.Value, m.Gradient, m.Shard)



def sender_key(name: str, epoch: int) -> str:
    """The sender field of frames from ``name`` in ``epoch`` (recovery starts a new epoch)."""
    return name if epoch == 0 else f"{name}#{epoch}"


def epoch_of(key: str) -> int:
    """The epoch a frame's sender field belongs to."""
    _, sep, tail = key.rpartition("#")
    return int(tail) if sep and tail.isdigit() else 0


def name_of(key: str) -> str:
    """The endpoint a frame's sender field names, without its epoch."""
    base, sep, tail = key.rpartition("#")
    return base if sep and tail.isdigit() else key


def _size(data: Data) -> int:
    if isinstance(data, codec.Frame):
        return data.nbytes
    return len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0  # a message object


_EXPIRE: Any = object()  # an inbox item: check the core's deadlines (see Host._sweep)

SendFn = Callable[[str, str, int, codec.Frame], None]  # (to, sender, seq, frame)
ReplyFn = Callable[[codec.Frame], None]
# What a transport hands a Host: a Frame, or its bytes (a bytearray is handed over: see Host.accept), or,
# in process, the message itself (``codec.copy_message``: nothing of it is shared with its sender).
Data = Union[codec.Frame, bytes, bytearray, memoryview, m.Message]
# What the caller hands a transport: a Frame, or the message itself where ``capabilities.messages``.
Outbound = Union[codec.Frame, m.Message]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, so that the runtime asks instead of checking its name."""

    places_gpus: bool = False  # reserves GPUs per worker (device="cuda" needs num_gpus there)
    placement_groups: bool = False  # ag.placement reserves bundles for several workers together
    restarts_workers: bool = False  # a dead worker's process can be restarted (recovery)
    zero_copy: bool = False  # tensor buffers of a Frame reach the receiver without a copy
    # notify/request take the message itself, not its Frame, and a request's reply may be a message
    # (in process: no encoding, the transport makes the one copy of its tensors with codec.copy_message)
    messages: bool = False


class Transport(Protocol):
    """What the Runtime needs from a transport; one implementation per backend (see ``register_backend``)."""

    name: str
    capabilities: Capabilities

    def spawn(self, spec: WorkerSpec, options: dict[str, Any]) -> Any:
        """Start a worker hosting ``spec``; return its backend handle (or None)."""

    def notify(self, worker: str, seq: int, frame: Outbound) -> None:
        """Send a one-way message from the caller (a Frame; the message itself with ``capabilities.messages``)."""

    def request(self, worker: str, seq: int, frame: Outbound) -> cf.Future:
        """Send a request from the caller; the future yields the reply (a Frame or a message), or raises an ActorgradError."""

    def probe(self, workers: list[str], timeout: float) -> dict[str, list[str]]:
        """Ask workers at once what they still wait for; whatever answered within ``timeout``."""

    def starting(self, worker: str) -> Optional[float]:
        """Seconds a worker has been starting, or None once it runs (or is unknown)."""

    def check_feasible(self, name: str, request: dict[str, float]) -> None:
        """Raise PlacementError when no machine can ever hold what a worker asks for."""

    def place_group(self, strategy: str, bundles: list[dict[str, float]], names: list[str], timeout: float) -> Any:
        """Reserve one bundle per worker together; the handle goes into spawn's options."""

    def reset(self, epoch: int, timeout: float) -> None:
        """Wait for every worker to be alive and reset it into ``epoch`` (recovery, rewind)."""

    def kill(self, worker: str) -> None:
        """Stop one worker."""

    def close(self) -> None:
        """Stop every worker and release the backend."""


class Host:
    """Runs one WorkerCore: ordered inbox, compute thread, outbox delivery."""

    def __init__(self, core: WorkerCore, send: SendFn, loop: asyncio.AbstractEventLoop, inline: bool = False,
                 epoch: int = 0, objects: bool = False, inline_unmeasured: bool = True,
                 inline_seconds: float = INLINE_SECONDS) -> None:
        self.core = core
        self.inline = inline  # cheap messages run on the loop (see [Note: inline compute])
        # A kind of message never handled here yet runs inline only if this is true: where the loop is shared
        # (in process), a first backward that sleeps must not hold up the other workers.
        self.inline_unmeasured = inline_unmeasured
        self.inline_seconds = inline_seconds
        self.objects = objects  # peers and replies get messages (codec.copy_message), not frames
        # Frames to peers keep CUDA tensors on the device: a data plane moves them (transport/dataplane.py).
        self.device_buffers = False
        self.name = core.name
        # [Note: epochs] Recovery resets every host into a new epoch. Frames keep their sender's
        # epoch in the sender field; a host drops frames of any other epoch, so nothing sent
        # before the reset (still in a socket, or on a restarted peer) reaches the reset core.
        self.epoch = epoch
        self.sender = sender_key(core.name, epoch)
        self._send = send
        self._loop = loop
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._next_in: dict[str, int] = {}
        self._held: dict[str, dict[int, tuple[Data, Optional[ReplyFn], str]]] = {}
        self._held_bytes: dict[str, int] = {}
        self._next_out: dict[str, int] = {}
        self._replies: dict[int, ReplyFn] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ag-{core.name}")
        self._job: Optional[Future] = None  # the core's last batch on the compute thread (see settle())
        core.host_stats = lambda: {"held_frames": sum(map(len, self._held.values())), "held_bytes": self.held_bytes()}
        # Moving average of seconds per handled message, by kind (a Route is cheap, a Forward may not be).
        self._cost: dict[type, float] = {}
        self.task = loop.create_task(self._run())
        self._sweeper = loop.create_task(self._sweep()) if core.deadline else None

    def accept(self, sender: str, seq: int, data: Data, reply: Optional[ReplyFn] = None) -> bool:
        """Take one frame (on the loop thread); release it once its predecessors have arrived.

        ``data`` is a Frame, or its bytes: a bytearray is the Host's from then on (tensors are built on
        it without a copy), bytes and memoryviews are copied from. False: the sender holds too many
        frames out of order here; they are dropped, and a channel should close the sender's connection.
        """
        # A sender already seen is of this epoch: the parse runs once per sender, not per frame.
        if sender not in self._next_in and epoch_of(sender) != self.epoch:
            log.debug("%s: frame of epoch %d from %s dropped (now in epoch %d)", self.name, epoch_of(sender),
                      sender, self.epoch)
            if reply is not None:  # a request would never be answered: say so at once
                err = E.StepAborted("a request from another epoch of the runtime (before or after a recovery)",
                                    worker=self.name)
                reply(codec.encode_frame(m.Failure(-1, E.to_info(err))))
            return True
        expected = self._next_in.get(sender, 0)
        if seq < expected:
            log.warning("%s: duplicate frame %d from %s dropped", self.name, seq, sender)
            return True
        if seq == expected and sender not in self._held:  # the usual case: in order, nothing held
            self._inbox.put_nowait((data, reply, sender))
            self._next_in[sender] = expected + 1
            return True
        held = self._held.setdefault(sender, {})
        if seq not in held:
            self._held_bytes[sender] = self._held_bytes.get(sender, 0) + _size(data)
        held[seq] = (data, reply, sender)
        while expected in held:
            item = held.pop(expected)
            self._held_bytes[sender] -= _size(item[0])
            self._inbox.put_nowait(item)
            expected += 1
        self._next_in[sender] = expected
        if not held:
            del self._held[sender], self._held_bytes[sender]
        elif len(held) > MAX_HELD_FRAMES or self._held_bytes[sender] > MAX_HELD_BYTES:
            log.error("%s: %s has %d frames (%d bytes) waiting for frame %d; dropped", self.name, sender, len(held),
                      self._held_bytes[sender], expected)
            self.forget(sender)
            return False
        return True

    def forget(self, sender: str) -> None:
        """Drop the frames held back for ``sender`` (its connection is gone: the gap cannot fill)."""
        held = self._held.pop(sender, None)
        self._held_bytes.pop(sender, None)
        if held:
            log.warning("%s: %d frames from %s dropped: an earlier frame never came", self.name, len(held), sender)

    def held_bytes(self) -> int:
        """Bytes of frames waiting for an earlier frame of their sender."""
        return sum(self._held_bytes.values())

    async def _sweep(self) -> None:
        """Worker-side deadlines: fail steps that wait here longer than the core's deadline."""
        assert self.core.deadline
        period = min(5.0, max(0.05, self.core.deadline / 10))
        while True:
            await asyncio.sleep(period)
            # Through the inbox, like a message: the core is only ever run by the _run task.
            self._inbox.put_nowait((_EXPIRE, None, None))

    async def quiesce(self) -> None:
        """Stop taking messages and wait until the compute thread is idle (before a reset)."""
        self.task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        try:
            await self.task
        except BaseException:  # cancelled: that is the point
            pass
        # The single compute thread runs jobs in order: once this one runs, the core is idle.
        await self._loop.run_in_executor(self._executor, lambda: None)
        self._executor.shutdown(wait=False)

    async def drain(self) -> None:
        """Wait until every message accepted so far has been handled."""
        await self._inbox.join()

    async def _run(self) -> None:
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            try:
                await self._handle_batch(batch)
            finally:
                for _ in batch:
                    self._inbox.task_done()
                # Frames hold reply closures (and through them the caller's request records):
                # let them go now, not when the next message arrives.
                batch = []

    def _decode(self, data: Data, reply: Optional[ReplyFn], sender: str) -> Optional[m.Message]:
        try:
            if isinstance(data, (codec.Frame, bytes, bytearray, memoryview)):
                frame = data if isinstance(data, codec.Frame) else codec.Frame.from_bytes(
                    data, owned=isinstance(data, bytearray))
                msg = codec.decode_frame(frame)
            elif type(data) in codec.SCHEMA_TYPES:
                msg = data  # handed over in process, already private (codec.copy_message)
            else:
                raise E.DecodeError(f"not a message: {type(data).__name__}")
        except E.DecodeError as err:
            log.error("%s: dropped a malformed message from %s: %s", self.name, sender, err.message)
            if reply is not None:
                reply(codec.encode_frame(m.Failure(-1, E.to_info(E.DecodeError(err.message, worker=self.name)))))
            return None
        peer = name_of(sender)
        if peer != CALLER and not (isinstance(msg, PEER_MESSAGES)
                                   and (not isinstance(msg, (m.Gradient, m.Shard)) or msg.from_worker == peer)):
            # A worker may only pass values and its own gradients on; the rest is the caller's to send.
            log.error("%s: dropped a %s from %s: only the caller may send it", self.name, type(msg).__name__, sender)
            if reply is not None:
                err = E.DecodeError(f"a worker may not send a {type(msg).__name__}", worker=self.name)
                reply(codec.encode_frame(m.Failure(getattr(msg, "req", -1), E.to_info(err))))
            return None
        if reply is not None:
            self._replies[getattr(msg, "req", -1)] = reply
        if self.core.tracer.enabled:
            self.core.tracer.instant("recv", type=type(msg).__name__)
        return msg

    def _handle_all(self, msgs: list[m.Message]) -> list:
        """Run the core over a batch of messages (on whichever thread): one outbox per message.

        ``None`` instead of a message means: do the core's deferred work (closing steps).
        """
        outs = []
        for msg in msgs:
            t0 = time.perf_counter()
            try:
                if msg is None:
                    outs.append(self.core.poll())
                elif msg is _EXPIRE:
                    outs.append(self.core.expire())
                else:
                    outs.append(self.core.handle(msg, defer=True))
            except Exception as exc:  # a bug in the core: answer the request, keep serving
                log.exception("%s: internal error handling %s", self.name, type(msg).__name__ if msg else "poll")
                out = []
                req = getattr(msg, "req", None)
                if req is not None:
                    err = E.ActorgradError(f"internal error handling {type(msg).__name__}: {exc!r}", worker=self.name)
                    out.append((None, m.Failure(req, E.to_info(err))))
                outs.append(out)
            cost = time.perf_counter() - t0
            kind = type(msg)
            self._cost[kind] = 0.8 * self._cost.get(kind, cost) + 0.2 * cost
        return outs

    async def _handle_batch(self, batch: list[tuple[Data, Optional[ReplyFn], Optional[str]]]) -> None:
        msgs = []
        for data, reply, sender in batch:
            if data is _EXPIRE:
                msg = data
            elif _size(data) >= DECODE_OFF_LOOP_BYTES:
                msg = await self._loop.run_in_executor(self._executor, self._decode, data, reply, sender)
            else:
                msg = self._decode(data, reply, sender)
            if msg is not None:
                msgs.append(msg)
        if not msgs:
            return
        # [Note: inline compute] Cheap messages run on the loop: a thread hop per message would
        # cost more than the work. Once handling gets expensive (real compute), the core runs on
        # the compute thread so the loop keeps receiving and sending meanwhile.
        for msg in msgs:
            await self._run_core([msg])
            # What that message produced is on its way; now the deferred work (closing steps,
            # updates), before the next message, which must see its effect.
            if self.core.has_deferred():
                await self._run_core([None])

    async def _run_core(self, msgs: list) -> None:
        cost = self._cost.get(type(msgs[0]), 0.0 if self.inline_unmeasured else None)
        if self.inline and cost is not None and cost < self.inline_seconds:
            outs = self._handle_all(msgs)
        else:
            # The thread's own future: cancelling this task (stop()) leaves it running, and settle() sees that.
            self._job = self._executor.submit(self._handle_all, msgs)
            outs = await asyncio.wrap_future(self._job)
        # Peers first: a Value or a Gradient is on the step's critical path, a reply to the caller
        # (ForwardDone, an Ack) rarely is. Each peer's and the caller's messages keep their order.
        for out in outs:
            for to, out_msg in out:
                if to is not None:
                    self.send(to, out_msg)
        for out in outs:
            for to, out_msg in out:
                if to is None:
                    self._reply(out_msg)

    def _reply(self, msg: m.Message) -> None:
        fn = self._replies.pop(getattr(msg, "req", -1), None)
        if fn is None:
            log.debug("%s: reply to unknown request %s dropped", self.name, getattr(msg, "req", None))
            return
        try:
            # Private: the reply may be read after the core has changed what it holds (a state's weights).
            fn(codec.copy_message(msg) if self.objects else codec.encode_frame(msg).private())
        except Exception:
            log.exception("%s: could not deliver a reply", self.name)

    def send(self, to: str, msg: m.Message) -> None:
        """Encode and send one message to a peer, numbering it on this channel."""
        seq = self._next_out.get(to, 0)
        self._next_out[to] = seq + 1
        if self.core.tracer.enabled:
            self.core.tracer.instant("send", to=to, type=type(msg).__name__)
        # Private: the core may change the tensor (an update) before the frame is read or written out.
        frame = codec.copy_message(msg) if self.objects else codec.encode_frame(msg, self.device_buffers).private()
        if to == self.name:
            self.accept(self.sender, seq, frame)
        else:
            self._send(to, self.sender, seq, frame)

    def inject(self, msg: m.Message) -> None:
        """Hand the core a message of the transport's own making (a data plane's Abort), as the caller's."""
        self._inbox.put_nowait((msg, None, CALLER))

    def describe_missing(self) -> list[str]:
        """What the core still waits for; read from the loop thread, tolerant of races."""
        try:
            return self.core.describe_missing()
        except Exception as exc:  # the compute thread may be mutating the state
            return [f"(state unavailable: {exc!r})"]

    async def settle(self, timeout: float) -> bool:
        """After stop(): wait up to ``timeout`` s for a batch still on the compute thread; whether the core is idle."""
        job = self._job
        if job is None or job.done():
            return True
        await asyncio.wait({asyncio.wrap_future(job)}, timeout=timeout)
        return job.done()

    def stop(self) -> None:
        """Stop the loop task and the compute thread."""
        self.task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
