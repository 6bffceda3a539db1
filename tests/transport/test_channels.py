"""Direct channels on loopback: the handshake, identity binding, limits (no Ray)."""

from __future__ import annotations

import asyncio
import os
import struct

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
