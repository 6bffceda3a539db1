"""The Host loop with pytest-asyncio: ordering per sender, replies, malformed frames."""

from __future__ import annotations

import asyncio

import pytest
import torch

from actorgrad import errors as E
from actorgrad.core import codec
from actorgrad.core import messages as m
from actorgrad.core.worker import WorkerCore, WorkerSpec
from actorgrad.optim import Optim
from actorgrad.transport.base import Host


class Harness:
    """A Host on the test's loop; records what it sends and what it replies."""

    def __init__(self, name="lin"):
        torch.manual_seed(0)
        self.core = WorkerCore(WorkerSpec(name, torch.nn.Linear(3, 2), Optim(torch.optim.SGD, lr=0.1)))
        self.sent: list[tuple[str, m.Message]] = []
        self.replies: dict[int, m.Message] = {}
        self.host = Host(self.core, self._send, asyncio.get_running_loop())
        self.seq = 0

    def _send(self, to, sender, seq, data):
        self.sent.append((to, codec.decode_frame(data)))

    def frame(self, msg, seq=None, sender="caller"):
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        reply = (lambda data: self.replies.__setitem__(msg.req, codec.decode_frame(data))) if hasattr(msg, "req") else None
        self.host.accept(sender, seq, codec.encode_frame(msg).private(), reply)

    async def settle(self):
        await self.host.drain()


@pytest.mark.asyncio
async def test_frames_out_of_order_are_handled_in_sender_order():
    h = Harness()
    x = torch.randn(4, 3)
    fwd = m.Forward(1, 10, 1, [x], {}, (), True)
    plan = m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, torch.ones(4, 2)),))
    close = m.Close(3, 1, (10,), (100,), ())
    h.frame(close, seq=2)
    h.frame(plan, seq=1)
    await h.settle()
    assert h.replies == {}  # nothing before frame 0
    h.frame(fwd, seq=0)
    await h.settle()
    assert isinstance(h.replies[1], m.ForwardDone) and isinstance(h.replies[2], m.Ack)
    assert isinstance(h.replies[3], m.CloseReady) and h.replies[3].applied is True
    h.host.stop()


@pytest.mark.asyncio
async def test_duplicate_frame_is_dropped():
    h = Harness()
    fwd = m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True)
    h.frame(fwd, seq=0)
    h.frame(m.Fetch(2, 10, 0), seq=1)
    h.frame(m.Fetch(3, 10, 0), seq=1)  # a resent frame: same sequence number
    await h.settle()
    assert 2 in h.replies and 3 not in h.replies
    h.host.stop()


@pytest.mark.asyncio
async def test_malformed_frame_gets_a_decode_error_and_the_host_keeps_serving():
    h = Harness()
    got = []
    h.host.accept("caller", 0, b"\x93garbage", lambda data: got.append(codec.decode_frame(data)))
    h.frame(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True), seq=1)
    await h.settle()
    assert isinstance(got[0], m.Failure)
    assert isinstance(E.from_info(got[0].error), E.DecodeError) and got[0].error["worker"] == "lin"
    assert isinstance(h.replies[1], m.ForwardDone)
    h.host.stop()


@pytest.mark.asyncio
async def test_gradients_leave_to_the_producer_worker_numbered_per_channel():
    h = Harness()
    h.frame(m.Forward(1, 10, 1, [m.Slot(0)], {}, (m.RefSpec("up", 5, 0, True),), True))
    h.host.accept("up", 0, codec.encode(m.Value(1, 10, 0, 5, torch.randn(4, 3))))
    h.frame(m.Plan(2, 100, 1, (m.Expect(10, 0, ((m.SEED, 0),)),), (m.SeedGrad(10, 0, 0, torch.ones(4, 2)),)))
    await h.settle()
    assert [(to, type(msg).__name__) for to, msg in h.sent] == [("up", "Gradient")]
    assert h.sent[0][1].tensor.shape == (4, 3)
    h.host.stop()


@pytest.mark.asyncio
async def test_only_the_caller_sends_calls_state_and_aborts_and_a_worker_only_its_own_gradients():
    h = Harness()
    got = []
    h.host.accept("intruder", 0, codec.encode(m.GetState(7, "full")), lambda data: got.append(codec.decode_frame(data)))
    h.host.accept("intruder", 1, codec.encode(m.SetState(8, "module", {})), lambda data: got.append(codec.decode_frame(data)))
    h.host.accept("intruder#3", 0, codec.encode(m.Abort(1, "x")))  # another epoch: dropped before decoding
    await h.settle()
    assert [type(x).__name__ for x in got] == ["Failure", "Failure"]
    assert "may not send a GetState" in got[0].error["message"]
    # A worker passes on gradients as itself only: one that claims another producer is dropped.
    h.frame(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    h.frame(m.Plan(2, 100, 1, (m.Expect(10, 0, ((3, 0),)),), ()))
    await h.settle()
    h.host.accept("evil", 0, codec.encode(m.Gradient(100, 1, 10, 0, "down", 3, 0, torch.ones(4, 2))))
    await h.settle()
    assert 2 not in h.replies  # the pass still waits for down's own gradient
    h.host.accept("down", 0, codec.encode(m.Gradient(100, 1, 10, 0, "down", 3, 0, torch.ones(4, 2))))
    await h.settle()
    assert isinstance(h.replies[2], m.Ack)
    h.host.stop()


@pytest.mark.asyncio
async def test_aborts_of_steps_not_yet_begun_are_refused():
    h = Harness()
    for i in range(1100):  # more than EndedSteps keeps: would have marked every later step as ended
        h.frame(m.Abort(10**6 + i, "far future"))
    h.frame(m.Forward(1, 10, 1, [torch.randn(4, 3)], {}, (), True))
    await h.settle()
    assert isinstance(h.replies[1], m.ForwardDone)
    assert h.core.top_step == 1 and 10**6 not in h.core.aborted
    h.host.stop()


@pytest.mark.asyncio
async def test_frames_held_out_of_order_are_bounded_per_sender_and_freed(monkeypatch):
    from actorgrad.transport import base

    monkeypatch.setattr(base, "MAX_HELD_FRAMES", 8)
    h = Harness()
    data = codec.encode(m.Value(1, 10, 0, 5, torch.randn(64, 64)))
    for seq in range(1, 9):  # frame 0 never comes
        assert h.host.accept("up", seq, data) is True
    assert h.core.stats()["held_frames"] == 8 and h.core.stats()["held_bytes"] == 8 * len(data)
    assert h.host.accept("up", 9, data) is False  # beyond the bound: refused, and all of it dropped
    assert h.core.stats()["held_frames"] == 0 and h.host.held_bytes() == 0
    h.host.accept("up", 3, data)
    h.host.forget("up")  # its connection closed: the gap can never fill
    assert h.host.held_bytes() == 0
    h.host.stop()
