"""Update rules: when a worker applies its optimizer, and to which gradients.

A rule says what happens when one pass has delivered all of this worker's
gradients (``on_pass``) and when the step commits (``on_close``); both hooks
get an ``UpdateContext``. A rule class declares what the worker must do for
it (``accumulates``, ``stashes_weights``, ``needs_optimizer``,
``decides_at_commit``); the worker does the bookkeeping (pending gradients,
freeing them at commit). ``register_rule`` adds a named rule to the table
``update=`` looks names up in. A user callable takes an ``UpdateContext`` at
both events and returns True to apply the pending gradients now.

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
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..errors import CheckpointError, ConfigError
from .codec import check_value_tree
from .optim import UpdateOptions

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
    """The global L2 norm of a set of gradients, as ``clip_grad_norm_`` takes it (fused: one device sync)."""
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm([g.detach() for g in grads.values()]))


class Weights(dict):
    """Copies of a module's parameters, tagged with the weight version they copy (for staleness)."""

    def __init__(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        super().__init__(tensors)
        self.version = version


@dataclass
class StepMetrics:
    """What the updates applied in one step did (see WorkerReport)."""

    updates: int = 0
    grad_norm: Optional[float] = None  # of the last update's gradient, before clipping
    clipped: bool = False  # clipping changed some update's gradient
    staleness: Optional[int] = None  # the most any update's gradient lagged its weights (in updates)
    lr: Optional[list[float]] = None  # the learning rates the last update used, per param group
    # The parameter change summed over the step's updates, negated (track_update_norm only).
    delta: Optional[list[torch.Tensor]] = None


# Oldest weight version that the forwards behind some passes' gradients used: (step, pass ids
# or None for every pass of the step) -> version, or None when no call is known.
WeightsVersion = Callable[[int, Optional[list[int]]], Optional[int]]


class Updater:
    """Applies gradients to a module's parameters with its optimizer, and records what each update did.

    Around every optimizer step it clips the gradient (``clip_grad_norm`` / ``clip_grad_value``
    of the worker's ag.Optim, over this worker's parameters, as torch.nn.utils does on a module)
    and afterwards steps the LR scheduler once. Per step it keeps the metrics of its updates for
    the step's report: how many, the gradient norm before clipping, whether clipping changed it,
    staleness (see ``report``), the learning rates used, and with ``track_update_norm`` the norm
    of the parameter change.
    """

    def __init__(self, worker: str, module: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 options: Optional[UpdateOptions] = None, scheduler: Optional[LRScheduler] = None,
                 weights_version: Optional[WeightsVersion] = None) -> None:
        self.worker = worker
        self.module = module
        self.optimizer = optimizer
        self.options = options or UpdateOptions()
        self.scheduler = scheduler
        self.weights_version = weights_version
        self.version = 0  # number of updates applied; names a weight version
        # The last _preview_clip, keyed by the gradient tensors and their in-place versions: a step's
        # report previews the update that applying the same gradients then makes (one norm, not two).
        self._preview: Optional[tuple[tuple, tuple[float, bool]]] = None
        self.reset()

    def reset(self) -> None:
        """Forget every step's metrics (recovery: step ids are used again after the rewind)."""
        self.records: dict[int, StepMetrics] = {}
        self.last_closed: Optional[int] = None
        self._preview = None

    def forget(self, grads: Grads) -> None:
        """A step's ``grads`` were popped (applied or dropped): let go of the preview memo if it holds them."""
        memo = self._preview
        if memo is not None and grads:
            dropped = {id(g) for g in grads.values()}
            if any(id(entry[1]) in dropped for entry in memo[0]):  # ids of live tensors: no reuse yet
                self._preview = None

    def scheduler_state(self) -> Optional[dict[str, Any]]:
        """The LR scheduler's state_dict, checked to be plain values that a checkpoint can hold."""
        if self.scheduler is None:
            return None
        state = self.scheduler.state_dict()
        try:
            check_value_tree(state)
        except TypeError as exc:
            raise CheckpointError(f"the state of the LR scheduler {type(self.scheduler).__name__} cannot be saved: "
                                  f"{exc}", worker=self.worker) from None
        return state

    def lrs(self) -> Optional[list[float]]:
        """The optimizer's learning rate per param group now (None without an optimizer)."""
        if self.optimizer is None:
            return None
        return [float(g["lr"]) for g in self.optimizer.param_groups if "lr" in g]

    def _staleness(self, step: int, passes: Optional[list[int]]) -> Optional[int]:
        oldest = self.weights_version(step, passes) if self.weights_version is not None else None
        return None if oldest is None else max(0, self.version - oldest)

    def apply(self, grads: Grads, step: int, passes: Optional[list[int]] = None) -> bool:
        """Set ``.grad`` from ``grads``, clip, step the optimizer and the schedule; False when there is nothing.

        ``passes``: the passes whose gradients ``grads`` holds (None: every pass of the step).
        """
        if not grads:
            return False
        if self.optimizer is None:
            raise ConfigError(
                "parameters received gradients but the worker has no optimizer; pass "
                "optimizer=ag.Optim(...) to ag.spawn, or set requires_grad=False on them",
                worker=self.worker,
                step=step,
            )
        opts = self.options
        clip = opts.clip_grad_norm is not None or opts.clip_grad_value is not None
        params = dict(self.module.named_parameters())
        try:
            for name, p in params.items():
                g = grads.get(name)
                # Clipping scales .grad in place: a copy leaves tensors held elsewhere unchanged.
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype, copy=clip)
            with_grad = [p for p in params.values() if p.grad is not None]
            if opts.clip_grad_norm is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(with_grad, opts.clip_grad_norm))
                clipped = norm > opts.clip_grad_norm
            else:
                norm, clipped = self._preview_clip(grads)
                if opts.clip_grad_value is not None:
                    torch.nn.utils.clip_grad_value_(with_grad, opts.clip_grad_value)
            staleness = self._staleness(step, passes)
            lr = self.lrs()
            before = [p.detach().clone() for p in params.values()] if opts.track_update_norm else None
            self.optimizer.step()
        finally:
            for p in params.values():
                p.grad = None
            self._preview = None  # applied: let the gradients go
        self.version += 1  # the weights changed, even if the schedule below raises
        rec = self.records.setdefault(step, StepMetrics())
        rec.updates += 1
        rec.grad_norm = norm
        rec.clipped = rec.clipped or clipped
        rec.lr = lr
        if staleness is not None:
            rec.staleness = staleness if rec.staleness is None else max(rec.staleness, staleness)
        if before is not None:
            with torch.no_grad():
                for b, p in zip(before, params.values()):
                    b.sub_(p.detach())
                if rec.delta is None:
                    rec.delta = before
                else:
                    for d, b in zip(rec.delta, before):
                        d.add_(b)
        if self.scheduler is not None and self.schedule_every == "update":
            self.scheduler.step()
        return True

    @property
    def schedule_every(self) -> str:
        """When the LR scheduler steps: "update" (after each optimizer step) or "step" (after each commit)."""
        schedule = self.options.schedule
        return getattr(schedule, "every", "update") if schedule is not None else "update"

    def step_committed(self) -> None:
        """A step committed here: a schedule with ``every="step"`` steps now, updated or not (as a plain
        PyTorch loop steps every scheduler every iteration)."""
        if self.scheduler is not None and self.schedule_every == "step":
            self.scheduler.step()

    def report(self, step: int, pending: Optional[Grads] = None, passes: Optional[list[int]] = None,
               take: bool = False) -> dict[str, Any]:
        """The metrics of ``step``'s updates, as plain values for the step's report.

        With ``pending``, it also counts the update that applying ``pending`` (the gradients of
        ``passes``) will make when the step commits: its gradient norm, clipping, staleness and
        learning rate are known now; its update norm only once it is applied. With ``take``, the
        step's record is freed.

        Staleness: for each update, the number of updates this worker had applied between the
        weights that the forwards behind its gradient used and the weights it is applied to; the
        step's is the largest.
        """
        rec = self.records.pop(step, None) if take else self.records.get(step)
        out: dict[str, Any] = {"updates": 0, "grad_norm": None, "clipped": False, "staleness": None,
                               "lr": self.lrs(), "update_norm": None}
        if rec is not None:
            out.update(updates=rec.updates, grad_norm=rec.grad_norm, clipped=rec.clipped, staleness=rec.staleness,
                       lr=rec.lr if rec.lr is not None else out["lr"])
            if rec.delta is not None:
                out["update_norm"] = grad_norm(dict(enumerate(rec.delta)))
        if pending:
            out["updates"] += 1
            norm, clipped = self._preview_clip(pending)
            out["grad_norm"] = norm
            out["clipped"] = out["clipped"] or clipped
            staleness = self._staleness(step, passes)
            if staleness is not None:
                out["staleness"] = staleness if out["staleness"] is None else max(out["staleness"], staleness)
            out["lr"] = self.lrs()
            out["update_norm"] = None
        return out

    def _preview_clip(self, grads: Grads) -> tuple[float, bool]:
        """The gradient norm (before clipping) and whether clipping will change ``grads``."""
        # The tensors themselves, not their ids (a freed tensor's id is used again); compared by identity.
        key = tuple((name, g, g._version) for name, g in grads.items())
        memo = self._preview
        if memo is not None and len(memo[0]) == len(key) and all(
                a[0] == b[0] and a[1] is b[1] and a[2] == b[2] for a, b in zip(memo[0], key)):
            return memo[1]
        result = self._measure_clip(grads)
        self._preview = (key, result)
        return result

    def _measure_clip(self, grads: Grads) -> tuple[float, bool]:
        opts = self.options
        if opts.clip_grad_norm is not None:
            norm = float(torch.nn.utils.get_total_norm(list(grads.values())))
            return norm, norm > opts.clip_grad_norm
        # One device sync for the check: the largest |g| of all gradients against the limit.
        clipped = opts.clip_grad_value is not None and bool(
            torch.nn.utils.get_total_norm(list(grads.values()), norm_type=math.inf) > opts.clip_grad_value)
        return grad_norm(grads), clipped

    def closed(self, step: int) -> None:
        """``step`` committed here: drop records nobody will ask for (the caller asks right after a
        commit for the record of that step when it tracks update norms)."""
        self.last_closed = step
        keep = step if self.options.track_update_norm else step + 1
        for k in [k for k in self.records if k < keep]:
            del self.records[k]

    def take_closed(self) -> tuple[Optional[int], bool, int, dict[str, Any]]:
        """The report of the step committed last (its actual updates), freeing its record:
        (step or None, whether it applied an update, the version now, the metrics)."""
        if self.last_closed is None:
            return None, False, self.version, {}
        out = self.report(self.last_closed, take=True)
        return self.last_closed, out["updates"] > 0, self.version, out


