"""Optim and Schedule: recipes a worker turns into an optimizer (and LR scheduler) over its own parameters.

A recipe travels to the worker instead of a built optimizer because an
optimizer is bound to parameter tensors, and those live in the worker.
Besides the optimizer's own arguments, ``ag.Optim`` takes keyword-only
extras that the worker applies around every optimizer step:

- ``schedule=ag.Schedule(cls, *, every="update", **kwargs)``: an LR scheduler
  the worker builds as ``cls(optimizer, **kwargs)`` and steps once after every
  optimizer step it applies (``every="update"``), or once after every
  ``ag.step()`` whether or not it updated (``every="step"``, as a plain
  PyTorch loop that steps its scheduler every iteration);
- ``clip_grad_norm=max_norm`` / ``clip_grad_value=clip_value``: the gradient
  is clipped over this worker's parameters before each optimizer step,
  exactly as ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` would
  clip them on the module in plain PyTorch;
- ``track_update_norm=True``: measure the L2 norm of every update (it costs a
  copy of the parameters per update, so it is off by default).
"""

from __future__ import annotations

from typing import Any

import torch

from .core.optim import (Optim, OptimizerSpec, Schedule, UpdateOptions, build_optimizer, build_schedule,
                         update_options)
from .errors import ConfigError

__all__ = ["Optim", "Schedule", "OptimizerSpec", "UpdateOptions", "build_optimizer", "build_schedule",
           "update_options", "normalize_optimizer"]


def normalize_optimizer(spec: Any, worker: str) -> OptimizerSpec | None:
    """Check an optimizer argument in the caller, before anything is shipped."""
    if spec is None:
        return spec
    if isinstance(spec, Optim):
        spec.check(worker)
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
