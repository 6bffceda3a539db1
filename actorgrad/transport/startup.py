"""What a worker process does once, before its first WorkerCore: keep its start-up cheap.

A worker process pays for its interpreter, Ray, torch and actorgrad; on top,
the first ``torch.optim`` optimizer imports ``torch._dynamo`` (torch.compile's
tracer: about 1.2 CPU-seconds and 65 MB per process on a small machine) only
to learn that nothing is being compiled: ``Optimizer.add_param_group``,
``zero_grad`` and ``state_dict`` are wrapped by ``torch._disable_dynamo``, and
``step`` calls ``torch._dynamo.graph_break()``, both no-ops outside
torch.compile. ``lazy_dynamo()`` puts a stand-in for ``torch._dynamo`` into
``sys.modules`` that answers those two calls as the real module would outside
compilation, and imports the real module, and steps aside for it, the first
time anything else of it is used (``torch.compile`` included). It is installed
only in worker processes the runtime starts (never in the caller's process),
only while ``torch._dynamo`` is not imported yet, and not at all with
``ACTORGRAD_LAZY_DYNAMO=0``.

The same holds for ``torch.fx.experimental.symbolic_shapes`` (sympy and
torch's symbolic shapes: about 0.8 CPU-seconds and 33 MB), which
``torch.autograd.grad`` imports at its first call to compare an output's
shape with its gradient's by ``expect_true(sym_eq(...))``: with plain ints
(there can be no symbolic ones while the module was never imported) that is
``==``, which is what the stand-in answers.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import threading
import types
from typing import Any, Callable, Optional

log = logging.getLogger("actorgrad.transport.startup")

# Reuse worker processes across runtimes of one driver (transport/ray.py, [Note: process pool]).
# Here, not in ray.py, so that setting it needs no import of Ray.
POOL_ENV = "ACTORGRAD_REUSE_PROCESSES"

_DYNAMO = "torch._dynamo"
_SHAPES = "torch.fx.experimental.symbolic_shapes"
_lock = threading.RLock()


class _StandIn(types.ModuleType):
    """A module until something beyond the calls it answers itself needs the real one."""

    package = True  # the real module is a package: it has a __path__ (asked by imports of its submodules)

    def __getattr__(self, name: str) -> Any:
        if name == "__path__" and not type(self).package:
            # `from m import f` asks whether m is a package first: a plain module is not.
            raise AttributeError(name)
        # Anything else (torch.compile, config, a submodule's __path__): the real module from now on.
        return getattr(_load_real(self.__name__), name)


class _DynamoStandIn(_StandIn):
    """``torch._dynamo`` until something beyond the optimizer's no-op calls needs the real one."""

    def graph_break(self, msg: str = "") -> None:
        """Outside torch.compile a no-op (compiling would have imported the real module)."""
        real = _loaded(_DYNAMO)
        if real is not None:
            real.graph_break(msg)

    def disable(self, fn: Optional[Callable] = None, recursive: bool = True, **kwargs: Any) -> Any:
        """``fn`` itself while nothing compiles; ``torch._dynamo.disable(fn)`` once the real module is in."""
        if fn is None:
            return functools.partial(self.disable, recursive=recursive, **kwargs)
        disabled: list[Callable] = []

        @functools.wraps(fn)
        def call(*args: Any, **kw: Any) -> Any:
            real = _loaded(_DYNAMO)
            if real is None:
                return fn(*args, **kw)
            if not disabled:
                disabled.append(real.disable(fn, recursive, **kwargs))
            return disabled[0](*args, **kw)

        return call


class _ShapesStandIn(_StandIn):
    """``torch.fx.experimental.symbolic_shapes`` for the shape checks of ``torch.autograd``."""

    package = False

    def sym_eq(self, x: Any, y: Any) -> Any:
        """``==`` of ints and of tuples of ints; anything symbolic goes to the real module."""
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(self.sym_eq(a, b) for a, b in zip(x, y))
        if type(x) is int and type(y) is int:
            return x == y
        return _load_real(self.__name__).sym_eq(x, y)

    def expect_true(self, a: Any, skip: int = 0) -> Any:
        """A plain bool as it is; anything symbolic goes to the real module."""
        if type(a) is bool:
            return a
        return _load_real(self.__name__).expect_true(a, skip + 1)


def _loaded(name: str) -> Optional[types.ModuleType]:
    """The real module if it has been imported, else None."""
    mod = sys.modules.get(name)
    return None if mod is None or isinstance(mod, _StandIn) else mod


def _load_real(name: str) -> types.ModuleType:
    with _lock:
        real = _loaded(name)
        if real is not None:
            return real
        log.debug("%s needed after all: importing it", name)
        sys.modules.pop(name, None)
        parent_name, _, child = name.rpartition(".")
        parent = sys.modules.get(parent_name)
        if parent is not None and isinstance(parent.__dict__.get(child), _StandIn):
            delattr(parent, child)
        return importlib.import_module(name)


def _install(name: str, cls: type) -> bool:
    """Put a stand-in for module ``name`` in place (its parent package imported); whether one is in place."""
    with _lock:
        if name in sys.modules:
            return isinstance(sys.modules[name], _StandIn)
        parent_name, _, child = name.rpartition(".")
        parent = importlib.import_module(parent_name)
        stand_in = cls(name, f"actorgrad's stand-in for {name} (imports it when used)")
        sys.modules[name] = stand_in
        setattr(parent, child, stand_in)  # what `import a.b.c` then binds, as the real import would
        return True


def lazy_dynamo() -> bool:
    """Install the ``torch._dynamo`` and symbolic-shapes stand-ins in this process; whether dynamo's is in place."""
    if os.environ.get("ACTORGRAD_LAZY_DYNAMO", "1") == "0":
        return False
    _install(_SHAPES, _ShapesStandIn)
    return _install(_DYNAMO, _DynamoStandIn)


def worker_process_setup() -> None:
    """Once per worker process, before its first module and optimizer: the cheap start-up above."""
    lazy_dynamo()
