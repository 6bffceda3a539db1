"""Direct channels: authenticated, length-prefixed frames over asyncio streams.

A worker serves a Unix socket (a socket file in a directory only its user can
open, for peers on its node) and a TCP port on its node's address (for peers
on other nodes); addresses are exchanged through Ray at spawn.

[Note: channel authentication] Every connection starts with a handshake before
any frame is read. The runtime creates one secret per run and hands it to its
workers through Ray (which authenticates its own calls). The server sends a
random nonce; the client answers with its identity (``caller`` or its worker
name), a nonce of its own and an HMAC-SHA256 over both nonces and the
identity; the server checks it and proves in turn that it knows the secret.
From then on the connection speaks for that identity only: a frame whose
sender field names anyone else is refused and the connection dropped. A peer
without the secret never gets a frame read, and holds a connection slot only
for the handshake's short deadline. Frames are not encrypted (see the README's
threat model).

A frame is ``u32 envelope length, u32 data length``, the envelope msgpack
``[kind, sender, seq, token]``, then the data: an encoded message
(``codec.Frame.to_bytes`` layout), written as its parts one after the other, so
a tensor's bytes go from its buffer to the socket without being joined; the
receiver reads the data into one bytearray of its own, on which the message's
tensors are then built without a copy:

- ``MSG``: one message from ``sender`` with its per-channel ``seq``;
  ``token`` is None for one-way messages, or a number the reply will carry;
- ``REPLY``: the encoded reply to the request with that ``token``;
- ``OOB``: a peer message whose large tensors travel out of band over the data
  plane (dataplane.py): the data is a small descriptor, then the encoded
  message with those buffers left empty. Only a server given an ``oob`` hook
  takes it; it is refused (and the connection closed) otherwise.

Each ordered pair of endpoints uses one stream, so frames arrive in order;
the Host still checks ``seq``. Nothing here knows about Ray or message types.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Union

import msgpack

from ..core.codec import Frame

log = logging.getLogger("actorgrad.transport.channels")

# A frame's data: an encoded message, or raw bytes (tests, and the channel layer itself knows no messages).
Data = Union[Frame, bytes, bytearray, memoryview]

MSG = 0
REPLY = 1
OOB = 2
_HEADER = struct.Struct("!II")
MAX_ENVELOPE = 1 << 12  # [kind, sender, seq, token]: a name and three numbers
# Largest frame a channel accepts by default (ACTORGRAD_MAX_FRAME_BYTES to change): big enough for the
# state of a 1 GiB module in one reply, far below what a length field can claim.
DEFAULT_MAX_FRAME = 1 << 30
DEFAULT_MAX_CONNECTIONS = 1024  # authenticated connections per worker: one per peer and the caller
DEFAULT_MAX_HANDSHAKES = 128  # connections still proving themselves, at once
HANDSHAKE_SECONDS = 5.0

_MAGIC = b"AGCH1"
_NONCE = 32
_HELLO = struct.Struct("!H")
_MAX_HELLO = 512


class AuthError(Exception):
    """A peer failed the channel handshake."""


@dataclass
class ChannelConfig:
    """Everything a worker's channels need: the runtime's secret and the limits."""

    secret: bytes
    max_frame: int = DEFAULT_MAX_FRAME
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    handshake_seconds: float = HANDSHAKE_SECONDS
    # The tensor data plane beside the channels (dataplane.py): "auto", "channel", "gloo" or "nccl",
    # and how long one transfer (or a pair's group set-up) may take before it fails its step.
    data_plane: str = "channel"
    data_plane_timeout: float = 60.0
    data_plane_min_bytes: int = 64 * 1024  # forced gloo/nccl: tensors from this size on

    @classmethod
    def create(cls) -> "ChannelConfig":
        """A fresh secret, limits from the environment (ACTORGRAD_MAX_FRAME_BYTES, ...)."""
        return cls(
            secrets.token_bytes(32),
            max_frame=_env_int("ACTORGRAD_MAX_FRAME_BYTES", DEFAULT_MAX_FRAME),
            max_connections=_env_int("ACTORGRAD_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
        )

    def __repr__(self) -> str:  # never print the secret
        return (f"ChannelConfig(max_frame={self.max_frame}, max_connections={self.max_connections}, "
                f"data_plane={self.data_plane!r})")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class RateLimitedLog:
    """Logs at most ``burst`` records per ``period`` seconds per key; counts the rest."""

    def __init__(self, logger: logging.Logger, period: float = 60.0, burst: int = 5) -> None:
        self._log = logger
        self._period = period
        self._burst = burst
        self._windows: dict[str, list[float]] = {}  # key -> [window start, count, suppressed]

    def __call__(self, level: int, key: str, text: str, *args: Any) -> None:
        """Log ``text % args`` unless ``key`` has logged ``burst`` times this period."""
        now = time.monotonic()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self._period:
            if w is not None and w[2]:
                self._log.log(level, "%d similar messages suppressed (%s)", int(w[2]), key)
            w = [now, 0, 0]
            self._windows[key] = w
            if len(self._windows) > 256:  # keys come from a bounded set of places; stay bounded anyway
                self._windows = {key: w}
        if w[1] < self._burst:
            w[1] += 1
            self._log.log(level, text, *args)
        else:
            w[2] += 1


_rlog = RateLimitedLog(log)


def pack_frame(kind: int, sender: Optional[str], seq: int, token: Optional[int], data: Union[Data, list]) -> list:
    """One frame as buffers to write one after the other (``writelines``); ``data`` is bytes, a Frame, or a
    list of byte buffers written one after the other."""
    env = msgpack.packb([kind, sender, seq, token], use_bin_type=True)
    if isinstance(data, (Frame, list)):
        parts = data.parts() if isinstance(data, Frame) else data
        return [_HEADER.pack(len(env), sum(map(len, parts))), env, *parts]
    return [_HEADER.pack(len(env), len(data)), env, data]


# A stream's buffer pauses reading from the socket at twice this: asyncio's default (64 KiB) made a large
# frame arrive 128 KiB per turn of the loop, which cost 200 ms for 32 MiB on one node (bench/dataplane.md).
STREAM_LIMIT = 4 << 20


# Frames larger than this are written in slices of this size, each once the socket took the last: asyncio's
# transport (Python 3.11) keeps what the socket did not take in one bytearray and deletes each sent prefix
# from its front, which copies the rest every time: quadratic in the frame (400 ms for 64 MiB on one node).
WRITE_SLICE = 1 << 20


class FrameWriter:
    """Writes frames to a stream in order: small ones at once, large ones slice by slice (see WRITE_SLICE)."""

    def __init__(self, writer: asyncio.StreamWriter, on_error: Callable[[str], None]) -> None:
        self.writer = writer
        self._on_error = on_error
        self._backlog: collections.deque = collections.deque()
        self._task: Optional[asyncio.Task] = None

    def write(self, frame: list) -> None:
        """Queue one frame's parts (on the loop thread); frames leave in the order written."""
        if self.writer.is_closing():
            return
        # While a large frame is on its way (its slices wait for the socket), every later frame waits too:
        # written now, it would land in the middle of that frame.
        busy = self._task is not None and not self._task.done()
        if not busy and sum(memoryview(p).nbytes for p in frame) <= WRITE_SLICE:
            self.writer.writelines(frame)
            return
        self._backlog.append(frame)
        if not busy:
            self._task = asyncio.get_running_loop().create_task(self._drain_backlog())

    async def _drain_backlog(self) -> None:
        try:
            while self._backlog:
                for part in self._backlog.popleft():
                    view = memoryview(part).cast("B")
                    for i in range(0, len(view), WRITE_SLICE):
                        self.writer.write(view[i:i + WRITE_SLICE])
                        await self.writer.drain()
        except Exception as exc:  # the connection went while a frame was on its way (or a part was unwritable)
            self._backlog.clear()
            self.writer.transport.abort()  # the stream is cut inside a frame: the peer must not read on
            self._on_error(f"the connection broke while writing: {exc!r}")


