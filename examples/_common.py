"""What the real-data examples share: datasets, batches, progress bars, curves, Markdown tables.

Both datasets ship inside packages, so nothing is downloaded at run time:
scikit-learn's bundled 8x8 digits, and MNIST-1D generated locally by the
``mnist1d`` package's own generator (``make_dataset``) with a fixed seed.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch

import actorgrad as ag

if TYPE_CHECKING:
    from tqdm.std import tqdm

__all__ = [
    "Split",
    "History",
    "load_digits_split",
    "load_mnist1d_split",
    "epoch_batches",
    "progress",
    "postfix",
    "train_on_workers",
    "accuracy",
    "Timer",
    "plot_curves",
    "markdown_table",
    "mlp_blocks",
    "describe_mlp",
]


@dataclass
class Split:
    """A train/test split as float32 inputs and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def features(self) -> int:
        """The number of input features."""
        return int(self.x_train.shape[1])

    def describe(self) -> str:
        """One line: sizes of the split."""
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test examples, "
                f"{self.features} features, {self.classes} classes")


@dataclass
class History:
    """Per-epoch curves of one training run."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)

    def add(self, train_loss: float, train_acc: float, test_acc: float) -> None:
        """Record one epoch."""
        self.train_loss.append(train_loss)
        self.train_acc.append(train_acc)
        self.test_acc.append(test_acc)


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Statistics of the training set only, so the test set stays unseen.
    mean = x_train.mean(axis=0, keepdims=True)
    std = x_train.std(axis=0, keepdims=True)
    std[std < 1e-6] = 1.0  # constant pixels (the digits' borders) stay 0 instead of dividing by 0
    tr = torch.tensor((x_train - mean) / std, dtype=torch.float32)
    te = torch.tensor((x_test - mean) / std, dtype=torch.float32)
    return tr, te


def load_digits_split(seed: int = 0, test_fraction: float = 0.25, tiny: bool = False) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images), a stratified split, standardized features."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    if tiny:
        x, y = x[:400], y[:400]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    tr, te = _standardize(x_tr, x_te)
    return Split("sklearn digits", tr, torch.from_numpy(y_tr), te, torch.from_numpy(y_te), 10)


def load_mnist1d_split(seed: int = 42, tiny: bool = False) -> Split:
    """MNIST-1D from the package's own generator (no download): 4000 train / 1000 test, 40 features.

    With the default seed 42 and sizes these are the generator settings of the dataset's paper.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    if tiny:
        args.num_samples = 500
    # make_dataset reseeds the global numpy and random generators; leave them as they were.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return Split(
        "MNIST-1D",
        torch.tensor(data["x"], dtype=torch.float32),
        torch.tensor(data["y"], dtype=torch.int64),
        torch.tensor(data["x_test"], dtype=torch.float32),
        torch.tensor(data["y_test"], dtype=torch.int64),
        10,
    )


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int, steps: Optional[int] = None) -> list[list[torch.Tensor]]:
    """Index batches for every epoch (a fresh shuffle each), fixed by ``seed``: every method sees the same.

    With ``steps``, exactly that many batches in all: as many epochs as they need, the last one cut short.
    """
    g = torch.Generator().manual_seed(seed)
    per_epoch = -(-n // batch_size)
    if steps is not None:
        epochs = -(-steps // per_epoch)
    out = []
    for e in range(epochs):
        perm = torch.randperm(n, generator=g)
        batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
        if steps is not None:
            batches = batches[:steps - e * per_epoch]
        out.append(batches)
    return out


def progress(total: int, desc: str, quiet: bool = False) -> tqdm:
    """A tqdm bar over ``total`` steps; silent with ``quiet`` or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())


def postfix(bar: tqdm, epoch: int, h: History) -> None:
    """Show the last epoch on the progress bar."""
    bar.set_postfix(epoch=epoch, loss=f"{h.train_loss[-1]:.3f}", train_acc=f"{h.train_acc[-1]:.3f}",
                    test_acc=f"{h.test_acc[-1]:.3f}")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of rows whose largest logit is the label."""
    return float((logits.argmax(dim=1) == labels).float().mean())


class Timer:
    """Sums the wall time of the blocks it times (training steps only, not evaluation)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0: Optional[float] = None

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._t0 is not None
        self.seconds += time.perf_counter() - self._t0
        self._t0 = None


def train_on_workers(split: Split, batches: Sequence[Sequence[torch.Tensor]], label: str,
                     train_step: Callable[[torch.Tensor, torch.Tensor], ag.Node],
                     predict: Callable[[torch.Tensor], ag.Node], quiet: bool = False,
                     pipelined: bool = False) -> tuple[History, float]:
    """The training loop of a model on workers; returns its per-epoch curves and its training wall time.

    ``train_step`` issues one step's forward calls and backward passes and returns the node of the loss
    to report; ``predict`` returns the logits node (it is called under ``ag.no_grad()``). With
    ``pipelined`` the steps close with ``ag.step(wait=False)``.
    """
    x_tr, y_tr = split.x_train, split.y_train
    history, timer = History(), Timer()
    with progress(sum(len(b) for b in batches), label, quiet=quiet) as bar:
        for epoch, idxs in enumerate(batches, 1):
            losses: list[float] = []
            with timer:
                prev: Optional[ag.Node] = None
                handle = None
                for idx in idxs:
                    loss = train_step(x_tr[idx], y_tr[idx])
                    if prev is not None:
                        # A closed step's values are freed when the next step closes: fetch before that,
                        # and only now, so that the fetch overlaps this step's work.
                        losses.append(prev.item())
                    if pipelined:
                        handle = ag.step(wait=False)
                    else:
                        ag.step()
                    prev = loss
                    bar.update(1)
                assert prev is not None
                losses.append(prev.item())
                if handle is not None:
                    handle.wait()  # every update of the epoch has landed (steps complete in order)
            with ag.no_grad():
                history.add(sum(losses) / len(losses), accuracy(predict(x_tr).value(), y_tr),
                            accuracy(predict(split.x_test).value(), split.y_test))
            postfix(bar, epoch, history)
    return history, timer.seconds


def plot_curves(histories: dict[str, History], path: str, title: str, wide: Sequence[str] = ()) -> str:
    """Write training loss and train/test accuracy per epoch, one line per run, as a PNG.

    Runs named in ``wide`` are drawn wide and faint, so that an identical run drawn over them stays visible.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe to call after pyplot was imported headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    single = len(histories) == 1
    for i, (label, h) in enumerate(histories.items()):
        color = f"C{i}"
        style = {"linewidth": 5, "alpha": 0.35} if label in wide else {}
        epochs = range(1, len(h.train_loss) + 1)
        ax_loss.plot(epochs, h.train_loss, color=color, label=label, **style)
        ax_acc.plot(epochs, h.test_acc, color=color, label=f"{label} (test)" if single else label, **style)
        # Several runs: test accuracy solid and train accuracy faint, so the legend stays short.
        ax_acc.plot(epochs, h.train_acc, color=color, linestyle="--", alpha=0.8 if single else 0.35,
                    label=f"{label} (train)" if single else None)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (cross-entropy, mean over the epoch)")
    ax_loss.set_yscale("log")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy" if single else "test accuracy (solid), train accuracy (dashed)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: Optional[str] = None) -> str:
    """A GitHub Markdown table; ``align`` is one of 'l'/'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mlp_blocks(features: int, hidden: int, depth: int, classes: int, seed: int,
               block: Optional[Callable[[int, int], torch.nn.Module]] = None) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """``depth`` Linear+ReLU blocks and a Linear head, initialised from ``seed`` alone."""
    block = block or (lambda i, o: torch.nn.Sequential(torch.nn.Linear(i, o), torch.nn.ReLU()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks, width = [], features
        for _ in range(depth):
            blocks.append(block(width, hidden))
            width = hidden
        head = torch.nn.Linear(width, classes)
    return blocks, head


def describe_mlp(features: int, hidden: int, depth: int, classes: int) -> str:
    """The layer widths of the MLP ``mlp_blocks`` builds, e.g. ``MLP 64-128-128-10``."""
    return f"MLP {features}-{'-'.join([str(hidden)] * depth)}-{classes}"
