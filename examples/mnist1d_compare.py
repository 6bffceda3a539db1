"""MNIST-1D: backprop through workers vs plain PyTorch vs local learning rules, same split and budget.

The dataset is generated locally by the ``mnist1d`` package's own generator
(``make_dataset``, seed 42: the paper's settings; nothing is downloaded). Every
method trains the same MLP (Linear+ReLU blocks and a Linear head, same initial
weights) on the same batches, in the same order, with the same optimizer and
number of steps:

- plain PyTorch: the reference, one process, ``loss.backward()``.
- backprop through workers: every block, the head and the loss are workers;
  one backward pass per step flows through them as messages. It must end with
  the same parameters as plain PyTorch (max |diff| <= 1e-5); the script fails
  otherwise.
- decoupled greedy learning (Belilovsky et al. 2020): each block has its own
  auxiliary linear classifier and loss, and the blocks are joined by
  ``node.detach()``, so every block learns from its local loss alone: one
  independent backward pass per block. Once plain, once pipelined
  (``max_staleness=1`` and ``ag.step(wait=False)``).
- synthetic gradients (DNI, Jaderberg et al. 2017) and feedback alignment
  (Lillicrap et al. 2016), with ``ag.SyntheticGradient`` and
  ``ag.FeedbackAlignment``.

It writes ``results.md`` (test accuracy, wall time, steps, exactness, next to
the dataset paper's published baselines) and ``mnist1d.png`` (curves).

    python examples/mnist1d_compare.py                    # all methods, embedded local Ray
    python examples/mnist1d_compare.py --backend local    # one process, no Ray
    python examples/mnist1d_compare.py --tiny --out /tmp/x --methods plain,backprop
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, when imported from elsewhere

import actorgrad as ag  # noqa: E402
from _common import History, Split, Timer, accuracy, epoch_batches, load_mnist1d_split, markdown_table  # noqa: E402
from _common import describe_mlp, mlp_blocks, plot_curves, postfix, progress  # noqa: E402
from _common import train_on_workers as _train_on_workers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-5  # docs/design.md, semantics 1: float32 parameters match plain PyTorch to this

# Greydanus (2020), "Scaling Down Deep Learning", and the mnist1d README: test accuracy on MNIST-1D.
PUBLISHED = [("logistic regression", "32%"), ("MLP", "68%"), ("CNN", "94%"), ("GRU", "91%"), ("human expert", "96%")]


@dataclass
class Result:
    """One method's run."""

    key: str
    label: str
    history: History
    seconds: float
    steps: int
    workers: int = 0  # 0: plain PyTorch, no workers
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # final parameters, for the exactness check
    note: str = ""

    @property
    def test_acc(self) -> float:
        """Test accuracy after the last epoch."""
        return self.history.test_acc[-1]


@dataclass
class Setup:
    """What every method shares: data, batches, initial weights, optimizer recipe."""

    args: argparse.Namespace
    split: Split
    batches: list[list[torch.Tensor]]
    blocks: list[torch.nn.Module]
    head: torch.nn.Module

    @property
    def steps(self) -> int:
        """Training steps in the whole run."""
        return sum(len(b) for b in self.batches)

    def optim(self) -> ag.Optim:
        """The optimizer recipe every module uses."""
        return ag.Optim(torch.optim.Adam, lr=self.args.lr)