async def _read_owned(reader: asyncio.StreamReader, n: int) -> Optional[bytearray]:
    """The next ``n`` bytes in a bytearray of their own, or None if the stream ends first."""
    # Grown as data arrives (not allocated from the declared length), and handed to the receiver, which
    # builds tensors on it: the one copy out of the stream's buffer is the only one on this side.
    out = bytearray()
    while len(out) < n:
        try:
            chunk = await reader.read(n - len(out))
        except ConnectionError:
            return None
        if not chunk:
            return None
        out += chunk
    return out


async def read_frame(reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME) -> Optional[list]:
    """The next frame's fields, or None at the end of the stream; ValueError if malformed."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    n_env, n_data = _HEADER.unpack(header)
    if n_env > MAX_ENVELOPE or n_data > max_frame:
        raise ValueError(f"frame of {n_env} + {n_data} bytes is too large (at most {MAX_ENVELOPE} + {max_frame}; "
                         "ACTORGRAD_MAX_FRAME_BYTES raises the limit)")
    try:
        env = await reader.readexactly(n_env)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    data = await _read_owned(reader, n_data)
    if data is None:
        return None
    try:
        # A small envelope: msgpack's own limits keep a hostile one from costing more than its size.
        fields = msgpack.unpackb(env, raw=False, max_array_len=4, max_map_len=0,
                                 max_str_len=256, max_bin_len=0, max_ext_len=0)
    except Exception as exc:
        raise ValueError(f"malformed envelope: {type(exc).__name__}") from None
    ok = (
        isinstance(fields, list)
        and len(fields) == 4
        and fields[0] in (MSG, REPLY, OOB)
        and (fields[1] is None or isinstance(fields[1], str))
        and isinstance(fields[2], int)
        and (fields[3] is None or isinstance(fields[3], int))
    )
    if not ok:
        raise ValueError("malformed frame")
    return fields + [data]


# --- handshake -----------------------------------------------------------------


def _mac(secret: bytes, role: bytes, first: bytes, second: bytes, identity: str) -> bytes:
    return hmac.new(secret, b"|".join((_MAGIC, role, first, second, identity.encode())), hashlib.sha256).digest()


async def _server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> str:
    """Prove the client knows ``secret`` and prove that we do; return the client's identity."""
    nonce_s = secrets.token_bytes(_NONCE)
    writer.write(_MAGIC + nonce_s)
    await writer.drain()
    (n,) = _HELLO.unpack(await reader.readexactly(_HELLO.size))
    if n > _MAX_HELLO:
        raise AuthError(f"a hello of {n} bytes")
    try:
        hello = msgpack.unpackb(await reader.readexactly(n), raw=False,
                                max_array_len=3, max_map_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types on bad input
        raise AuthError(f"a malformed hello ({type(exc).__name__})") from None
    ok = (isinstance(hello, list) and len(hello) == 3 and isinstance(hello[0], str) and 0 < len(hello[0]) <= 256
          and isinstance(hello[1], bytes) and len(hello[1]) == _NONCE and isinstance(hello[2], bytes))
    if not ok:
        raise AuthError("a malformed hello")
    identity, nonce_c, mac = hello
    if not hmac.compare_digest(mac, _mac(secret, b"client", nonce_s, nonce_c, identity)):
        raise AuthError(f"a wrong key (claimed to be {identity[:64]!r})")
    writer.write(_mac(secret, b"server", nonce_c, nonce_s, identity))
    await writer.drain()
    return identity


async def _client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                            identity: str) -> None:
    """Prove to the server that we know ``secret``; refuse a server that does not."""
    head = await reader.readexactly(len(_MAGIC) + _NONCE)
    if head[:len(_MAGIC)] != _MAGIC:
        raise AuthError("the server does not speak the actorgrad channel protocol")
    nonce_s = head[len(_MAGIC):]
    nonce_c = secrets.token_bytes(_NONCE)
    hello = msgpack.packb([identity, nonce_c, _mac(secret, b"client", nonce_s, nonce_c, identity)],
                          use_bin_type=True)
    writer.write(_HELLO.pack(len(hello)) + hello)
    await writer.drain()
    proof = await reader.readexactly(hashlib.sha256().digest_size)
    if not hmac.compare_digest(proof, _mac(secret, b"server", nonce_c, nonce_s, identity)):
        raise AuthError("the server could not prove it belongs to this runtime")


