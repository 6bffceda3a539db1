"""Hostile frames: nesting and expansion bombs are refused within bounded time and memory, never crash."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actorgrad.core import codec
from actorgrad.core import messages as m
from actorgrad.errors import DecodeError

ACK = b"\x93\x0b\x01"  # [Ack code, req=1, data=...]: a frame whose one value tree is ours to fill
MiB = 1 << 20


def _ext(code: int, payload: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, payload))


def framed(envelope: bytes, *buffers: bytes) -> bytes:
    """An envelope (and tensor buffers) in the Frame byte layout: what a transport hands the decoder."""
    return codec.Frame(envelope, list(buffers)).to_bytes()


def nested_tuples(depth: int, leaf: bytes = b"\x00") -> bytes:
    """An Ack whose data is ``depth`` tuple extensions around ``leaf``: each one re-enters msgpack."""
    inner = leaf
    for _ in range(depth):
        inner = _ext(3, b"\x91" + inner)
    return ACK + inner


def nested_arrays(depth: int) -> bytes:
    return ACK + b"\x91" * depth + b"\x00"


def nested_maps(depth: int) -> bytes:
    return ACK + b"\x81\xa1k" * depth + b"\x00"


def repeated(item: bytes, size: int) -> bytes:
    """An Ack whose data is one array of ``item`` repeated to fill ``size`` bytes."""
    n = (size - len(ACK) - 5) // len(item)
    return ACK + b"\xdd" + struct.pack("!I", n) + item * n


# --- nesting bombs: a crash cannot be caught in-process, so these run in a child ---------------------

_CHILD = textwrap.dedent("""
    import sys
    from actorgrad.core import codec
    from actorgrad.errors import DecodeError
    from tests.core.test_codec_bombs import framed, nested_arrays, nested_maps, nested_tuples
    for name, frame in [
        ("tuples 64", nested_tuples(64)), ("tuples 65", nested_tuples(65)),
        ("tuples 195", nested_tuples(195)), ("tuples 10000", nested_tuples(10000)),
        ("arrays 64", nested_arrays(64)), ("arrays 65", nested_arrays(65)),
        ("arrays 2000", nested_arrays(2000)), ("arrays 100000", nested_arrays(100000)),
        ("maps 65", nested_maps(65)), ("maps 10000", nested_maps(10000)),
    ]:
        try:
            codec.decode(framed(frame))
            print(name, len(frame), "decoded", flush=True)
        except DecodeError as e:
            print(name, len(frame), "DecodeError", e.message, flush=True)
