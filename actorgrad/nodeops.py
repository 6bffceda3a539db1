"""Tensor operations on Nodes: what ``h + attn(h)``, ``out[:, -1]``, ``loss / K`` or ``torch.relu(node)`` build.

An operation on Nodes runs nowhere at once: it returns a ``DerivedNode`` that records it as an
``Op`` (PyTorch's own name for the function, see core/ops.py) over Nodes, tensors and constants.
Where it runs is decided by how it is used:

- passed into a worker's call (the common case: a residual, a reshape, a scaling between two
  workers), it is *fused* into that call: the worker evaluates it on the values that arrive, before
  its module, inside its own autograd graph. No message, no extra hop; the gradient of the
  operation is part of that worker's VJP, so it is exact.
- used by the caller itself (``backward()``, ``value()``), used a second time, or passed to a worker
  with its own backward, it is *materialized* once: a call that runs no module, in the worker of its
  first Node operand, whose output is an ordinary Node. A residual stream (``h = h + block(h)``
  repeated) so costs one such call per addition, and never a growing expression.

Operations are traced, not shipped as code: ``node.apply(fn)`` calls ``fn`` on the Node, so any
function built of tensor operations works (a lambda too) and only PyTorch's named operations cross
the wire.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree

from . import errors as E
from .core import ops
from .core.messages import Op

_TENSOR = "torch.Tensor."


def derive(name: str, args: tuple, kwargs: dict) -> Any:
    """The DerivedNode(s) of operation ``name`` applied to ``args``/``kwargs``, which hold Nodes."""
    _check(name, kwargs)
    nodes = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, NodeOps)]
    if not nodes:
        raise E.ConfigError(f"{name}: no Node among its arguments")
    runtime = nodes[0]._runtime
    if any(n._runtime is not runtime for n in nodes):
        raise E.ConfigError(f"{name}: its Nodes come from different runtimes (from before ag.shutdown()?)")
    op = Op(name, tuple(args), dict(kwargs))
    make = nodes[0]._derived
    if name not in ops.MULTI:
        return make(op)
    # Several tensors come back: how many is known only from the operands' shapes (waits for them).
    whole = make(op, several=True)
    result = meta_value(whole)
    if not isinstance(result, (tuple, list)):
        return make(op)
    return type(result)(make(Op(ops.GETITEM, (whole, i), {})) for i in range(len(result)))


def _check(name: str, kwargs: dict) -> None:
    if ops.lookup(name) is not None and "out" not in kwargs:
        return
    short = name.removeprefix(_TENSOR)
    if "out" in kwargs:
        why = "out= writes into a tensor of the caller; assign the result instead"
    elif short.endswith("_") and not short.endswith("__") or short.startswith("__i"):
        why = ("in-place operations cannot change a value that a worker holds; use the out-of-place form "
               f"({short.rstrip('_').replace('__i', '__')}), and rebind the name")
    elif short in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__array__"):
        why = "a Node's value lives in a worker: fetch it with node.value() or node.item()"
    elif ops.allowed_name(name) and name.startswith("torch"):
        why = "it is not an operation of PyTorch's __torch_function__ table"
    else:
        why = "it is not a differentiable tensor operation that a worker can run"
    raise E.ConfigError(f"{name} is not supported on Nodes: {why}. Put other code in a module and spawn it")


def meta_value(x: Any) -> Any:
    """What a Node (or an operation on Nodes) would hold, as meta tensors (shapes and dtypes only)."""
    if isinstance(x, NodeOps):
        return x._meta_value()
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    return x


def meta_of_op(op: Op) -> Any:
    """An operation's result on meta tensors: its shapes and dtypes, without running it anywhere."""
    fn = ops.lookup(op.fn)
    assert fn is not None
    args, kwargs = pytree.tree_map(meta_value, (op.args, op.kwargs), is_leaf=lambda y: isinstance(y, NodeOps))
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise E.ConfigError(f"{op.fn} cannot be applied to these operands: {exc}") from None


def _binary(name: str, reflected: bool = False) -> Callable[[Any, Any], Any]:
    full = _TENSOR + name

    def method(self: Any, other: Any) -> Any:
        return derive(full, (self, other), {})

    method.__name__ = name
    method.__doc__ = f"``{name}`` as on a tensor: a Node of the result."
    return method


