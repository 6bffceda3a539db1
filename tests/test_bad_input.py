"""Bad input, each with a specific error naming the worker and call, and the runtime usable after it:
wrong dtypes, non-finite values (the optional guard names the worker where NaN/Inf first appears),
backward() twice on the same seed, worker-side deadlines, and malformed messages and frames."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import struct

import msgpack
import pytest
import torch
from hypothesis import example, given, settings
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


def plain_copy(w, module: torch.nn.Module) -> torch.nn.Module:
    """A plain-PyTorch module at the worker's current weights."""
    module.load_state_dict(w.state_dict())
    return module


def snapshot(*workers) -> dict[str, dict[str, torch.Tensor]]:
    return {w.name: {k: v.clone() for k, v in w.state_dict().items()} for w in workers}


def assert_unchanged(snap: dict[str, dict[str, torch.Tensor]], *workers) -> None:
    """A failed step applies nothing: every worker holds exactly the weights it held before."""
    assert sorted(snap) == sorted(w.name for w in workers)
    for w in workers:
        now = w.state_dict()
        assert sorted(now) == sorted(snap[w.name]), w.name
        for k, v in snap[w.name].items():
            assert torch.equal(now[k], v), f"{w.name}.{k} changed by a failed step"


def plain_sgd_step(loss: torch.Tensor, *modules: torch.nn.Module, lr: float = 0.1) -> None:
    params = [p for mod in modules for p in mod.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    opt.zero_grad()
    loss.backward()
    opt.step()


def assert_matches(w, module: torch.nn.Module) -> None:
    sd = w.state_dict()
    ref = module.state_dict()
    assert sorted(sd) == sorted(ref), w.name
    for k, v in ref.items():
        torch.testing.assert_close(sd[k], v, atol=1e-5, rtol=1e-5, msg=lambda s: f"{w.name}.{k}: {s}")


def still_usable(enc, head, mse, *others) -> None:
    """A correct step right after the error gives exactly PyTorch's SGD update; other workers stay put."""
    enc_p = plain_copy(enc, torch.nn.Linear(4, 3))
    head_p = plain_copy(head, torch.nn.Linear(3, 1))
    snap = snapshot(mse, *others)
    before = enc.state_dict()["weight"].clone()
    x, y = torch.randn(5, 4), torch.randn(5, 1)
    mse(head(enc(x)), y).backward()
    report = ag.step()
    assert report.workers["enc"].applied and report.workers["head"].applied
    assert not torch.equal(before, enc.state_dict()["weight"])
    plain_sgd_step(torch.nn.functional.mse_loss(head_p(enc_p(x)), y), enc_p, head_p)
    assert_matches(enc, enc_p)
    assert_matches(head, head_p)
    assert_unchanged(snap, mse, *others)


def test_wrong_input_dtype_is_a_dtype_error_naming_worker_and_call(backend):
    enc, head, mse = chain()
    snap = snapshot(enc, head, mse)
    node = enc(torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(E.DTypeError) as info:
        node.value()
    err = info.value
    assert isinstance(err, E.ForwardDTypeError) and isinstance(err, E.WorkerError)
    assert err.worker == "enc" and err.call == node.call.id
    assert "float64" in str(err) and "float32" in str(err)
    with pytest.raises(E.DTypeError):
        ag.step()
    assert_unchanged(snap, enc, head, mse)
    still_usable(enc, head, mse)


def test_integer_seed_gradient_is_a_dtype_error(backend):
    enc, head, mse = chain()
    snap = snapshot(enc, head, mse)
    out = head(enc(torch.randn(5, 4)))
    with pytest.raises(E.DTypeError) as info:
        out.backward(torch.ones(5, 1, dtype=torch.int64)).wait()
    assert info.value.worker == "head"
    with pytest.raises(E.ActorgradError):
        ag.step()
    assert_unchanged(snap, enc, head, mse)
    still_usable(enc, head, mse)


def test_backward_twice_on_the_same_seed_is_a_config_error(backend):
    enc, head, mse = chain()
    enc_p = plain_copy(enc, torch.nn.Linear(4, 3))
    head_p = plain_copy(head, torch.nn.Linear(3, 1))
    x, y = torch.randn(5, 4), torch.randn(5, 1)
    loss = mse(head(enc(x)), y)
    loss.backward()
    with pytest.raises(E.ConfigError) as info:
        loss.backward()
    assert info.value.worker == "mse" and info.value.call == loss.call.id
    assert "already" in str(info.value)
    # A caller-side argument error does not abort the step: the first pass still applies.
    report = ag.step()
    assert report.workers["enc"].applied and report.passes == 1
    # Exactly one pass's update: a rejected second seed that was nevertheless added in would double it.
    plain_sgd_step(torch.nn.functional.mse_loss(head_p(enc_p(x)), y), enc_p, head_p)
    assert_matches(enc, enc_p)
    assert_matches(head, head_p)
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
    snap = snapshot(enc, head, mse, log)
    # log of negative numbers: NaN appears in "log", and must not be blamed on "head" or "mse". Its
    # forward is the first of its kind (the caller waits for it), so the error comes at the next line using it.
    with pytest.raises(E.NonFiniteError) as info:
        loss = mse(head(log(enc(torch.randn(5, 4)))), torch.randn(5, 1))
        loss.backward().wait()
    assert info.value.worker == "log"
    assert "appeared here" in str(info.value)
    with pytest.raises(E.NonFiniteError):
        ag.step()
    assert_unchanged(snap, enc, head, mse, log)
    still_usable(enc, head, mse, log)


def test_non_finite_constant_input_is_blamed_on_the_caller(guarded):
    enc, head, mse = chain()
    snap = snapshot(enc, head, mse)
    x = torch.randn(5, 4)
    x[0, 0] = float("nan")
    with pytest.raises(E.NonFiniteError) as info:
        enc(x).value()
    assert info.value.worker == "enc" and "constant" in str(info.value)
    with pytest.raises(E.NonFiniteError):
        ag.step()
    assert_unchanged(snap, enc, head, mse)
    still_usable(enc, head, mse)


def test_non_finite_gradient_is_caught_in_the_backward_that_made_it(guarded):
    enc, head, mse = chain()
    bad = ag.spawn(BadGrad(), name="bad", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    snap = snapshot(enc, head, mse, bad)
    loss = mse(head(bad(enc(torch.randn(5, 4)))), torch.randn(5, 1))
    with pytest.raises(E.NonFiniteError) as info:
        loss.backward().wait()
    assert info.value.worker == "bad" and "backward" in str(info.value)
    with pytest.raises(E.NonFiniteError):
        ag.step()
    assert_unchanged(snap, enc, head, mse, bad)
    still_usable(enc, head, mse, bad)


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
    replies: list[codec.Frame] = []
    msg = m.Forward(1, 10, 1, [m.Slot(0)], {}, (m.RefSpec("up", 5, 0, True),), True)
    host.accept("caller", 0, codec.encode(msg), replies.append)
    for _ in range(100):
        if replies:
            break
        await asyncio.sleep(0.05)
    host.stop()
    assert replies, "the sweeper never failed the waiting call"
    err = E.from_info(codec.decode_frame(replies[0]).error)
    assert isinstance(err, E.DeadlineExceeded) and err.worker == "w"


def test_frames_of_an_earlier_or_a_later_epoch_are_refused_never_handled():
    from actorgrad.transport.base import Host, sender_key

    # Each frame is its own request (its own req number and reply callback), so the test sees
    # exactly which one was handled. The host is in epoch 2: frames of epochs 0 and 1 (from before
    # a reset) and of epoch 3 (an epoch this host was never moved to) must never reach the core.
    # A request of another epoch is refused at once (a StepAborted Failure), so that no caller
    # waits for an answer that would never come.
    frames = {7: ("caller", 0), 8: (sender_key("caller", 1), 1), 9: (sender_key("caller", 2), 2),
              10: (sender_key("caller", 3), 3)}

    async def run():
        core = WorkerCore(WorkerSpec("w", torch.nn.Linear(3, 2)))
        host = Host(core, lambda *a: None, asyncio.get_running_loop(), epoch=2)
        got: dict[int, list[codec.Frame]] = {req: [] for req in frames}
        for req, (sender, _) in frames.items():
            host.accept(sender, 0, codec.encode(m.GetState(req, "stats")), got[req].append)
        await asyncio.sleep(0.2)
        await asyncio.wait_for(host.drain(), 5)
        host.stop()
        return got

    got = asyncio.run(run())
    replies = {req: [codec.decode_frame(r) for r in rs] for req, rs in got.items()}
    handled = {req for req, rs in replies.items() if any(isinstance(r, m.Ack) for r in rs)}
    assert handled == {9}, f"handled frames of epochs {sorted(frames[r][1] for r in handled)}"
    assert len(replies[9]) == 1
    assert isinstance(replies[9][0], m.Ack) and replies[9][0].req == 9
    for req in (7, 8, 10):
        assert len(replies[req]) == 1, (frames[req], replies[req])
        r = replies[req][0]
        assert isinstance(r, m.Failure), (frames[req], r)
        err = E.from_info(r.error)
        assert isinstance(err, E.StepAborted) and err.worker == "w", (frames[req], err)
        assert "another epoch" in str(err)


# --- malformed messages and frames ---------------------------------------------------------------

FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=8),
                         st.binary(max_size=8), st.lists(st.integers(-2**63, 2**63 - 1), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(-2**63, 2**63 - 1), max_size=2))


def same(a, b) -> bool:
    """Structural equality that tells types apart, treats NaN as equal to NaN, and compares tensors."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def assert_round_trips(code: int, fields: list, msg) -> None:
    """An accepted message is of the class the schema names for its code, and survives a round trip."""
    assert code in codec.SCHEMA
    cls, validators = codec.SCHEMA[code]
    assert type(msg) is cls and len(fields) == len(validators)
    again = codec.decode(codec.encode(msg))
    assert type(again) is cls
    assert same(again, msg), f"{msg!r} came back as {again!r}"


# Well-formed messages (random fields are almost never all valid): these must decode and round-trip.
WELL_FORMED = [
    (1, [1, 2, 3, [m.Slot(0), 1.5, "a"], {"k": [1, None]}, [["up", 5, 0, True]], True, [1], False]),
    (2, [1, 0, "w", 2, 3]),
    (3, [1, 2, 0, 4, torch.arange(6, dtype=torch.float32).reshape(2, 3)]),
    (4, [1, 2, 3, [[4, 0, [[5, 1], [-1, 0]]]], [[4, 0, 0, None], [4, 1, 1, torch.ones(2)]], False]),
    (5, [1, 2, 3, 0, "w", 4, 1, None]),
    (6, [1, 2, [3, 4], [5], [[3, 0]]]),
    (7, [1, "why"]),
    (8, [1, 2, 0]),
    (9, [1, "stats"]),
    (10, [1, "module", {"weight": torch.zeros(2, 2, dtype=torch.float64)}]),
    (11, [2**64 - 1, [float("nan"), b"raw", (1, "t")]]),
    (12, [-1, {"type": "DecodeError", "message": "x"}]),
    (13, [7]),
]


def _pack_fields(code: int, fields: list) -> bytes:
    packer = codec._Packer()
    envelope = packer.packb([code, *fields])
    return codec.Frame(envelope, packer.buffers).to_bytes()


@pytest.mark.parametrize("code, fields", WELL_FORMED)
def test_well_formed_messages_decode_and_round_trip(code, fields):
    assert_round_trips(code, fields, codec.decode(_pack_fields(code, fields)))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 16), st.lists(FIELD_VALUES, max_size=9))
@example(13, [5])
@example(9, [3, "stats"])
@example(11, [1, float("nan")])
@example(2, [1, 0, "w", 2, 3])
@example(6, [1, 2, [1], [2], [[1, 0]]])
def test_messages_with_missing_or_wrongly_typed_fields_only_raise_decode_error(code, fields):
    data = codec.Frame(msgpack.packb([code, *fields], use_bin_type=True), []).to_bytes()
    try:
        msg = codec.decode(data)
    except E.DecodeError:
        return
    assert_round_trips(code, fields, msg)


class _NoBytearrayMeta(type):
    """Stands in for ``bytearray`` in the codec: type checks still work, building one fails."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, bytearray)

    def __call__(cls, *args, **kwargs):
        raise AssertionError("the decoder copied the tensor data (bytearray) before refusing the header")


class _NoBytearray(metaclass=_NoBytearrayMeta):
    pass


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the decoder called {what} before refusing the header")

    return refuse


@pytest.mark.parametrize("shape, message", [
    ([2**40, 2**40], r"shape \[1099511627776, 1099511627776\] needs \d+ bytes, got 16"),
    ([2**62], r"shape \[4611686018427387904\] needs \d+ bytes, got 16"),
    ([1, -5], r"tensor shape has an invalid size -5"),
    ([2**31] * 8, r"shape \[2147483648, .*\] needs \d+ bytes, got 16"),
])
def test_oversized_tensor_headers_are_refused_without_allocating(shape, message, monkeypatch):
    payload = codec.tensor_header("float32", shape, 0)
    # Every way the decoder could allocate the tensor's memory fails the test; only the zero-size
    # scalar it may build to learn the element size is allowed.
    real_empty = torch.empty

    def empty(*size, **kwargs):
        if size in ((), ((),)) and not kwargs.get("size"):
            return real_empty(*size, **kwargs)
        raise AssertionError(f"the decoder called torch.empty{size} before refusing the header")

    monkeypatch.setattr(codec.torch, "empty", empty)
    for fn in ("zeros", "ones", "full", "frombuffer", "tensor", "as_tensor", "from_numpy", "empty_strided"):
        monkeypatch.setattr(codec.torch, fn, _refuse(f"torch.{fn}"))
    monkeypatch.setattr(codec, "bytearray", _NoBytearray, raising=False)
    with pytest.raises(E.DecodeError, match=message):
        codec.tensor_from_bytes("float32", shape, memoryview(b"\0" * 16))
    ext = msgpack.ExtType(1, payload)
    with pytest.raises(E.DecodeError, match=message):
        codec.decode(codec.Frame(msgpack.packb([3, 1, 1, 0, 0, ext], use_bin_type=True), [b"\0" * 16]).to_bytes())


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
