"""Every exception a user can catch.

Each error names the worker (and the call, where there is one) so that a
failure in a graph of dozens of workers points at its source. Errors cross
process boundaries as plain records (see ``to_info`` / ``from_info``), never
pickled.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = [
    "ActorgradError",
    "ConfigError",
    "ShapeError",
    "WorkerError",
    "ForwardShapeError",
    "DTypeError",
    "ForwardDTypeError",
    "NonFiniteError",
    "WorkerDied",
    "DeadlineExceeded",
    "StepClosedError",
    "DecodeError",
    "CheckpointError",
    "PlacementError",
    "StepAborted",
]


class ActorgradError(Exception):
    """Base class: carries the worker, the call and the step it concerns."""

    def __init__(
        self,
        message: str,
        *,
        worker: str | None = None,
        call: int | None = None,
        step: int | None = None,
        cause: str | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        self.worker = worker
        self.call = call
        self.step = step
        self.cause_text = cause
        self.remote_traceback = remote_traceback
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        # Rendered when shown: the runtime fills in the worker or step after raising sites create it.
        return self._render()

    def _render(self) -> str:
        where = []
        if self.worker is not None:
            where.append(f"worker '{self.worker}'")
        if self.call is not None:
            where.append(f"call {self.call}")
        if self.step is not None:
            where.append(f"step {self.step}")
        prefix = f"[{', '.join(where)}] " if where else ""
        text = prefix + self.message
        if self.cause_text:
            text += f"\n  caused by: {self.cause_text}"
        if self.remote_traceback:
            text += "\n  remote traceback:\n" + _indent(self.remote_traceback)
        return text


class ConfigError(ActorgradError, ValueError):
    """A misuse of the API: a bad option, a missing optimizer, a duplicate name."""


class ShapeError(ActorgradError, ValueError):
    """A tensor of the wrong shape: an input, a seed gradient or a gradient message."""


class WorkerError(ActorgradError, RuntimeError):
    """A module's forward or backward raised; the original error is the cause."""


class ForwardShapeError(ShapeError, WorkerError):
    """A module's forward raised because an input had the wrong shape."""


class DTypeError(ShapeError):
    """A tensor of the wrong dtype: an input the module cannot take, or a non-floating gradient."""


class ForwardDTypeError(DTypeError, WorkerError):
    """A module's forward raised because an input had the wrong dtype."""


class NonFiniteError(WorkerError):
    """NaN or Inf appeared in this worker's output or gradients (``ag.init(check_finite=True)``)."""


class WorkerDied(ActorgradError, RuntimeError):
    """A worker's process died; waits that depend on it fail with this.

    With recovery on (``ag.init(recover=True, ...)``), the runtime has already restarted the worker
    and restored every worker to its last checkpoint when this is raised: ``recovered`` is True,
    ``restored_step`` is the checkpoint's step and ``replay`` lists the steps that were lost and
    must be run again (``ag.train`` does that by itself).
    """

    recovered: bool = False
    restored_step: int | None = None
    replay: Sequence[int] = ()  # immutable default: a list here would be shared by every instance


class DeadlineExceeded(ActorgradError, TimeoutError):
    """A wait passed its deadline; the message lists what is still missing."""


class StepClosedError(ActorgradError, RuntimeError):
    """A node of a step that is already closed was used."""


class PlacementError(ConfigError):
    """Ray cannot place a worker (or a group of workers) as asked; names what was asked for."""


class DecodeError(ActorgradError, ValueError):
    """A message or a checkpoint could not be decoded: malformed, truncated or unsafe."""


class CheckpointError(ActorgradError, RuntimeError):
    """A checkpoint is missing, torn, corrupted, wrongly signed, or does not match the workers."""


class StepAborted(ActorgradError, RuntimeError):
    """Work that belonged to a step that was aborted because of another error."""


_CLASSES: dict[str, type[ActorgradError]] = {
    cls.__name__: cls
    for cls in (
        ActorgradError,
        ConfigError,
        ShapeError,
        WorkerError,
        ForwardShapeError,
        DTypeError,
        ForwardDTypeError,
        NonFiniteError,
        WorkerDied,
        DeadlineExceeded,
        StepClosedError,
        DecodeError,
        CheckpointError,
        PlacementError,
        StepAborted,
    )
}


def to_info(err: ActorgradError) -> dict[str, Any]:
    """Turn an error into a plain record that can travel in a message."""
    return {
        "type": type(err).__name__,
        "message": err.message,
        "worker": err.worker,
        "call": err.call,
        "step": err.step,
        "cause": err.cause_text,
        "traceback": err.remote_traceback,
    }


def from_info(info: dict[str, Any]) -> ActorgradError:
    """Rebuild an error from its record; unknown types become ActorgradError."""
    cls = _CLASSES.get(str(info.get("type")), ActorgradError)
    return cls(
        str(info.get("message", "")),
        worker=info.get("worker"),
        call=info.get("call"),
        step=info.get("step"),
        cause=info.get("cause"),
        remote_traceback=info.get("traceback"),
    )


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())
