"""The wire encoding: every message round-trips; anything malformed is a DecodeError."""

from __future__ import annotations

import struct

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
    m.Release(3, 9),
    m.Forward(1, 2, 3, [T, [T, 2]], {"k": T}, (), True, (0, 2)),
    m.Plan(4, 5, 1, (), (), False),
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


def _hdr(dtype, shape, index=0):
    return msgpack.ExtType(1, codec.tensor_header(dtype, shape, index))


def _framed(envelope: bytes, *buffers: bytes) -> bytes:
    """An envelope (and buffers) in the Frame byte layout, as a transport would carry them."""
    return codec.Frame(envelope, list(buffers)).to_bytes()


@pytest.mark.parametrize(
    "envelope, buffers, words",
    [
        (b"", (), "malformed"),
        (b"\xc1", (), "malformed"),
        (_raw(), (), "non-empty list"),
        (_raw(99, 1), (), "unknown message type"),
        (_raw(7, 1), (), "needs 2 fields"),
        (_raw(7, "one", "why"), (), "Abort.step"),
        (_raw(8, 1, 2, True), (), "Fetch.out"),
        (_raw(3, 1, 1, 0, 0, _hdr("float32", [2])), (b"\0" * 7,), "needs 8 bytes"),
        (_raw(3, 1, 1, 0, 0, _hdr("object", [1])), (b"\0",), "unknown tensor dtype"),
        (_raw(3, 1, 1, 0, 0, _hdr("float32", [-1])), (b"",), "invalid size"),
        (_raw(3, 1, 1, 0, 0, _hdr("float32", [1], 1)), (b"\0" * 4,), "buffer 1 does not exist"),
        (_raw(3, 1, 1, 0, 0, _hdr("float32", [1], -1)), (b"\0" * 4,), "buffer -1 does not exist"),
        (_raw(3, 1, 1, 0, 0, _hdr("float32", [1], "0")), (b"\0" * 4,), "does not exist"),
        (_raw(3, 1, 1, 0, 0, _hdr("float32", [1])), (b"\0" * 4, b"\0" * 4), "1 buffers that no tensor uses"),
        (_raw(11, 1, [_hdr("float32", [1]), _hdr("float32", [1])]), (b"\0" * 4,), "used twice"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(1, msgpack.packb(["float32", [1]]))), (b"\0" * 4,),
         "must be [dtype, shape, buffer index]"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(1, b"\xc1")), (), "header is malformed"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(1, b"\x93" + b"\x90" * 600)), (), "longer than 512"),
        (_raw(3, 1, 1, 0, 0, msgpack.ExtType(42, b"")), (), "unknown extension"),
        (_raw(1, 1, 2, 3, [msgpack.ExtType(2, msgpack.packb(4))], {}, [], True, [], False), (), "slot 4 has no ref"),
        (_raw(1, 1, 2, 3, [], {}, [], True, [2, 1], False), (), "leaf positions must be increasing"),
        (_raw(1, 1, 2, 3, [], {}, [], True, [-1], False), (), "leaf positions must be increasing"),
        (_raw(4, 1, 2, 3, [], [], "yes"), (), "expected a boolean"),
        (_raw(3, 1, 1, 0, 0, "not a tensor"), (), "expected a tensor"),
        (_raw(11, 1, msgpack.Timestamp(1, 0)), (), "unknown extension type -1"),
        (_raw(11, 1, {True: 1}), (), "map keys must be str or int"),
        (_raw(11, 1, {1.5: 1}), (), "map keys must be str or int"),
        (_raw(11, 1, msgpack.ExtType(2, msgpack.packb("x"))), (), "input slot must hold exactly one integer"),
        (_raw(11, 1, msgpack.ExtType(2, msgpack.packb(-1))), (), "invalid input slot -1"),
        (_raw(11, 1, msgpack.ExtType(3, msgpack.packb({}))), (), "a tuple must be packed as a list"),
        (_raw(11, 1, msgpack.ExtType(1, b"")), (), "a tensor header is malformed"),
        (_raw(11, 1, [[[[]]]] * 2) + b"\x00", (), "bytes left over"),
        (_raw(11, 1, "x")[:-1], (), "ends early"),
    ],
)
def test_malformed_messages_raise_decode_error(envelope, buffers, words):
    with pytest.raises(DecodeError) as info:
        codec.decode(_framed(envelope, *buffers))
    assert words in str(info.value)
    with pytest.raises(DecodeError):  # the same without the byte layout
        codec.decode_frame(codec.Frame(envelope, [bytearray(b) for b in buffers], owned=True))


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


