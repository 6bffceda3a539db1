"""The wire encoding of messages: msgpack, tensors as dtype + shape + raw buffer.

A message is packed as ``[code, field, field, ...]`` in the field order of its
dataclass. Decoding checks the code, the number of fields and the type of
every field, and rebuilds tensors from raw bytes; nothing is ever unpickled,
and anything unexpected raises ``DecodeError``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import fields
from typing import Any, Callable

import msgpack
import torch

from ..errors import DecodeError
from . import messages as m

# Extension type codes inside value trees.
_EXT_TENSOR = 1
_EXT_SLOT = 2
_EXT_TUPLE = 3

MAX_DIMS = 32
MAX_DEPTH = 64

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# --- tensors ---------------------------------------------------------------


_TENSOR_HDR = struct.Struct("!H")


def tensor_payload(dtype: str, shape: list, raw: Any) -> bytes:
    """A tensor extension's bytes: u16 header length, msgpack [dtype, shape], then the raw buffer."""
    hdr = msgpack.packb([dtype, list(shape)], use_bin_type=True)
    # One copy of the raw buffer, straight from the tensor's memory (no intermediate bytes object).
    return b"".join((_TENSOR_HDR.pack(len(hdr)), hdr, raw))


def tensor_to_payload(t: torch.Tensor) -> bytes:
    """A tensor (moved to CPU, made contiguous) as extension bytes."""
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"tensors of dtype {t.dtype} cannot be sent")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
    return tensor_payload(name, list(t.shape), raw)


def tensor_from_payload(data: bytes) -> torch.Tensor:
    """Rebuild a tensor from extension bytes, checking every part."""
    if len(data) < _TENSOR_HDR.size:
        raise DecodeError("a tensor needs a header")
    (n,) = _TENSOR_HDR.unpack_from(data)
    if _TENSOR_HDR.size + n > len(data):
        raise DecodeError("a tensor header runs past its data")
    try:
        hdr = msgpack.unpackb(data[_TENSOR_HDR.size:_TENSOR_HDR.size + n], raw=False)
    except Exception as exc:
        raise DecodeError(f"a tensor header is malformed: {exc}") from None
    if not isinstance(hdr, list) or len(hdr) != 2:
        raise DecodeError("a tensor header must be [dtype, shape]")
    return tensor_from_bytes(hdr[0], hdr[1], memoryview(data)[_TENSOR_HDR.size + n:])


