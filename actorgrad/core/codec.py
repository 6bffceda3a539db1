"""The wire encoding of messages: a msgpack envelope plus one raw buffer per tensor.

A message encodes to a ``Frame``: an envelope, packed as ``[code, field, field,
...]`` in the field order of its dataclass, in which each tensor is an extension
holding only its header ``[dtype, shape, buffer index]``, and the tensors' raw
bytes as separate (out-of-band) buffers. A transport moves the buffers as it
likes (written one after the other to a socket, handed over in process) while
the envelope stays schema-checked msgpack. Decoding checks the code, the number
of fields and the type of every field, and that every buffer belongs to exactly
one tensor of the right size; nothing is ever unpickled, and anything
unexpected raises ``DecodeError``.

[Note: device buffers] A buffer may also be a 1-D uint8 torch tensor: what a
data plane (transport/dataplane.py) received out of band, on the receiver's
device, or, with ``encode_frame(msg, device_buffers=True)``, a view of a CUDA
tensor that stays on its device until a transport writes the frame as bytes
(``parts``). A tensor is then built on such a buffer (same device, no copy).

[Note: frame ownership] ``encode_frame`` copies nothing: its buffers are views
of the sender's tensors, which the sender may change later (an optimizer step,
a user reusing an input). ``Frame.private()`` makes the one copy that lets a
frame outlive that; a frame whose ``owned`` is true has buffers nobody else
reads or writes, and decodes into tensors built on them without a copy.

Decoding a frame costs time and memory bounded by a small multiple of its size
and by ``MAX_ELEMENTS``: before msgpack builds a single object, ``scan_frame``
walks the frame's structure iteratively and refuses it if it nests deeper than
``MAX_DEPTH``, holds more than ``MAX_ELEMENTS`` values, declares more values
than it has bytes, or holds a map key or an extension this codec never sends.
Only frames that pass are handed to msgpack, so no frame can drive msgpack's C
recursion (one level per tuple extension) or its allocations.
"""

from __future__ import annotations

import math
import reprlib
import struct
from dataclasses import fields
from functools import partial
from typing import Any, Callable, Optional, Union

import msgpack
import torch

from ..errors import DecodeError
from . import messages as m

# Extension type codes inside value trees.
_EXT_TENSOR = 1
_EXT_SLOT = 2
_EXT_TUPLE = 3
# A tagged record, one array ``[tag, ...fields]``: a Typed container, an Op, a slice, Ellipsis, a dtype.
_EXT_TAGGED = 4
_TYPED_KINDS = frozenset(("namedtuple", "dataclass", "packed", "pytree", "mapping"))

MAX_DIMS = 32
# How deeply value trees may nest (a field's own value is at depth 0); the same bound for encode and decode.
MAX_DEPTH = 64
# Values one frame may hold (every list item, map key and map value counts), so that a frame's decoded
# objects stay bounded however large the frame: ~60-100 bytes each for containers and strings (~100 MiB at
# most), ~230 for a tiny tensor. Raise it by setting ``actorgrad.core.codec.MAX_ELEMENTS`` in every process
# (caller and workers) before the runtime starts.
MAX_ELEMENTS = 1 << 20
# A tensor header is msgpack ``[dtype, shape, index]``: at most ~300 bytes for MAX_DIMS dimensions.
MAX_TENSOR_HEADER = 512
# Tensors (buffers) one frame may carry: each costs a buffer view and a size entry before the envelope
# is read, so their number is bounded on its own (~50 MiB of views at most).
MAX_BUFFERS = 1 << 18
# Buffers start at multiples of this in Frame.to_bytes, so that tensors built on a received buffer
# are aligned for every dtype (the largest element, complex128, is 16 bytes).
ALIGN = 16

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
# Looked up once: building a scalar tensor to ask its element size costs more than decoding a small tensor.
_ITEMSIZE = {name: dt.itemsize for name, dt in DTYPES.items()}


# --- tensors ---------------------------------------------------------------


def tensor_header(dtype: str, shape: list, index: int) -> bytes:
    """A tensor extension's payload: msgpack ``[dtype, shape, buffer index]``."""
    return msgpack.packb([dtype, list(shape), index], use_bin_type=True)