class NodeOps:
    """The tensor operations of a Node (mixed into Node); each returns a DerivedNode."""

    __slots__ = ()

    def _derived(self, op: Op, several: bool = False) -> Any:
        """A new DerivedNode of this Node's runtime for ``op`` (handles.py builds it)."""
        raise NotImplementedError

    def _meta_value(self) -> torch.Tensor:
        """This value as a meta tensor (waits for the forward that tells its shape)."""
        raise NotImplementedError

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        """``torch.relu(node)``, ``torch.cat([a, b])``, ``F.gelu(node)``: recorded as operations on Nodes."""
        return derive(ops.name_of(func), tuple(args), dict(kwargs or {}))

    __add__ = _binary("__add__")
    __radd__ = _binary("__radd__")
    __sub__ = _binary("__sub__")
    __rsub__ = _binary("__rsub__")
    __mul__ = _binary("__mul__")
    __rmul__ = _binary("__rmul__")
    __truediv__ = _binary("__truediv__")
    __rtruediv__ = _binary("__rtruediv__")
    __floordiv__ = _binary("__floordiv__")
    __rfloordiv__ = _binary("__rfloordiv__")
    __mod__ = _binary("__mod__")
    __rmod__ = _binary("__rmod__")
    __pow__ = _binary("__pow__")
    __rpow__ = _binary("__rpow__")
    __matmul__ = _binary("__matmul__")
    __rmatmul__ = _binary("__rmatmul__")
    __and__ = _binary("__and__")
    __or__ = _binary("__or__")
    __xor__ = _binary("__xor__")
    # Elementwise, as on tensors: ``pred == y`` is a Node. Hashing stays by identity (as torch.Tensor's):
    # sets and dicts of Nodes find a Node by identity before they would compare.
    __eq__ = _binary("__eq__")  # type: ignore[assignment]
    __ne__ = _binary("__ne__")  # type: ignore[assignment]
    __hash__ = object.__hash__
    __lt__ = _binary("__lt__")
    __le__ = _binary("__le__")
    __gt__ = _binary("__gt__")
    __ge__ = _binary("__ge__")

    def __neg__(self) -> Any:
        return derive("torch.neg", (self,), {})

    def __abs__(self) -> Any:
        return derive("torch.abs", (self,), {})

    def __invert__(self) -> Any:
        return derive(_TENSOR + "__invert__", (self,), {})

    def __getitem__(self, index: Any) -> Any:
        """Indexing and slicing as on a tensor (ints, slices, None, Ellipsis, index tensors or Nodes)."""
        return derive(_TENSOR + "__getitem__", (self, index), {})

    def __setitem__(self, index: Any, value: Any) -> None:
        _check(_TENSOR + "__setitem__", {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        full = _TENSOR + name
        if ops.lookup(full) is not None:
            def method(*args: Any, **kwargs: Any) -> Any:
                return derive(full, (self,) + args, kwargs)

            method.__name__ = name
            return method
        if hasattr(torch.Tensor, name):
            _check(full, {})
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(node, *args, **kwargs)``, traced: ``fn`` may be any function built of tensor operations
        (a torch function, a lambda, a tensor method's name as a string); its result holds Nodes."""
        if isinstance(fn, str):
            return derive(_TENSOR + fn, (self,) + args, kwargs)
        return fn(self, *args, **kwargs)

    # Shape questions wait for the operands' forwards (they are answered from shapes, not values).

    def size(self, dim: Optional[int] = None) -> Any:
        """The value's size (``torch.Size``) or one dimension's, as ``Tensor.size``; waits for the forward."""
        shape = meta_value(self).shape
        return shape if dim is None else shape[dim]

    def dim(self) -> int:
        """The number of dimensions; waits for the forward."""
        return meta_value(self).dim()

    @property
    def ndim(self) -> int:
        """The number of dimensions; waits for the forward."""
        return self.dim()

    @property
    def dtype(self) -> torch.dtype:
        """The value's dtype; waits for the forward."""
        return meta_value(self).dtype

    @property
    def T(self) -> Any:  # noqa: N802 - torch.Tensor's name
        """The dimensions reversed, as ``Tensor.T`` (waits for the forward, to know how many there are)."""
        return derive(_TENSOR + "permute", (self, tuple(range(self.dim() - 1, -1, -1))), {})

    @property
    def mT(self) -> Any:  # noqa: N802 - torch.Tensor's name
        """The last two dimensions swapped, as ``Tensor.mT``."""
        return derive(_TENSOR + "transpose", (self, -2, -1), {})

    def __len__(self) -> int:
        shape = meta_value(self).shape
        if not shape:
            raise TypeError("len() of a 0-d Node")
        return shape[0]

    def __iter__(self) -> Any:
        """Over the first dimension, as a tensor iterates (``a, b = node`` for a node of length 2)."""
        return (self[i] for i in range(len(self)))

    def __bool__(self) -> bool:
        raise E.ConfigError("the truth value of a Node is not known in the caller: its value lives in a worker; "
                            "fetch it with node.item() or node.value() to branch on it")

    def __float__(self) -> float:
        raise E.ConfigError("float() of a Node: its value lives in a worker; use node.item()")

    def __int__(self) -> int:
        raise E.ConfigError("int() of a Node: its value lives in a worker; use node.item()")

    def __index__(self) -> int:
        raise E.ConfigError("a Node used as an index: its value lives in a worker; use node.item()")
