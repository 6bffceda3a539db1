"""Weight versions of one worker: stashed copies for backward, and snapshots for stale forwards.

Two ways a forward may run on weights other than the live parameters (see [Note: weight
stashing] in rules.py):

- stashing: when updates may land while calls wait for their backward, a forward that saves
  for backward runs on a copy of the current version (one copy per version, shared by its
  calls, freed with its last call);
- snapshots (``max_staleness = k > 0``): the weights after each recent step's commit (key 0: the
  initial ones); a forward of step s uses those after step s-1-k.

The Updater's ``version`` (the number of updates applied) names the live weights.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .calls import CallState
from .rules import Updater, Weights


class WeightVersions:
    """The stash and the snapshots of one worker, with the reference counts that free them."""

    def __init__(self, module: torch.nn.Module, updater: Updater, max_staleness: int, stashes: bool) -> None:
        self.module = module
        self.updater = updater
        self.max_staleness = max_staleness
        self.stashes = stashes or max_staleness > 0
        self.reset()

    def reset(self) -> None:
        """Forget every copy (recovery); with max_staleness, the current weights become snapshot 0."""
        self.stash: dict[int, dict[str, torch.Tensor]] = {}
        self.stash_refs: dict[int, int] = {}
        self.snapshots: dict[int, Weights] = {}
        self.snapshot_refs: dict[int, int] = {}
        if self.max_staleness > 0:
            self.snapshots[0] = self._clone()

    def _clone(self) -> Weights:
        return Weights({n: p.detach().clone().requires_grad_(p.requires_grad)
                        for n, p in self.module.named_parameters()}, self.updater.version)

    def for_forward(self, c: CallState) -> Optional[dict[str, torch.Tensor]]:
        """The parameters ``c``'s forward runs on (None: the live ones); records them on ``c``."""
        if self.max_staleness > 0:
            c.snapshot = self._snapshot_for(c.step)
            return self.snapshots[c.snapshot]
        if c.msg.save and self.stashes:
            c.version = self.updater.version
            return self._stash()
        return None

    def _stash(self) -> dict[str, torch.Tensor]:
        v = self.updater.version
        if v not in self.stash:
            self.stash[v] = {
                n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in self.module.named_parameters()
            }
        self.stash_refs[v] = self.stash_refs.get(v, 0) + 1
        return self.stash[v]

    def _snapshot_for(self, step: int) -> int:
        """The snapshot a forward of ``step`` uses: the latest one taken at or before step - 1 - k."""
        target = step - 1 - self.max_staleness
        key = max((k for k in self.snapshots if k <= target), default=min(self.snapshots))
        self.snapshot_refs[key] = self.snapshot_refs.get(key, 0) + 1
        return key

    def forward_version(self, c: CallState) -> int:
        """The version a forward reports to the caller: the live one, or -(snapshot key) - 1."""
        return self.updater.version if c.snapshot is None else -c.snapshot - 1

    def version_of(self, c: CallState) -> int:
        """The weight version ``c``'s forward used (for staleness)."""
        if c.version is not None:
            return c.version
        if c.snapshot is not None and c.snapshot in self.snapshots:
            return self.snapshots[c.snapshot].version
        # Live weights: only update="step" with max_staleness=0 runs forwards on them, and
        # its forwards wait for the previous update, so none lands in between.
        return self.updater.version

    def release(self, c: CallState) -> None:
        """``c`` no longer needs its weights: drop a copy nobody else uses."""
        version = c.version
        if version is not None and version in self.stash_refs:
            self.stash_refs[version] -= 1
            if self.stash_refs[version] <= 0:
                del self.stash_refs[version]
                self.stash.pop(version, None)
        c.version = None
        if c.snapshot is not None:
            key, c.snapshot = c.snapshot, None
            self.snapshot_refs[key] = self.snapshot_refs.get(key, 1) - 1
            newest = max(self.snapshots, default=None)
            floor = max((k for k in self.snapshots if newest is not None and k <= newest - self.max_staleness),
                        default=None)
            if self.snapshot_refs[key] <= 0 and floor is not None and key < floor:
                self.snapshots.pop(key, None)
                self.snapshot_refs.pop(key, None)

    def committed(self, step: int) -> None:
        """After ``step`` committed: with max_staleness, keep its weights and drop those no forward can need."""
        if self.max_staleness <= 0:
            return
        self.snapshots[step] = self._clone()
        # Any later forward has step >= step + 1 and so uses a key <= step - k: the newest such key
        # and everything after it stay; older ones go once no live call uses them.
        floor = max((k for k in self.snapshots if k <= step - self.max_staleness), default=None)
        for key in [k for k in self.snapshots if floor is not None and k < floor]:
            if self.snapshot_refs.get(key, 0) <= 0:
                del self.snapshots[key]
                self.snapshot_refs.pop(key, None)

    def state(self) -> dict[str, Any]:
        """The snapshots for a checkpoint: stale forwards after a restore must use the same old weights."""
        if self.max_staleness <= 0:
            return {}
        return {"snapshots": [[k, {n: t.detach().cpu() for n, t in v.items()}] for k, v in sorted(self.snapshots.items())],
                "snapshot_versions": [[k, v.version] for k, v in sorted(self.snapshots.items())]}

    def loaded(self, state: Any, device: torch.device) -> None:
        """New weights were loaded (``state``: what was loaded, maybe with snapshots); replace the snapshots."""
        if self.max_staleness <= 0:
            return
        saved = state.get("snapshots") if isinstance(state, dict) else None
        if saved:
            # Versions go on from the saved ones plus the version bump of the load, so staleness stays exact.
            versions = {int(k): int(v) + 1 for k, v in state.get("snapshot_versions") or ()}
            self.snapshots = {
                int(k): Weights({n: t.to(device).requires_grad_(self.module.get_parameter(n).requires_grad)
                                 for n, t in v.items()}, versions.get(int(k), self.updater.version))
                for k, v in saved}
        else:
            self.snapshots = {max(self.snapshots, default=0): self._clone()}
        self.snapshot_refs = {}

    def stats(self) -> dict[str, int]:
        """Counts of the copies held."""
        return {"stashed_versions": len(self.stash), "snapshots": len(self.snapshots)}
