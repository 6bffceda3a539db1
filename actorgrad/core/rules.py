"""Update rules: when a worker applies its optimizer, and to which gradients.

The table ``UPDATE_RULES`` maps a rule name to what happens when one pass has
delivered all of this worker's gradients (``on_pass``) and when the step
closes (``on_close``). A user callable takes an ``UpdateContext`` at both
events and returns True to apply the pending gradients now.

[Note: weight stashing]
A call's backward must use the weights its forward used. When a rule may
apply an update while calls are still waiting for their backward ("pass",
callables, or max_staleness > 0), the forward runs through
``functional_call`` on a copy of the parameters taken for the current weight
version (one copy per version, shared by every call of that version, freed
when its last call is freed). The optimizer updates the real parameters in
place; the copies stay as the forwards saw them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError

log = logging.getLogger("actorgrad.rules")

Grads = dict[str, torch.Tensor]


def add_grads(into: Grads, more: Grads, owned: Optional[set[str]] = None) -> None:
    """Sum ``more`` into ``into``, parameter by parameter.

    With ``owned``, sums after the first are made in place into a tensor allocated here (its
    name is recorded in ``owned``); a tensor received from elsewhere is never modified.
    """
    for name, g in more.items():
        if name not in into:
            into[name] = g
        elif owned is not None and name in owned:
            into[name].add_(g)
        else:
            into[name] = into[name] + g
            if owned is not None:
                owned.add(name)


def grad_norm(grads: Grads) -> float:
    """The global L2 norm of a set of gradients (per-tensor norms in their own dtype, then combined)."""
    if not grads:
        return 0.0
    norms = [float(torch.linalg.vector_norm(g.detach())) for g in grads.values()]
    return float(sum(n * n for n in norms) ** 0.5)


class Updater:
    """Applies gradients to a module's parameters with its optimizer."""

    def __init__(self, worker: str, module: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
        self.worker = worker
        self.module = module
        self.optimizer = optimizer
        self.version = 0  # number of updates applied; names a weight version
        self.last_grad_norm: Optional[float] = None  # of the last gradient applied

    def apply(self, grads: Grads, step: int) -> bool:
        """Set ``.grad`` from ``grads`` and step the optimizer; False when there is nothing."""
        if not grads:
            return False
        if self.optimizer is None:
            raise ConfigError(
                "parameters received gradients but the worker has no optimizer; pass "
                "optimizer=ag.Optim(...) to ag.spawn, or set requires_grad=False on them",
                worker=self.worker,
                step=step,
            )
        params = dict(self.module.named_parameters())
        for name, p in params.items():
            g = grads.get(name)
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
        self.last_grad_norm = grad_norm(grads)
        self.optimizer.step()
        for p in params.values():
            p.grad = None
        self.version += 1
        return True


@dataclass
class UpdateContext:
    """What a custom update rule sees: the pending gradients and the means to apply them."""

    worker: str
    step: int
    event: str  # "pass" when a pass delivered all its gradients here, "close" at step close
    pass_id: Optional[int]
    grads: Grads  # accumulated and not yet applied; the rule may edit it in place
    pass_grads: Grads  # this pass's gradients alone (empty at "close")
    module: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    version: int
    _updater: Updater = field(repr=False, default=None)  # type: ignore[assignment]

    def apply(self, grads: Optional[Grads] = None) -> bool:
        """Apply ``grads`` (default: the pending ones) with the optimizer now."""
        applied = self._updater.apply(self.grads if grads is None else grads, self.step)
        if grads is None:
            self.grads.clear()
        return applied


@dataclass
class PendingGrads:
    """Gradients a worker has computed but not applied, per step."""

    by_step: dict[int, Grads] = field(default_factory=dict)

    def for_step(self, step: int) -> Grads:
        """The pending gradients of ``step`` (created empty)."""
        return self.by_step.setdefault(step, {})

    def pop(self, step: int) -> Grads:
        """Remove and return the pending gradients of ``step``."""
        return self.by_step.pop(step, {})


class Rule:
    """Base of the rules: what to do at the end of a pass and at step close."""

    stashes = False  # whether updates may land while calls still wait for backward

    def on_pass(self, updater: Updater, pending: PendingGrads, step: int, pass_id: int, grads: Grads) -> bool:
        raise NotImplementedError

    def on_close(self, updater: Updater, pending: PendingGrads, step: int) -> bool:
        raise NotImplementedError


class StepRule(Rule):
    """Sum every gradient of every call and pass of the step; apply once at close."""

    def on_pass(self, updater, pending, step, pass_id, grads):
        add_grads(pending.for_step(step), grads)
        return False

    def on_close(self, updater, pending, step):
        return updater.apply(pending.pop(step), step)


class PassRule(Rule):
    """Apply as soon as one pass has delivered all of this worker's gradients."""

    stashes = True

    def on_pass(self, updater, pending, step, pass_id, grads):
        return updater.apply(grads, step)

    def on_close(self, updater, pending, step):
        pending.pop(step)
        return False


class CallableRule(Rule):
    """A user function that sees the pending gradients at each event and decides."""

    stashes = True

    def __init__(self, fn: Callable[[UpdateContext], Any]) -> None:
        self.fn = fn

    def _call(self, updater, pending, step, event, pass_id, pass_grads) -> bool:
        grads = pending.for_step(step)
        ctx = UpdateContext(
            worker=updater.worker, step=step, event=event, pass_id=pass_id, grads=grads,
            pass_grads=pass_grads, module=updater.module, optimizer=updater.optimizer,
            version=updater.version, _updater=updater,
        )
        before = updater.version
        if self.fn(ctx):
            ctx.apply()
        return updater.version != before

    def on_pass(self, updater, pending, step, pass_id, grads):
        add_grads(pending.for_step(step), grads)
        return self._call(updater, pending, step, "pass", pass_id, grads)

    def on_close(self, updater, pending, step):
        applied = self._call(updater, pending, step, "close", None, {})
        pending.pop(step)
        return applied


UPDATE_RULES: dict[str, Callable[[], Rule]] = {"step": StepRule, "pass": PassRule}


def make_rule(update: Any) -> Rule:
    """The rule object for an ``update=`` argument of ag.spawn."""
    if isinstance(update, str):
        if update not in UPDATE_RULES:
            raise ConfigError(f"update must be one of {sorted(UPDATE_RULES)} or a callable, got {update!r}")
        return UPDATE_RULES[update]()
    if callable(update):
        return CallableRule(update)
    raise ConfigError(f"update must be one of {sorted(UPDATE_RULES)} or a callable, got {update!r}")
