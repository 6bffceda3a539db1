"""Record and draw two timelines: overlapping passes, and a pipelined run.

    python examples/timelines.py --out docs

writes ``overlap.json/.png`` (a shared trunk, two branches whose backward
passes run at the same time) and ``pipeline.json/.png`` (a 4-stage chain with
max_staleness=1 and 4 micro-batches per step, steps closed with
``ag.step(wait=False)``). Open the JSON files in ui.perfetto.dev.
"""

from __future__ import annotations

import argparse
import os

import torch

import actorgrad as ag
from actorgrad.trace import render_png


class TanhLinear(torch.nn.Linear):
    """Linear then tanh."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


class HeavyBranch(torch.nn.Linear):
    """A branch with enough work that its backward shows on the timeline."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        for _ in range(6):
            y = torch.tanh(y @ self.weight.t()) + y
        return y


def overlap(out: str, backend: str) -> None:
    """Two losses on two branches of one trunk: their backward passes overlap."""
    ag.init(backend=backend)
    sgd = ag.Optim(torch.optim.SGD, lr=0.01)
    trunk = ag.spawn(TanhLinear(512, 512), name="trunk", optimizer=sgd)
    a = ag.spawn(HeavyBranch(512, 512), name="branch_a", optimizer=sgd)
    b = ag.spawn(HeavyBranch(512, 512), name="branch_b", optimizer=sgd)
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    x, y = torch.randn(256, 512), torch.randn(256, 512)
    for _ in range(2):  # warm up
        h = trunk(x)
        mse(a(h), y).backward()
        mse(b(h), y).backward()
        ag.step()
    path = os.path.join(out, "overlap.json")
    with ag.trace(path):
        for _ in range(2):
            h = trunk(x)
            mse(a(h), y).backward()
            mse(b(h), y).backward()
            ag.step()
    ag.shutdown()
    render_png(path, os.path.join(out, "overlap.png"), title="two passes, one trunk: branch backwards overlap")


def pipeline(out: str, backend: str) -> None:
    """A 4-stage chain, 4 micro-batches per step, max_staleness=1."""
    ag.init(backend=backend)
    stages = [ag.spawn(TanhLinear(1024, 1024), name=f"stage{i}", optimizer=ag.Optim(torch.optim.SGD, lr=0.01),
                       max_staleness=1) for i in range(4)]
    mse = ag.spawn(torch.nn.MSELoss(), name="mse", max_staleness=1)

    def one_step() -> None:
        losses = []
        for _ in range(4):
            h = torch.randn(64, 1024)
            for s in stages:
                h = s(h)
            losses.append(mse(h, torch.zeros(64, 1024)))
        ag.backward(*losses)
        ag.step(wait=False)

    one_step()
    ag.step()
    path = os.path.join(out, "pipeline.json")
    with ag.trace(path):
        for _ in range(4):
            one_step()
        ag.step()
    ag.shutdown()
    render_png(path, os.path.join(out, "pipeline.png"), title="pipelined: 4 stages, 4 micro-batches, max_staleness=1")


def main() -> None:
    """Write both timelines."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs")
    p.add_argument("--backend", default="ray", choices=["ray", "local"])
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    overlap(args.out, args.backend)
    pipeline(args.out, args.backend)
    print(f"wrote {args.out}/overlap.png and {args.out}/pipeline.png")


if __name__ == "__main__":
    main()
