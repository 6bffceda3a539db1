"""What a tiny torch op costs when other Python runs between calls (README "Performance").

A worker of the small bench chain runs one Linear(64, 64) + tanh forward (32 rows) per message, with the
message handling (asyncio, decoding, the worker core) between two forwards. This times the same forward
in a tight loop and with about 200 us of unrelated Python between calls, in CPU time of the thread, so
machine load does not enter: the difference is what cold caches cost each op.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Optional

import torch


def forward_cpu_us(pollute: bool, calls: int = 2000, layers: int = 5) -> float:
    """Median CPU microseconds of one forward (leaf, clone, Linear, tanh), with or without Python between calls."""
    torch.manual_seed(0)
    lins = [torch.nn.Linear(64, 64) for _ in range(layers)]
    x0 = torch.randn(32, 64)
    rng = random.Random(0)
    junk = {str(i): [rng.random() for _ in range(20)] for i in range(300)}
    times = []
    for i in range(calls):
        if pollute:
            json.dumps(junk)
            sorted(junk.items())
        t0 = time.thread_time()
        leaf = x0.detach().requires_grad_(True)
        torch.tanh(lins[i % layers](leaf.clone()))
        times.append(time.thread_time() - t0)
    return 1e6 * statistics.median(times[calls // 10:])


def main(argv: Optional[list[str]] = None) -> int:
    """Print both timings and their ratio."""
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    torch.set_num_threads(1)
    forward_cpu_us(False, 300)
    tight, polluted = forward_cpu_us(False), forward_cpu_us(True)
    print(f"Linear(64,64)+tanh forward, CPU us per call: tight loop {tight:.0f}, "
          f"with other Python between calls {polluted:.0f} ({polluted / tight:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
