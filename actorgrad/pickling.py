"""Whether a worker's spec can travel to its process, and if not, which object stops it.

A Ray worker gets its module (and optimizer recipe, update rule) through Ray's cloudpickle. A
module that holds a lock, an open file, a generator, a function compiled by torch.compile or a
lambda bound to any of these fails there with a raw serialization error. ``check`` runs at
``ag.spawn`` on every backend (so both raise the same ConfigError): it pickles the spec's
structure with tensors left out, which costs a fraction of a millisecond whatever the size of
the weights. When that fails, ``error`` walks the objects (submodules, attributes, containers,
a function's closure and globals) to the deepest one that does not pickle, and names it.
"""

from __future__ import annotations

import functools
import io
import logging
import sys
import types
from typing import Any, Iterator, Optional

import torch

from . import errors as E

log = logging.getLogger("actorgrad.pickling")

__all__ = ["check", "error", "cloudpickle_module"]

_MAX_DEPTH = 24


def cloudpickle_module() -> Any:
    """cloudpickle as Ray uses it: Ray's own copy once Ray is loaded, else a standalone one if installed.

    Both are cloudpickle 3; the standalone one spares a local-backend program the import of Ray.
    """
    if "ray" not in sys.modules:
        try:
            import cloudpickle as standalone

            return standalone
        except ImportError:
            pass
    from ray import cloudpickle as ray_cloudpickle

    return ray_cloudpickle


@functools.lru_cache(maxsize=None)
def _structure_pickler(base: type) -> type:
    class StructurePickler(base):  # type: ignore[misc, valid-type]
        """Pickles everything but tensor data: a tensor becomes an empty placeholder."""

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return (torch.empty, (0,))
            return super().reducer_override(obj)

    return StructurePickler


def _dumps(obj: Any) -> None:
    cp = cloudpickle_module()
    _structure_pickler(cp.CloudPickler)(io.BytesIO(), protocol=5).dump(obj)


def check(spec: Any) -> None:
    """Raise ConfigError naming the worker and the object at fault if ``spec`` cannot be pickled."""
    try:
        _dumps(spec)
    except Exception as exc:
        raise error(spec, exc) from None


def error(spec: Any, exc: BaseException) -> E.ConfigError:
    """The ConfigError for a spec whose pickling raised ``exc``: the deepest object at fault, and advice."""
    found: Optional[tuple[str, Any, BaseException]] = None
    for label in ("module", "optimizer", "update"):
        obj = getattr(spec, label, None)
        err = _fails(obj)
        if err is not None:
            found = _deepest(label, obj, err, set(), 0)
            break
    if found is None:
        where, why = "the worker's spec", exc
        text = f"{where} cannot be pickled ({type(why).__name__}: {why})"
        advice = ""
    else:
        where, obj, why = found
        text = f"{where} ({_describe(obj)}) cannot be pickled ({type(why).__name__}: {why})"
        advice = _advice(obj)
    return E.ConfigError(
        f"ag.spawn cannot send this worker to its process: {text}. A worker gets a pickled copy of its module, "
        "optimizer and update rule (Ray's cloudpickle, on every backend)" + (f"; {advice}" if advice else "") + ". Otherwise leave the "
        "object out of the pickle (__getstate__/__setstate__) and create it in the worker, e.g. on the first "
        "forward", worker=getattr(spec, "name", None))


def _fails(obj: Any) -> Optional[BaseException]:
    try:
        _dumps(obj)
    except Exception as exc:
        return exc
    return None


def _deepest(path: str, obj: Any, why: BaseException, seen: set[int], depth: int) -> tuple[str, Any, BaseException]:
    """Starting at ``obj`` (which fails with ``why``), the path of the deepest part that fails too."""
    seen.add(id(obj))
    if depth >= _MAX_DEPTH or _opaque(obj):
        return path, obj, why
    for suffix, child in _children(obj):
        if id(child) in seen or _atomic(child):
            continue
        err = _fails(child)
        if err is not None:
            return _deepest(path + suffix, child, err, seen, depth + 1)
    return path, obj, why


def _atomic(obj: Any) -> bool:
    return obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.Tensor, type))


def _opaque(obj: Any) -> bool:
    """An object to name as a whole: a compiled function, or torch's and Ray's own internals."""
    if _compiled(obj):
        return True
    if isinstance(obj, torch.nn.Module):
        return False
    mod = getattr(type(obj), "__module__", "") or ""
    return mod.split(".")[0] in ("torch", "ray")


def _compiled(obj: Any) -> bool:
    return callable(obj) and getattr(obj, "_torchdynamo_orig_callable", None) is not None


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    """(path suffix, object) for what pickling ``obj`` pickles too."""
    if isinstance(obj, torch.nn.Module):
        for key, value in vars(obj).items():
            if key in ("_parameters", "_buffers", "_modules") and isinstance(value, dict):
                for name, sub in value.items():
                    yield f".{name}", sub
            else:
                yield f".{key}", value
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"[{key!r}]", value
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield f"[{i}]", value
        return
    if isinstance(obj, (set, frozenset)):
        for value in obj:
            yield "[...]", value
        return
    if isinstance(obj, functools.partial):
        yield ".func", obj.func
        yield ".args", obj.args
        yield ".keywords", obj.keywords
        return
    if isinstance(obj, types.MethodType):
        yield ".__self__", obj.__self__
        yield ".__func__", obj.__func__
        return
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        for name, cell in zip(code.co_freevars, obj.__closure__ or ()):
            try:
                yield f".__closure__[{name!r}]", cell.cell_contents
            except ValueError:  # an empty cell
                continue
        for name in code.co_names:
            if name in obj.__globals__:
                yield f".__globals__[{name!r}]", obj.__globals__[name]
        if obj.__defaults__:
            yield ".__defaults__", obj.__defaults__
        if obj.__kwdefaults__:
            yield ".__kwdefaults__", obj.__kwdefaults__
        for key, value in vars(obj).items():
            yield f".{key}", value
        return
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        for key, value in state.items():
            yield f".{key}", value
    for slot in getattr(type(obj), "__slots__", ()) or ():
        if isinstance(slot, str) and hasattr(obj, slot):
            yield f".{slot}", getattr(obj, slot)


def _describe(obj: Any) -> str:
    if _compiled(obj):
        return "a function compiled by torch.compile"
    cls = type(obj)
    if isinstance(obj, types.FunctionType):
        return f"the function {obj.__qualname__}"
    mod = cls.__module__
    return f"a {cls.__qualname__}" if mod in ("builtins", "__main__") else f"a {mod}.{cls.__qualname__}"


def _advice(obj: Any) -> str:
    name = type(obj).__name__.lower()
    if _compiled(obj):
        return ("compile in the worker instead: spawn the module before anything compiles it here (a forward that "
                "calls torch.compile then compiles in the worker, on its first call), or spawn torch.compile(module), "
                "which pickles")
    if "lock" in name or "semaphore" in name or "condition" in name or "event" in name:
        return "a lock belongs to one process: create it in the worker (e.g. in __setstate__)"
    if "io" in type(obj).__module__ or "file" in name:
        return "an open file belongs to one process: store its path and open it in the worker"
    if isinstance(obj, types.GeneratorType):
        return "a generator cannot be pickled: store the data (or what builds the iterator) instead"
    return ""
