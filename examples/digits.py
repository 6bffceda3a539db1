"""Handwritten digits (scikit-learn's bundled 8x8 images): an MLP whose every block is a worker.

Each Linear+ReLU block, the classifier head and the cross-entropy loss live in
workers of their own (Ray actors by default). Every step sends the batch
through the chain, starts one backward pass at the loss, and closes the step:
each block applies its own Adam to the gradient it computed itself. After every
epoch the model is evaluated through the same workers under ``ag.no_grad()``.
No data is downloaded: the images ship inside scikit-learn.

    python examples/digits.py                       # embedded local Ray
    python examples/digits.py --backend local       # one process, no Ray
    python examples/digits.py --tiny --out /tmp/x   # a few seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, when imported from elsewhere

import actorgrad as ag  # noqa: E402
from _common import describe_mlp, epoch_batches, load_digits_split, markdown_table, mlp_blocks  # noqa: E402
from _common import plot_curves, train_on_workers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["ray", "local"], default="ray")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 20; 3 with --tiny)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train for exactly this many steps instead (overrides --epochs)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2, help="Linear+ReLU blocks, one worker each")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a reduced size that runs in seconds (tests)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for digits.png and digits.md")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.epochs is None:
        args.epochs = 3 if args.tiny else 20
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Train, evaluate every epoch, write the curves and a one-row table; return the results."""
    args = parse_args(argv)
    split = load_digits_split(seed=args.seed, tiny=args.tiny)
    print(split.describe())
    blocks, head = mlp_blocks(split.features, args.hidden, args.depth, split.classes, seed=args.seed)
    batches = epoch_batches(len(split.y_train), args.batch, args.epochs, seed=args.seed + 1, steps=args.steps)
    args.epochs = len(batches)
    steps = sum(len(b) for b in batches)

    ag.init(backend=args.backend)
    try:
        adam = ag.Optim(torch.optim.Adam, lr=args.lr)
        workers = [ag.spawn(copy.deepcopy(b), name=f"block{i}", optimizer=adam) for i, b in enumerate(blocks)]
        workers.append(ag.spawn(copy.deepcopy(head), name="head", optimizer=adam))
        loss_fn = ag.spawn(torch.nn.CrossEntropyLoss(), name="xent")

        def forward(x: torch.Tensor) -> ag.Node:
            h = x  # a constant input: nothing is sent back to the caller
            for w in workers:
                h = w(h)
            return h

        def train_step(x: torch.Tensor, y: torch.Tensor) -> ag.Node:
            loss = loss_fn(forward(x), y)
            loss.backward()
            return loss

        history, seconds = train_on_workers(split, batches, f"digits ({args.backend})", train_step, forward,
                                            quiet=args.tiny)
    finally:
        ag.shutdown()

    os.makedirs(args.out, exist_ok=True)
    png = plot_curves({f"MLP, {args.depth} blocks + head, one worker each": history}, os.path.join(args.out, "digits.png"),
                      f"{split.describe()}; Adam lr {args.lr}, batch {args.batch}; backend {args.backend}")
    table = markdown_table(
        ["dataset", "model", "test accuracy", "train accuracy", "epochs", "steps", "training wall time (s)", "backend"],
        [[split.name, f"{describe_mlp(split.features, args.hidden, args.depth, split.classes)}, {args.depth + 2} workers",
          f"{history.test_acc[-1]:.4f}", f"{history.train_acc[-1]:.4f}", args.epochs, steps,
          f"{seconds:.1f}", args.backend]],
        align="llrrrrrl")
    md = os.path.join(args.out, "digits.md")
    with open(md, "w") as f:
        f.write(table)
    print(f"wrote {png} and {md}")
    print(f"test accuracy: {history.test_acc[-1]:.4f}")
    return {"test_acc": history.test_acc[-1], "history": history, "steps": steps, "seconds": seconds,
            "png": png, "table": md}


if __name__ == "__main__":
    main()