def tensor_buffer(t: torch.Tensor, device_buffers: bool = False) -> tuple[str, list, Any, bool]:
    """A tensor's dtype name, shape, raw bytes (a view where possible) and whether those are a private copy.

    ``device_buffers``: a non-CPU tensor's bytes stay on its device, as a uint8 tensor (see [Note: device buffers]).
    """
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"tensors of dtype {t.dtype} cannot be sent")
    t = t.detach()
    private = False
    if device_buffers and t.device.type != "cpu" and t.numel():
        return name, list(t.shape), byte_view(t), False
    if t.device.type != "cpu":
        t, private = t.cpu(), True
    if not t.is_contiguous():
        t, private = t.contiguous(), True
    if not t.numel():
        return name, list(t.shape), b"", True
    # A view of the tensor's own memory: no copy here (see [Note: frame ownership]). numpy has no
    # bfloat16: that one is viewed as int16 (same bytes).
    arr = t.view(torch.int16).numpy() if t.dtype is torch.bfloat16 else t.numpy()
    return name, list(t.shape), memoryview(arr).cast("B"), private


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor on its device (a copy only if not contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def tensor_nbytes(dtype: Any, shape: Any) -> int:
    """The byte size of a tensor header's dtype and shape; DecodeError if either is invalid."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DecodeError(f"unknown tensor dtype {_brief(dtype)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise DecodeError(f"tensor shape must be a list of at most {MAX_DIMS} sizes, got {_brief(shape)}")
    for s in shape:
        if not _is_int(s) or s < 0:
            raise DecodeError(f"tensor shape has an invalid size {_brief(s)}")
    return math.prod(shape) * _ITEMSIZE[dtype]


def tensor_from_bytes(dtype: Any, shape: Any, data: Any, owned: bool = False) -> torch.Tensor:
    """Rebuild a tensor from dtype name, shape and raw bytes, checking each part.

    ``owned``: nobody else reads or writes ``data``, so the tensor may be built on it without a copy.
    ``data`` may be a uint8 tensor (see [Note: device buffers]): the tensor is a view of it, on its device.
    """
    nbytes = tensor_nbytes(dtype, shape)
    if isinstance(data, torch.Tensor):
        if data.dtype is not torch.uint8 or data.dim() != 1 or not data.is_contiguous():
            raise DecodeError("a tensor buffer must be a contiguous 1-D uint8 tensor")
        if data.numel() != nbytes:
            raise DecodeError(f"tensor of dtype {dtype} and shape {shape} needs {nbytes} bytes, got {data.numel()}")
        if not nbytes:
            return torch.empty(shape, dtype=DTYPES[dtype], device=data.device)
        flat = data if owned else data.clone()
        if flat.data_ptr() % _ITEMSIZE[dtype]:
            flat = flat.clone()
        return flat.view(DTYPES[dtype]).reshape(shape)
    try:
        data = memoryview(data)
    except TypeError:
        raise DecodeError("tensor data must be raw bytes") from None
    if not data.c_contiguous:
        raise DecodeError("tensor data must be contiguous")
    dt = DTYPES[dtype]
    numel = math.prod(shape)
    itemsize = _ITEMSIZE[dtype]
    if numel * itemsize != data.nbytes:
        raise DecodeError(
            f"tensor of dtype {dtype} and shape {shape} needs {numel * itemsize} bytes, got {data.nbytes}"
        )
    if numel == 0:
        # An empty tensor's other sizes are unchecked by its (zero) byte count; torch computes strides
        # from them, and refuses with its own errors where they overflow 64 bits.
        if math.prod(max(s, 1) for s in shape) * itemsize > _MAX_TENSOR_BYTES:
            raise DecodeError(f"tensor shape {shape} is too large")
        return torch.empty(shape, dtype=dt)
    if data.format != "B":
        data = data.cast("B")
    if owned and not data.readonly:
        flat = torch.frombuffer(data, dtype=dt)
        if flat.data_ptr() % itemsize:  # a buffer at an odd offset (not laid out by Frame.to_bytes)
            flat = flat.clone()
    else:
        # One copy into memory the tensor owns: the sender's bytes may be immutable or still in use.
        flat = torch.frombuffer(bytearray(data), dtype=dt)
    return flat.reshape(shape)


_MAX_TENSOR_BYTES = (1 << 63) - 1


class _Tensors:
    """One decode's buffers: each taken by exactly one tensor extension."""

    __slots__ = ("buffers", "owned", "taken")

    def __init__(self, buffers: list, owned: bool) -> None:
        self.buffers = buffers
        self.owned = owned
        self.taken: set[int] = set()

    def take(self, payload: bytes) -> torch.Tensor:
        """The tensor a header extension describes, built on its buffer."""
        dtype, shape, index = self.header(payload)
        return tensor_from_bytes(dtype, shape, self.buffers[index], self.owned)

    def header(self, payload: bytes) -> tuple[Any, Any, int]:
        """A tensor extension's ``[dtype, shape, buffer index]``, its index checked and marked taken."""
        if len(payload) > MAX_TENSOR_HEADER:
            raise DecodeError(f"a tensor header of {len(payload)} bytes is longer than {MAX_TENSOR_HEADER}")
        try:
            # Limits sized for [dtype, shape, index]: whatever else a header holds stays this small.
            hdr = msgpack.unpackb(payload, raw=False, max_array_len=MAX_DIMS, max_map_len=0, max_str_len=64,
                                  max_bin_len=0, max_ext_len=0)
        except Exception as exc:
            raise DecodeError(f"a tensor header is malformed: {type(exc).__name__}: {exc}") from None
        if not isinstance(hdr, list) or len(hdr) != 3:
            raise DecodeError("a tensor header must be [dtype, shape, buffer index]")
        index = hdr[2]
        if not _is_int(index) or not 0 <= index < len(self.buffers):
            raise DecodeError(f"tensor buffer {_brief(index)} does not exist (the frame has {len(self.buffers)})")
        if index in self.taken:
            raise DecodeError(f"tensor buffer {index} is used twice")
        self.taken.add(index)
        return hdr[0], hdr[1], index


class _Headers(_Tensors):
    """One peek's buffers: records each tensor header's byte size by buffer index, builds no tensor."""

    __slots__ = ("sizes",)

    def __init__(self, count: int) -> None:
        super().__init__([None] * count, False)
        self.sizes: dict[int, int] = {}

    def take(self, payload: bytes) -> None:
        """Record the header's size; the tensor's place in the tree stays None."""
        dtype, shape, index = self.header(payload)
        self.sizes[index] = tensor_nbytes(dtype, shape)


# --- frames ------------------------------------------------------------------

_FRAME_HEAD = struct.Struct("<II")  # envelope length, buffer count
_PADDING = bytes(ALIGN)
_COPY_ENVELOPE = 1 << 16


class Frame:
    """One encoded message: a msgpack envelope and one contiguous byte buffer per tensor.

    ``owned``: nobody but the receiver reads or writes the buffers (see [Note: frame ownership]).
    As bytes (``to_bytes``): u32 envelope length, u32 buffer count, one u64 size per buffer
    (little-endian), the envelope, then each buffer, starting at a multiple of ALIGN (zero padding).
    """

    __slots__ = ("envelope", "buffers", "owned", "nbytes")

    def __init__(self, envelope: Union[bytes, memoryview], buffers: list, owned: bool = False) -> None:
        self.envelope = envelope
        self.buffers = buffers
        self.owned = owned
        # Buffers are byte-formatted (bytes, bytearray, memoryview of "B"): len is their size.
        self.nbytes = len(envelope) + sum(map(len, buffers))

    def __repr__(self) -> str:
        return f"Frame({len(self.envelope)} byte envelope, {len(self.buffers)} buffers, {self.nbytes} bytes)"

    def private(self) -> "Frame":
        """This frame with buffers nobody else holds: a copy of each borrowed one (self if already owned)."""
        if self.owned:
            return self
        return Frame(self.envelope, [b.clone() if isinstance(b, torch.Tensor) else bytearray(b) for b in self.buffers],
                     owned=True)

    def parts(self) -> list:
        """The frame's bytes as buffers to write one after the other (``writelines``: no join copy)."""
        sizes = [len(b) for b in self.buffers]
        head = _FRAME_HEAD.pack(len(self.envelope), len(sizes)) + struct.pack(f"<{len(sizes)}Q", *sizes)
        out = [head, self.envelope]
        pos = len(head) + len(self.envelope)
        for buf, size in zip(self.buffers, sizes):
            pad = -pos % ALIGN
            if pad:
                out.append(_PADDING[:pad])
            if isinstance(buf, torch.Tensor):  # a device buffer: its bytes now (see [Note: device buffers])
                buf = memoryview(buf.cpu().numpy()) if len(buf) else b""
            out.append(buf)
            pos += pad + size
        return out

    def to_bytes(self) -> bytes:
        """The frame as one bytes object (for transports that move bytes)."""
        return b"".join(self.parts())

    @classmethod
    def from_bytes(cls, data: Any, owned: bool = False) -> "Frame":
        """Split bytes written by ``to_bytes`` into envelope and buffer views (no copy); DecodeError if they lie.

        ``owned``: the caller hands ``data`` over (e.g. a bytearray just read from a socket), so tensors
        may be built on it.
        """
        try:
            view = memoryview(data)
        except TypeError:
            raise DecodeError(f"a frame must be bytes, got {type(data).__name__}") from None
        if view.format != "B" or view.ndim != 1:
            if not view.c_contiguous:
                raise DecodeError("a frame must be contiguous bytes")
            view = view.cast("B")
        n = len(view)
        if n < _FRAME_HEAD.size:
            raise DecodeError(f"a frame of {n} bytes is shorter than its header")
        n_env, count = _FRAME_HEAD.unpack_from(view)
        # Every count and size is checked against the frame's own length before anything is built.
        if count > MAX_BUFFERS:
            raise DecodeError(f"a frame declares {count} buffers (at most {MAX_BUFFERS})")
        table = _FRAME_HEAD.size + 8 * count
        if table + n_env > n:
            raise DecodeError(f"a frame of {n} bytes declares {count} buffers and a {n_env} byte envelope")
        sizes = struct.unpack_from(f"<{count}Q", view, _FRAME_HEAD.size)
        pos = table + n_env
        buffers = []
        for size in sizes:
            pos += -pos % ALIGN
            end = pos + size
            if end > n:
                raise DecodeError(f"a frame of {n} bytes declares a buffer of {size} bytes at offset {pos}")
            buffers.append(view[pos:end])
            pos = end
        if pos != n:
            raise DecodeError(f"a frame has {n - pos} bytes after its last buffer")
        envelope = view[table:table + n_env]
        # A small envelope is copied (scanning bytes is ~40% faster than a view); a large one is not, so
        # that a hostile frame costs no second copy of itself before the scan refuses it.
        return cls(bytes(envelope) if n_env <= _COPY_ENVELOPE else envelope, buffers, owned)


# --- value trees -----------------------------------------------------------


class _Packer:
    """One encode: packs value trees and collects their tensors' buffers."""

    __slots__ = ("buffers", "owned", "device_buffers")

    def __init__(self, device_buffers: bool = False) -> None:
        self.buffers: list = []
        self.owned = True  # until a buffer is a view of someone's tensor
        self.device_buffers = device_buffers

    def default(self, obj: Any) -> Any:
        """msgpack's hook for what it cannot pack itself: tensors, slots, tuples."""
        if isinstance(obj, torch.Tensor):
            name, shape, buf, private = tensor_buffer(obj, self.device_buffers)
            index = len(self.buffers)
            if index >= MAX_BUFFERS:
                raise TypeError(f"a message may hold at most {MAX_BUFFERS} tensors")
            self.buffers.append(buf)
            self.owned = self.owned and private
            return msgpack.ExtType(_EXT_TENSOR, tensor_header(name, shape, index))
        if isinstance(obj, m.Slot):
            return msgpack.ExtType(_EXT_SLOT, self.packb(obj.index))
        if isinstance(obj, tuple):
            return msgpack.ExtType(_EXT_TUPLE, self.packb(list(obj)))
        if isinstance(obj, m.Op):
            return msgpack.ExtType(_EXT_TAGGED, self.packb(["O", obj.fn, list(obj.args), obj.kwargs]))
        if isinstance(obj, m.Typed):
            return msgpack.ExtType(_EXT_TAGGED, self.packb(["T", obj.kind, obj.type, obj.context,
                                                            list(obj.children)]))
        if isinstance(obj, slice):
            return msgpack.ExtType(_EXT_TAGGED, self.packb(["S", obj.start, obj.stop, obj.step]))
        if obj is Ellipsis:
            return msgpack.ExtType(_EXT_TAGGED, self.packb(["E"]))
        if isinstance(obj, torch.dtype) and obj in _DTYPE_NAMES:
            return msgpack.ExtType(_EXT_TAGGED, self.packb(["D", _DTYPE_NAMES[obj]]))
        raise TypeError(f"cannot send a value of type {type(obj).__name__}")

    def packb(self, obj: Any) -> bytes:
        """``obj`` as msgpack, tensors as header extensions."""
        return msgpack.packb(obj, default=self.default, strict_types=True, use_bin_type=True)


def _ext_hook(tensors: _Tensors, level: int, code: int, data: bytes) -> Any:
    # ``level`` counts the unpackb calls around this one: each tuple re-enters msgpack's C unpacker
    # (with its parse stack on the C stack), so the count is refused before re-entering, never after.
    # scan_frame already bounds it; this is the backstop should the two ever disagree.
    if code == _EXT_TENSOR:
        return tensors.take(data)
    if code == _EXT_SLOT:
        index = msgpack.unpackb(data)
        if not _is_int(index) or index < 0:
            raise DecodeError(f"invalid input slot {_brief(index)}")
        return m.Slot(index)
    if code == _EXT_TUPLE:
        if level >= _MAX_LEVELS:
            raise DecodeError(f"value is nested too deeply (at most {MAX_DEPTH} levels)")
        items = _unpackb(data, partial(_ext_hook, tensors, level + 1))
        if not isinstance(items, list):
            raise DecodeError("a tuple must be packed as a list")
        return tuple(items)
    if code == _EXT_TAGGED:
        if level >= _MAX_LEVELS:
            raise DecodeError(f"value is nested too deeply (at most {MAX_DEPTH} levels)")
        return _tagged(_unpackb(data, partial(_ext_hook, tensors, level + 1)))
    raise DecodeError(f"unknown extension type {code}")


def _tagged(items: Any) -> Any:
    """A tagged record from its decoded array; every field is checked here."""
    if not isinstance(items, list) or not items or not isinstance(items[0], str):
        raise DecodeError("a tagged value must be a list that starts with its tag")
    tag, n = items[0], len(items)
    if tag == "O" and n == 4:
        fn, args, kwargs = items[1:]
        if not isinstance(fn, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise DecodeError(f"an operation must be [name, args, kwargs], got {_brief(items)}")
        if not all(isinstance(k, str) for k in kwargs):
            raise DecodeError("an operation's keyword names must be strings")
        return m.Op(fn, tuple(args), kwargs)
    if tag == "T" and n == 5:
        kind, typ, context, children = items[1:]
        if kind not in _TYPED_KINDS or not isinstance(typ, str) or not isinstance(children, list):
            raise DecodeError(f"a typed container must be [kind, type, context, children], got {_brief(items)}")
        if kind in ("namedtuple", "dataclass"):
            if (not isinstance(context, (list, tuple)) or len(context) != len(children)
                    or not all(isinstance(f, str) and f.isidentifier() for f in context)):
                raise DecodeError(f"a {kind}'s context must name each of its {len(children)} fields")
            context = tuple(context)
        elif kind == "mapping":
            if (not isinstance(context, (list, tuple)) or len(context) != len(children)
                    or not all(_is_int(k) or isinstance(k, str) for k in context)):
                raise DecodeError(f"a mapping's context must hold the key of each of its {len(children)} values")
            context = tuple(context)
        return m.Typed(kind, typ, context, tuple(children))
    if tag == "S" and n == 4:
        if not all(v is None or _is_int(v) for v in items[1:]):
            raise DecodeError(f"a slice holds integers or None, got {_brief(items)}")
        return slice(*items[1:])
    if tag == "E" and n == 1:
        return Ellipsis
    if tag == "D" and n == 2 and items[1] in DTYPES:
        return DTYPES[items[1]]
    raise DecodeError(f"invalid tagged value {_brief(items)}")


# Tuples nest at most MAX_DEPTH deep below a field, which is itself inside the message list.
_MAX_LEVELS = MAX_DEPTH + 2


def _unpackb(data: bytes, ext_hook: Callable[[int, bytes], Any]) -> Any:
    n = len(data)
    return msgpack.unpackb(
        data,
        ext_hook=ext_hook,
        raw=False,
        strict_map_key=False,
        use_list=True,
        # scan_frame enforces tighter bounds; these keep msgpack's own allocations within the frame.
        max_str_len=n,
        max_bin_len=n,
        max_ext_len=n,
        max_array_len=n,
        max_map_len=n // 2,
    )


def check_value_tree(obj: Any, depth: int = 0) -> None:
    """Raise TypeError unless ``obj`` is a tree this codec can send (types, depth, MAX_ELEMENTS)."""
    # Iterative, so that a deep or cyclic tree costs no recursion before the depth check refuses it.
    limit = MAX_ELEMENTS
    count = 0
    stack = [(obj, depth)]
    while stack:
        x, d = stack.pop()
        if d > MAX_DEPTH:
            raise TypeError(f"value is nested too deeply (at most {MAX_DEPTH} levels)")
        count += 1
        if x is None or isinstance(x, (bool, int, float, str, bytes, m.Slot)) or x is Ellipsis:
            continue
        if isinstance(x, torch.Tensor):
            if x.dtype not in _DTYPE_NAMES:
                raise TypeError(f"tensors of dtype {x.dtype} cannot be sent")
            continue
        if isinstance(x, (list, tuple)):
            stack.extend((item, d + 1) for item in x)
        elif isinstance(x, m.Typed):
            stack.append((x.context, d + 1))
            stack.extend((item, d + 1) for item in x.children)
        elif isinstance(x, m.Op):
            stack.append((list(x.args), d + 1))
            stack.append((x.kwargs, d + 1))
        elif isinstance(x, slice):
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (x.start, x.stop, x.step)):
                raise TypeError("a slice may hold only integers or None")
        elif isinstance(x, torch.dtype):
            if x not in _DTYPE_NAMES:
                raise TypeError(f"dtype {x} cannot be sent")
        elif isinstance(x, dict):
            for k, v in x.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"dictionary keys must be str or int, got {type(k).__name__}")
                stack.append((v, d + 1))
            count += len(x)  # the keys
        else:
            raise TypeError(f"cannot send a value of type {type(x).__name__}")
        if count + len(stack) > limit:
            raise TypeError(_too_many(count + len(stack)))


