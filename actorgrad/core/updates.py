"""Update bookkeeping of one worker: its rule, the gradients pending per step, and what a commit applies.

The rule decides when to apply (rules.py); this part does what every rule needs around it: it
sums a completed pass's gradients into the step's pending ones when the rule accumulates,
frees them when the step commits, reports what the commit will apply, and keeps the error
of a failed commit for the next step to raise.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from .. import errors as E
from .optim import OptimizerSpec, build_optimizer, build_schedule, update_options
from .rules import Grads, PendingGrads, Rule, UpdateContext, Updater, WeightsVersion, make_rule


class Updates:
    """The rule, optimizer, updater and pending gradients of one worker."""

    def __init__(self, worker: str, module: torch.nn.Module, optimizer: Optional[OptimizerSpec],
                 update: Union[str, Callable[..., Any], Rule], weights_version: WeightsVersion) -> None:
        self.worker = worker
        self.optimizer = build_optimizer(optimizer, module, worker)
        self.rule: Rule = make_rule(update)
        options = update_options(optimizer)
        self.updater = Updater(worker, module, self.optimizer, options,
                               build_schedule(options, self.optimizer, worker), weights_version)
        # A hook the rule leaves as the base's no-op is skipped, context and all (it runs for every pass).
        self._on_pass = type(self.rule).on_pass is not Rule.on_pass
        self._on_close = type(self.rule).on_close is not Rule.on_close
        self.reset()

    def reset(self) -> None:
        """Forget every step's pending gradients and metrics (recovery)."""
        # An aborted step's gradients are freed by popping them (the worker's _drop_step): the updater
        # lets go of them too (its preview memo of the step's Close report holds them).
        self.pending = PendingGrads(on_pop=self.updater.forget)
        self.commit_error: Optional[E.ActorgradError] = None
        self.updater.reset()

    @property
    def version(self) -> int:
        """The number of updates applied: names the live weights."""
        return self.updater.version

    def lacks_optimizer(self, param_grads: Grads) -> bool:
        """Whether these parameter gradients have nowhere to go (no optimizer, and the rule needs one)."""
        return bool(param_grads) and self.optimizer is None and self.rule.needs_optimizer

    def _context(self, step: int, event: str, pass_id: Optional[int], pass_grads: Grads) -> UpdateContext:
        u = self.updater
        if self.rule.accumulates:
            grads, passes = self.pending.for_step(step), self.pending.passes_of(step)
        else:  # nothing is ever pending: leave no empty entries behind
            grads, passes = {}, []
        return UpdateContext(
            worker=self.worker, step=step, event=event, pass_id=pass_id, grads=grads, pass_grads=pass_grads,
            module=u.module, optimizer=u.optimizer, version=u.version, _updater=u, _passes=passes,
            scheduler=u.scheduler,
        )

    def pass_done(self, step: int, pass_id: int, grads: Grads) -> bool:
        """A pass delivered all of its gradients here; return whether an update was applied."""
        if self.rule.accumulates:
            self.pending.add(step, pass_id, grads)
        return self._on_pass and self.rule.on_pass(self._context(step, "pass", pass_id, grads))

    def ready_report(self, step: int) -> tuple[bool, int, bool, dict[str, Any]]:
        """What the commit of ``step`` will apply, for the answer to its Close: (an update is pending,
        the version after the commit, whether these metrics are final, the metrics)."""
        pending = self.pending.by_step.get(step) or {}
        # An update that lands at Commit is reported as it will be; only its norm needs it applied:
        # with track_update_norm the caller then asks for GetState("update") (not final).
        final = not (self.updater.options.track_update_norm and (pending or self.rule.decides_at_commit))
        metrics = self.updater.report(step, pending, self.pending.passes.get(step), take=final)
        return bool(pending), self.updater.version + (1 if pending else 0), final, metrics

    def commit(self, step: int) -> bool:
        """Let the rule apply what it holds for ``step``; free the step's pending gradients either way."""
        try:
            applied = self._on_close and self.rule.on_close(self._context(step, "close", None, {}))
        finally:
            self.pending.pop(step)
            self.updater.closed(step)
        self.updater.step_committed()
        return applied

    def take_commit_error(self) -> Optional[E.ActorgradError]:
        """The error of the last failed commit (once), to fail the next step with."""
        err, self.commit_error = self.commit_error, None
        return err

    def state(self) -> dict[str, Any]:
        """Optimizer state, version and (when there is one) the LR scheduler's state, for a checkpoint."""
        data: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "version": self.updater.version,
        }
        if self.updater.scheduler is not None:
            data["scheduler"] = self.updater.scheduler_state()
        return data

    def load(self, state: dict[str, Any]) -> None:
        """Restore what ``state()`` returned."""
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(_fix_optimizer_state(state["optimizer"]))
        if self.updater.scheduler is not None and state.get("scheduler") is not None:
            self.updater.scheduler.load_state_dict(state["scheduler"])
        self.updater.version = int(state.get("version", self.updater.version))


def _fix_optimizer_state(sd: dict) -> dict:
    """msgpack turns tuples (Adam's betas) into lists; optimizers accept both, except where they index."""
    groups = []
    for g in sd.get("param_groups", []):
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": {int(k): v for k, v in sd.get("state", {}).items()}, "param_groups": groups}