# --- frames: envelope plus out-of-band buffers ----------------------------------------------------------


def _tensors(dtype):
    """Tensors of ``dtype`` in every shape the codec must carry: 0-d, empty, plain and non-contiguous."""
    base = (torch.arange(24) % 5).to(dtype)
    return [base[3].clone(), base[:0].reshape(0, 3), base.reshape(2, 3, 4), base.reshape(4, 6).t(),
            base.reshape(4, 6)[:, 1::2]]


def _with_tensors(t):
    return [
        m.Forward(1, 2, 3, [m.Slot(0), t, (t, "a", None)], {"k": t}, (m.RefSpec("enc", 7, 0, True),), True),
        m.Value(1, 9, 0, 2, t),
        m.Plan(4, 5, 1, (m.Expect(2, 0, ((9, 0),)),), (m.SeedGrad(2, 1, 0, t),)),
        m.Gradient(5, 1, 2, 0, "head", 9, 0, t),
        m.SetState(9, "module", {"weight": t, "n": {0: [t, 2]}}),
        m.Ack(10, {"outputs": [t, (t,)]}),
    ]


FRAME_SAMPLES = SAMPLES + [msg for dtype in codec.DTYPES.values() for t in _tensors(dtype)
                           for msg in _with_tensors(t)]


@pytest.mark.parametrize("msg", FRAME_SAMPLES, ids=lambda x: type(x).__name__)
def test_frames_round_trip_every_message_and_dtype(msg):
    frame = codec.encode_frame(msg)
    assert _same(codec.decode_frame(frame), msg)
    assert _same(codec.decode_frame(frame.private()), msg)
    data = frame.to_bytes()
    assert len(data) >= frame.nbytes
    assert _same(codec.decode_frame(codec.Frame.from_bytes(data)), msg)
    assert _same(codec.decode_frame(codec.Frame.from_bytes(bytearray(data), owned=True)), msg)
    assert b"".join(frame.parts()) == data


def test_frame_layout_is_documented_and_buffers_are_aligned():
    t = torch.arange(3, dtype=torch.float64)
    frame = codec.encode_frame(m.Ack(1, [torch.ones(1, dtype=torch.uint8), t]))
    data = frame.to_bytes()
    n_env, count = struct.unpack_from("<II", data)
    sizes = struct.unpack_from(f"<{count}Q", data, 8)
    assert (count, sizes) == (2, (1, 24)) and data[8 + 8 * count:8 + 8 * count + n_env] == frame.envelope
    back = codec.Frame.from_bytes(bytearray(data), owned=True)
    assert [len(b) for b in back.buffers] == [1, 24]
    decoded = codec.decode_frame(back).data[1]
    assert decoded.data_ptr() % codec.ALIGN == 0 and torch.equal(decoded, t)


def test_encoding_copies_nothing_and_private_copies_once():
    t = torch.arange(1024, dtype=torch.float32)
    frame = codec.encode_frame(m.Value(1, 1, 0, 0, t))
    assert not frame.owned
    private = frame.private()
    assert private.owned and private.private() is private
    t.add_(1)  # the sender changes its tensor after sending
    assert torch.equal(codec.decode_frame(frame).tensor, t)  # a view follows the change ...
    assert torch.equal(codec.decode_frame(private).tensor, t - 1)  # ... the private copy does not
    # Copies the encoder made itself (non-contiguous) are private already.
    assert codec.encode_frame(m.Value(1, 1, 0, 0, torch.randn(3, 4).t())).owned