def _too_many(n: int) -> str:
    return (f"a message may hold at most {MAX_ELEMENTS} values (list items, map keys and values), this one "
            f"holds at least {n}; send large data as tensors, or raise actorgrad.core.codec.MAX_ELEMENTS in "
            "every process")


# --- frame scan --------------------------------------------------------------

# What the first byte of a msgpack object says about it: (kind, argument).
_K_SCALAR = 0  # nil, bool, float: argument is the object's size in bytes
_K_INT = 1  # argument: size in bytes
_K_STR = 2  # fixstr: argument is the size in bytes
_K_STR_VAR = 3  # str8/16/32: argument is the width of the length
_K_BIN = 4  # bin8/16/32: argument is the width of the length
_K_ARRAY = 5  # fixarray: argument is the number of items
_K_ARRAY_VAR = 6  # array16/32: argument is the width of the count
_K_MAP = 7  # fixmap: argument is the number of entries
_K_MAP_VAR = 8  # map16/32: argument is the width of the count
_K_EXT = 9  # fixext: argument is the payload size
_K_EXT_VAR = 10  # ext8/16/32: argument is the width of the length
_K_INVALID = 11


def _kinds() -> list[tuple[int, int]]:
    table = [(_K_INVALID, 0)] * 256
    for b in range(0x00, 0x80):
        table[b] = (_K_INT, 1)
    for b in range(0xE0, 0x100):
        table[b] = (_K_INT, 1)
    for b in range(0x80, 0x90):
        table[b] = (_K_MAP, b & 0x0F)
    for b in range(0x90, 0xA0):
        table[b] = (_K_ARRAY, b & 0x0F)
    for b in range(0xA0, 0xC0):
        table[b] = (_K_STR, 1 + (b & 0x1F))
    table[0xC0] = table[0xC2] = table[0xC3] = (_K_SCALAR, 1)
    table[0xCA], table[0xCB] = (_K_SCALAR, 5), (_K_SCALAR, 9)
    for b, size in zip(range(0xCC, 0xD4), (2, 3, 5, 9, 2, 3, 5, 9)):
        table[b] = (_K_INT, size)
    for b, width in ((0xC4, 1), (0xC5, 2), (0xC6, 4)):
        table[b] = (_K_BIN, width)
    for b, width in ((0xD9, 1), (0xDA, 2), (0xDB, 4)):
        table[b] = (_K_STR_VAR, width)
    for b, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        table[b] = (_K_EXT_VAR, width)
    for b, size in zip(range(0xD4, 0xD9), (1, 2, 4, 8, 16)):
        table[b] = (_K_EXT, size)
    table[0xDC], table[0xDD] = (_K_ARRAY_VAR, 2), (_K_ARRAY_VAR, 4)
    table[0xDE], table[0xDF] = (_K_MAP_VAR, 2), (_K_MAP_VAR, 4)
    return table


