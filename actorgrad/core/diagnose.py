"""Diagnosis: turn what went wrong in a worker into an error that says what, where and why.

Exceptions raised by the user's module are classified by their message (torch gives no
dtype/shape exception classes); NaN/Inf are traced to where they first appeared; a custom
backward's result is checked; and ``describe_missing`` says what a worker still waits for.
"""

from __future__ import annotations

import re
import traceback
from typing import Any, Callable, Iterable, Optional

import torch

from .. import errors as E
from . import messages as m
from .calls import CallState
from .passes import PassState
from .vjp import Saved, map_leaves

_DTYPE_WORDS = re.compile(
    r"dtype|scalar type|expected .*(Float|Double|Half|Long|Int)|(Float|Double|Half|Long|Int|Bool) and "
    r"(Float|Double|Half|Long|Int|Bool)|not implemented for '(Long|Int|Bool|Byte)'",
)

_SHAPE_WORDS = re.compile(
    r"shape|size mismatch|sizes? of tensor|must match the size|cannot be multiplied|dimension|"
    r"expected input|expected .* channels|input size|out of bounds",
    re.IGNORECASE,
)


class Diagnosis:
    """Builds the errors of one worker (named in each), and explains failures of its module."""

    def __init__(self, worker: str, module: torch.nn.Module) -> None:
        self.worker = worker
        self.module = module

    def error(self, cls: type[E.ActorgradError], text: str, call: Optional[int] = None,
              step: Optional[int] = None, exc: Optional[BaseException] = None) -> E.ActorgradError:
        """An error of class ``cls`` naming this worker, with ``exc`` (if any) as its cause and traceback."""
        cause = f"{type(exc).__name__}: {exc}" if exc is not None else None
        tb = "".join(traceback.format_exception(exc)) if exc is not None else None
        err = cls(text, worker=self.worker, call=call, step=step, cause=cause, remote_traceback=tb)
        if exc is not None:
            err.__cause__ = exc
        return err

    def forward_raised(self, c: CallState, exc: Exception, values: list[torch.Tensor]) -> E.ActorgradError:
        """The error for a forward that raised: a dtype or shape error when the message says so."""
        text = f"forward raised {type(exc).__name__}: {exc}"
        if _looks_like(exc, (RuntimeError, TypeError), _DTYPE_WORDS):
            cls: type[E.ActorgradError] = E.ForwardDTypeError
            text += self._dtype_hint(values, c.msg.args)
        elif _looks_like(exc, (RuntimeError, ValueError, IndexError), _SHAPE_WORDS):
            cls = E.ForwardShapeError
        else:
            cls = E.WorkerError
        return self.error(cls, text, c.id, c.step, exc)

    def _dtype_hint(self, values: list, args: Any) -> str:
        """Say which input's dtype differs from the module's parameters."""
        param = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        if param is None:
            return ""
        tensors = list(values) + [a for a in (args if isinstance(args, (list, tuple)) else [])
                                  if isinstance(a, torch.Tensor)]
        for i, t in enumerate(tensors):
            if isinstance(t, torch.Tensor) and t.dtype != param.dtype:
                return (f" (input {i} has dtype {str(t.dtype).removeprefix('torch.')}, the module's parameters are "
                        f"{str(param.dtype).removeprefix('torch.')}; convert it, e.g. with .to({param.dtype}))")
        return ""

    def nonfinite_forward(self, c: CallState, outputs: list[torch.Tensor],
                          values: list[torch.Tensor]) -> Optional[E.ActorgradError]:
        """NonFiniteError when an output holds NaN/Inf, saying whether it came in or appeared here."""
        bad = first_nonfinite(outputs)
        if bad is None:
            return None
        msg = c.msg
        src = first_nonfinite(values)
        consts: list = []
        map_leaves((msg.args, msg.kwargs), lambda x: consts.append(x) if isinstance(x, torch.Tensor) else x)
        if src is not None:
            where = (f"its input {src} (from worker '{msg.refs[src].worker}' call {msg.refs[src].call}) "
                     "is already not finite")
        elif first_nonfinite(consts) is not None:
            where = "a tensor the caller passed in as a constant is already not finite"
        else:
            where = "its inputs are finite: it appeared here"
        return self.error(E.NonFiniteError, f"forward output {bad} contains NaN or Inf; {where}", msg.call, msg.step)

    def nonfinite_backward(self, ps: PassState, call: int, grad_outputs: list, input_grads: list,
                           param_grads: dict[str, torch.Tensor]) -> Optional[E.ActorgradError]:
        """NonFiniteError when a computed gradient holds NaN/Inf, saying whether it came in or appeared here."""
        bad_in = first_nonfinite(input_grads)
        i = first_nonfinite(param_grads.values())
        bad_p = None if i is None else list(param_grads)[i]
        if bad_in is None and bad_p is None:
            return None
        came = first_nonfinite(grad_outputs)
        what = f"the gradient for input {bad_in}" if bad_in is not None else f"the gradient of {bad_p!r}"
        where = (f"the gradient that arrived for output {came} is already not finite" if came is not None
                 else "the gradients that arrived are finite: it appeared here")
        return self.error(E.NonFiniteError, f"backward: {what} contains NaN or Inf; {where}", call, ps.step)

    def check_custom(self, c: CallState, saved: Saved, result: Any) -> tuple[list, dict[str, torch.Tensor]]:
        """A custom backward's ``(input_grads, param_grads)``, checked; raises what is wrong with it."""
        if not (isinstance(result, tuple) and len(result) == 2):
            raise self.error(E.WorkerError, "a custom backward must return (input_grads, {name: grad})", c.id, c.step)
        input_grads, param_grads = result
        if isinstance(input_grads, torch.Tensor) or input_grads is None:
            input_grads = [input_grads]
        input_grads = list(input_grads)
        if len(input_grads) != len(saved.inputs):
            raise self.error(E.WorkerError, f"custom backward returned {len(input_grads)} input gradients for "
                             f"{len(saved.inputs)} inputs", c.id, c.step)
        for i, (g, x) in enumerate(zip(input_grads, saved.inputs)):
            if g is not None and tuple(g.shape) != tuple(x.shape):
                raise self.error(E.ShapeError, f"custom backward returned a gradient of shape {tuple(g.shape)} "
                                 f"for input {i} of shape {tuple(x.shape)}", c.id, c.step)
        params = dict(self.module.named_parameters())
        clean = {}
        for name, g in dict(param_grads or {}).items():
            if name not in params:
                raise self.error(E.WorkerError, f"custom backward returned a gradient for unknown parameter "
                                 f"{name!r}", c.id, c.step)
            if g is None:
                continue
            if tuple(g.shape) != tuple(params[name].shape):
                raise self.error(E.ShapeError, f"custom backward returned a gradient of shape {tuple(g.shape)} "
                                 f"for parameter {name!r} of shape {tuple(params[name].shape)}", c.id, c.step)
            clean[name] = g.detach()
        return input_grads, clean