def test_owned_frames_decode_without_a_copy_and_borrowed_ones_with_one():
    t = torch.arange(16, dtype=torch.int32)
    data = bytearray(codec.encode(m.Value(1, 1, 0, 0, t)))
    owned = codec.decode_frame(codec.Frame.from_bytes(data, owned=True)).tensor
    borrowed = codec.decode_frame(codec.Frame.from_bytes(data)).tensor
    owned.add_(1)  # built on the received buffer itself
    assert torch.equal(borrowed, t) and torch.equal(owned, t + 1)
    assert torch.equal(codec.decode_frame(codec.Frame.from_bytes(data)).tensor, t + 1)
    # Immutable bytes are never written to, whatever the caller claims.
    frozen = codec.decode_frame(codec.Frame.from_bytes(bytes(codec.encode(m.Value(1, 1, 0, 0, t))), owned=True))
    frozen.tensor.add_(1)


def _layout(n_env: int, sizes: list[int]) -> bytes:
    return struct.pack("<II", n_env, len(sizes)) + struct.pack(f"<{len(sizes)}Q", *sizes)


GOOD = codec.encode(m.Value(1, 1, 0, 0, torch.arange(4, dtype=torch.float32)))
ENV = codec.encode_frame(m.Value(1, 1, 0, 0, torch.arange(4, dtype=torch.float32))).envelope


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "shorter than its header"),
        (b"\x00" * 7, "shorter than its header"),
        (_layout(5, []), "declares 0 buffers and a 5 byte envelope"),
        (struct.pack("<II", 0, 1), "declares 1 buffers"),  # the size table itself is missing
        (struct.pack("<II", 0, 2**32 - 1), f"at most {codec.MAX_BUFFERS}"),
        (struct.pack("<II", 0, codec.MAX_BUFFERS) + b"\x00" * 64, "declares 262144 buffers"),
        (_layout(len(ENV), [2**64 - 1]) + ENV, "a buffer of 18446744073709551615 bytes"),
        (_layout(len(ENV), [17]) + ENV + b"\x00" * 20, "a buffer of 17 bytes"),
        (_layout(len(ENV), [8]) + ENV + b"\x00" * 32, "after its last buffer"),
        (GOOD + b"\x00", "after its last buffer"),
        (GOOD[:-1], "declares a buffer of 16 bytes"),
        (_layout(2**32 - 1, []) + ENV, "byte envelope"),
        ("not bytes", "a frame must be bytes"),
    ],
)
def test_frame_bytes_that_lie_are_decode_errors(data, words):
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    assert words in str(info.value)


def test_huge_declared_sizes_allocate_nothing():
    import tracemalloc

    data = _layout(len(ENV), [2**40, 2**40]) + ENV
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError):
            codec.Frame.from_bytes(data)
        assert tracemalloc.get_traced_memory()[1] < 64 * 1024
    finally:
        tracemalloc.stop()


def test_more_tensors_than_buffers_allowed_is_refused_on_both_sides(monkeypatch):
    monkeypatch.setattr(codec, "MAX_BUFFERS", 4)
    with pytest.raises(TypeError):
        codec.encode_frame(m.Ack(1, [torch.ones(1)] * 5))
    frame = codec.encode_frame(m.Ack(1, [torch.ones(1)] * 4))
    assert len(codec.decode(frame.to_bytes()).data) == 4
    with pytest.raises(DecodeError):
        codec.decode_frame(codec.Frame(frame.envelope, frame.buffers * 2))


def test_decode_frame_refuses_what_is_not_a_frame():
    with pytest.raises(DecodeError):
        codec.decode_frame(GOOD)
    with pytest.raises(DecodeError):
        codec.decode_frame(codec.Frame(bytearray(ENV), [b"\x00" * 16]))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([codec.encode(msg) for msg in FRAME_SAMPLES[::7]]), st.data())
