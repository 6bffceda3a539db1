"""Direct channels: length-prefixed msgpack frames over asyncio streams.

A worker serves a Unix socket (abstract namespace on Linux, for peers on its
node) and a TCP port (for peers on other nodes); addresses are exchanged
through Ray at spawn. A frame is ``u32 envelope length, u32 data length``, the
envelope msgpack ``[kind, sender, seq, token]``, then the data itself (written
as is: a large tensor is not packed a second time):

- ``MSG``: one message from ``sender`` with its per-channel ``seq``;
  ``token`` is None for one-way messages, or a number the reply will carry;
- ``REPLY``: the encoded reply to the request with that ``token``.

Each ordered pair of endpoints uses one stream, so frames arrive in order;
the Host still checks ``seq``. Nothing here knows about Ray or messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import sys
import uuid
from typing import Any, Awaitable, Callable, Optional

import msgpack

log = logging.getLogger("actorgrad.transport.channels")

MSG = 0
REPLY = 1
_HEADER = struct.Struct("!II")
MAX_ENVELOPE = 1 << 16
MAX_FRAME = 1 << 31  # frames above 2 GiB are refused

AcceptFn = Callable[[str, int, bytes, Optional[Callable[[bytes], None]]], None]


def pack_frame(kind: int, sender: Optional[str], seq: int, token: Optional[int], data: bytes) -> list[bytes]:
    """One frame as buffers to write one after the other (``writelines``)."""
    env = msgpack.packb([kind, sender, seq, token], use_bin_type=True)
    return [_HEADER.pack(len(env), len(data)), env, data]


async def read_frame(reader: asyncio.StreamReader) -> Optional[list]:
    """The next frame's fields, or None at the end of the stream; ValueError if malformed."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    n_env, n_data = _HEADER.unpack(header)
    if n_env > MAX_ENVELOPE or n_data > MAX_FRAME:
        raise ValueError(f"frame of {n_env} + {n_data} bytes is too large")
    try:
        env = await reader.readexactly(n_env)
        data = await reader.readexactly(n_data)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    fields = msgpack.unpackb(env, raw=False)
    ok = (
        isinstance(fields, list)
        and len(fields) == 4
        and fields[0] in (MSG, REPLY)
        and (fields[1] is None or isinstance(fields[1], str))
        and isinstance(fields[2], int)
        and (fields[3] is None or isinstance(fields[3], int))
    )
    if not ok:
        raise ValueError("malformed frame")
    return fields + [data]


def _unix_name(tag: str) -> str:
    name = f"actorgrad-{tag}-{uuid.uuid4().hex[:12]}"
    if sys.platform.startswith("linux"):
        return "\0" + name  # abstract: no file to clean up
    return os.path.join("/tmp", name + ".sock")


class ChannelServer:
    """Accepts frames for one Host on a Unix socket and a TCP port."""

    def __init__(self, accept: AcceptFn, tag: str, host_ip: str) -> None:
        self._accept = accept
        self._tag = tag
        self._host_ip = host_ip
        self._servers: list[asyncio.AbstractServer] = []
        self.address: dict[str, Any] = {}

    async def start(self, node_id: str) -> dict[str, Any]:
        """Start listening; return the address peers connect to."""
        path = _unix_name(self._tag)
        self._servers.append(await asyncio.start_unix_server(self._serve, path=path))
        tcp = await asyncio.start_server(self._serve, host="0.0.0.0", port=0)
        self._servers.append(tcp)
        port = tcp.sockets[0].getsockname()[1]
        self.address = {"node": node_id, "unix": path, "host": self._host_ip, "port": port}
        return self.address

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)

        def replier(token: int) -> Callable[[bytes], None]:
            def reply(data: bytes) -> None:
                if not writer.is_closing():
                    writer.writelines(pack_frame(REPLY, None, 0, token, data))

            return reply

        try:
            while True:
                try:
                    fields = await read_frame(reader)
                except ValueError as exc:
                    log.error("%s: closing a channel that sent a bad frame: %s", self._tag, exc)
                    break
                if fields is None:
                    break
                kind, sender, seq, token, data = fields
                if kind != MSG or sender is None:
                    log.error("%s: unexpected frame kind %s dropped", self._tag, kind)
                    continue
                self._accept(sender, seq, data, None if token is None else replier(token))
        finally:
            writer.close()

    def close(self) -> None:
        """Stop listening."""
        for s in self._servers:
            s.close()


class Channel:
    """The sending end towards one worker; frames queue until the connection is up."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str,
                 resolve: Callable[[], Awaitable[dict[str, Any]]], my_node: str,
                 on_reply: Optional[Callable[[int, bytes], None]] = None,
                 on_lost: Optional[Callable[[str], None]] = None) -> None:
        self.name = name
        self._loop = loop
        self._resolve = resolve
        self._my_node = my_node
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._writer: Optional[asyncio.StreamWriter] = None
        self._queue: list[list[bytes]] = []
        self.failed: Optional[str] = None
        self._task = loop.create_task(self._connect())

    def send(self, frame: list[bytes]) -> None:
        """Write a frame (on the loop thread), or queue it until connected."""
        if self.failed is not None:
            return
        if self._writer is not None:
            self._writer.writelines(frame)
        else:
            self._queue.append(frame)

    async def _connect(self) -> None:
        try:
            addr = await self._resolve()
            if addr.get("node") == self._my_node and addr.get("unix"):
                reader, writer = await asyncio.open_unix_connection(addr["unix"])
            else:
                reader, writer = await asyncio.open_connection(addr["host"], addr["port"])
        except Exception as exc:
            self._lost(f"could not connect: {exc!r}")
            return
        _nodelay(writer)
        self._writer = writer
        for frame in self._queue:
            writer.writelines(frame)
        self._queue.clear()
        await self._read_replies(reader)

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                fields = await read_frame(reader)
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