_KINDS = _kinds()
_KEY_KINDS = frozenset((_K_INT, _K_STR, _K_STR_VAR))
# Size of a value that is one fixed-size object (nil, bool, number, fixstr, empty fixarray or fixmap),
# else 0; the same for keys (int or fixstr). Runs of such values are the bulk of most frames (and of
# expansion bombs) and take the short loops below.
_SIZES = bytes(arg if kind <= _K_STR or b in (0x80, 0x90) else 0 for b, (kind, arg) in enumerate(_KINDS))
_KEY_SIZES = bytes(arg if kind in (_K_INT, _K_STR) else 0 for kind, arg in _KINDS)


def scan_frame(data: bytes) -> None:
    """Check a frame's structure and budgets without building anything; raise DecodeError if refused."""
    # One pass over the object headers with an explicit stack: the work is linear in the number of
    # values (bounded by MAX_ELEMENTS); strings, bins and tensor payloads are skipped in one step.
    try:
        _scan(data)
    except IndexError:
        # Reading past the end: the frame is shorter than its headers say.
        raise DecodeError("malformed message: the frame ends early") from None


def _scan(data: bytes) -> None:
    n = len(data)
    kinds, sizes, key_sizes, key_kinds = _KINDS, _SIZES, _KEY_SIZES, _KEY_KINDS
    max_open = MAX_DEPTH + 2  # containers open around a deepest value: message list, field, MAX_DEPTH more
    budget = MAX_ELEMENTS
    elements = 1
    pending = 1  # values announced but not read yet, each of which needs at least one byte
    pos = 0
    left = [1]  # per open container: values still to read (a map's keys and values both count)
    is_map = [False]
    ends = [n]  # per open container: where its bytes must end (a tuple's payload, the frame), or -1
    in_map = False
    while True:
        count = left[-1]
        if count:
            before = count
            if not in_map:
                s = sizes[data[pos]]
                while s:
                    pos += s
                    count -= 1
                    if not count:
                        break
                    s = sizes[data[pos]]
            elif not count & 1:
                ks = key_sizes[data[pos]]
                while ks:
                    s = sizes[data[pos + ks]]
                    if not s:
                        break
                    pos += ks + s
                    count -= 2
                    if not count:
                        break
                    ks = key_sizes[data[pos]]
            pending -= before - count
        if not count:
            left.pop()
            is_map.pop()
            in_map = is_map[-1] if is_map else False
            end = ends.pop()
            if end >= 0 and pos != end:
                if pos < end:
                    raise DecodeError(f"malformed message: {end - pos} bytes left over at offset {pos}")
                if pos > n:
                    raise DecodeError("malformed message: the frame ends early")
                raise DecodeError("malformed message: a value runs past the end of its tuple")
            if not left:
                return
            continue
        # One value that the loops above do not take: a container, a long string, an extension, a key.
        left[-1] = count - 1
        pending -= 1
        b = data[pos]
        kind, arg = kinds[b]
        if in_map and not count & 1 and kind not in key_kinds:
            raise DecodeError(f"map keys must be str or int (byte 0x{b:02x} at offset {pos})")
        if kind <= 2:  # _K_SCALAR, _K_INT, _K_STR (a key, or a value after one)
            pos += arg
            continue
        if kind == 5 or kind == 7:  # _K_ARRAY, _K_MAP
            pos += 1
            items = arg
        elif kind == 6 or kind == 8:  # _K_ARRAY_VAR, _K_MAP_VAR
            items = int.from_bytes(data[pos + 1:pos + 1 + arg], "big")
            pos += 1 + arg
        elif kind == 3 or kind == 4:  # _K_STR_VAR, _K_BIN
            pos += 1 + arg + int.from_bytes(data[pos + 1:pos + 1 + arg], "big")
            continue
        elif kind == 9 or kind == 10:  # _K_EXT, _K_EXT_VAR
            if kind == 9:
                size, start = arg, pos + 2
            else:
                size, start = int.from_bytes(data[pos + 1:pos + 1 + arg], "big"), pos + 2 + arg
            code, pos = data[start - 1], start + size
            if pos > n:
                raise DecodeError("malformed message: an extension runs past the frame")
            if code == 1:  # _EXT_TENSOR
                continue  # its payload is parsed by tensor_from_payload, with bounds of its own
            if code != _EXT_SLOT and code != _EXT_TUPLE and code != _EXT_TAGGED:
                raise DecodeError(f"unknown extension type {code - 256 if code > 127 else code}")
            if not size:
                raise DecodeError(f"malformed message: an empty extension of type {code} at offset {start - 1}")
            inner_kind, inner_arg = kinds[data[start]]
            if code == _EXT_SLOT:
                if inner_kind != _K_INT or inner_arg != size:
                    raise DecodeError(f"an input slot must hold exactly one integer (offset {start})")
                continue
            # A tuple is exactly one array: read its header here, so the tuple and its list are one level.
            if inner_kind == _K_ARRAY:
                items, head = inner_arg, 1
            elif inner_kind == _K_ARRAY_VAR:
                items, head = int.from_bytes(data[start + 1:start + 1 + inner_arg], "big"), 1 + inner_arg
            else:
                raise DecodeError(f"a tuple must be packed as a list (offset {start})")
            if head > size:
                raise DecodeError("malformed message: a tuple runs past its extension")
            elements += items
            pending += items
            if pending > n - start - head or elements > budget:
                _refuse_count(elements, pos)
            if items:
                if len(left) >= max_open:
                    raise DecodeError(f"value is nested too deeply (at most {MAX_DEPTH} levels)")
                left.append(items)
                is_map.append(False)
                in_map = False
                ends.append(pos)
                pos = start + head
            elif head != size:
                raise DecodeError("malformed message: bytes left over in a tuple")
            continue
        else:
            raise DecodeError(f"malformed message: invalid byte 0x{b:02x} at offset {pos}")
        # An array or a map with ``items`` entries starts here.
        if kind >= 7:  # _K_MAP, _K_MAP_VAR
            items *= 2
        elements += items
        pending += items
        if pending > n - pos or elements > budget:
            _refuse_count(elements, pos)
        if items:
            if len(left) >= max_open:
                raise DecodeError(f"value is nested too deeply (at most {MAX_DEPTH} levels)")
            left.append(items)
            in_map = kind >= 7
            is_map.append(in_map)
            ends.append(-1)


