"""Optimizer and schedule recipes (ag.Optim, ag.Schedule) and how a worker builds them.

The user-facing documentation is in actorgrad/optim.py, which re-exports these names.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from ..errors import ConfigError

log = logging.getLogger("actorgrad.optim")


class Schedule:
    """An LR scheduler recipe: the worker builds ``cls(optimizer, **kwargs)`` over its own optimizer.

    A keyword argument that is itself a Schedule (or a list of them, as for ``SequentialLR``'s
    ``schedulers``) is built over the same optimizer first.

    ``every``: "update" (default) steps the scheduler after each optimizer step of the worker;
    "step" steps it once after every ``ag.step()``, whether or not the worker updated in it (as a
    plain-PyTorch loop that calls ``scheduler.step()`` every iteration).

    >>> sched = Schedule(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.5)
    >>> sched = Schedule(torch.optim.lr_scheduler.StepLR, every="step", step_size=10, gamma=0.5)
    """

    EVERY = ("update", "step")

    def __init__(self, cls: Union[type[LRScheduler], Callable[[torch.optim.Optimizer], LRScheduler]], *,
                 every: str = "update", **kwargs: Any) -> None:
        # Checked at ag.spawn (check()), where the error can name the worker.
        self.cls = cls
        self.every = every
        self.kwargs = kwargs

    def check(self, worker: str) -> None:
        """Raise ConfigError (naming ``worker``) unless this is a recipe of a scheduler actorgrad can step."""
        if self.every not in self.EVERY:
            raise ConfigError(f"ag.Schedule(every=...) must be one of {self.EVERY}, got {self.every!r}", worker=worker)
        cls = self.cls
        if isinstance(cls, type):
            if not issubclass(cls, LRScheduler):
                raise ConfigError(f"ag.Schedule needs a torch.optim.lr_scheduler.LRScheduler class (or a callable "
                                  f"optimizer -> scheduler), got {cls.__name__}", worker=worker)
            _check_steppable(cls, worker)
        elif isinstance(cls, LRScheduler):
            raise ConfigError("ag.Schedule got a scheduler instance, which is bound to an optimizer in this process; "
                              "pass the class and its arguments, ag.Schedule(cls, **kwargs)", worker=worker)
        elif not callable(cls):
            raise ConfigError(f"ag.Schedule needs an LRScheduler class or a callable optimizer -> scheduler, "
                              f"got {cls!r}", worker=worker)
        elif self.kwargs:
            raise ConfigError("ag.Schedule(callable) takes no keyword arguments: the callable gets the optimizer "
                              "only", worker=worker)
        for value in self.kwargs.values():
            for inner in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(inner, Schedule):
                    inner.check(worker)

    def build(self, optimizer: torch.optim.Optimizer, worker: str) -> LRScheduler:
        """Build the scheduler over ``optimizer`` (which it steps from then on); ConfigError if it cannot be."""
        try:
            kwargs = {k: _build_nested(v, optimizer, worker) for k, v in self.kwargs.items()}
            sched = self.cls(optimizer, **kwargs)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"the schedule {self!r} could not be built: {type(exc).__name__}: {exc}",
                              worker=worker) from None
        if not isinstance(sched, LRScheduler):
            raise ConfigError(f"the schedule callable returned {type(sched).__name__}, not a "
                              "torch.optim.lr_scheduler.LRScheduler", worker=worker)
        _check_steppable(type(sched), worker)
        return sched

    def __repr__(self) -> str:
        name = getattr(self.cls, "__name__", repr(self.cls))
        args = ", ".join(f"{k}={v!r}" for k, v in (({"every": self.every} if self.every != "update" else {})
                                                   | self.kwargs).items())
        return f"Schedule({name}{', ' if args else ''}{args})"


def _build_nested(value: Any, optimizer: torch.optim.Optimizer, worker: str) -> Any:
    if isinstance(value, Schedule):
        return value.build(optimizer, worker)
    if isinstance(value, (list, tuple)) and any(isinstance(v, Schedule) for v in value):
        return type(value)(_build_nested(v, optimizer, worker) for v in value)
    return value


def _check_steppable(cls: type, worker: str) -> None:
    if issubclass(cls, ReduceLROnPlateau):
        raise ConfigError("ReduceLROnPlateau needs a metric at every step, but a worker steps its schedule itself "
                          "after each update, without one; use an epoch- or step-based scheduler, or step the "
                          "learning rate in a callable update rule", worker=worker)


class Optim:
    """An optimizer recipe: the worker builds ``cls(params, **kwargs)`` itself.

    Keyword-only extras, not passed to the optimizer: ``schedule`` (an ``ag.Schedule``, stepped
    once after every optimizer step), ``clip_grad_norm`` / ``clip_grad_value`` (clip this
    worker's gradient before each optimizer step), ``track_update_norm`` (report the L2 norm of
    each update in the StepReport; costs a parameter copy per update).

    >>> opt = Optim(torch.optim.SGD, lr=0.1, momentum=0.9)
    >>> opt = Optim(torch.optim.SGD, lr=0.1, clip_grad_norm=1.0,
    ...             schedule=Schedule(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.5))
    """

    def __init__(self, cls: type[torch.optim.Optimizer], *, schedule: Any = None,
                 clip_grad_norm: Optional[float] = None, clip_grad_value: Optional[float] = None,
                 track_update_norm: bool = False, **kwargs: Any) -> None:
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError(
                f"ag.Optim needs a torch.optim.Optimizer class, got {cls!r}; "
                "pass a plain callable params -> optimizer for anything else"
            )
        self.cls = cls
        self.kwargs = kwargs
        self.schedule = schedule
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.track_update_norm = track_update_norm

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Build the optimizer over ``params``."""
        return self.cls(params, **self.kwargs)

    def check(self, worker: str) -> None:
        """Raise ConfigError (naming ``worker``) for extras that are not valid."""
        for label, value in (("clip_grad_norm", self.clip_grad_norm), ("clip_grad_value", self.clip_grad_value)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{label} must be a positive finite number, got {value!r}", worker=worker)
        if self.clip_grad_norm is not None and self.clip_grad_value is not None:
            raise ConfigError("give clip_grad_norm or clip_grad_value, not both: their order would be a guess; "
                              "clip in a callable update rule for anything else", worker=worker)
        if not isinstance(self.track_update_norm, bool):
            raise ConfigError(f"track_update_norm must be True or False, got {self.track_update_norm!r}",
                              worker=worker)
        if self.schedule is not None:
            if not isinstance(self.schedule, Schedule):
                raise ConfigError(f"schedule must be ag.Schedule(cls, **kwargs), got {self.schedule!r}", worker=worker)
            self.schedule.check(worker)
            self._try_build(worker)

    def _try_build(self, worker: str) -> None:
        """Build optimizer and schedule over placeholder parameters, so a bad recipe fails at ag.spawn."""
        try:
            opt = self.cls([torch.nn.Parameter(torch.zeros(1))], **self.kwargs)
        except Exception as exc:  # the optimizer may need real parameters (devices, fused kernels): the worker checks
            log.debug("%s: optimizer not trial-built in the caller: %s", worker, exc)
            return
        self.schedule.build(opt, worker)

    def options(self) -> "UpdateOptions":
        """What the worker applies around each optimizer step."""
        return UpdateOptions(self.schedule, self.clip_grad_norm, self.clip_grad_value, self.track_update_norm)

    def __repr__(self) -> str:
        args = [f"{k}={v!r}" for k, v in self.kwargs.items()]
        for label in ("schedule", "clip_grad_norm", "clip_grad_value"):
            if getattr(self, label) is not None:
                args.append(f"{label}={getattr(self, label)!r}")
        if self.track_update_norm:
            args.append("track_update_norm=True")
        return f"Optim({self.cls.__name__}{', ' if args else ''}{', '.join(args)})"


@dataclass(frozen=True)
class UpdateOptions:
    """The extras of an ag.Optim that the worker's Updater applies around each optimizer step."""

    schedule: Optional[Schedule] = None
    clip_grad_norm: Optional[float] = None
    clip_grad_value: Optional[float] = None
    track_update_norm: bool = False


OptimizerSpec = Union[Optim, Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]]


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


def update_options(spec: OptimizerSpec | None) -> UpdateOptions:
    """The extras of an optimizer argument (none for a plain callable)."""
    return spec.options() if isinstance(spec, Optim) else UpdateOptions()


def steps_every_step(spec: Any) -> bool:
    """Whether an optimizer argument has a schedule stepped after every ag.step() (``every="step"``)."""
    schedule = getattr(spec, "schedule", None) if isinstance(spec, Optim) else None
    return isinstance(schedule, Schedule) and getattr(schedule, "every", "update") == "step"


def build_schedule(options: UpdateOptions, optimizer: torch.optim.Optimizer | None, worker: str) -> LRScheduler | None:
    """Build the worker's LR scheduler over its optimizer, if its recipe has one."""
    if options.schedule is None or optimizer is None:
        return None
    return options.schedule.build(optimizer, worker)