def describe_missing(waiting: Iterable[CallState], passes: Iterable[PassState],
                     may_run: Callable[[int], bool]) -> list[str]:
    """Human-readable lines: the inputs queued calls wait for, and the gradients open passes wait for."""
    lines = []
    for c in waiting:
        missing = [i for i in range(len(c.msg.refs)) if i not in c.values]
        if missing:
            srcs = ", ".join(f"slot {i} from '{c.msg.refs[i].worker}' call {c.msg.refs[i].call}" for i in missing)
            lines.append(f"call {c.id} (step {c.step}): forward waits for input {srcs}")
        elif not may_run(c.step):
            lines.append(f"call {c.id} (step {c.step}): forward waits for the update of an earlier step")
    for ps in passes:
        for call, out, edge in ps.ledger.missing():
            src = "the seed" if edge[0] == m.SEED else f"call {edge[0]} slot {edge[1]}"
            lines.append(f"call {call} (pass {ps.id}): gradient for output {out} from {src}")
    return lines


def fmt_edges(missing: list[tuple[int, int, tuple[int, int]]]) -> str:
    """The edges a plan still expects, as words."""
    if not missing:
        return "nothing more"
    return ", ".join(f"output {o} from call {e[0]} slot {e[1]}" for _, o, e in missing)


def first_nonfinite(tensors: Any) -> Optional[int]:
    """Index of the first floating tensor holding NaN or Inf, or None."""
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return i
    return None


def _looks_like(exc: BaseException, classes: tuple[type[BaseException], ...], words: re.Pattern) -> bool:
    return isinstance(exc, classes) and bool(words.search(str(exc)))