def _refuse_count(elements: int, pos: int) -> None:
    if elements > MAX_ELEMENTS:
        raise DecodeError(_too_many(elements))
    raise DecodeError(f"malformed message: more values announced than bytes left (offset {pos})")


_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxlist, _brief.maxdict, _brief.maxtuple = 2, 4, 4, 4
_brief.maxstring = _brief.maxother = _brief.maxlong = 60
_brief = _brief.repr


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
    # Nothing to check: scan_frame refused every depth, key and extension a value tree may not hold,
    # and msgpack builds nothing else.
    return x


def _dict(x: Any) -> dict:
    if not isinstance(x, dict):
        raise DecodeError(f"expected a map, got {type(x).__name__}")
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
            raise DecodeError(f"expected a {cls.__name__} of {len(validators)} fields, got {_brief(x)}")
        return cls(*(v(i) for v, i in zip(validators, x)))

    return check


def _edge(x: Any) -> tuple[int, int]:
    if not isinstance(x, (list, tuple)) or len(x) != 2:
        raise DecodeError(f"an edge must be [call, slot], got {_brief(x)}")
    return (_int(x[0]), _int(x[1]))


def _opt_int(x: Any) -> Optional[int]:
    return None if x is None else _int(x)


def _shape(x: Any) -> tuple[int, ...]:
    if not isinstance(x, (list, tuple)) or len(x) > MAX_DIMS:
        raise DecodeError(f"a shape must be a list of at most {MAX_DIMS} sizes")
    out = tuple(_int(d) for d in x)
    if any(d < 0 for d in out):
        raise DecodeError(f"a shape has a negative size: {out}")
    return out


