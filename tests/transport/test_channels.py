"""Direct channels on loopback: the handshake, identity binding, limits, FrameWriter ordering (no Ray)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any, Awaitable, Callable

import pytest

from actorgrad.transport import channels as C


class Server:
    """A ChannelServer on this loop that records the frames it accepts."""

    def __init__(self, config: C.ChannelConfig) -> None:
        self.frames: list[tuple[str, int, bytes]] = []
        self.gone: list[str] = []
        self.server = C.ChannelServer(self._accept, "w", "127.0.0.1", config, gone=self.gone.append)

    def _accept(self, sender, seq, data, reply):
        self.frames.append((sender, seq, data))
        if reply is not None:
            reply(b"re:" + data)
        return True

    async def start(self) -> dict:
        return await self.server.start("node")


def channel(addr, config, identity="caller", node="node", replies=None, lost=None):
    async def resolve():
        return addr

    return C.Channel(asyncio.get_running_loop(), "w", resolve, node, config, identity,
                     on_reply=lambda token, data: replies.append((token, data)) if replies is not None else None,
                     on_lost=lambda why: lost.append(why) if lost is not None else None)


async def until(cond, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.asyncio
@pytest.mark.parametrize("node", ["node", "other"], ids=["unix", "tcp"])
async def test_an_authenticated_channel_carries_frames_and_replies(node):
    cfg = C.ChannelConfig(os.urandom(32))
    srv = Server(cfg)
    addr = await srv.start()
    assert os.stat(addr["unix"]).st_mode & 0o777 == 0o600
    replies: list = []
    ch = channel(addr, cfg, node=node, replies=replies)
    ch.send(C.pack_frame(C.MSG, "caller", 0, None, b"one"))
    ch.send(C.pack_frame(C.MSG, "caller#2", 1, 7, b"two"))  # a later epoch of the same identity
    await until(lambda: len(replies) == 1)
    assert srv.frames == [("caller", 0, b"one"), ("caller#2", 1, b"two")] and replies == [(7, b"re:two")]
    assert srv.server.stats.authenticated == 1 and ch.failed is None
    await ch.closed()
    await until(lambda: srv.gone)
    assert sorted(srv.gone) == ["caller", "caller#2"]
    srv.server.close()
    assert not os.path.exists(addr["unix"])


@pytest.mark.asyncio
async def test_a_wrong_secret_is_refused_both_ways_before_any_frame():
    srv = Server(C.ChannelConfig(os.urandom(32)))
    addr = await srv.start()
    lost: list = []
    ch = channel(addr, C.ChannelConfig(os.urandom(32)), lost=lost)
    ch.send(C.pack_frame(C.MSG, "caller", 0, None, b"x"))
    await until(lambda: lost)
    assert "handshake failed" in lost[0] and srv.frames == []
    await until(lambda: srv.server.stats.refused_handshakes == 1)
    srv.server.close()


@pytest.mark.asyncio
async def test_a_connection_may_not_speak_for_another_identity():
    cfg = C.ChannelConfig(os.urandom(32))
    srv = Server(cfg)
    addr = await srv.start()
    lost: list = []
    ch = channel(addr, cfg, identity="enc", lost=lost)
    ch.send(C.pack_frame(C.MSG, "enc", 0, None, b"mine"))
    ch.send(C.pack_frame(C.MSG, "caller", 0, None, b"spoofed"))
    ch.send(C.pack_frame(C.MSG, "enc", 1, None, b"after"))
    await until(lambda: lost)
    assert srv.frames == [("enc", 0, b"mine")]
    assert srv.server.stats.causes == {"spoof": 1}
    assert C.speaks_for("enc", "enc#12") and not C.speaks_for("enc", "encx") and not C.speaks_for("enc", "enc#x")
    srv.server.close()


@pytest.mark.asyncio
async def test_a_frame_above_the_limit_closes_the_connection():
    cfg = C.ChannelConfig(os.urandom(32), max_frame=1024)
    srv = Server(cfg)
    addr = await srv.start()
    lost: list = []
    ch = channel(addr, cfg, lost=lost)
    ch.send(C.pack_frame(C.MSG, "caller", 0, None, b"a" * 1024))
    ch.send(C.pack_frame(C.MSG, "caller", 1, None, b"a" * 1025))
    await until(lambda: lost)
    assert [f[1] for f in srv.frames] == [0] and srv.server.stats.causes == {"frame": 1}
    srv.server.close()


@pytest.mark.asyncio
async def test_silent_and_excess_connections_are_dropped():
    cfg = C.ChannelConfig(os.urandom(32), max_handshakes=2, handshake_seconds=0.3)
    srv = Server(cfg)
    addr = await srv.start()
    conns = [await asyncio.open_unix_connection(addr["unix"]) for _ in range(4)]
    # Two are handshaking (they got the challenge); the others were closed at once.
    got = [await reader.read(64) for reader, _ in conns]
    assert sorted(len(g) for g in got) == [0, 0, 37, 37]
    # The two that never answer are dropped once the handshake deadline passes.
    for (reader, _), g in zip(conns, got):
        if g:
            assert await asyncio.wait_for(reader.read(64), 10) == b""
    assert srv.server.stats.refused_connections == 2 and srv.server.stats.refused_handshakes == 2
    # And an honest peer still gets in.
    replies: list = []
    ch = channel(addr, cfg, replies=replies)
    ch.send(C.pack_frame(C.MSG, "caller", 0, 1, b"hi"))
    await until(lambda: replies)
    for _, w in conns:
        w.close()
    await ch.closed()
    srv.server.close()


@pytest.mark.asyncio
async def test_hostile_hellos_are_refused_without_reading_further():
    cfg = C.ChannelConfig(os.urandom(32), handshake_seconds=2)
    srv = Server(cfg)
    addr = await srv.start()
    hellos = [
        b"\xff\xff" + b"x" * 64,  # a length beyond the hello's bound
        struct.pack("!H", 4) + b"\xc1\xc1\xc1\xc1",  # not msgpack
        struct.pack("!H", 3) + b"\x93\x01\x02",  # wrong shape
        struct.pack("!II", 16, 2**31),  # a frame header instead of a hello
    ]
    for hello in hellos:
        reader, writer = await asyncio.open_unix_connection(addr["unix"])
        assert len(await reader.readexactly(37)) == 37
        writer.write(hello)
        assert await asyncio.wait_for(reader.read(64), 10) == b""
        writer.close()
    await until(lambda: srv.server.stats.refused_handshakes == len(hellos))
    assert srv.frames == []
    srv.server.close()


# --- FrameWriter: order and failure over real sockets ----------------------------------------------

HANG_GUARD = 30.0  # seconds: only so that a bug fails the test instead of hanging it (no speed is asserted)


async def stream_pair(kind: str) -> tuple[tuple, tuple, Callable[[], Awaitable[None]]]:
    """Two connected ends as asyncio streams ((reader, writer), (reader, writer)) and a cleanup coroutine."""
    if kind == "unix":
        a, b = socket.socketpair()
        ra, wa = await asyncio.open_connection(sock=a, limit=C.STREAM_LIMIT)
        rb, wb = await asyncio.open_connection(sock=b, limit=C.STREAM_LIMIT)
        server = None
    else:
        accepted = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0,
                                            limit=C.STREAM_LIMIT)
        port = server.sockets[0].getsockname()[1]
        ra, wa = await asyncio.open_connection("127.0.0.1", port, limit=C.STREAM_LIMIT)
        rb, wb = await asyncio.wait_for(accepted, HANG_GUARD)
        C._nodelay(wa)  # as a Channel's TCP connection

    async def cleanup():
        for w in (wa, wb):
            w.transport.abort()
        if server is not None:
            server.close()
            await server.wait_closed()

    return (ra, wa), (rb, wb), cleanup


def small(i: int) -> bytes:
    return bytes([i % 251]) * (1 + i % 9)  # 1 to 9 bytes, telling the index


def large(i: int, size: int) -> tuple[bytes, Any]:
    """A frame body of ``size`` bytes (not a multiple of WRITE_SLICE), as one part or several."""
    body = i.to_bytes(4, "big") + os.urandom(size - 4)
    if i % 2:
        return body, [body[:size // 3], bytearray(body[size // 3:size // 2]), memoryview(body)[size // 2:]]
    return body, body


async def read_frames(reader: asyncio.StreamReader, n: int, out: list) -> list:
    """Read ``n`` frames into ``out`` (kept by the caller: what arrived is known even if the rest never does)."""
    for _ in range(n):
        fields = await C.read_frame(reader)
        assert fields is not None, f"the stream ended after {len(out)} of {n} frames"
        out.append(fields)
    return out


async def frame_writer_over(kind: str) -> tuple[C.FrameWriter, list, asyncio.StreamReader, asyncio.StreamWriter,
                                                Callable[[], Awaitable[None]]]:
    """A FrameWriter on one end of a stream pair: (writer, the errors it reports, the other end's reader and
    writer, cleanup)."""
    (_, wa), (rb, wb), cleanup = await stream_pair(kind)
    errors: list = []
    return C.FrameWriter(wa, errors.append), errors, rb, wb, cleanup


def check_frames(frames: list, expected: list[bytes]) -> None:
    for i, (fields, body) in enumerate(zip(frames, expected)):
        kind, sender, seq, token, data = fields
        assert (kind, sender, seq, token) == (C.MSG, "w", i, None), f"frame {i} arrived as frame {seq}"
        assert len(data) == len(body) and data == body, f"frame {i} ({len(body)} bytes) arrived altered"


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_frame_writer_keeps_small_frames_behind_an_in_flight_large_frame(kind):
    out, errors, rb, _, cleanup = await frame_writer_over(kind)
    expected: list[bytes] = []

    def write(body, data=None):
        out.write(C.pack_frame(C.MSG, "w", len(expected), None, body if data is None else data))
        expected.append(bytes(body))

    try:
        MiB = 1 << 20
        # 1. Back to back in one turn of the loop (write() never waits): small first (written at once),
        # small frames right behind large ones, two large ones in a row, sizes off the slice boundary.
        plan = ["s", ("l", 2 * MiB), "s", "s", ("l", 5 * MiB - 3), ("l", 3 * MiB + 17), "s", ("l", 4 * MiB), "s"]
        for item in plan:
            if item == "s":
                write(small(len(expected)))
            else:
                write(*large(len(expected), item[1]))
        assert out._task is not None and not out._task.done()  # the large frames wait for the socket
        frames: list = []
        got = asyncio.get_running_loop().create_task(read_frames(rb, len(plan) + 8 + 2, frames))
        # 2. More frames written between the slices of a large frame in flight (one loop turn apart).
        busy = []
        for j in range(8):
            await asyncio.sleep(0)
            busy.append(not out._task.done())
            if j % 3 == 1:
                write(*large(len(expected), 2 * MiB + j))
            else:
                write(small(len(expected)))
        assert busy[0], "the writes of phase 2 should have met a large frame in flight"
        # 3. Once everything queued has left, a small frame goes out at once, then a large one again.
        def garbled(why: str) -> AssertionError:  # a stream cut up by a frame written into another
            check_frames(frames, expected)  # names the first frame that arrived wrong, if one did
            return AssertionError(f"{len(frames)} of {len(expected)} frames arrived, then {why}")

        await until(lambda: out._task.done() or got.done(), timeout=HANG_GUARD)  # the reader may die first
        if got.done() and got.exception() is not None:
            raise garbled(f"the reader failed: {got.exception()!r}")
        write(small(len(expected)))
        write(*large(len(expected), 2 * MiB + 1))
        try:
            await asyncio.wait_for(got, HANG_GUARD)
        except asyncio.TimeoutError:
            raise garbled(f"nothing parsed for {HANG_GUARD:g}s") from None
        except ValueError as exc:
            raise garbled(f"the reader failed: {exc!r}") from None
        assert len(frames) == len(expected)
        check_frames(frames, expected)
        assert errors == [] and not out._backlog
    finally:
        await cleanup()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_frame_writer_aborts_and_reports_when_the_peer_goes_mid_frame(kind):
    out, errors, rb, wb, cleanup = await frame_writer_over(kind)
    try:
        out.write(C.pack_frame(C.MSG, "w", 0, None, b"first"))
        out.write(C.pack_frame(C.MSG, "w", 1, None, os.urandom(32 << 20)))  # far more than socket buffers hold
        for i in range(2, 6):
            out.write(C.pack_frame(C.MSG, "w", i, None, small(i)))
        first = await asyncio.wait_for(C.read_frame(rb), HANG_GUARD)
        assert first[2] == 0 and first[4] == b"first"
        await asyncio.wait_for(rb.readexactly(256 << 10), HANG_GUARD)  # the large frame is on its way
        assert len(out._backlog) == 4 and not out._task.done()  # the small ones wait behind it
        wb.transport.abort()  # the peer goes, with the large frame half sent
        await until(lambda: errors, timeout=HANG_GUARD)
        await asyncio.wait_for(out._task, HANG_GUARD)
        assert len(errors) == 1 and "the connection broke while writing" in errors[0]
        # Aborted, not left half-written: nothing stays queued, and later frames are dropped, not queued.
        assert out.writer.transport.is_closing() and not out._backlog
        out.write(C.pack_frame(C.MSG, "w", 6, None, b"late"))
        out.write(C.pack_frame(C.MSG, "w", 7, None, os.urandom(2 << 20)))
        assert not out._backlog and out._task.done() and len(errors) == 1
    finally:
        await cleanup()
