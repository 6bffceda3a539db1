"""Bad input, each with a specific error naming the worker and call, and the runtime usable after it:
wrong dtypes, non-finite values (the optional guard names the worker where NaN/Inf first appears),
backward() twice on the same seed, worker-side deadlines, and malformed messages and frames."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actorgrad as ag
from actorgrad import errors as E
from actorgrad.core import codec
from actorgrad.core import messages as m
from actorgrad.core.worker import WorkerCore, WorkerSpec
from actorgrad.optim import Optim
from actorgrad.transport.channels import read_frame


def chain():
    torch.manual_seed(0)
    enc = ag.spawn(torch.nn.Linear(4, 3), name="enc", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    head = ag.spawn(torch.nn.Linear(3, 1), name="head", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    return enc, head, mse


def still_usable(enc, head, mse) -> None:
    """A correct step right after the error works and changes the weights."""
    before = enc.state_dict()["weight"].clone()
    mse(head(enc(torch.randn(5, 4))), torch.randn(5, 1)).backward()
    report = ag.step()
    assert report.workers["enc"].applied
    assert not torch.equal(before, enc.state_dict()["weight"])


def test_wrong_input_dtype_is_a_dtype_error_naming_worker_and_call(backend):
    enc, head, mse = chain()
    node = enc(torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(E.DTypeError) as info:
        node.value()
    err = info.value
    assert isinstance(err, E.ForwardDTypeError) and isinstance(err, E.WorkerError)
    assert err.worker == "enc" and err.call == node.call.id
    assert "float64" in str(err) and "float32" in str(err)
    with pytest.raises(E.DTypeError):
        ag.step()
    still_usable(enc, head, mse)


def test_integer_seed_gradient_is_a_dtype_error(backend):
    enc, head, mse = chain()
    out = head(enc(torch.randn(5, 4)))
    with pytest.raises(E.DTypeError) as info:
        out.backward(torch.ones(5, 1, dtype=torch.int64)).wait()
    assert info.value.worker == "head"
    with pytest.raises(E.ActorgradError):
        ag.step()
    still_usable(enc, head, mse)


def test_backward_twice_on_the_same_seed_is_a_config_error(backend):
    enc, head, mse = chain()
    loss = mse(head(enc(torch.randn(5, 4))), torch.randn(5, 1))
    loss.backward()
    with pytest.raises(E.ConfigError) as info:
        loss.backward()
    assert info.value.worker == "mse" and info.value.call == loss.call.id
    assert "already" in str(info.value)
    # A caller-side argument error does not abort the step: the first pass still applies.
    report = ag.step()
    assert report.workers["enc"].applied and report.passes == 1
    still_usable(enc, head, mse)


class Log(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class BadGrad(ag.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def backward(self, inputs, outputs, grad_outputs):
        gi, gp = super().backward(inputs, outputs, grad_outputs)
        return [g * float("inf") for g in gi], gp


@pytest.fixture(params=["local", "ray"])
def guarded(request):
    if request.param == "ray":
        request.getfixturevalue("ray_session")()
    ag.init(backend=request.param, timeout=60, check_finite=True)
    yield request.param
    ag.shutdown()


def test_non_finite_guard_names_the_worker_where_nan_first_appears(guarded):
    enc, head, mse = chain()
    log = ag.spawn(Log(), name="log")
    # log of negative numbers: NaN appears in "log", and must not be blamed on "head" or "mse".
    loss = mse(head(log(enc(torch.randn(5, 4)))), torch.randn(5, 1))
    with pytest.raises(E.NonFiniteError) as info:
        loss.backward().wait()
    assert info.value.worker == "log"
    assert "appeared here" in str(info.value)
    with pytest.raises(E.NonFiniteError):
        ag.step()
    still_usable(enc, head, mse)


def test_non_finite_constant_input_is_blamed_on_the_caller(guarded):
    enc, head, mse = chain()
    x = torch.randn(5, 4)
    x[0, 0] = float("nan")
    with pytest.raises(E.NonFiniteError) as info:
        enc(x).value()
    assert info.value.worker == "enc" and "constant" in str(info.value)
    with pytest.raises(E.NonFiniteError):
        ag.step()
    still_usable(enc, head, mse)


def test_non_finite_gradient_is_caught_in_the_backward_that_made_it(guarded):
    enc, head, mse = chain()
    bad = ag.spawn(BadGrad(), name="bad", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    loss = mse(head(bad(enc(torch.randn(5, 4)))), torch.randn(5, 1))
    with pytest.raises(E.NonFiniteError) as info:
        loss.backward().wait()
    assert info.value.worker == "bad" and "backward" in str(info.value)
    with pytest.raises(E.NonFiniteError):
        ag.step()
    still_usable(enc, head, mse)


def test_without_the_guard_nan_flows_as_in_pytorch(local):
    log = ag.spawn(Log(), name="log")
    assert torch.isnan(log(torch.tensor([-1.0])).value()).all()
    ag.step()


# --- worker-side deadlines ----------------------------------------------------------------------


def test_worker_deadline_fails_and_frees_a_step_that_waits_forever():
    core = WorkerCore(WorkerSpec("w", torch.nn.Linear(3, 2), Optim(torch.optim.SGD, lr=0.1), deadline=5.0))
    core.handle(m.Forward(1, 10, 1, [m.Slot(0)], {}, (m.RefSpec("up", 5, 0, True),), True))
    assert core.stats()["calls"] == 1
    assert core.expire() == []  # not yet late
    import time

    out = core.expire(time.monotonic() + 6.0)
    fails = [E.from_info(msg.error) for to, msg in out if to is None and isinstance(msg, m.Failure)]
    assert len(fails) == 1 and isinstance(fails[0], E.DeadlineExceeded)
    assert fails[0].worker == "w" and "slot 0 from 'up' call 5" in str(fails[0])
    stats = core.stats()
    assert stats["calls"] == 0 and stats["open_steps"] == 0 and stats["queued_forwards"] == 0


@pytest.mark.asyncio
async def test_host_sweeps_worker_deadlines():
    from actorgrad.transport.base import Host

    core = WorkerCore(WorkerSpec("w", torch.nn.Linear(3, 2), Optim(torch.optim.SGD, lr=0.1), deadline=0.2))
    host = Host(core, lambda *a: None, asyncio.get_running_loop())
    replies: list[bytes] = []
    msg = m.Forward(1, 10, 1, [m.Slot(0)], {}, (m.RefSpec("up", 5, 0, True),), True)
    host.accept("caller", 0, codec.encode(msg), replies.append)
    for _ in range(100):
        if replies:
            break
        await asyncio.sleep(0.05)
    host.stop()
    assert replies, "the sweeper never failed the waiting call"
    err = E.from_info(codec.decode(replies[0]).error)
    assert isinstance(err, E.DeadlineExceeded) and err.worker == "w"


def test_frames_of_an_earlier_epoch_are_dropped():
    from actorgrad.transport.base import Host, sender_key

    async def run():
        core = WorkerCore(WorkerSpec("w", torch.nn.Linear(3, 2)))
        host = Host(core, lambda *a: None, asyncio.get_running_loop(), epoch=2)
        got: list[bytes] = []
        fetch = m.GetState(7, "stats")
        host.accept("caller", 0, codec.encode(fetch), got.append)  # epoch 0: dropped
        host.accept(sender_key("caller", 1), 0, codec.encode(fetch), got.append)  # epoch 1: dropped
        host.accept(sender_key("caller", 2), 0, codec.encode(fetch), got.append)
        await asyncio.sleep(0.2)
        host.stop()
        return got

    got = asyncio.run(run())
    assert len(got) == 1


# --- malformed messages and frames ---------------------------------------------------------------

FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=8),
                         st.binary(max_size=8), st.lists(st.integers(-2**63, 2**63 - 1), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(-2**63, 2**63 - 1), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 16), st.lists(FIELD_VALUES, max_size=9))
def test_messages_with_missing_or_wrongly_typed_fields_only_raise_decode_error(code, fields):
    data = msgpack.packb([code, *fields], use_bin_type=True)
    try:
        codec.decode(data)
    except E.DecodeError:
        pass


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**62], [1, -5], [2**31] * 8])
def test_oversized_tensor_headers_are_refused_without_allocating(shape):
    ext = msgpack.ExtType(1, codec.tensor_payload("float32", shape, b"\0" * 16))
    with pytest.raises(E.DecodeError):
        codec.decode(msgpack.packb([3, 1, 1, 0, 0, ext], use_bin_type=True))


def test_oversized_frame_lengths_are_refused():
    async def run(header: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(header)
        reader.feed_eof()
        return await read_frame(reader)

    with pytest.raises(ValueError, match="too large"):
        asyncio.run(run(struct.pack("!II", 10, 2**32 - 1)))
    with pytest.raises(ValueError, match="too large"):
        asyncio.run(run(struct.pack("!II", 2**31, 10)))
    assert asyncio.run(run(struct.pack("!II", 10, 10) + b"short")) is None  # torn: end of stream
