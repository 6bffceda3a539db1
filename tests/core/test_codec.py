"""The wire encoding: every message round-trips; anything malformed is a DecodeError."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actorgrad.core import codec
from actorgrad.core import messages as m
from actorgrad.errors import DecodeError

T = torch.arange(6, dtype=torch.float32).reshape(2, 3)

SAMPLES = [
    m.Forward(1, 2, 3, [m.Slot(0), T, (1, "a", None), {"k": [1.5, True]}], {"scale": 2.0},
              (m.RefSpec("enc", 7, 0, True),), True),
    m.Route(2, 0, "head", 9, 1),
    m.Value(1, 9, 0, 2, T),
    m.Plan(4, 5, 1, (m.Expect(2, 0, ((9, 0), (m.SEED, 1))),), (m.SeedGrad(2, 0, 1, None), m.SeedGrad(2, 1, 0, T))),
    m.Gradient(5, 1, 2, 0, "head", 9, 0, T),
    m.Gradient(5, 1, 2, 0, "head", 9, 0, None),
    m.Close(6, 1, (2, 9), (5,), ((2, 0),)),
    m.Abort(1, "why"),
    m.Commit(3),
    m.Fetch(7, 2, 0),
    m.GetState(8, "full"),
    m.SetState(9, "module", {"weight": T, "n": {0: [1, 2]}}),
    m.Ack(10, {"single": True, "outputs": [[[2, 3], "float32", True]]}),
    m.Failure(11, {"type": "WorkerError", "message": "boom", "worker": "w"}),
]


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg):
    assert _same(codec.decode(codec.encode(msg)), msg)


@pytest.mark.parametrize("dtype", list(codec.DTYPES.values()))
def test_tensor_dtypes_round_trip(dtype):
    t = (torch.arange(12) % 3).to(dtype).reshape(3, 4)
    back = codec.decode(codec.encode(m.Value(1, 1, 0, 0, t))).tensor
    assert back.dtype == dtype and torch.equal(back, t)


def test_zero_dim_and_empty_and_non_contiguous_tensors():
    for t in (torch.tensor(3.5), torch.empty(0, 4), torch.randn(4, 5).t()):
        back = codec.decode(codec.encode(m.Value(1, 1, 0, 0, t))).tensor
        assert back.shape == t.shape and torch.equal(back, t)


def _raw(*fields):
    return msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),
        (_raw(), "non-empty list"),
        (_raw(99, 1), "unknown message type"),
        (_raw(7, 1), "needs 2 fields"),
        (_raw(7, "one", "why"), "Abort.step"),
        (_raw(8, 1, 2, True), "Fetch.out"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(1, codec.tensor_payload("float32", [2], b"\0" * 7))), "needs 8 bytes"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(1, codec.tensor_payload("object", [1], b"\0"))), "unknown tensor dtype"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(1, codec.tensor_payload("float32", [-1], b""))), "invalid size"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(1, b"\xff\xff\x90")), "runs past its data"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(1, b"\x00\x01\xc1")), "header is malformed"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(42, b"")), "unknown extension"),
        (_raw(1, 1, 2, 3, [msgpack.ExtType(2, msgpack.packb(4))], {}, [], True), "slot 4 has no ref"),
        (_raw(3, 1, 1, 0, 0, "not a tensor"), "expected a tensor"),
        (_raw(11, 1, msgpack.Timestamp(1, 0)), "unknown extension type -1"),
        (_raw(11, 1, {True: 1}), "map keys must be str or int"),
        (_raw(11, 1, {1.5: 1}), "map keys must be str or int"),
        (_raw(11, 1, msgpack.ExtType(2, msgpack.packb("x"))), "input slot must hold exactly one integer"),
        (_raw(11, 1, msgpack.ExtType(2, msgpack.packb(-1))), "invalid input slot -1"),
        (_raw(11, 1, msgpack.ExtType(3, msgpack.packb({}))), "a tuple must be packed as a list"),
        (_raw(11, 1, msgpack.ExtType(1, b"")), "a tensor needs a header"),
        (_raw(11, 1, msgpack.ExtType(1, b"\x00")), "a tensor needs a header"),
        (_raw(11, 1, [[[[]]]] * 2) + b"\x00", "bytes left over"),
        (_raw(11, 1, "x")[:-1], "ends early"),
    ],
)
def test_malformed_messages_raise_decode_error(data, words):
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    assert words in str(info.value)


def test_pickle_payload_is_not_unpickled():
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(DecodeError):
        codec.decode(pickle.dumps(Boom()))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_ever_raise_decode_error(data):
    try:
        codec.decode(data)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES), st.data())
def test_mutated_messages_only_ever_raise_decode_error(msg, data):
    raw = bytearray(codec.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        codec.decode(bytes(raw[:cut]))
    except DecodeError:
        pass
