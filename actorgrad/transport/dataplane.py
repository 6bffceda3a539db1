"""The tensor data plane: large tensors of peer messages over torch.distributed point-to-point.

[Note: data plane] A peer message (Value, Gradient, Shard) from one Ray worker
to another still goes over the authenticated channel (channels.py) as a
schema-checked envelope; only its large tensors' bytes may travel beside it,
with gloo (CPU tensors) or NCCL (CUDA tensors), the same code for both:

1. The sender encodes the message as always, picks the buffers at or above the
   pair's threshold (``choose``), and sends an ``OOB`` channel frame: a
   descriptor ``[group, backend, store host, store port, [[buffer, tag], ...]]``
   then the frame with those buffers left empty. It then posts one ``send``
   per buffer on the pair's group.
2. The receiver reads the envelope's tensor headers (``codec.peek``): the
   sizes it allocates and receives come from there, never from the
   descriptor. It allocates each buffer on its own device, posts the
   ``recv``s, and once they complete hands the filled frame to its Host in
   the sender's order; decoding then checks every buffer against its header.

Each direction of a pair has its own two-rank process group, made lazily by
the sender: it hosts a ``TCPStore`` on its node's address (one per worker,
made on first use) and names the group (a random id, the store's key prefix) in the
descriptor; the receiver joins on first sight. No global
``init_process_group`` is needed, so workers can be added and restarted.
Every group operation of one group runs on that group's own thread, in
order; waits have a deadline (``timeout``). A transfer that fails or misses
its deadline drops its group (the next transfer makes a new one) and fails its
step on this worker (an ``Abort`` through the Host, so the caller's error
names the worker and the step; not when the peer's process is gone, which
the runtime's death detection reports), and the receiver hands the Host the
frame without its tensors, which the Host drops as malformed, so the sender's
later frames are not held up. Recovery (a new epoch) drops every group;
shutdown destroys them and the store.

gloo and NCCL authenticate nobody: see the README's security section.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import secrets
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import msgpack
import torch

from .. import errors as E
from ..core import codec
from ..core import messages as m

log = logging.getLogger("actorgrad.transport.dataplane")

MODES = ("auto", "channel", "gloo", "nccl")
# Forced "gloo"/"nccl": tensors at least this large take the data plane (ACTORGRAD_DATA_PLANE_MIN_BYTES).
DEFAULT_MIN_BYTES = 64 * 1024
# "auto", CUDA to CUDA: NCCL from this size on (a host round trip costs more than a kernel launch).
AUTO_NCCL_BYTES = 16 * 1024
PEER_MESSAGES = (m.Value, m.Gradient, m.Shard)
# What gloo and NCCL say when the other process has gone: the runtime learns of the death itself (and
# recovers, or raises WorkerDied); failing the step here as well would race that with a vaguer error.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Read error")
_LEN = struct.Struct("<I")
_MAX_DESCRIPTOR = 1 << 16


def check_mode(mode: Any) -> str:
    """The data plane mode, validated; ConfigError otherwise."""
    if mode not in MODES:
        raise E.ConfigError(f"data_plane must be one of {MODES}, got {mode!r}")
    return mode


def min_bytes_from_env() -> int:
    """The forced modes' threshold: ACTORGRAD_DATA_PLANE_MIN_BYTES, or DEFAULT_MIN_BYTES."""
    raw = os.environ.get("ACTORGRAD_DATA_PLANE_MIN_BYTES")
    if not raw:
        return DEFAULT_MIN_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise E.ConfigError(f"ACTORGRAD_DATA_PLANE_MIN_BYTES must be an integer, got {raw!r}") from None
    return max(1, value)