""")


def test_nesting_bombs_do_not_crash_the_process():
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    lines = {" ".join(line.split()[:2]): line for line in proc.stdout.splitlines()}
    assert "decoded" in lines["tuples 64"] and "decoded" in lines["arrays 64"]
    for name in ("tuples 65", "tuples 195", "tuples 10000", "arrays 65", "arrays 2000", "arrays 100000",
                 "maps 65", "maps 10000"):
        assert "DecodeError value is nested too deeply" in lines[name], lines[name]
    # The frame from the report: ~921 bytes, a tuple extension nested 195 deep.
    assert 900 <= len(nested_tuples(195)) <= 930


def test_extensions_that_wrap_extensions_are_refused_before_reentering_msgpack():
    # A tuple whose payload is directly another tuple (no list), 10000 deep: the old decoder recursed
    # through every level before noticing; the scan refuses the first.
    inner = b"\x00"
    for _ in range(10000):
        inner = _ext(3, inner)
    with pytest.raises(DecodeError, match="a tuple must be packed as a list"):
        codec.decode(framed(ACK + inner))
    inner = b"\x00"
    for _ in range(1000):
        inner = _ext(2, inner)
    with pytest.raises(DecodeError, match="input slot must hold exactly one integer"):
        codec.decode(framed(ACK + inner))


@pytest.mark.parametrize("make, depth", [(nested_tuples, 64), (nested_arrays, 64), (nested_maps, 64)])
def test_depth_limit_is_the_same_for_encode_and_decode(make, depth):
    assert isinstance(codec.decode(framed(make(depth))), m.Ack)
    with pytest.raises(DecodeError, match="nested too deeply"):
        codec.decode(framed(make(depth + 1)))
    # The encoder refuses exactly what the decoder refuses, and says so with TypeError.
    for kind in (list, tuple, dict):
        value = 0
        for _ in range(depth):
            value = {"k": value} if kind is dict else kind([value])
        codec.check_value_tree(value)
        again = codec.decode(codec.encode(m.Ack(1, value)))
        assert type(again.data) is kind
        deeper = {"k": value} if kind is dict else kind([value])
        with pytest.raises(TypeError, match="nested too deeply"):
            codec.check_value_tree(deeper)
        # encode() trusts its caller (what users send passes check_value_tree first); the receiver refuses.
        with pytest.raises(DecodeError, match="nested too deeply"):
            codec.decode(codec.encode(m.Ack(1, deeper)))


def test_encoding_a_very_deep_value_raises_type_error_not_recursion_error():
    for kind in (list, tuple):
        value = 0
        for _ in range(10000):
            value = kind([value])
        with pytest.raises(TypeError, match="nested too deeply"):
            codec.encode(m.Ack(1, value))
        with pytest.raises(TypeError, match="nested too deeply"):
            codec.check_value_tree(value)
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(TypeError, match="nested too deeply"):
        codec.check_value_tree(cyclic)


def test_decode_runs_on_many_threads_at_once():
    frames = [(framed(nested_tuples(64)), True), (framed(nested_tuples(65)), False),
              (framed(nested_arrays(64)), True), (framed(repeated(b"\x80", 4096)), True),
              (framed(nested_maps(70)), False)]
    errors: list = []

    def work() -> None:
        for _ in range(20):
            for frame, ok in frames:
                try:
                    codec.decode(frame)
                    if not ok:
                        errors.append(("decoded", frame[:16]))
                except DecodeError:
                    if ok:
                        errors.append(("refused", frame[:16]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- element budget --------------------------------------------------------------------------------


def test_element_budget_is_enforced_on_both_sides(monkeypatch):
    monkeypatch.setattr(codec, "MAX_ELEMENTS", 1000)
    ok = list(range(990))
    assert codec.decode(codec.encode(m.Ack(1, ok))).data == ok
    big = list(range(1000))
    with pytest.raises(TypeError, match="at most 1000 values"):
        codec.check_value_tree(big)
    with pytest.raises(DecodeError, match="MAX_ELEMENTS"):
        codec.decode(codec.encode(m.Ack(1, big)))
    with pytest.raises(DecodeError, match="at most 1000 values.*MAX_ELEMENTS"):
        codec.decode(framed(msgpack.packb([11, 1, big])))
    # Map keys count too.
    with pytest.raises(DecodeError, match="at most 1000 values"):
        codec.decode(framed(msgpack.packb([11, 1, {i: None for i in range(600)}])))
    with pytest.raises(TypeError, match="at most 1000 values"):
        codec.check_value_tree({i: None for i in range(600)})


def _peak_during(fn) -> tuple[int, object]:
    tracemalloc.start()
    try:
        try:
            result: object = fn()
        except DecodeError as e:
            result = e
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def _bound(frame: bytes, buffers: int = 0) -> int:
    # Decoded objects: at most 256 bytes per value (measured: a tiny tensor ~230, a one-entry dict holding
    # an empty dict ~100 for 3 bytes of frame, an empty dict ~73, a 2-char str ~60), and no more values
    # than bytes or than the budget; 256 more per tensor buffer (its view, ~190, bounded by MAX_BUFFERS);
    # byte strings and tensor data: the envelope's copy plus the tensor's own memory (2x the frame);
    # 256 KiB for everything else.
    return 256 * min(len(frame), codec.MAX_ELEMENTS) + 256 * buffers + 2 * len(frame) + 256 * 1024


@pytest.mark.parametrize("size", [16 * MiB, 1 * MiB])
def test_map_expansion_bomb_is_refused_before_building_anything(size, monkeypatch):
    # 16 MiB of empty maps used to cost 1.1 GiB and 13 s; it announces more values than the budget.
    frame = framed(repeated(b"\x80", size + 8 * 1024))  # just past the budget at 1 MiB
    peak, result = _peak_during(lambda: codec.decode(frame))
    assert isinstance(result, DecodeError) and "MAX_ELEMENTS" in result.message
    assert peak <= MiB, peak
    # Also refused when the budget is only reached by reading the values, not from the first header:
    # many small lists of empty maps. (A smaller budget only to keep the test quick: tracemalloc makes
    # the scan's integer arithmetic slow.)
    monkeypatch.setattr(codec, "MAX_ELEMENTS", 1 << 16)
    n = size // 16
    frame = framed(ACK + b"\xdd" + struct.pack("!I", n) + (b"\x9f" + b"\x80" * 15) * n)
    peak, result = _peak_during(lambda: codec.decode(frame))
    assert isinstance(result, DecodeError), result
    assert peak <= MiB, peak


# The frames that cost most per byte to decode (accepted ones: refused frames cost next to nothing),
# with the values each item counts against the budget.
_WORST_ITEMS = {
    "empty maps": (b"\x80", 1),
    "empty lists": (b"\x90", 1),
    "{0: {}}": (b"\x81\x00\x80", 3),
    "{0: 0}": (b"\x81\x00\x00", 3),
    "[[]]": (b"\x91\x90", 2),
    "2-char strings": (b"\xa2ab", 1),
    "floats": (b"\xca" + struct.pack("!f", 1.5), 1),
    "1-tuples": (_ext(3, b"\x91\x00"), 2),
    "slots": (_ext(2, b"\x05"), 1),
    "tiny tensors": (_ext(1, codec.tensor_header("uint8", [1], 0)), 1),
    "empty tensors": (_ext(1, codec.tensor_header("uint8", [0], 0)), 1),
    "duplicate keys": (None, 2),
}


@pytest.mark.parametrize("name", list(_WORST_ITEMS))
def test_decode_memory_is_bounded_for_the_worst_frames(name, monkeypatch):
    # At the full budget (1M values) these take minutes under tracemalloc; the bound is per value, so a
    # 16 Ki budget with frames that fill it measures the same ratio.
    monkeypatch.setattr(codec, "MAX_ELEMENTS", 1 << 14)
    item, values = _WORST_ITEMS[name]
    n = (1 << 14) // values - 16  # just within the budget
    if item is None:
        frame = framed(ACK + b"\xdf" + struct.pack("!I", n) + b"\x00\x00" * n)
    elif name.endswith("tensors"):  # each tensor has a buffer of its own
        dtype, shape, size = ("uint8", [1], 1) if name == "tiny tensors" else ("uint8", [0], 0)
        frame = framed(ACK + b"\xdd" + struct.pack("!I", n)
                       + b"".join(_ext(1, codec.tensor_header(dtype, shape, i)) for i in range(n)),
                       *[b"\x01" * size] * n)
    else:
        frame = framed(ACK + b"\xdd" + struct.pack("!I", n) + item * n)
    peak, result = _peak_during(lambda: codec.decode(frame))
    assert isinstance(result, m.Ack), result
    buffers = n if name.endswith("tensors") else 0
    assert peak <= _bound(frame, buffers), (name, peak, len(frame), peak / len(frame))
    # A frame twice the budget is refused, and costs nothing.
    twice = framed(repeated(item or b"\x00", 2 * len(frame) + 1024))
    peak, result = _peak_during(lambda: codec.decode(twice))
    assert isinstance(result, DecodeError) and "MAX_ELEMENTS" in result.message, result
    assert peak <= MiB


def test_big_tensors_and_strings_cost_a_small_multiple_of_the_frame():
    t = torch.arange(4 * MiB // 4, dtype=torch.float32)
    frame = codec.encode(m.SetState(1, "module", {"w": t, "name": "x" * MiB, "raw": b"y" * MiB}))
    peak, result = _peak_during(lambda: codec.decode(frame))
    assert isinstance(result, m.SetState) and torch.equal(result.state["w"], t)
    assert peak <= 3 * len(frame) + MiB, peak / len(frame)


# --- declared lengths, extensions, tensors -----------------------------------------------------------

_SHORT = [
    ACK + b"\xdd\xff\xff\xff\xff" + b"\xc0" * 100,  # an array of 4G items
    ACK + b"\xdf\xff\xff\xff\xff" + b"\x00" * 100,  # a map of 4G entries
    ACK + b"\xdb\xff\xff\xff\xff" + b"x" * 100,  # a 4 GiB string
    ACK + b"\xc6\xff\xff\xff\xff" + b"x" * 100,  # a 4 GiB bin
    ACK + b"\xc9\xff\xff\xff\xff\x01" + b"x" * 100,  # a 4 GiB tensor extension
    ACK + b"\xc9\xff\xff\xff\xff\x03" + b"\x90",  # a 4 GiB tuple extension
    ACK + b"\x9f" + b"\xdd\x00\x10\x00\x00" * 15,  # nested arrays that each announce 1M items
    ACK + b"\xc7\x00\x01",  # empty tensor extension
    ACK + b"\xc7\x00\x02",  # empty slot extension
    ACK + b"\xc7\x00\x03",  # empty tuple extension
    ACK + b"\xd4\x01\x00",  # a tensor header cut short
    ACK + b"\xd5\x01\x00\x05",  # a tensor header length past its data
    ACK + _ext(1, b"\x02\x01" + b"\x90" * 600),  # a tensor header too long
    ACK + b"\xd4\xff\x00",  # a timestamp extension
    ACK + b"\x81\xca\x00\x00\x00\x00\x00",  # a float key
    ACK + b"\x81\x90\x00",  # a list key
    ACK + b"\x81" + _ext(3, b"\x91\x00") + b"\x00",  # a tuple key
    ACK + b"\x81\xc3\x00",  # a bool key
    ACK + _ext(3, b"\x92\x00"),  # a tuple shorter than it says
    ACK + _ext(3, b"\x91\x00\x00"),  # a tuple with bytes left over
    ACK + _ext(3, b"\x91\x92\x00"),  # a tuple whose list runs past its payload
    ACK + b"\x00\x00",  # bytes left over after the message
]


@pytest.mark.parametrize("frame", _SHORT, ids=range(len(_SHORT)))
def test_declared_lengths_and_bad_extensions_are_refused_cheaply(frame):
    frame = framed(frame)
    peak, result = _peak_during(lambda: codec.decode(frame))
    assert isinstance(result, DecodeError), result
    assert peak <= 256 * 1024


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [0, 2**62, 2**62], [2**64 - 1, 2**64 - 1], [2**32] * 32,
                                   [0] * 33, [3, 0, 2**63]])
def test_tensor_shapes_that_overflow_are_decode_errors(shape):
    with pytest.raises(DecodeError):
        codec.tensor_from_bytes("float64", shape, b"")
    with pytest.raises(DecodeError):
        codec.decode(framed(ACK + _ext(1, codec.tensor_header("float64", shape, 0)), b""))


def test_many_tiny_tensors_decode():
    frame = codec.encode(m.Ack(1, [torch.tensor(i % 100, dtype=torch.int8) for i in range(2000)]))
    assert [int(t) for t in codec.decode(frame).data] == [i % 100 for i in range(2000)]


def test_values_the_decoder_refuses_are_refused_before_sending():
    for bad in ({1.5: 1}, {(1, 2): 1}, {True: 1}, {None: 1}):
        with pytest.raises(TypeError):
            codec.check_value_tree(bad)


def test_error_messages_stay_short_for_huge_values():
    refs = [[torch.zeros(1)] * 5000]
    packer = codec._Packer()
    envelope = packer.packb([1, 1, 2, 3, [], {}, [refs[0]], True])
    with pytest.raises(DecodeError) as info:
        codec.decode(framed(envelope, *packer.buffers))
    assert len(str(info.value)) < 400


# --- property tests ----------------------------------------------------------------------------------


def _bomb() -> st.SearchStrategy[bytes]:
    """Frames built from nesting and length headers that hostile peers would use."""
    piece = st.sampled_from([
        b"\x91", b"\x9f", b"\x81\x00", b"\x81\xa1k", b"\xdc\xff\xff", b"\xdd\x00\x10\x00\x00",
        b"\xdf\x00\x10\x00\x00", b"\xd5\x03\x91", b"\xc7\x05\x03\x91", b"\xd4\x02", b"\x80", b"\x90",
        b"\x00", b"\xc0", b"\xa2ab", b"\xcb" + b"\x00" * 8, b"\xc4\x05", b"\xdb\xff\xff\xff\xff",
        b"\xc9\x00\x00\x00\x08\x01", b"\xd4\x01\x00", b"\xc7\x00\x03", b"\xd4\xff\x00",
    ])
    return st.builds(lambda parts, reps, head: head + b"".join(p * r for p, r in zip(parts, reps)),
                     st.lists(piece, min_size=1, max_size=12),
                     st.lists(st.integers(1, 300), min_size=12, max_size=12),
                     st.sampled_from([ACK, b"\x92\x07\x01", b"\x98\x01\x01\x02\x03", b""]))


@settings(max_examples=400, deadline=None)
@given(_bomb())
def test_generated_bombs_only_ever_raise_decode_error(frame):
    try:
        msg = codec.decode(framed(frame))
    except DecodeError:
        return
    assert type(msg) in {cls for cls, _ in codec.SCHEMA.values()}
    # Anything accepted survives the encoder's identical checks.
    codec.decode(codec.encode(msg))


_SAMPLES = [
    codec.encode(msg) for msg in (
        m.Forward(1, 2, 3, [m.Slot(0), torch.ones(2, 3), (1, ("a", (None,)), [2.5])], {"k": {"j": [1, (2,)]}},
                  (m.RefSpec("enc", 7, 0, True),), True),
        m.Route(2, 0, "head", 9, 1),
        m.Value(1, 9, 0, 2, torch.arange(6, dtype=torch.int16).reshape(2, 3)),
        m.Plan(4, 5, 1, (m.Expect(2, 0, ((9, 0), (m.SEED, 1))),), (m.SeedGrad(2, 1, 0, torch.ones(2)),)),
        m.Gradient(5, 1, 2, 0, "head", 9, 0, torch.ones(3, dtype=torch.bfloat16)),
        m.Close(6, 1, (2, 9), (5,), ((2, 0),)),
        m.Abort(1, "why"),
        m.Fetch(7, 2, 0),
        m.GetState(8, "full"),
        m.SetState(9, "module", {"weight": torch.ones(2, 2), "n": {0: [1, (2, 3)]}}),
        m.Ack(10, {"single": True, "outputs": [[[2, 3], "float32", True]]}),
        m.Failure(11, {"type": "WorkerError", "message": "boom"}),
        m.Commit(3),
    )
]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(_SAMPLES), st.data())
def test_bit_flips_insertions_and_truncations_only_ever_raise_decode_error(frame, data):
    raw = bytearray(frame)
    for _ in range(data.draw(st.integers(0, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and raw:
            raw[i] = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0x90, 0xC1, 0xC7, 0xD4, 0xDC, 0xDD, 0xDF, 0xFF]))
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=6))
        elif raw:
            del raw[i]
    cut = data.draw(st.integers(0, len(raw)))
    try:
        msg = codec.decode(bytes(raw[:cut]))
    except DecodeError:
        return
    codec.decode(codec.encode(msg))