_output_meta = _record(m.OutputMeta, _shape, _str, _bool)
_refspec = _record(m.RefSpec, _str, _int, _int, _bool)
_expect = _record(m.Expect, _int, _int, _list_of(_edge))
_seed = _record(m.SeedGrad, _int, _int, _int, _opt_tensor)
_pair = _edge


def _grads(x: Any) -> dict:
    """Shard.grads: parameter names to tensors."""
    d = _dict(x)
    for k, v in d.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise DecodeError(f"gradients must map parameter names to tensors, got {_brief(k)}: {type(v).__name__}")
    return d


def _positions(x: Any) -> tuple[int, ...]:
    """Forward.leaves: argument tensor positions, strictly increasing and >= 0 (the worker checks the upper bound)."""
    out = _list_of(_int)(x)
    if any(i < 0 for i in out) or any(a >= b for a, b in zip(out, out[1:])):
        raise DecodeError(f"leaf positions must be increasing integers >= 0, got {_brief(x)}")
    return out

# One row per message type: wire code, class, a validator per field (in order).
SCHEMA: dict[int, tuple[type, tuple[Callable[[Any], Any], ...]]] = {
    1: (m.Forward, (_int, _int, _int, _tree, _dict, _list_of(_refspec), _bool, _positions, _bool)),
    2: (m.Route, (_int, _int, _str, _int, _int)),
    3: (m.Value, (_int, _int, _int, _int, _tensor)),
    4: (m.Plan, (_int, _int, _int, _list_of(_expect), _list_of(_seed), _bool)),
    5: (m.Gradient, (_int, _int, _int, _int, _str, _int, _int, _opt_tensor)),
    6: (m.Close, (_int, _int, _list_of(_int), _list_of(_int), _list_of(_pair))),
    7: (m.Abort, (_int, _str)),
    8: (m.Fetch, (_int, _int, _int)),
    9: (m.GetState, (_int, _str)),
    10: (m.SetState, (_int, _str, _tree)),
    11: (m.Ack, (_int, _tree)),
    12: (m.Failure, (_int, _dict)),
    13: (m.Commit, (_int,)),
    14: (m.ForwardDone, (_int, _tree, _list_of(_output_meta), _int)),
    15: (m.CloseReady, (_int, _int, _int, _int, _bool, _int, _bool, _dict)),
    16: (m.UpdateReport, (_int, _opt_int, _bool, _int, _dict)),
    20: (m.Release, (_int, _int)),
    21: (m.Shard, (_int, _str, _grads)),
}
_CODES = {cls: code for code, (cls, _) in SCHEMA.items()}