def speaks_for(identity: str, sender: str) -> bool:
    """Whether an authenticated ``identity`` may send frames with this sender field (``name`` or ``name#epoch``)."""
    if sender == identity:
        return True
    base, sep, tail = sender.rpartition("#")
    return bool(sep) and base == identity and tail.isdigit()


# --- server ----------------------------------------------------------------------


def _private_unix_path(tag: str) -> tuple[str, str]:
    """A socket path in a fresh directory that only this user can enter (0700)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isdir(base) or len(base) > 60:
        base = tempfile.gettempdir()
    directory = tempfile.mkdtemp(prefix="ag-", dir=base)  # mkdtemp creates it 0700
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)[:24]
    return directory, os.path.join(directory, f"{safe}.sock")


# A hook for a frame: the sender (already checked against the connection's identity), seq, data (a
# bytearray the hook may keep) and the reply function; returns False when the frame must close the
# connection (e.g. a bound exceeded).
AcceptFn = Callable[[str, int, bytearray, Optional[Callable[[Data], None]]], Optional[bool]]
GoneFn = Callable[[str], None]


@dataclass
class ServerStats:
    """What a ChannelServer has refused and holds: for stats() and for tests."""

    connections: int = 0
    handshaking: int = 0
    authenticated: int = 0
    refused_handshakes: int = 0
    refused_connections: int = 0
    refused_frames: int = 0
    causes: dict[str, int] = field(default_factory=dict)

    def refuse(self, what: str) -> None:
        """Count one refusal by cause."""
        self.causes[what] = self.causes.get(what, 0) + 1


class ChannelServer:
    """Accepts frames for one Host on a private Unix socket and a TCP port, from authenticated peers only."""

    def __init__(self, accept: AcceptFn, tag: str, host_ip: str, config: ChannelConfig,
                 gone: Optional[GoneFn] = None, oob: Optional[AcceptFn] = None) -> None:
        self._accept = accept
        self._oob = oob  # takes OOB frames (sender, seq, data, None); without it they are refused
        self._gone = gone
        self._tag = tag
        self._host_ip = host_ip
        self._config = config
        self._servers: list[asyncio.AbstractServer] = []
        self._dir: Optional[str] = None
        self._handshaking = 0
        self._open: set[asyncio.StreamWriter] = set()
        self.stats = ServerStats()
        self.address: dict[str, Any] = {}

    async def start(self, node_id: str) -> dict[str, Any]:
        """Start listening; return the address peers connect to."""
        self._dir, path = _private_unix_path(self._tag)
        self._servers.append(await asyncio.start_unix_server(self._serve, path=path, limit=STREAM_LIMIT))
        os.chmod(path, 0o600)
        # The node's own address only: not every interface of the machine.
        tcp = await asyncio.start_server(self._serve, host=self._host_ip, port=0, limit=STREAM_LIMIT)
        self._servers.append(tcp)
        port = tcp.sockets[0].getsockname()[1]
        self.address = {"node": node_id, "unix": path, "host": self._host_ip, "port": port}
        return self.address

    def _refuse(self, what: str, text: str, *args: Any) -> None:
        self.stats.refuse(what)
        _rlog(logging.WARNING, f"{self._tag}:{what}", f"%s: {text}", self._tag, *args)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self._config
        if self._handshaking >= cfg.max_handshakes or len(self._open) >= cfg.max_connections:
            self.stats.refused_connections += 1
            self._refuse("busy", "refused a connection: %d open, %d still authenticating", len(self._open),
                         self._handshaking)
            writer.transport.abort()
            return
        self._open.add(writer)
        self.stats.connections += 1
        identity: Optional[str] = None
        senders: set[str] = set()
        try:
            self._handshaking += 1
            try:
                identity = await asyncio.wait_for(_server_handshake(reader, writer, cfg.secret),
                                                  cfg.handshake_seconds)
            except (AuthError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError,
                    struct.error) as exc:
                self.stats.refused_handshakes += 1
                self._refuse("auth", "refused a connection that did not authenticate: %s",
                             str(exc) or type(exc).__name__)
                return
            finally:
                self._handshaking -= 1
            self.stats.authenticated += 1
            _nodelay(writer)
            await self._frames(reader, writer, identity, senders)
        finally:
            self._open.discard(writer)
            if identity is None:
                writer.transport.abort()  # no goodbye for a peer that never authenticated
            else:
                writer.close()
            if self._gone is not None:
                for sender in senders:
                    self._gone(sender)

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: str,
                      senders: set[str]) -> None:
        out = FrameWriter(writer, lambda why: log.warning("reply to %s not sent: %s", identity, why))

        def replier(token: int) -> Callable[[Data], None]:
            def reply(data: Data) -> None:
                out.write(pack_frame(REPLY, None, 0, token, data))

            return reply

        while True:
            try:
                fields = await read_frame(reader, self._config.max_frame)
            except ValueError as exc:
                self.stats.refused_frames += 1
                self._refuse("frame", "closing %s's channel, which sent a bad frame: %s", identity, exc)
                return
            if fields is None:
                return
            kind, sender, seq, token, data = fields
            if kind == OOB and self._oob is not None and token is None and sender is not None \
                    and speaks_for(identity, sender):
                senders.add(sender)
                if self._oob(sender, seq, data, None) is False:
                    self.stats.refused_frames += 1
                    self._refuse("oob", "closing %s's channel, which sent a bad data-plane frame", identity)
                    return
                continue
            if kind != MSG or sender is None or not speaks_for(identity, sender):
                self.stats.refused_frames += 1
                self._refuse("spoof", "closing %s's channel, which sent a frame as %r (kind %s)", identity,
                             sender, kind)
                return
            senders.add(sender)
            if self._accept(sender, seq, data, None if token is None else replier(token)) is False:
                self.stats.refused_frames += 1
                self._refuse("bound", "closing %s's channel: it holds too many frames out of order", identity)
                return

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        for s in self._servers:
            s.close()
        for w in list(self._open):
            w.transport.abort()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# --- client ----------------------------------------------------------------------


class Channel:
    """The sending end towards one worker; frames queue until the connection is up and authenticated."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str,
                 resolve: Callable[[], Awaitable[dict[str, Any]]], my_node: str, config: ChannelConfig,
                 identity: str, on_reply: Optional[Callable[[int, bytearray], None]] = None,
                 on_lost: Optional[Callable[[str], None]] = None) -> None:
        self.name = name
        self._loop = loop
        self._resolve = resolve
        self._my_node = my_node
        self._config = config
        self._identity = identity
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._writer: Optional[asyncio.StreamWriter] = None
        self._out: Optional[FrameWriter] = None
        self._queue: list[list] = []
        self.failed: Optional[str] = None
        self._task = loop.create_task(self._connect())

    def send(self, frame: list) -> None:
        """Write a frame (on the loop thread), or queue it until connected."""
        if self.failed is not None:
            return
        if self._out is not None:
            self._out.write(frame)
        else:
            self._queue.append(frame)

    async def _connect(self) -> None:
        try:
            addr = await self._resolve()
            if addr.get("node") == self._my_node and addr.get("unix"):
                reader, writer = await asyncio.open_unix_connection(addr["unix"], limit=STREAM_LIMIT)
            else:
                reader, writer = await asyncio.open_connection(addr["host"], addr["port"], limit=STREAM_LIMIT)
        except Exception as exc:
            self._lost(f"could not connect: {exc!r}")
            return
        try:
            await asyncio.wait_for(_client_handshake(reader, writer, self._config.secret, self._identity),
                                   self._config.handshake_seconds * 2)
        except (AuthError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.transport.abort()
            self._lost(f"the channel handshake failed: {str(exc) or type(exc).__name__}")
            return
        _nodelay(writer)
        self._writer = writer
        self._out = FrameWriter(writer, self._lost)
        for frame in self._queue:
            self._out.write(frame)
        self._queue.clear()
        await self._read_replies(reader)

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                fields = await read_frame(reader, self._config.max_frame)
                if fields is None:
                    break
                kind, _, _, token, data = fields
                if kind == REPLY and token is not None and self._on_reply is not None:
                    self._on_reply(token, data)
        except Exception as exc:
            log.error("channel to %s broke: %r", self.name, exc)
        self._lost("the connection closed")

    def _lost(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            self._queue.clear()
            if self._on_lost is not None:
                self._on_lost(why)

    def close(self) -> None:
        """Close the connection."""
        self.failed = self.failed or "closed"
        if self._writer is not None:
            self._writer.close()
        self._task.cancel()

    async def closed(self) -> None:
        """Close, and wait until the connection task has ended."""
        self.close()
        try:
            await self._task
        except BaseException:  # cancelled: that is the point
            pass


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
