"""Every worker's own random generator, swapped into torch's global one around its computations.

Modules draw from torch's default generator (Dropout, torch.randn in a forward), which one
process shares: on backend="local" every worker runs in the caller's process, each on a thread
of its own, and without a swap they would race for it. So each worker keeps its own CPU
generator state, seeded from the runtime's seed and its name, and ``with rng:`` puts it in
place for one forward under a process-wide lock (two local workers never interleave), then
puts the previous state back. Backward passes run outside it: autograd draws nothing there
(Dropout keeps its mask), and the lock would serialize independent passes. Ray workers do the same, so that both backends
draw the same sequence per worker. The caller's own draws are not under the lock: see the
README ("Randomness").
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Optional

import torch

__all__ = ["WorkerRng", "worker_seed"]

# Process-wide: local workers of one process share torch's default generator.
_LOCK = threading.Lock()


def worker_seed(seed: int, name: str) -> int:
    """A worker's seed: stable across processes and runs (unlike hash()), distinct per name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


class WorkerRng:
    """A worker's generator states (CPU, and its CUDA device's if it has one); a re-entrant context."""

    def __init__(self, seed: Optional[int], name: str, device: torch.device) -> None:
        self.enabled = seed is not None
        self.seed = worker_seed(seed, name) if seed is not None else None
        self.device = device
        self._cpu: Optional[torch.Tensor] = None
        self._cuda: Optional[torch.Tensor] = None
        self._outer: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self._depth = 0
        if self.seed is not None:
            g = torch.Generator()
            g.manual_seed(self.seed)
            self._cpu = g.get_state()

    def _cuda_state(self) -> torch.Tensor:
        # Built on first use, inside the worker's process: CUDA is touched only by a CUDA worker.
        if self._cuda is None:
            g = torch.Generator(self.device)
            g.manual_seed(self.seed or 0)
            self._cuda = g.get_state()
        return self._cuda

    def __enter__(self) -> "WorkerRng":
        if not self.enabled:
            return self
        if self._depth:  # a custom backward that runs a forward: already in place
            self._depth += 1
            return self
        _LOCK.acquire()
        try:
            outer_cuda = None
            if self.device.type == "cuda":
                outer_cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(self._cuda_state(), self.device)
            self._outer = (torch.get_rng_state(), outer_cuda)
            assert self._cpu is not None
            torch.set_rng_state(self._cpu)
        except BaseException:
            _LOCK.release()
            raise
        self._depth = 1
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        self._depth -= 1
        if self._depth:
            return
        try:
            assert self._outer is not None
            self._cpu = torch.get_rng_state()
            torch.set_rng_state(self._outer[0])
            if self._outer[1] is not None:
                self._cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(self._outer[1], self.device)
        finally:
            self._outer = None
            _LOCK.release()

    def state(self) -> Optional[torch.Tensor]:
        """The worker's CPU generator state (a copy), or None without a seed."""
        return None if self._cpu is None else self._cpu.clone()

    def load(self, state: Optional[torch.Tensor]) -> None:
        """Restore what ``state()`` returned (a checkpoint): a replayed step draws the same numbers."""
        if state is not None and self.enabled:
            with _LOCK:  # validated by torch itself: a malformed state raises here, not in a forward
                outer = torch.get_rng_state()
                try:
                    torch.set_rng_state(state.to(torch.uint8).cpu())
                finally:
                    torch.set_rng_state(outer)
            self._cpu = state.to(torch.uint8).cpu().clone()