def model_params(blocks: Sequence[torch.nn.Module], head: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of blocks and head, under the names the workers of backprop use."""
    out = {}
    for i, b in enumerate(blocks):
        out.update({f"block{i}.{k}": v.detach().clone() for k, v in b.state_dict().items()})
    out.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over every parameter (both must hold the same names)."""
    if a.keys() != b.keys():
        raise ValueError(f"different parameter names: {sorted(a)} vs {sorted(b)}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --- plain PyTorch -------------------------------------------------------------


def run_plain(s: Setup) -> Result:
    """The reference: the same modules in one process, each block with its own optimizer."""
    blocks, head = copy.deepcopy(s.blocks), copy.deepcopy(s.head)
    modules = [*blocks, head]
    # One optimizer per module, as each worker has: for Adam this is the same arithmetic as one over all.
    opts = [s.optim().build(m.parameters()) for m in modules]
    model = torch.nn.Sequential(*modules)
    x_tr, y_tr = s.split.x_train, s.split.y_train
    history, timer = History(), Timer()
    with progress(s.steps, "plain PyTorch", quiet=s.args.tiny) as bar:
        for epoch, idxs in enumerate(s.batches, 1):
            losses = []
            with timer:
                for idx in idxs:
                    loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
                    for o in opts:
                        o.zero_grad(set_to_none=True)
                    loss.backward()
                    for o in opts:
                        o.step()
                    losses.append(loss.item())
                    bar.update(1)
            with torch.no_grad():
                history.add(sum(losses) / len(losses), accuracy(model(x_tr), y_tr),
                            accuracy(model(s.split.x_test), s.split.y_test))
            postfix(bar, epoch, history)
    threads = torch.get_num_threads()
    return Result("plain", f"plain PyTorch (one process, {threads} thread{'s' if threads > 1 else ''})", history,
                  timer.seconds, s.steps, params=model_params(blocks, head))


# --- methods on workers --------------------------------------------------------


def ready(workers: Sequence[ag.Worker]) -> None:
    """Wait until every worker is up (its module and optimizer built), so that timing starts with training."""
    for w in workers:
        w.stats()


def train_on_workers(s: Setup, label: str, train_step: Callable[[torch.Tensor, torch.Tensor], ag.Node],
                     predict: Callable[[torch.Tensor], ag.Node], pipelined: bool = False) -> tuple[History, float]:
    """The loop every worker method shares (``_common.train_on_workers`` on this run's data and batches)."""
    return _train_on_workers(s.split, s.batches, label, train_step, predict, quiet=s.args.tiny, pipelined=pipelined)


def run_backprop(s: Setup) -> Result:
    """End-to-end backprop: one backward pass per step through block workers, head and loss worker."""
    opt = s.optim()
    blocks = [ag.spawn(copy.deepcopy(b), name=f"block{i}", optimizer=opt) for i, b in enumerate(s.blocks)]
    head = ag.spawn(copy.deepcopy(s.head), name="head", optimizer=opt)
    xent = ag.spawn(torch.nn.CrossEntropyLoss(), name="xent")
    ready([*blocks, head, xent])

    def predict(x: torch.Tensor) -> ag.Node:
        h = x
        for b in blocks:
            h = b(h)
        return head(h)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> ag.Node:
        loss = xent(predict(x), y)
        loss.backward()
        return loss

    history, seconds = train_on_workers(s, "backprop through workers", train_step, predict)
    params = {}
    for w in [*blocks, head]:
        params.update({f"{w.name}.{k}": v for k, v in w.state_dict().items()})
    return Result("backprop", "backprop through workers", history, seconds, s.steps, workers=len(blocks) + 2,
                  params=params)


def run_greedy(s: Setup, pipelined: bool) -> Result:
    """Decoupled greedy learning: every block trains on its own auxiliary classifier's loss."""
    opt = s.optim()
    k = 1 if pipelined else 0
    pre = "dglp" if pipelined else "dgl"
    blocks, heads, losses = [], [], []
    for i, b in enumerate(s.blocks):
        blocks.append(ag.spawn(copy.deepcopy(b), name=f"{pre}.block{i}", optimizer=opt, max_staleness=k))
        # The last block's auxiliary classifier is the model's head (same initial weights as elsewhere);
        # the others are fresh linear classifiers.
        last = i == len(s.blocks) - 1
        if last:
            aux = copy.deepcopy(s.head)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s.args.seed + 100 + i)
                aux = torch.nn.Linear(s.args.hidden, s.split.classes)
        heads.append(ag.spawn(aux, name=f"{pre}.aux{i}", optimizer=opt, max_staleness=k))
        losses.append(ag.spawn(torch.nn.CrossEntropyLoss(), name=f"{pre}.xent{i}", max_staleness=k))
    ready([*blocks, *heads, *losses])

    def predict(x: torch.Tensor) -> ag.Node:
        h = x
        for b in blocks:
            h = b(h)
        return heads[-1](h)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> ag.Node:
        h: object = x
        loss = None
        for b, aux, xent in zip(blocks, heads, losses):
            out = b(h)
            loss = xent(aux(out), y)
            loss.backward()       # this block's own pass: it reaches this block and stops
            h = out.detach()      # the next block sends no gradient back through this edge
        assert loss is not None
        return loss

    label = "decoupled greedy, pipelined" if pipelined else "decoupled greedy"
    history, seconds = train_on_workers(s, label, train_step, predict, pipelined=pipelined)
    note = ("`max_staleness=1`, steps closed with `ag.step(wait=False)`; a forward runs on the weights of one "
            "update before, evaluation included" if pipelined else
            "one auxiliary linear classifier and loss per block, blocks joined by `node.detach()`: one "
            "independent backward pass per block")
    return Result(pre, label, history, seconds, s.steps, workers=3 * len(blocks), note=note)


def run_feedback_alignment(s: Setup) -> Result:
    """Feedback alignment: every Linear (head included) sends its input gradient back through a fixed random B."""
    opt = s.optim()
    workers: list[ag.Worker] = []
    linears = [b[0] for b in s.blocks] + [s.head]
    for i, lin in enumerate(linears):
        fa = ag.FeedbackAlignment(lin.in_features, lin.out_features, seed=s.args.seed + 1000 + i)
        with torch.no_grad():  # the same initial W and b as every other method; only B is new
            fa.weight.copy_(lin.weight)
            fa.bias.copy_(lin.bias)
        name = "fa.head" if i == len(linears) - 1 else f"fa.linear{i}"
        workers.append(ag.spawn(fa, name=name, optimizer=opt))
        if i < len(linears) - 1:
            # A worker of its own: FA's backward replaces the Linear's input gradient only, the ReLU's stays exact.
            workers.append(ag.spawn(torch.nn.ReLU(), name=f"fa.relu{i}"))
    xent = ag.spawn(torch.nn.CrossEntropyLoss(), name="fa.xent")
    ready([*workers, xent])

    def predict(x: torch.Tensor) -> ag.Node:
        h = x
        for w in workers:
            h = w(h)
        return h

    def train_step(x: torch.Tensor, y: torch.Tensor) -> ag.Node:
        loss = xent(predict(x), y)
        loss.backward()
        return loss

    history, seconds = train_on_workers(s, "feedback alignment", train_step, predict)
    note = ("`ag.FeedbackAlignment` for every Linear: parameter gradients as usual, input gradient "
            "through a fixed random matrix instead of W^T; ReLUs in workers of their own")
    return Result("fa", "feedback alignment", history, seconds, s.steps, workers=len(workers) + 1, note=note)


def run_synthetic_gradients(s: Setup) -> Result:
    """Synthetic gradients (DNI): every block updates at once from a predicted gradient of its output."""
    blocks = []
    for i, b in enumerate(s.blocks):
        sg = ag.SyntheticGradient(copy.deepcopy(b))  # predictor: a zero-initialised Linear(hidden, hidden)
        opt = sg.optim(torch.optim.Adam, lr=s.args.lr, predictor={"lr": s.args.sg_lr})
        blocks.append(ag.spawn(sg, name=f"sg.block{i}", optimizer=opt, update="pass"))
    head = ag.spawn(copy.deepcopy(s.head), name="sg.head", optimizer=s.optim())
    xent = ag.spawn(torch.nn.CrossEntropyLoss(), name="sg.xent")
    ready([*blocks, head, xent])

    def predict(x: torch.Tensor) -> ag.Node:
        h = x
        for b in blocks:
            h, _ = b(h)
        return head(h)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> ag.Node:
        h: object = x
        for b in blocks:
            # The synthetic pass: the block applies its update from the predicted gradient right away
            # (update="pass"), and its input gradient is the previous block's predictor target.
            h, _ = ag.nn.synthetic_call(b, h)
        loss = xent(head(h), y)
        loss.backward()  # the true gradient: trains the head, and the last block's predictor
        return loss

    history, seconds = train_on_workers(s, "synthetic gradients", train_step, predict)
    note = (f"`ag.SyntheticGradient` around every block, `update=\"pass\"`; linear gradient predictors "
            f"(Adam lr {s.args.sg_lr}) learn from the next block's (bootstrapped) or the head's (true) gradient")
    return Result("sg", "synthetic gradients (DNI)", history, seconds, s.steps, workers=len(blocks) + 2, note=note)


METHODS: dict[str, Callable[[Setup], Result]] = {
    "plain": run_plain,
    "backprop": run_backprop,
    "dgl": lambda s: run_greedy(s, pipelined=False),
    "dglp": lambda s: run_greedy(s, pipelined=True),
    "sg": run_synthetic_gradients,
    "fa": run_feedback_alignment,
}


# --- the run -------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["ray", "local"], default="ray")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 30; 2 with --tiny)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train for exactly this many steps instead (overrides --epochs)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3, help="Linear+ReLU blocks, one worker each")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate, for every module")
    parser.add_argument("--sg-lr", type=float, default=1e-3, help="Adam's learning rate for the gradient predictors")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    parser.add_argument("--data-seed", type=int, default=42, help="mnist1d generator seed (42: the paper's)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--tiny", action="store_true", help="a reduced size that runs in seconds (tests)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for results.md and mnist1d.png")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.epochs is None:
        args.epochs = 2 if args.tiny else 30
    if args.tiny:
        args.hidden = min(args.hidden, 32)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return args


def start_ray(backend: str) -> bool:
    """Start one Ray instance for every method (each method's runtime joins it); True if started here."""
    if backend != "ray":
        return False
    import logging

    import ray

    if ray.is_initialized():
        return False
    # Workers import what this script imports (as ag.init does for an embedded instance).
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    ray.init(logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}})
    return True


