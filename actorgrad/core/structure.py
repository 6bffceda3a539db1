"""Nested values on the wire: the containers PyTorch programs pass to modules and get back.

A call's arguments and a module's result may nest tuples, lists, dicts, namedtuples, dataclasses,
``PackedSequence`` and any type registered with ``torch.utils._pytree`` (Hugging Face registers its
``ModelOutput``s there), with tensors, ``None`` and plain constants as leaves. ``encode`` turns such
a value into a *wire tree* that the codec can check and send without pickling: tuples, lists and
dicts stay themselves (the common case costs no more than before); every other container becomes an
``m.Typed`` record that names its type (``"module:qualname"``) and its fields. One level of a
registered container is taken apart and put back by pytree itself (``tree_flatten`` with an
``is_leaf`` that stops below it, ``tree_unflatten`` with a one-level spec), so whatever pytree
knows, this module knows.

``decode`` builds the value back. A type is found without importing anything: among the types this
process has sent (so the in-process backend gets the very classes), then in ``sys.modules`` and in
the namespaces a worker adds (its module's globals, where cloudpickle rebuilt the user's classes).
A namedtuple or dataclass that cannot be found is rebuilt with the same name and fields, so that a
worker never fails only because its process has not imported the caller's script.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
from typing import Any, Callable, Iterable, Optional

import torch
import torch.utils._pytree as pytree
from torch.nn.utils.rnn import PackedSequence

from . import messages as m

CONSTANTS = (type(None), bool, int, float, str, bytes, slice, type(Ellipsis), torch.dtype)
_LEAF_SPEC = pytree.tree_flatten(0)[1]
_PACKED_REF = "torch.nn.utils.rnn:PackedSequence"

_lock = threading.Lock()
_sent: dict[str, type] = {}  # "module:qualname" -> every container type this process has encoded
_rebuilt: dict[tuple, type] = {}  # stand-ins for namedtuple / dataclass types no namespace holds


def type_ref(cls: type) -> str:
    """The wire name of a type: ``module:qualname``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _note(cls: type) -> str:
    ref = type_ref(cls)
    if _sent.get(ref) is not cls:
        with _lock:
            _sent[ref] = cls
    return ref


def _key_ok(k: Any) -> bool:
    return isinstance(k, (str, int)) and not isinstance(k, bool)


def _is_constant_tree(x: Any, depth: int = 0) -> bool:
    """Whether ``x`` (a pytree context) is built of constants, lists, tuples and str/int-keyed dicts."""
    if depth > 16:
        return False
    if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
        return all(_is_constant_tree(v, depth + 1) for v in x)
    if type(x) is dict:
        return all(_key_ok(k) and _is_constant_tree(v, depth + 1) for k, v in x.items())
    return isinstance(x, CONSTANTS)


class _OneLevel:
    """``is_leaf`` for ``tree_flatten`` that stops below the root: one level of a container.

    It holds no reference to the value: pytree's flattening keeps its ``is_leaf`` in a reference
    cycle until the garbage collector runs, and a Node held that long would keep its worker's
    output past its step.
    """

    __slots__ = ("root",)

    def __init__(self) -> None:
        self.root = True

    def __call__(self, _: Any) -> bool:
        root, self.root = self.root, False
        return not root