def test_mutated_frame_bytes_only_ever_raise_decode_error_or_decode(data, draw):
    raw = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        op = draw.draw(st.sampled_from(["set", "insert", "delete", "size"]))
        i = draw.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "set" and raw:
            raw[i] = draw.draw(st.integers(0, 255))
        elif op == "insert":
            raw[i:i] = draw.draw(st.binary(min_size=1, max_size=9))
        elif op == "delete" and raw:
            del raw[i]
        elif op == "size" and len(raw) >= 16:  # rewrite a header field or size entry with a lie
            j = draw.draw(st.integers(0, min(len(raw) - 8, 64)))
            raw[j:j + 4] = struct.pack("<I", draw.draw(st.sampled_from([0, 1, 15, 16, 17, 2**31, 2**32 - 1])))
    owned = draw.draw(st.booleans())
    try:
        msg = codec.decode_frame(codec.Frame.from_bytes(raw if owned else bytes(raw), owned=owned))
    except DecodeError:
        return
    assert type(msg) in {cls for cls, _ in codec.SCHEMA.values()}
    codec.decode(codec.encode(msg))


def _same_strict(a, b):
    """Equal, with the same container types and tensor layout (what the in-process handover must match)."""
    if isinstance(a, torch.Tensor):
        return (type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
                and not b.requires_grad and torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_strict(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_strict(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same_strict(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return type(a) is type(b) and a == b


HANDOVER = SAMPLES + [
    m.Value(1, 9, 0, 2, torch.randn(4, 5).t()),  # non-contiguous: arrives contiguous, as decoded
    m.Value(1, 9, 0, 2, torch.nn.Parameter(torch.randn(3))),  # a Parameter arrives as a plain tensor
    m.Value(1, 9, 0, 2, torch.randn(3, requires_grad=True) * 2),  # no autograd history crosses
    m.Forward(1, 2, 3, [list(range(3)), (torch.Size([2, 3]),), m.Typed("namedtuple", "a:P", ["x"], (T,)),
                        m.Op("torch.cat", ([T, T],), {"dim": 0}), slice(1, None), Ellipsis, torch.float16],
              {}, [m.RefSpec("enc", 7, 0, True)], True, [0]),
    m.ForwardDone(1, (m.Slot(0), [m.Slot(1)]), [m.OutputMeta(torch.Size([2]), "float32", True),
                                                 m.OutputMeta([], "int64", False)], 0),
    m.Plan(4, 5, 1, [m.Expect(2, 0, [[9, 0]])], [m.SeedGrad(2, 1, 0, T)], False),
]


@pytest.mark.parametrize("msg", HANDOVER, ids=lambda x: type(x).__name__)
def test_copy_message_is_what_decoding_its_frame_gives(msg):
    decoded = codec.decode_frame(codec.encode_frame(msg).private())
    copied = codec.copy_message(msg)
    assert _same_strict(decoded, copied), (decoded, copied)
    # Nothing is shared with the sender: changing the original's tensors leaves the copy as it was.
    for t in codec_tensors(msg):
        with torch.no_grad():
            t.add_(1)
    assert _same_strict(decoded, copied)


def codec_tensors(x):
    if isinstance(x, torch.Tensor):
        return [x] if x.is_leaf or not x.requires_grad else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in codec_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in codec_tensors(v)]
    if hasattr(x, "__dataclass_fields__"):
        return [t for f in x.__dataclass_fields__ for t in codec_tensors(getattr(x, f))]
    return []


def test_copy_message_refuses_what_encoding_refuses():
    import enum

    class Flag(enum.IntEnum):
        ON = 1

    class Items(list):
        pass

    for bad in (object(), Flag.ON, Items([1]), {"k": [object()]}):
        with pytest.raises(TypeError):
            codec.encode_frame(m.Ack(1, bad))
        with pytest.raises(TypeError):
            codec.copy_message(m.Ack(1, bad))