def tensor_from_bytes(dtype: Any, shape: Any, data: Any) -> torch.Tensor:
    """Rebuild a tensor from dtype name, shape and raw bytes, checking each part."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DecodeError(f"unknown tensor dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise DecodeError(f"tensor shape must be a list of at most {MAX_DIMS} sizes, got {shape!r}")
    for s in shape:
        if not _is_int(s) or s < 0:
            raise DecodeError(f"tensor shape has an invalid size {s!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("tensor data must be raw bytes")
    dt = DTYPES[dtype]
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dt).element_size()
    if numel * itemsize != len(data):
        raise DecodeError(
            f"tensor of dtype {dtype} and shape {shape} needs {numel * itemsize} bytes, got {len(data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dt)
    # One copy into memory the tensor owns (received bytes are immutable).
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(dt).reshape(shape)


# --- value trees -----------------------------------------------------------


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return msgpack.ExtType(_EXT_TENSOR, tensor_to_payload(obj))
    if isinstance(obj, m.Slot):
        return msgpack.ExtType(_EXT_SLOT, _packb(obj.index))
    if isinstance(obj, tuple):
        return msgpack.ExtType(_EXT_TUPLE, _packb(list(obj)))
    raise TypeError(f"cannot send a value of type {type(obj).__name__}")


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_TENSOR:
        return tensor_from_payload(data)
    if code == _EXT_SLOT:
        index = _unpackb(data)
        if not _is_int(index) or index < 0:
            raise DecodeError(f"invalid input slot {index!r}")
        return m.Slot(index)
    if code == _EXT_TUPLE:
        items = _unpackb(data)
        if not isinstance(items, list):
            raise DecodeError("a tuple must be packed as a list")
        return tuple(items)
    raise DecodeError(f"unknown extension type {code}")


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(
        data,
        ext_hook=_ext_hook,
        raw=False,
        strict_map_key=False,
        use_list=True,
    )


def check_value_tree(obj: Any, depth: int = 0) -> None:
    """Raise TypeError unless ``obj`` is a tree this codec can send."""
    if depth > MAX_DEPTH:
        raise TypeError("value is nested too deeply")
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, m.Slot)):
        if isinstance(obj, torch.Tensor) and obj.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensors of dtype {obj.dtype} cannot be sent")
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            check_value_tree(item, depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"dictionary keys must be str or int, got {type(k).__name__}")
            check_value_tree(v, depth + 1)
        return
    raise TypeError(f"cannot send a value of type {type(obj).__name__}")


def _check_tree_after_decode(obj: Any, depth: int = 0) -> None:
    try:
        check_value_tree(obj, depth)
    except TypeError as e:
        raise DecodeError(str(e)) from None


# --- field validators --------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(x: Any) -> int:
    if not _is_int(x):
        raise DecodeError(f"expected an integer, got {type(x).__name__}")
    return x


def _bool(x: Any) -> bool:
    if not isinstance(x, bool):
        raise DecodeError(f"expected a boolean, got {type(x).__name__}")
    return x


def _str(x: Any) -> str:
    if not isinstance(x, str):
        raise DecodeError(f"expected a string, got {type(x).__name__}")
    return x


def _tensor(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise DecodeError(f"expected a tensor, got {type(x).__name__}")
    return x


def _opt_tensor(x: Any) -> torch.Tensor | None:
    return None if x is None else _tensor(x)


def _tree(x: Any) -> Any:
    _check_tree_after_decode(x)
    return x


def _dict(x: Any) -> dict:
    if not isinstance(x, dict):
        raise DecodeError(f"expected a map, got {type(x).__name__}")
    _check_tree_after_decode(x)
    return x


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    def check(x: Any) -> tuple:
        if not isinstance(x, (list, tuple)):
            raise DecodeError(f"expected a list, got {type(x).__name__}")
        return tuple(item(i) for i in x)

    return check


def _record(cls: type, *validators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(x: Any) -> Any:
        if not isinstance(x, (list, tuple)) or len(x) != len(validators):
            raise DecodeError(f"expected a {cls.__name__} of {len(validators)} fields, got {x!r:.80}")
        return cls(*(v(i) for v, i in zip(validators, x)))

    return check


def _edge(x: Any) -> tuple[int, int]:
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        raise DecodeError(f"an edge must be [call, slot], got {x!r:.80}")
    return (_int(x[0]), _int(x[1]))


_refspec = _record(m.RefSpec, _str, _int, _int, _bool)
_expect = _record(m.Expect, _int, _int, _list_of(_edge))
_seed = _record(m.SeedGrad, _int, _int, _int, _opt_tensor)
_pair = _edge

# One row per message type: wire code, class, a validator per field (in order).
SCHEMA: dict[int, tuple[type, tuple[Callable[[Any], Any], ...]]] = {
    1: (m.Forward, (_int, _int, _int, _tree, _dict, _list_of(_refspec), _bool)),
    2: (m.Route, (_int, _int, _str, _int, _int)),
    3: (m.Value, (_int, _int, _int, _int, _tensor)),
    4: (m.Plan, (_int, _int, _int, _list_of(_expect), _list_of(_seed))),
    5: (m.Gradient, (_int, _int, _int, _int, _str, _int, _int, _opt_tensor)),
    6: (m.Close, (_int, _int, _list_of(_int), _list_of(_int), _list_of(_pair))),
    7: (m.Abort, (_int, _str)),
    8: (m.Fetch, (_int, _int, _int)),
    9: (m.GetState, (_int, _str)),
    10: (m.SetState, (_int, _str, _tree)),
    11: (m.Ack, (_int, _tree)),
    12: (m.Failure, (_int, _dict)),
    13: (m.Commit, (_int,)),
}
_CODES = {cls: code for code, (cls, _) in SCHEMA.items()}


# Fields that hold records or plain lists (not value trees): sent as nested lists.
_STRUCT_FIELDS = {"refs", "expect", "seeds", "calls", "passes", "retain"}


def _plain(value: Any) -> Any:
    if isinstance(value, (m.RefSpec, m.Expect, m.SeedGrad)):
        return [_plain(getattr(value, f.name)) for f in fields(value)]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode(msg: m.Message) -> bytes:
    """Encode one message to bytes."""
    code = _CODES.get(type(msg))
    if code is None:
        raise TypeError(f"not a message: {type(msg).__name__}")
    payload: list[Any] = [code]
    for f in fields(msg):
        value = getattr(msg, f.name)
        payload.append(_plain(value) if f.name in _STRUCT_FIELDS else value)
    return _packb(payload)


def decode(data: bytes) -> m.Message:
    """Decode and validate one message; raise DecodeError on anything unexpected."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"a message must be bytes, got {type(data).__name__}")
    try:
        raw = _unpackb(bytes(data))
    except DecodeError:
        raise
    except Exception as e:  # msgpack raises many types on bad input
        raise DecodeError(f"malformed message: {type(e).__name__}: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise DecodeError("a message must be a non-empty list")
    code = raw[0]
    if not _is_int(code) or code not in SCHEMA:
        raise DecodeError(f"unknown message type {code!r}")
    cls, validators = SCHEMA[code]
    if len(raw) - 1 != len(validators):
        raise DecodeError(f"{cls.__name__} needs {len(validators)} fields, got {len(raw) - 1}")
    values = []
    for f, validator, value in zip(fields(cls), validators, raw[1:]):
        try:
            values.append(validator(value))
        except DecodeError as e:
            raise DecodeError(f"{cls.__name__}.{f.name}: {e.message}") from None
    if cls is m.Forward:
        _check_slots(values)
    return cls(*values)


def _check_slots(values: list) -> None:
    """Every Slot in a Forward's arguments must name one of its refs."""
    n = len(values[5])
    for slot in _slots_in((values[3], values[4])):
        if slot.index >= n:
            raise DecodeError(f"Forward.args: slot {slot.index} has no ref (only {n})")


def _slots_in(tree: Any) -> list[m.Slot]:
    out: list[m.Slot] = []
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, m.Slot):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return out