# Fields that hold records or plain lists (not value trees): sent as nested lists.
_STRUCT_FIELDS = {"refs", "expect", "seeds", "calls", "passes", "retain", "outputs"}


def _plain(value: Any) -> Any:
    if isinstance(value, (m.RefSpec, m.Expect, m.SeedGrad, m.OutputMeta)):
        return [_plain(getattr(value, name)) for name in _names(type(value))]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode_frame(msg: m.Message, device_buffers: bool = False) -> Frame:
    """Encode one message: its envelope, and views of its tensors' memory as buffers (no copy).

    ``device_buffers``: CUDA tensors' buffers stay on their device (see [Note: device buffers]).
    """
    code = _CODES.get(type(msg))
    if code is None:
        raise TypeError(f"not a message: {type(msg).__name__}")
    payload: list[Any] = [code]
    for name in _names(type(msg)):
        value = getattr(msg, name)
        payload.append(_plain(value) if name in _STRUCT_FIELDS else value)
    packer = _Packer(device_buffers)
    try:
        envelope = packer.packb(payload)
    except (RecursionError, ValueError) as e:
        # Each tuple re-enters the packer (RecursionError); msgpack's own nesting limit raises ValueError.
        if isinstance(e, ValueError) and "recursion" not in str(e):
            raise
        raise TypeError(f"value is nested too deeply (at most {MAX_DEPTH} levels)") from None
    # No scan of the finished envelope here: it would cost the hot path ~0.2 us per value. What users
    # send (call arguments, states) is checked by check_value_tree against the decoder's own budgets
    # before it is encoded; everything else is built by actorgrad itself.
    return Frame(envelope, packer.buffers, packer.owned)


def _unpack_envelope(frame: Frame, tensors: "_Tensors") -> Any:
    """The envelope's msgpack value, its tensor extensions handed to ``tensors``; DecodeError on bad input."""
    data = frame.envelope
    if not isinstance(data, (bytes, memoryview)):
        raise DecodeError(f"an envelope must be bytes, got {type(data).__name__}")
    if len(frame.buffers) > MAX_BUFFERS:
        raise DecodeError(f"a frame holds {len(frame.buffers)} buffers (at most {MAX_BUFFERS})")
    scan_frame(data)  # before msgpack builds anything: refuses what would nest or expand beyond the budgets
    try:
        return _unpackb(data, partial(_ext_hook, tensors, 0))
    except DecodeError:
        raise
    except Exception as e:  # msgpack raises many types on bad input
        raise DecodeError(f"malformed message: {type(e).__name__}: {e}") from None


def decode_frame(frame: Frame) -> m.Message:
    """Decode and validate one message; raise DecodeError on anything unexpected.

    Tensors are built on the frame's buffers where it owns them (``frame.owned``), else on a copy.
    """
    if not isinstance(frame, Frame):
        raise DecodeError(f"a message must be a Frame, got {type(frame).__name__}")
    buffers = frame.buffers
    tensors = _Tensors(buffers, frame.owned)
    raw = _unpack_envelope(frame, tensors)
    if len(tensors.taken) != len(buffers):
        raise DecodeError(f"a frame holds {len(buffers) - len(tensors.taken)} buffers that no tensor uses")
    if not isinstance(raw, list) or not raw:
        raise DecodeError("a message must be a non-empty list")
    code = raw[0]
    if not _is_int(code) or code not in SCHEMA:
        raise DecodeError(f"unknown message type {_brief(code)}")
    cls, validators = SCHEMA[code]
    if len(raw) - 1 != len(validators):
        raise DecodeError(f"{cls.__name__} needs {len(validators)} fields, got {len(raw) - 1}")
    values = []
    for name, validator, value in zip(_names(cls), validators, raw[1:]):
        try:
            values.append(validator(value))
        except DecodeError as e:
            raise DecodeError(f"{cls.__name__}.{name}: {e.message}") from None
    if cls is m.Forward:
        _check_slots(values)
    elif cls is m.ForwardDone:
        _check_structure(values)
    return cls(*values)


