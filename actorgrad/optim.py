"""Optim: the recipe a worker turns into an optimizer over its own parameters."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Union

import torch

from .errors import ConfigError

__all__ = ["Optim", "OptimizerSpec", "build_optimizer"]


class Optim:
    """An optimizer recipe: the worker builds ``cls(params, **kwargs)`` itself.

    >>> opt = Optim(torch.optim.SGD, lr=0.1, momentum=0.9)
    """

    def __init__(self, cls: type[torch.optim.Optimizer], **kwargs: Any) -> None:
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError(
                f"ag.Optim needs a torch.optim.Optimizer class, got {cls!r}; "
                "pass a plain callable params -> optimizer for anything else"
            )
        self.cls = cls
        self.kwargs = kwargs

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Build the optimizer over ``params``."""
        return self.cls(params, **self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"Optim({self.cls.__name__}{', ' if args else ''}{args})"


OptimizerSpec = Union[Optim, Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]]


def normalize_optimizer(spec: Any, worker: str) -> OptimizerSpec | None:
    """Check an optimizer argument in the caller, before anything is shipped."""
    if spec is None or isinstance(spec, Optim):
        return spec
    if isinstance(spec, torch.optim.Optimizer):
        if len(spec.param_groups) == 1 and not spec.state:
            return Optim(type(spec), **{k: v for k, v in spec.defaults.items() if k != "params"})
        raise ConfigError(
            "an optimizer instance is bound to parameters in this process; "
            "pass ag.Optim(cls, **kwargs) so that the worker builds it over its own",
            worker=worker,
        )
    if callable(spec):
        return spec
    raise ConfigError(f"optimizer must be ag.Optim(...) or a callable params -> optimizer, got {spec!r}", worker=worker)


def build_optimizer(spec: OptimizerSpec | None, module: torch.nn.Module, worker: str) -> torch.optim.Optimizer | None:
    """Build the worker's optimizer over its module's parameters."""
    if spec is None:
        return None
    params = list(module.parameters())
    if not params:
        raise ConfigError("the module has no parameters, so it cannot have an optimizer", worker=worker)
    opt = spec.build(params) if isinstance(spec, Optim) else spec(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"the optimizer callable returned {type(opt).__name__}, not a torch.optim.Optimizer", worker=worker)
    return opt
