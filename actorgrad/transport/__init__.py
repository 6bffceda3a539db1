"""Transports move messages and host WorkerCores; they compute nothing.

Backends are found by name in a registry: ``register_backend(name, factory)``,
where ``factory(address, **options)`` returns a ``Transport`` (see base.py).
"local" and "ray" are registered here; Ray is imported only when "ray" is used.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .. import errors as E
from .base import Capabilities, Transport

__all__ = ["Capabilities", "Transport", "backends", "create_transport", "register_backend"]

# factory(address, **options) -> Transport; address and options are what ag.init was given.
BackendFactory = Callable[..., Transport]

_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``ag.init(backend=name)`` build its transport with ``factory(address, **options)``."""
    if not isinstance(name, str) or not name:
        raise E.ConfigError(f"a backend name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise E.ConfigError(f"the factory of backend {name!r} must be callable, got {factory!r}")
    _BACKENDS[name] = factory


def backends() -> tuple[str, ...]:
    """The registered backend names, in registration order."""
    return tuple(_BACKENDS)


def create_transport(name: str, address: Optional[str] = None, **options: Any) -> Transport:
    """A new transport of backend ``name``; ConfigError naming the registered backends if unknown."""
    factory = _BACKENDS.get(name)
    if factory is None:
        raise E.ConfigError(f"backend must be one of {backends()}, got {name!r}")
    return factory(address, **options)


def _ray(address: Optional[str], **options: Any) -> Transport:
    from .ray import RayTransport  # here, not above: backend="local" must work without importing Ray

    return RayTransport(address, **options)


def _local(address: Optional[str], **options: Any) -> Transport:
    if address is not None or options:
        raise E.ConfigError("backend='local' takes no Ray address or Ray options")
    from .local import LocalTransport

    return LocalTransport()


register_backend("ray", _ray)
register_backend("local", _local)