def encode(value: Any, leaf: Callable[[Any, str], Any], path: str = "",
           leaf_types: tuple[type, ...] = (torch.Tensor,)) -> Any:
    """``value`` as a wire tree; ``leaf(x, path)`` gives the wire form of each leaf that is not a constant.

    ``leaf_types``: what goes to ``leaf`` without asking pytree (tensors; the caller's Nodes).
    Raises TypeError naming the path of anything that cannot be sent.
    """
    if isinstance(value, leaf_types):
        return leaf(value, path)
    t = type(value)
    sub = lambda v, p: encode(v, leaf, p, leaf_types)  # noqa: E731
    if t is tuple:
        return tuple(sub(v, f"{path}[{i}]") for i, v in enumerate(value))
    if t is list:
        return [sub(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if t is dict:
        for k in value:
            if not _key_ok(k):
                raise TypeError(f"{path}: dictionary keys must be str or int, got {type(k).__name__}")
        return {k: sub(v, f"{path}[{k!r}]") for k, v in value.items()}
    if isinstance(value, CONSTANTS):
        return value
    if isinstance(value, torch.Size):
        return tuple(int(d) for d in value)
    if isinstance(value, PackedSequence):
        return m.Typed("packed", _PACKED_REF, None, tuple(sub(v, f"{path}.{f}") for f, v in zip(value._fields, value)))
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and t not in pytree.SUPPORTED_NODES:
        names = tuple(f.name for f in dataclasses.fields(value))
        return m.Typed("dataclass", _note(t), names, tuple(sub(getattr(value, n), f"{path}.{n}") for n in names))
    children, spec = pytree.tree_flatten(value, is_leaf=_OneLevel())
    if spec.is_leaf() and isinstance(value, dict):
        # A dict subclass this process has not registered (a class shipped by value to a worker, whose
        # module's registration never ran there): its keys and values, rebuilt as that class.
        for k in value:
            if not _key_ok(k):
                raise TypeError(f"{path}: dictionary keys must be str or int, got {type(k).__name__}")
        return m.Typed("mapping", _note(t), list(value), tuple(sub(v, f"{path}[{k!r}]") for k, v in value.items()))
    if spec.is_leaf():  # not a container pytree knows: a tensor, a Node, or something unsendable
        return leaf(value, path)
    if spec.type is collections.namedtuple:
        cls = spec.context
        return m.Typed("namedtuple", _note(cls), tuple(cls._fields),
                       tuple(sub(v, f"{path}.{f}") for f, v in zip(cls._fields, children)))
    context = spec.context
    if not _is_constant_tree(context):
        raise TypeError(f"{path}: a {t.__name__} cannot be sent (its structure holds {type(context).__name__}); "
                        "use a dict, list, tuple, namedtuple or dataclass")
    keys = context if isinstance(context, list) and len(context) == len(children) else range(len(children))
    return m.Typed("pytree", _note(spec.type), context, tuple(sub(v, f"{path}[{k!r}]") for k, v in zip(keys, children)))


def decode(tree: Any, leaf: Callable[[Any], Any], types: "TypeResolver") -> Any:
    """The value a wire tree stands for; ``leaf(x)`` for each Slot and Op (and returns what replaces it)."""
    t = type(tree)
    if t is tuple:
        return tuple(decode(v, leaf, types) for v in tree)
    if t is list:
        return [decode(v, leaf, types) for v in tree]
    if t is dict:
        return {k: decode(v, leaf, types) for k, v in tree.items()}
    if t is m.Slot or t is m.Op:
        return leaf(tree)
    if t is m.Typed:
        return types.build(tree, [decode(v, leaf, types) for v in tree.children])
    return tree


class TypeResolver:
    """Finds the classes that Typed records name, without importing; see the module docstring."""

    def __init__(self, namespaces: Iterable[dict] = ()) -> None:
        self.namespaces = list(namespaces)

    def build(self, rec: m.Typed, children: list) -> Any:
        """The container ``rec`` describes, holding ``children``."""
        if rec.kind == "packed":
            if len(children) != 4:
                raise TypeError(f"a PackedSequence has 4 fields, got {len(children)}")
            # tuple.__new__: PackedSequence's own constructor checks its fields, which may be Nodes here.
            return tuple.__new__(PackedSequence, children)
        if rec.kind == "namedtuple":
            cls = self._find(rec.type, lambda c: isinstance(c, type) and issubclass(c, tuple)
                             and tuple(getattr(c, "_fields", ())) == rec.context)
            cls = cls or self._rebuild(rec, lambda name: collections.namedtuple(name, rec.context))
            return cls(*children)
        if rec.kind == "dataclass":
            cls = self._find(rec.type, lambda c: dataclasses.is_dataclass(c) and isinstance(c, type)
                             and tuple(f.name for f in dataclasses.fields(c)) == rec.context)
            cls = cls or self._rebuild(rec, lambda name: dataclasses.make_dataclass(name, rec.context))
            return _make_dataclass(cls, dict(zip(rec.context, children)))
        if rec.kind == "mapping":
            cls = self._find(rec.type, lambda c: isinstance(c, type) and issubclass(c, dict))
            items = list(zip(rec.context, children))
            if cls is None:
                return dict(items)
            if cls in pytree.SUPPORTED_NODES:
                return pytree.tree_unflatten(children, pytree.TreeSpec(cls, list(rec.context),
                                                                        [_LEAF_SPEC] * len(children)))
            try:
                return cls(items)
            except Exception:  # a constructor of its own: fill it as the dict it is
                obj = cls.__new__(cls)
                dict.update(obj, items)
                return obj
        cls = self._find(rec.type, lambda c: c in pytree.SUPPORTED_NODES)
        if cls is None:
            raise TypeError(f"type {rec.type} is not known in this process (import it, or register it with "
                            "torch.utils._pytree, in every process that receives it)")
        spec = pytree.TreeSpec(cls, rec.context, [_LEAF_SPEC] * len(children))
        return pytree.tree_unflatten(children, spec)

    def _find(self, ref: str, ok: Callable[[Any], bool]) -> Optional[type]:
        cls = _sent.get(ref)
        if cls is not None and ok(cls):
            return cls
        mod, _, qual = ref.partition(":")
        if "<" in qual:  # a class defined inside a function: only _sent can know it
            return None
        roots = [vars(sys.modules[mod])] if mod in sys.modules else []
        roots += [ns for ns in self.namespaces if ns.get("__name__") == mod]
        for root in roots:
            first, *rest = qual.split(".")
            obj = root.get(first)
            for part in rest:
                obj = getattr(obj, part, None) if isinstance(obj, type) else None
            if obj is not None and ok(obj):
                return obj
        return None

    def _rebuild(self, rec: m.Typed, make: Callable[[str], type]) -> type:
        key = (rec.kind, rec.type, rec.context)
        with _lock:
            cls = _rebuilt.get(key)
            if cls is None:
                name = rec.type.rpartition(":")[2].rpartition(".")[2]
                cls = _rebuilt[key] = make(name if name.isidentifier() else "Rebuilt")
        return cls


def _make_dataclass(cls: type, values: dict) -> Any:
    init = {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        obj = cls(**{k: v for k, v in values.items() if k in init})
    except Exception:  # a __post_init__ that computes on its fields, which may be Nodes here
        obj = object.__new__(cls)
        init = set()
    for k, v in values.items():
        if k not in init:
            object.__setattr__(obj, k, v)
    return obj


def slots_in(tree: Any) -> list[m.Slot]:
    """The Slots of a wire tree, in order."""
    found: list[m.Slot] = []
    decode(tree, lambda x: found.append(x) if type(x) is m.Slot else None, _NO_TYPES)
    return found


class _NoTypes(TypeResolver):
    def build(self, rec: m.Typed, children: list) -> Any:
        return None


_NO_TYPES = _NoTypes()


def describe(tree: Any, depth: int = 0) -> str:
    """A short text form of a wire structure, for error messages: ``(T, (T, T))``, ``{'logits': T}``."""
    if depth > 4:
        return "..."
    t = type(tree)
    if t is m.Slot:
        return "T"
    if t is tuple:
        inner = ", ".join(describe(v, depth + 1) for v in tree)
        return f"({inner},)" if len(tree) == 1 else f"({inner})"
    if t is list:
        return "[" + ", ".join(describe(v, depth + 1) for v in tree) + "]"
    if t is dict:
        return "{" + ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in tree.items()) + "}"
    if t is m.Typed:
        name = tree.type.rpartition(":")[2]
        return f"{name}(" + ", ".join(describe(v, depth + 1) for v in tree.children) + ")"
    return repr(tree)