def choose(mode: str, min_bytes: int, me: dict, peer: Optional[dict], on_device: bool) -> tuple[Optional[str], int]:
    """The backend for one message to ``peer`` and the buffer size from which it applies; (None, 0): the channel.

    ``me``/``peer``: ``{"node", "pid", "device"}`` of both ends (the peer's None while unknown);
    ``on_device``: the message's buffers are CUDA tensors.
    """
    if mode == "channel" or peer is None:
        return None, 0
    if peer.get("node") == me.get("node") and peer.get("pid") == me.get("pid"):
        return None, 0  # one process: the Host hands frames over without a socket anyway
    both_cuda = on_device and str(peer.get("device", "cpu")).startswith("cuda")
    if mode == "gloo":
        return "gloo", min_bytes
    if mode == "nccl":
        return ("nccl", min_bytes) if both_cuda else (None, 0)
    if both_cuda:
        return "nccl", AUTO_NCCL_BYTES
    # CPU to CPU, and mixed (the host copy happens anyway): the channel. It is authenticated, and since it
    # writes large frames slice by slice it moves them as fast as gloo does (README "Data plane").
    return None, 0


# --- descriptors ---------------------------------------------------------------


def pack(descriptor: list, frame: codec.Frame) -> list:
    """An OOB frame's data as parts: u32 length, the descriptor (padded to codec.ALIGN), the frame."""
    desc = msgpack.packb(descriptor, use_bin_type=True)
    pad = -(_LEN.size + len(desc)) % codec.ALIGN
    return [_LEN.pack(len(desc) + pad) + desc + bytes(pad), *frame.parts()]


def unpack(data: bytearray) -> tuple[list, codec.Frame]:
    """The descriptor and frame of an OOB frame's data; ValueError if malformed."""
    view = memoryview(data)
    if len(view) < _LEN.size:
        raise ValueError("too short")
    (n,) = _LEN.unpack_from(view)
    if n > _MAX_DESCRIPTOR or _LEN.size + n > len(view):
        raise ValueError(f"a descriptor of {n} bytes")
    try:
        # Padding follows the msgpack object: unpack only the first one.
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=n, max_array_len=codec.MAX_BUFFERS,
                                    max_map_len=0, max_str_len=256, max_bin_len=0, max_ext_len=0)
        unpacker.feed(view[_LEN.size:_LEN.size + n])
        desc = unpacker.unpack()
    except Exception as exc:
        raise ValueError(f"a malformed descriptor ({type(exc).__name__})") from None
    ok = (isinstance(desc, list) and len(desc) == 5 and isinstance(desc[0], str) and 0 < len(desc[0]) <= 64
          and desc[1] in ("gloo", "nccl") and isinstance(desc[2], str) and isinstance(desc[3], int)
          and isinstance(desc[4], list) and desc[4]
          and all(isinstance(e, list) and len(e) == 2 and all(isinstance(v, int) and 0 <= v < 2 ** 31 for v in e)
                  for e in desc[4]))
    if not ok:
        raise ValueError("a malformed descriptor")
    try:
        frame = codec.Frame.from_bytes(view[_LEN.size + n:], owned=True)
    except E.DecodeError as err:
        raise ValueError(err.message) from None
    return desc, frame


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 16 else f"{n} bytes"


# --- groups ----------------------------------------------------------------------


class _Group:
    """One direction of one pair: a two-rank process group, its thread, its tags."""

    def __init__(self, gid: str, peer: str, rank: int, backend: str) -> None:
        self.id = gid
        self.peer = peer
        self.rank = rank  # 0: we send on it (we made it); 1: we receive on it
        self.backend = backend
        self.pg: Any = None  # set on the group's thread
        self.broken: Optional[str] = None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"ag-dp-{peer}")
        self._tag = 0

    def tags(self, n: int) -> list[int]:
        """The next ``n`` tags of this direction (the receiver posts exactly these)."""
        out = [(self._tag + i) % (2 ** 31) for i in range(n)]
        self._tag += n
        return out

    def drop(self, why: str) -> None:
        """Mark the group unusable and tear its connections down (waits on it fail)."""
        if self.broken is None:
            self.broken = why
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.abort()
            except Exception as exc:  # a backend without abort: its connections go with the object
                log.debug("abort of group %s: %r", self.id, exc)
        self.thread.shutdown(wait=False, cancel_futures=True)