@dataclass
class UpdateContext:
    """What a custom update rule sees: the pending gradients and the means to apply them.

    ``apply`` clips and steps the schedule as the worker's ag.Optim says, like every update.
    """

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
    _passes: list[int] = field(repr=False, default_factory=list)  # the passes whose gradients ``grads`` holds
    scheduler: Optional[LRScheduler] = None

    def apply(self, grads: Optional[Grads] = None) -> bool:
        """Apply ``grads`` (default: the pending ones) with the optimizer now."""
        applied = self._updater.apply(self.grads if grads is None else grads, self.step, list(self._passes))
        if grads is None:
            self.grads.clear()
            self._passes.clear()
        return applied

    def apply_pass(self) -> bool:
        """Apply this pass's gradients alone (``pass_grads``) now, leaving the pending ones as they are."""
        assert self.pass_id is not None, "apply_pass() needs a pass event"
        return self._updater.apply(self.pass_grads, self.step, [self.pass_id])


@dataclass
class PendingGrads:
    """Gradients a worker has computed but not applied, per step, and the passes they came from.

    ``on_pop`` is told the gradients ``pop`` removes (the Updater's ``forget``: a step ended,
    committed or aborted, must not leave its gradients held by the preview memo).
    """

    by_step: dict[int, Grads] = field(default_factory=dict)
    passes: dict[int, list[int]] = field(default_factory=dict)
    on_pop: Optional[Callable[[Grads], None]] = field(default=None, repr=False)

    def for_step(self, step: int) -> Grads:
        """The pending gradients of ``step`` (created empty)."""
        return self.by_step.setdefault(step, {})

    def add(self, step: int, pass_id: int, grads: Grads) -> None:
        """Sum one pass's gradients into those pending for ``step``."""
        add_grads(self.for_step(step), grads)
        if grads:
            self.passes.setdefault(step, []).append(pass_id)

    def passes_of(self, step: int) -> list[int]:
        """The passes whose gradients are pending for ``step`` (created empty)."""
        return self.passes.setdefault(step, [])

    def pop(self, step: int) -> Grads:
        """Remove and return the pending gradients of ``step``."""
        self.passes.pop(step, None)
        grads = self.by_step.pop(step, {})
        if grads and self.on_pop is not None:
            self.on_pop(grads)
        return grads