def peek(frame: Frame) -> tuple[type, Optional[int], dict[int, int]]:
    """A frame's message class, its ``step`` field (None if it has none) and each tensor buffer's size by
    index, as its envelope declares them, without building any tensor; DecodeError as ``decode_frame``.

    A data plane reads this before the tensors themselves have arrived (see transport/dataplane.py).
    """
    headers = _Headers(len(frame.buffers))
    raw = _unpack_envelope(frame, headers)
    if not isinstance(raw, list) or not raw or not _is_int(raw[0]) or raw[0] not in SCHEMA:
        raise DecodeError("not a message")
    cls = SCHEMA[raw[0]][0]
    names = _names(cls)
    if len(raw) - 1 != len(names):
        raise DecodeError(f"{cls.__name__} needs {len(names)} fields, got {len(raw) - 1}")
    step = raw[1 + names.index("step")] if "step" in names else None
    return cls, step if _is_int(step) else None, headers.sizes


def encode(msg: m.Message) -> bytes:
    """Encode one message to bytes (``Frame.to_bytes`` of its frame)."""
    return encode_frame(msg).to_bytes()


def decode(data: bytes) -> m.Message:
    """Decode and validate one message from bytes written by ``encode``; raise DecodeError on anything unexpected."""
    return decode_frame(Frame.from_bytes(data))


def _check_slots(values: list) -> None:
    """Every Slot in a Forward's arguments must name one of its refs."""
    n = len(values[5])
    for slot in _slots_in((values[3], values[4])):
        if slot.index >= n:
            raise DecodeError(f"Forward.args: slot {slot.index} has no ref (only {n})")


def _check_structure(values: list) -> None:
    """A ForwardDone's structure holds output i's Slot exactly once for each of its outputs."""
    n = len(values[2])
    if sorted(s.index for s in _slots_in(values[1])) != list(range(n)):
        raise DecodeError(f"ForwardDone.structure: its slots do not name each of the {n} outputs once")


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
        elif isinstance(x, m.Typed):
            stack.extend(x.children)
        elif isinstance(x, m.Op):
            stack.extend(x.args)
            stack.extend(x.kwargs.values())
    return out


# --- in-process handover -----------------------------------------------------

_ATOMS = (type(None), bool, int, float, str, bytes)
SCHEMA_TYPES = frozenset(_CODES)  # the message classes, for a receiver handed messages in process
_RECORDS = (m.RefSpec, m.Expect, m.SeedGrad, m.OutputMeta)
# Fields whose validator builds tuples (records and lists of them, positions): copied the same way.
_TUPLE_FIELDS = _STRUCT_FIELDS | {"leaves"}
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def copy_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor a frame of ``t`` decodes to: a private, contiguous CPU copy without autograd history."""
    if t.dtype not in _DTYPE_NAMES:
        raise TypeError(f"tensors of dtype {t.dtype} cannot be sent")
    t = t.detach()
    if t.device.type != "cpu":
        return t.cpu().contiguous()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t.clone(memory_format=torch.contiguous_format)


def _copy_tree(x: Any, depth: int = 0) -> Any:
    """A value tree as decoding its encoding builds it: containers new, tensors copied, TypeError where
    encoding would refuse (the exact types msgpack packs, and this codec's extensions)."""
    t = type(x)
    if t in _ATOMS or x is Ellipsis or t is m.Slot:
        return x
    if depth > MAX_DEPTH:
        raise TypeError(f"value is nested too deeply (at most {MAX_DEPTH} levels)")
    if isinstance(x, torch.Tensor):
        return copy_tensor(x)
    if t is list:
        return [_copy_tree(v, depth + 1) for v in x]
    if isinstance(x, tuple):  # subclasses (torch.Size) arrive as plain tuples
        return tuple(_copy_tree(v, depth + 1) for v in x)
    if t is dict:
        return {_copy_tree(k, depth + 1): _copy_tree(v, depth + 1) for k, v in x.items()}
    if t is m.Typed:
        context = _copy_tree(x.context, depth + 1)
        if x.kind in ("namedtuple", "dataclass"):
            context = tuple(context)
        return m.Typed(x.kind, x.type, context, tuple(_copy_tree(v, depth + 1) for v in x.children))
    if t is m.Op:
        return m.Op(x.fn, tuple(_copy_tree(v, depth + 1) for v in x.args), _copy_tree(x.kwargs, depth + 1))
    if t is slice or (t is torch.dtype and x in _DTYPE_NAMES):
        return x
    if t in (bytearray, memoryview):
        return bytes(x)
    raise TypeError(f"cannot send a value of type {t.__name__}")


def _copy_struct(x: Any) -> Any:
    """A record field (refs, expect, seeds, ...) as its validator builds it: lists become tuples."""
    if isinstance(x, _RECORDS):
        return type(x)(*(_copy_struct(getattr(x, n)) for n in _names(type(x))))
    if isinstance(x, (list, tuple)):
        return tuple(_copy_struct(v) for v in x)
    if isinstance(x, torch.Tensor):
        return copy_tensor(x)
    return x


def copy_message(msg: m.Message) -> m.Message:
    """What ``decode_frame(encode_frame(msg).private())`` returns, without the bytes: for a transport that hands
    messages over in process. The one copy of every tensor is made now, on the sender's thread (see
    [Note: frame ownership]); nothing the receiver gets is shared with the sender."""
    cls = type(msg)
    if cls not in _CODES:
        raise TypeError(f"not a message: {cls.__name__}")
    values = []
    for name in _names(cls):
        v = getattr(msg, name)
        if type(v) in _ATOMS:
            values.append(v)
        elif name in _TUPLE_FIELDS:
            values.append(_copy_struct(v))
        else:
            values.append(_copy_tree(v))
    return cls(*values)