def _make_group(backend: str, store: Any, rank: int, host_ip: str, timeout: float, device: torch.device) -> Any:
    """A two-rank process group on ``store`` (blocks until both ranks have joined, at most ``timeout``)."""
    import torch.distributed as dist

    delta = datetime.timedelta(seconds=timeout)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host_ip)]  # the node's address only
        opts._timeout = delta
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    if not hasattr(dist, "ProcessGroupNCCL"):
        raise RuntimeError("this build of torch has no NCCL")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = delta
    if device.index is not None:
        torch.cuda.set_device(device)
    return dist.ProcessGroupNCCL(store, rank, 2, opts)


class DataPlane:
    """One worker's end of the data plane: its store, its groups, its transfers (see [Note: data plane])."""

    def __init__(self, name: str, mode: str, timeout: float, min_bytes: int, device: torch.device, node: str,
                 host_ip: str, loop: asyncio.AbstractEventLoop, fail: Callable[[Optional[int], str], None],
                 max_bytes: int = 1 << 30) -> None:
        self.name = name
        self.mode = check_mode(mode)
        self.timeout = timeout  # seconds per transfer and per group set-up
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes  # one message's tensors, as a channel frame's limit (ACTORGRAD_MAX_FRAME_BYTES)
        self.device = device
        self.me = {"node": node, "pid": os.getpid(), "device": str(device)}
        self.peers: dict[str, dict] = {}  # worker -> its {"node", "pid", "device"}, once its address is known
        self._host_ip = host_ip
        self._loop = loop
        self._fail = fail  # (step, text): fail this step here (on the loop thread)
        self._store: Any = None
        self._clients: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()  # stores are made on group threads
        self._out: dict[str, _Group] = {}  # receiver -> the group we send on
        self._in: dict[str, _Group] = {}  # group id -> a group we receive on
        # Fault injection for tests: post no recv (a peer that never receives).
        self.skip_recv = False
        self.sent = 0  # transfers completed, for tests and stats
        self.received = 0

    # --- sending ---------------------------------------------------------------

    def outgoing(self, to: str, frame: codec.Frame) -> Optional[list]:
        """The data of an OOB channel frame for ``frame`` whose large tensors go over the data plane (their
        sends posted); None: send ``frame`` over the channel as usual. On the loop thread."""
        on_device = any(isinstance(b, torch.Tensor) and b.device.type == "cuda" for b in frame.buffers)
        backend, threshold = choose(self.mode, self.min_bytes, self.me, self.peers.get(to), on_device)
        if backend is None:
            return None
        big = [i for i, b in enumerate(frame.buffers) if len(b) and len(b) >= threshold]
        if not big or sum(len(frame.buffers[i]) for i in big) > self.max_bytes:
            return None
        try:
            cls, step, _ = codec.peek(frame)
        except E.DecodeError:
            return None
        if cls not in PEER_MESSAGES:
            return None
        group = self._out.get(to)
        if group is None or group.broken is not None or group.backend != backend:
            if group is not None:
                group.drop("replaced")
            group = self._out[to] = self._create(to, backend)
        tags = group.tags(len(big))
        tensors = []
        buffers = list(frame.buffers)
        for i in big:
            buf = buffers[i]
            t = buf if isinstance(buf, torch.Tensor) else torch.frombuffer(buf, dtype=torch.uint8)
            tensors.append(t.cpu() if backend == "gloo" else t)
            buffers[i] = b""
        what = f"{cls.__name__} of step {step}"
        if not _submit(group, self._send_all, group, tensors, tags, step, what):
            return None  # dropped just now: this one goes over the channel
        assert self._store is not None
        desc = [group.id, backend, self._host_ip, self._store.port, [[i, t] for i, t in zip(big, tags)]]
        return pack(desc, codec.Frame(frame.envelope, buffers, owned=True))

    def _create(self, to: str, backend: str) -> _Group:
        """A new group towards ``to`` (rank 0, our store); its thread builds it while the descriptor travels."""
        import torch.distributed as dist

        if self._store is None:
            self._store = dist.TCPStore(self._host_ip, 0, None, True, datetime.timedelta(seconds=self.timeout),
                                        wait_for_workers=False)
        group = _Group(secrets.token_hex(16), to, 0, backend)
        store = dist.PrefixStore(group.id + "/", self._store)
        group.thread.submit(self._build, group, store)
        log.debug("%s: new %s group %s towards %s", self.name, backend, group.id, to)
        return group

    def _build(self, group: _Group, store: Any) -> None:
        try:
            group.pg = _make_group(group.backend, store, group.rank, self._host_ip, self.timeout, self.device)
        except Exception as exc:
            group.broken = f"the {group.backend} group with {group.peer} could not be set up: {exc}"

    def _send_all(self, group: _Group, tensors: list, tags: list, step: Optional[int], what: str) -> None:
        """Post and wait for the sends of one message (on the group's thread)."""
        nbytes = sum(t.numel() for t in tensors)
        try:
            if group.broken is not None or group.pg is None:
                raise RuntimeError(group.broken or "the group is gone")
            works = [group.pg.send([t], 1, tag) for t, tag in zip(tensors, tags)]
            self._wait(works)
            self.sent += 1
        except Exception as exc:
            text = (f"data plane: the {group.backend} send of {_mib(nbytes)} ({what}) to worker {group.peer!r} "
                    f"failed or did not complete within {self.timeout:g}s: {_brief(exc)}")
            self._broken(group, step, text)

    def _wait(self, works: list) -> None:
        deadline = datetime.timedelta(seconds=self.timeout)
        for work in works:
            work.wait(deadline)

    def _broken(self, group: _Group, step: Optional[int], text: str) -> None:
        group.drop(text)
        if self._out.get(group.peer) is group:
            self._loop.call_soon_threadsafe(self._forget_out, group)
        self._failed(step, text)

    def _failed(self, step: Optional[int], text: str) -> None:
        """Fail ``step`` here, unless the peer's process is gone (see _PEER_GONE)."""
        if any(p in text for p in _PEER_GONE):
            log.warning("%s: %s", self.name, text)
            return
        log.error("%s: %s", self.name, text)
        self._loop.call_soon_threadsafe(self._fail, step, text)

    def _forget_out(self, group: _Group) -> None:
        if self._out.get(group.peer) is group:
            del self._out[group.peer]

    # --- receiving -------------------------------------------------------------

    def incoming(self, sender: str, peer: str, data: bytearray, deliver: Callable[[codec.Frame], None]) -> bool:
        """Take an OOB channel frame from ``peer``: receive its tensors, then ``deliver`` the whole frame (on
        the loop thread, possibly later). False: the frame is malformed (the channel closes)."""
        try:
            desc, frame = unpack(data)
            cls, step, sizes = codec.peek(frame)
        except (ValueError, E.DecodeError) as exc:
            log.error("%s: a malformed data-plane frame from %s: %s", self.name, sender, exc)
            return False
        gid, backend, host, port, entries = desc
        indices = [i for i, _ in entries]
        # The envelope is the truth: each named buffer is empty in the frame and has a size in the envelope.
        if (cls not in PEER_MESSAGES or len(set(indices)) != len(indices)
                or any(i >= len(frame.buffers) or len(frame.buffers[i]) or not sizes.get(i) for i in indices)):
            log.error("%s: a data-plane frame from %s that its envelope does not match", self.name, sender)
            return False
        if sum(sizes[i] for i in indices) > self.max_bytes:  # allocated before a byte arrives: bounded
            log.error("%s: a data-plane frame from %s declares more than %d bytes", self.name, sender,
                      self.max_bytes)
            return False
        what = f"{cls.__name__} of step {step}"
        group = self._in.get(gid)
        if group is None:
            for old in [g for g in self._in.values() if g.peer == peer]:
                old.drop("the peer made a new group")  # it dropped that one; its sends go to the new one
                del self._in[old.id]
            group = self._in[gid] = _Group(gid, peer, 1, backend)
            group.thread.submit(self._join, group, host, port)
        elif group.backend != backend:
            return False
        device = self.device if backend == "nccl" else torch.device("cpu")
        jobs = [(i, sizes[i], tag) for i, tag in entries]
        if not _submit(group, self._recv_all, group, frame, jobs, device, step, what, deliver):
            text = f"data plane: the {backend} group of worker {peer!r} is gone ({group.broken}); {what} dropped"
            log.error("%s: %s", self.name, text)
            self._fail(step, text)
            deliver(frame)  # without its tensors: dropped as malformed, the sender's later frames flow on
        return True

    def _join(self, group: _Group, host: str, port: int) -> None:
        import torch.distributed as dist

        try:
            with self._lock:
                client = self._clients.get((host, port))
                if client is None:
                    client = self._clients[(host, port)] = dist.TCPStore(
                        host, port, None, False, datetime.timedelta(seconds=self.timeout))
            store = dist.PrefixStore(group.id + "/", client)
            group.pg = _make_group(group.backend, store, 1, self._host_ip, self.timeout, self.device)
        except Exception as exc:
            group.broken = f"could not join the {group.backend} group of {group.peer}: {exc}"

    def _recv_all(self, group: _Group, frame: codec.Frame, jobs: list, device: torch.device, step: Optional[int],
                  what: str, deliver: Callable[[codec.Frame], None]) -> None:
        """Allocate, post and wait for the receives of one message, then deliver it (on the group's thread)."""
        nbytes = sum(n for _, n, _ in jobs)
        try:
            if group.broken is not None or group.pg is None:
                raise RuntimeError(group.broken or "the group is gone")
            if device.type == "cuda" and self.device.type != "cuda":
                raise RuntimeError(f"an NCCL transfer to a worker on {self.device}")
            bufs = [torch.empty(n, dtype=torch.uint8, device=device) for _, n, _ in jobs]
            if self.skip_recv:
                raise TimeoutError("no recv posted (fault injection)")
            works = [group.pg.recv([b], 0, tag) for b, (_, _, tag) in zip(bufs, jobs)]
            self._wait(works)
        except Exception as exc:
            text = (f"data plane: worker {self.name!r} did not receive the {group.backend} tensors "
                    f"({_mib(nbytes)}, {what}) from worker {group.peer!r} within {self.timeout:g}s: {_brief(exc)}")
            if self.skip_recv:
                # A peer that never posts its receive: wait as long as a real one would, say nothing.
                threading.Event().wait(self.timeout)
                self._loop.call_soon_threadsafe(deliver, frame)
                return
            group.drop(text)
            self._failed(step, text)
            # Without its tensors: the Host drops it as malformed, and the sender's later frames flow on.
            self._loop.call_soon_threadsafe(deliver, frame)
            return
        buffers = list(frame.buffers)
        for (i, _, _), b in zip(jobs, bufs):
            buffers[i] = b
        self.received += 1
        self._loop.call_soon_threadsafe(deliver, codec.Frame(frame.envelope, buffers, owned=True))

    # --- life cycle ------------------------------------------------------------

    def groups(self) -> int:
        """How many groups this worker holds (both directions)."""
        return len(self._out) + len(self._in)

    def reset(self) -> None:
        """Drop every group (recovery: a new epoch; peers may be new processes)."""
        groups = list(self._out.values()) + list(self._in.values())
        self._out.clear()
        self._in.clear()
        for g in groups:
            g.drop("the runtime is recovering")

    def close(self) -> None:
        """Drop every group and stop the store (shutdown)."""
        self.reset()
        self._clients.clear()
        self._store = None


def _submit(group: _Group, fn: Callable[..., None], *args: Any) -> bool:
    """Queue ``fn`` on the group's thread; False if the group was dropped meanwhile."""
    try:
        group.thread.submit(fn, *args)
    except RuntimeError:  # its thread was shut down
        return False
    return True


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text[:300]