class Rule:
    """Base of the update rules: what to do when a pass completes here and when its step commits.

    The class attributes declare what the worker does for the rule, so that it never has to
    recognise a rule by its class.
    """

    accumulates = True  # each completed pass's gradients are summed into the step's pending ones
    stashes_weights = False  # updates may land while calls still wait for their backward
    needs_optimizer = True  # parameter gradients without an optimizer are an error at backward
    decides_at_commit = False  # whether it applies at commit is known only then (reports are not final)

    def on_pass(self, ctx: UpdateContext) -> bool:
        """A pass delivered all of this worker's gradients; return whether an update was applied."""
        return False

    def on_close(self, ctx: UpdateContext) -> bool:
        """The step commits; return whether an update was applied. Pending gradients are freed after."""
        return False


class StepRule(Rule):
    """Sum every gradient of every call and pass of the step; apply once at commit."""

    def on_close(self, ctx: UpdateContext) -> bool:
        return ctx.apply()


class PassRule(Rule):
    """Apply as soon as one pass has delivered all of this worker's gradients."""

    accumulates = False
    stashes_weights = True

    def on_pass(self, ctx: UpdateContext) -> bool:
        return ctx.apply_pass()


class CallableRule(Rule):
    """A user function that sees the pending gradients at each event and decides."""

    stashes_weights = True
    needs_optimizer = False  # the function may use the gradients without the optimizer
    decides_at_commit = True

    def __init__(self, fn: Callable[[UpdateContext], Any]) -> None:
        self.fn = fn

    def _call(self, ctx: UpdateContext) -> bool:
        before = ctx.version
        if self.fn(ctx):
            ctx.apply()
        return ctx._updater.version != before

    on_pass = _call
    on_close = _call


