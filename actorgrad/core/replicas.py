"""The gradient exchange of a replicated worker's replicas: every one applies the same update.

A worker spawned with ``replicas=n`` runs as n workers (its name for rank 0, ``name[i]`` for the
others), each with a copy of the module and optimizer state. The caller spreads a step's calls over
them; each call's backward runs where its forward ran. When a step is done at a replica (all of its
calls and passes here, nothing failed), the replica sends its gradient sum for the step to every
other replica (one ``Shard`` each) and waits for theirs; the sum of all shards, taken in replica
order, replaces its pending gradients. Every replica adds the same tensors in the same order, so
all hold bit-identical sums, answer Close with the same report and apply the same optimizer step:
their parameters never drift apart.

The exchange uses the workers' own authenticated messages (one hop, all-to-all) rather than a
separate collective library: it needs no process group to set up, rebuild after a recovery or
tear down, is bounded by the same deadlines as every other message, and refuses what a process
outside the runtime sends. Its cost is n-1 messages of the gradient's size per replica per step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import messages as m

Grads = dict[str, torch.Tensor]


class ReplicaSync:
    """One replica's side of the exchange: its peers, the shards received, the steps it has sent."""

    def __init__(self, name: str, members: tuple[str, ...]) -> None:
        self.name = name
        self.members = tuple(members)
        self.shards: dict[int, dict[str, Grads]] = {}  # step -> peer -> its gradient sum
        self.sent: set[int] = set()

    @property
    def active(self) -> bool:
        """Whether this worker has peers to agree with."""
        return len(self.members) > 1

    def accept(self, msg: m.Shard, ended: Callable[[int], bool]) -> Optional[str]:
        """Keep a peer's shard; return why it is refused, or None."""
        if msg.from_worker not in self.members or msg.from_worker == self.name:
            return f"a shard from '{msg.from_worker}', which is not another replica of this worker"
        if ended(msg.step):
            return None  # a late shard of a step that ended here (aborted): nothing to do
        got = self.shards.setdefault(msg.step, {})
        if msg.from_worker in got:
            return f"a second shard of step {msg.step} from '{msg.from_worker}'"
        got[msg.from_worker] = msg.grads
        return None

    def outgoing(self, step: int, grads: Grads) -> list[tuple[str, m.Shard]]:
        """This replica's shard for ``step``, to every peer (once)."""
        if step in self.sent:
            return []
        self.sent.add(step)
        shard = m.Shard(step, self.name, {k: v.detach() for k, v in grads.items()})
        return [(peer, shard) for peer in self.members if peer != self.name]

    def total(self, step: int, own: Grads) -> Optional[Grads]:
        """The sum over every replica in replica order, once all shards of ``step`` are here (else None)."""
        got = self.shards.get(step, {})
        if len(got) < len(self.members) - 1:
            return None
        parts = [own if peer == self.name else got[peer] for peer in self.members]
        total: Grads = {}
        for name in sorted({k for p in parts for k in p}):
            acc: Optional[torch.Tensor] = None
            for p in parts:
                g = p.get(name)
                if g is not None:
                    acc = g.detach().clone() if acc is None else acc + g.to(acc.device)
            assert acc is not None
            total[name] = acc
        return total

    def missing(self, step: int) -> list[str]:
        """The peers whose shard of ``step`` has not arrived."""
        got = self.shards.get(step, {})
        return [p for p in self.members if p != self.name and p not in got]

    def forget(self, step: int) -> None:
        """Drop what is kept for a step that ended here."""
        self.shards.pop(step, None)
        self.sent.discard(step)

    def reset(self) -> None:
        """Forget every step (recovery)."""
        self.shards.clear()
        self.sent.clear()
