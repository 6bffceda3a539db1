"""Tensor operations that may be applied to Nodes, by name, and their evaluation in a worker.

The names are PyTorch's own: every function that takes part in ``__torch_function__``
(``torch.overrides.get_overridable_functions``), named as ``torch.overrides.resolve_name`` names it
(``torch.Tensor.__add__``, ``torch.cat``, ``torch.nn.functional.gelu``). That is the set of tensor
operations PyTorch itself lets another type stand in for; what it also holds that is not a pure
function of its inputs (in-place ops, hooks, ``backward``, conversions out of tensors) is refused.
A worker evaluates an ``m.Op`` by looking its name up in the same table: nothing else can run.
"""

from __future__ import annotations

import operator
import threading
from typing import Any, Callable, Optional

import torch

# Names that return tensors from tensors but are not operations a Node may stand in: they mutate,
# reach outside the value (hooks, storage, autograd state), or leave tensors (numbers, arrays).
_REFUSED = frozenset("""
__setitem__ __bool__ __float__ __int__ __index__ __len__ __contains__ __nonzero__ __complex__ __long__
__array__ __array_wrap__ __dlpack__ __dlpack_device__ __deepcopy__ __reduce_ex__ __setstate__ __repr__
__format__ __reversed__ __iter__ __hash__ backward register_hook register_post_accumulate_grad_hook retain_grad
numpy tolist item data_ptr storage untyped_storage storage_offset share_memory_ pin_memory record_stream
is_shared is_pinned element_size dim_order nelement numel size stride dim is_contiguous is_floating_point
is_complex is_signed get_device __cuda_array_interface__ cpu cuda to_dense apply_ map_ map2_ set_ detach_
requires_grad_ resize_ resize_as_ sum_to_size new_empty new_empty_strided
""".split())

# Functions whose result is several tensors: the caller needs their number before the op runs.
MULTI = frozenset("""
torch.Tensor.chunk torch.Tensor.split torch.Tensor.unbind torch.Tensor.tensor_split torch.Tensor.split_with_sizes
torch.Tensor.hsplit torch.Tensor.vsplit torch.Tensor.dsplit torch.Tensor.unsafe_chunk torch.Tensor.unsafe_split
torch.chunk torch.split torch.unbind torch.tensor_split torch.split_with_sizes torch.hsplit torch.vsplit
torch.dsplit torch.functional.split torch.Tensor.max torch.Tensor.min torch.Tensor.sort torch.Tensor.topk
torch.Tensor.kthvalue torch.Tensor.median torch.Tensor.mode torch.Tensor.aminmax torch.max torch.min torch.sort
torch.topk torch.kthvalue torch.median torch.mode torch.aminmax torch.var_mean torch.std_mean
torch.nn.functional.multi_head_attention_forward
""".split())

# Beyond PyTorch's table: picking one tensor out of a several-tensor result (see MULTI).
GETITEM = "actorgrad.getitem"

_lock = threading.Lock()
_table: Optional[dict[str, Callable[..., Any]]] = None


def table() -> dict[str, Callable[..., Any]]:
    """Every operation a Node may stand in, by name (built once, ~20 ms)."""
    global _table
    if _table is None:
        with _lock:
            if _table is None:
                found: dict[str, Callable[..., Any]] = {}
                for funcs in torch.overrides.get_overridable_functions().values():
                    for f in funcs:
                        name = torch.overrides.resolve_name(f)
                        if name and allowed_name(name):
                            found[name] = f
                found["torch.neg"] = torch.neg  # unary minus and abs(): not in the overridable table
                found["torch.abs"] = torch.abs
                found[GETITEM] = operator.getitem
                _table = found
    return _table


def allowed_name(name: str) -> bool:
    """Whether an operation of this name may run on Nodes (before looking it up in the table)."""
    last = name.rpartition(".")[2]
    if last in _REFUSED or ".__get__" in name or name.endswith("__.__get__"):
        return False
    if last.startswith("__i") and last.endswith("__") and last not in ("__index__",):
        return False  # in-place operators: __iadd__, __imul__, ...
    if last.endswith("_") and not last.endswith("__"):
        return False  # in-place methods: add_, relu_, ...
    return True


def lookup(name: str) -> Optional[Callable[..., Any]]:
    """The function an Op names, or None when it is not one that may run on Nodes."""
    return table().get(name)


def name_of(func: Callable[..., Any]) -> str:
    """PyTorch's name of a function (``torch.overrides.resolve_name``), or its qualified name."""
    name = torch.overrides.resolve_name(func)
    if name:
        return name
    mod = getattr(func, "__module__", None) or ""
    return f"{mod}.{getattr(func, '__qualname__', repr(func))}".lstrip(".")


def evaluate(op: Any, args: tuple, kwargs: dict) -> Any:
    """Run one Op on its (already evaluated) arguments; TypeError when its name is not allowed."""
    fn = lookup(op.fn)
    if fn is None:
        raise TypeError(f"{op.fn} is not an operation that may run on Nodes")
    if "out" in kwargs:
        raise TypeError(f"{op.fn}: out= is not supported on Nodes")
    if op.fn == GETITEM and not isinstance(args[0], (tuple, list)):
        raise TypeError(f"{GETITEM} picks from a several-tensor result, got {type(args[0]).__name__}")
    return fn(*args, **kwargs)