RuleFactory = Callable[[], Rule]
UPDATE_RULES: dict[str, RuleFactory] = {"step": StepRule, "pass": PassRule}


def register_rule(name: str, factory: RuleFactory) -> None:
    """Make ``update=name`` in ag.spawn build each worker's rule with ``factory()`` (a Rule subclass or a
    function returning a Rule)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a rule name must be a non-empty string, got {name!r}")
    if name in UPDATE_RULES:
        raise ConfigError(f"an update rule named {name!r} is already registered")
    if not callable(factory):
        raise ConfigError(f"register_rule needs a factory that returns a Rule, got {factory!r}")
    UPDATE_RULES[name] = factory


def make_rule(update: Any) -> Rule:
    """The rule object for an ``update=`` argument of ag.spawn (a registered name, a callable or a Rule)."""
    if isinstance(update, Rule):
        return update
    if isinstance(update, str):
        if update not in UPDATE_RULES:
            raise ConfigError(f"unknown update rule {update!r}; known rules: {sorted(UPDATE_RULES)} "
                              "(or pass a callable, or add one with ag.register_rule)")
        rule = UPDATE_RULES[update]()
        if not isinstance(rule, Rule):
            raise ConfigError(f"the factory of update rule {update!r} returned {type(rule).__name__}, not a Rule")
        return rule
    if callable(update):
        return CallableRule(update)
    raise ConfigError(f"update must be one of {sorted(UPDATE_RULES)} or a callable, got {update!r}")