def write_results(args: argparse.Namespace, s: Setup, results: list[Result], diff: Optional[float],
                  total_seconds: float) -> tuple[str, str]:
    """Write results.md and mnist1d.png; return their paths."""
    os.makedirs(args.out, exist_ok=True)
    rows, notes = [], []
    for r in results:
        if r.key == "plain":
            exact = "reference"
        elif r.key == "backprop" and diff is not None:
            exact = f"{diff:.2e} ({'exact' if diff == 0 else 'OK' if diff <= TOLERANCE else 'MISMATCH'})"
        else:
            exact = "n/a (another learning rule)"
        label = r.label
        if r.note:
            notes.append(f"{len(notes) + 1}. {r.label}: {r.note}.")
            label += f" ({len(notes)})"
        rows.append([label, r.workers or "–", f"{100 * r.test_acc:.1f}%", f"{100 * r.history.train_acc[-1]:.1f}%",
                     f"{r.seconds:.1f}", r.steps, f"{1000 * r.seconds / r.steps:.2f}", exact])
    model = describe_mlp(s.split.features, args.hidden, args.depth, s.split.classes)
    lines = [
        "# MNIST-1D: backprop through workers and local learning rules\n",
        f"Written by `examples/mnist1d_compare.py{' --tiny' if args.tiny else ''}` "
        f"(backend `{args.backend}`). {s.split.describe()} (mnist1d `make_dataset`, seed {args.data_seed}). "
        f"Every method: {model} (ReLU), same initial weights, Adam lr {args.lr} per module, batch {args.batch}, "
        f"{args.epochs} epochs ({s.steps} steps), the same batches in the same order. Wall time: the training steps only "
        f"(not spawning workers, not the per-epoch evaluation). Plain PyTorch runs torch on "
        f"{'one thread, as every Ray worker does' if args.backend == 'ray' else 'the threads the local workers use'}, "
        f"so that it does the same float arithmetic. Machine: {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, Python {platform.python_version()}. Whole script: {total_seconds:.0f} s.\n",
        markdown_table(["method", "workers", "test accuracy", "train accuracy", "wall time (s)", "steps", "ms / step",
                        "max \\|param diff\\| vs plain PyTorch"], rows),
        "\n".join(notes) + "\n",
        "Published test accuracies on MNIST-1D (Greydanus 2020, *Scaling Down Deep Learning*, and the "
        "`mnist1d` README; other models and training budgets, for reference only):\n",
        markdown_table(["model (published, for reference)", "test accuracy"], PUBLISHED),
    ]
    md = os.path.join(args.out, "results.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    curves = {r.label.split(" (one")[0]: r.history for r in results}
    png = plot_curves(curves, os.path.join(args.out, "mnist1d.png"),
                      f"MNIST-1D, {model}, Adam lr {args.lr}, batch {args.batch}; backend {args.backend}",
                      wide=["plain PyTorch"])  # backprop through workers lies exactly on it
    return md, png


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the chosen methods, write the table and the curves, check exactness; return the results."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    split = load_mnist1d_split(seed=args.data_seed, tiny=args.tiny)
    print(split.describe())
    blocks, head = mlp_blocks(split.features, args.hidden, args.depth, split.classes, seed=args.seed)
    batches = epoch_batches(len(split.y_train), args.batch, args.epochs, seed=args.seed + 1, steps=args.steps)
    args.epochs = len(batches)
    s = Setup(args, split, batches, blocks, head)

    started_ray = start_ray(args.backend)
    results: list[Result] = []
    # Plain PyTorch must do the workers' float arithmetic: a Ray worker runs torch on one thread, and
    # with another thread count a matmul splits its sums differently; the results differ by ~1e-8
    # after one epoch and training amplifies that (to ~0.3 after 30 epochs). Local workers compute in
    # this process, as plain PyTorch does, so there the thread count stays as it is.
    threads = torch.get_num_threads()
    if args.backend == "ray":
        torch.set_num_threads(1)
    try:
        for key in args.methods:
            t_method = time.perf_counter()
            if key == "plain":
                results.append(run_plain(s))
            else:
                ag.init(backend=args.backend)
                try:
                    results.append(METHODS[key](s))
                finally:
                    ag.shutdown()  # this method's workers go; Ray (started above) stays for the next
            r = results[-1]
            print(f"{r.label}: test accuracy {100 * r.test_acc:.1f}%, {r.steps} steps in {r.seconds:.1f} s "
                  f"({time.perf_counter() - t_method:.1f} s in all, with set-up and evaluation)")
    finally:
        torch.set_num_threads(threads)
        if started_ray:
            import ray

            ray.shutdown()

    by_key = {r.key: r for r in results}
    diff = None
    if "plain" in by_key and "backprop" in by_key:
        diff = max_abs_diff(by_key["plain"].params, by_key["backprop"].params)
        print(f"backprop through workers vs plain PyTorch: max |param diff| = {diff:.2e}")
    md, png = write_results(args, s, results, diff, time.perf_counter() - t0)
    print(f"wrote {md} and {png}")
    main_result = by_key.get("backprop") or results[-1]
    print(f"test accuracy: {main_result.test_acc:.4f} ({main_result.label})")
    if diff is not None and diff > TOLERANCE:
        raise SystemExit(f"backprop through workers does not match plain PyTorch: max |param diff| {diff:.2e} "
                         f"> {TOLERANCE:g}")
    return {"results": by_key, "diff": diff, "table": md, "png": png}


if __name__ == "__main__":
    main()
