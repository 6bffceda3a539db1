"""The pass table of one worker: each pass's ledger, the gradients that arrived, and early gradients.

A pass's Plan says which gradient messages each of its calls here waits for (see ledger.py);
a Gradient can arrive before its Plan (a consumer was faster than the caller), and then waits
in ``early`` until the Plan comes.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch

from .. import errors as E
from . import messages as m
from .calls import CallState
from .ledger import Ledger

ErrorFn = Callable[..., E.ActorgradError]


class PassStatus(enum.Enum):
    """Where one pass stands here: still collecting, done (every planned call ran its VJP), or failed."""

    OPEN = "open"
    COMPLETE = "complete"
    FAILED = "failed"


# Module-level names for the message path: attribute access on an Enum class costs ~0.2 us on Python 3.11.
PASS_OPEN, PASS_COMPLETE, PASS_FAILED = PassStatus.OPEN, PassStatus.COMPLETE, PassStatus.FAILED


@dataclass
class Arrived:
    """One gradient message as it arrived, kept until its call's VJP."""

    edge: tuple[int, int]
    from_worker: str
    tensor: Optional[torch.Tensor]
    seed: bool = False


@dataclass
class PassState:
    """One pass at this worker: its ledger, arrived gradients and parameter gradients."""

    id: int
    step: int
    req: int
    ledger: Ledger = field(default_factory=Ledger)
    arrived: dict[tuple[int, int], list[Arrived]] = field(default_factory=dict)
    done_calls: set[int] = field(default_factory=set)
    param_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    status: PassStatus = PASS_OPEN
    created_us: float = 0.0
    owned: set[str] = field(default_factory=set)  # param_grads entries this pass allocated itself
    accumulate: bool = True  # False: a partial backward that leaves this worker's parameters out
    leaf_grads: list[list] = field(default_factory=list)  # [call, leaf position, gradient] for the caller
    since: float = field(default_factory=time.monotonic)

    @property
    def open(self) -> bool:
        """Still collecting gradients (neither complete nor failed)."""
        return self.status is PASS_OPEN

    def all_done(self) -> bool:
        """Every call the pass plans here has run its VJP."""
        return all(c in self.done_calls for c in self.ledger.calls())


class PassTable:
    """Every live pass of one worker, and gradients that came before their pass's Plan."""

    def __init__(self) -> None:
        self.passes: dict[int, PassState] = {}
        self.early: dict[int, list[m.Gradient]] = {}

    def get(self, pass_id: int) -> Optional[PassState]:
        """The live pass ``pass_id``, or None."""
        return self.passes.get(pass_id)

    def add(self, msg: m.Plan, created_us: float) -> PassState:
        """Record a Plan's pass (its expectations are filled in by the caller of this)."""
        ps = self.passes[msg.pass_id] = PassState(msg.pass_id, msg.step, msg.req, created_us=created_us,
                                                  accumulate=msg.accumulate)
        return ps

    def keep_early(self, msg: m.Gradient) -> None:
        """Keep a gradient whose Plan has not come yet."""
        self.early.setdefault(msg.pass_id, []).append(msg)

    def take_early(self, pass_id: int) -> list[m.Gradient]:
        """The gradients that came before ``pass_id``'s Plan, in arrival order."""
        return self.early.pop(pass_id, [])

    def drop(self, pass_ids: Iterable[int]) -> None:
        """Forget these passes and anything that came early for them."""
        for pid in pass_ids:
            self.passes.pop(pid, None)
            self.early.pop(pid, None)

    def forget_early(self, step: int) -> None:
        """Drop gradients that came early for passes of ``step`` (aborted)."""
        for pid in [p for p, gs in self.early.items() if gs and gs[0].step == step]:
            del self.early[pid]

    def open_passes(self) -> Iterator[PassState]:
        """The passes still collecting gradients."""
        for ps in list(self.passes.values()):
            if ps.open:
                yield ps


def sum_arrived(ps: PassState, c: CallState, custom_backward: bool, error: ErrorFn) -> list[Optional[torch.Tensor]]:
    """One gradient per output of ``c``: the sum of what arrived for it in ``ps`` (None: nothing did).

    Checks each message against the output it is for; ``error(cls, text, call, step)`` builds the errors raised.
    """
    grads: list[Optional[torch.Tensor]] = []
    for out, o in enumerate(c.outputs):
        total: Optional[torch.Tensor] = None
        for a in ps.arrived.get((c.id, out), []):
            g = a.tensor
            differentiable = c.saved is not None and c.saved.outputs[out].requires_grad
            if a.seed and not differentiable and not custom_backward:
                raise error(E.ConfigError, f"backward() seeded at output {out}, which does not require "
                            "grad: nothing that produced it is differentiable", c.id, ps.step)
            if g is None and a.seed:
                if o.numel() != 1:
                    raise error(E.ShapeError, f"backward() without a gradient needs a scalar, but output "
                                f"{out} has shape {tuple(o.shape)}; pass gradient=", c.id, ps.step)
                g = torch.ones_like(o)
            if g is None:
                continue
            if not (g.is_floating_point() or g.is_complex()):
                src = "the seed gradient" if a.seed else f"worker '{a.from_worker}' call {a.edge[0]} slot {a.edge[1]}"
                raise error(E.DTypeError, f"gradient for output {out} from {src} has dtype "
                            f"{str(g.dtype).removeprefix('torch.')}; gradients must be floating point",
                            c.id, ps.step)
            if tuple(g.shape) != tuple(o.shape):
                src = "the seed gradient" if a.seed else f"worker '{a.from_worker}' call {a.edge[0]} slot {a.edge[1]}"
                raise error(E.ShapeError, f"gradient for output {out} from {src} has shape "
                            f"{tuple(g.shape)}, but the output has shape {tuple(o.shape)}", c.id, ps.step)
            g = g.to(device=o.device, dtype=o.dtype)
            total = g if total is None else total + g
        grads.append(total)
    return grads
