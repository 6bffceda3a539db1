"""Quickstart: a shared trunk, two heads with their own optimizers, two losses.

Every module below lives in its own worker (a Ray actor by default). The two
losses start two independent backward passes; the trunk sums the gradients of
both and applies its own optimizer once, when ``ag.step()`` closes the step.

    python examples/quickstart.py                     # embedded local Ray
    python examples/quickstart.py --backend local     # one process, no Ray
"""

from __future__ import annotations

import argparse

import torch

import actorgrad as ag


def make_teachers(seed: int):
    """Two fixed random functions of x that the heads learn to imitate."""
    g = torch.Generator().manual_seed(seed)
    wa, wb = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    va, vb = torch.randn(3, 1, generator=g), torch.randn(3, 1, generator=g)

    def teacher(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(x @ wa) @ va, torch.sin(0.5 * x @ wb) @ vb

    return teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["ray", "local"], default="ray")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # the modules' initial weights
    data = torch.Generator().manual_seed(args.seed + 1)
    teacher = make_teachers(args.seed)

    ag.init(backend=args.backend)
    try:
        # A shared trunk ...
        enc = ag.spawn(torch.nn.Linear(4, 8), name="enc", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
        act = ag.spawn(torch.nn.Tanh(), name="act")  # no parameters, no optimizer
        # ... two heads, each with an optimizer of its own ...
        head_a = ag.spawn(torch.nn.Linear(8, 1), name="head_a", optimizer=ag.Optim(torch.optim.Adam, lr=0.05))
        head_b = ag.spawn(torch.nn.Linear(8, 1), name="head_b",
                          optimizer=ag.Optim(torch.optim.SGD, lr=0.05, momentum=0.9))
        # ... and one loss worker, called twice per step.
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")

        def evaluate(x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor) -> tuple[float, float]:
            with ag.no_grad():       # nothing is saved for backward
                h = act(enc(x))
                return mse(head_a(h), ya).item(), mse(head_b(h), yb).item()

        x_test = torch.randn(512, 4, generator=data)
        test_before = evaluate(x_test, *teacher(x_test))

        history: list[tuple[float, float]] = []
        for step in range(1, args.steps + 1):
            x = torch.randn(args.batch, 4, generator=data)
            ya, yb = teacher(x)

            h = act(enc(x))          # a Node: the activation stays in the "act" worker
            la = mse(head_a(h), ya)
            lb = mse(head_b(h), yb)
            la.backward()            # two independent passes, in flight at once
            lb.backward()
            report = ag.step()       # every worker applies its update

            history.append((la.item(), lb.item()))
            if step == 1 or step % 10 == 0 or step == args.steps:
                print(f"step {step:4d}  loss_a {history[-1][0]:.4f}  loss_b {history[-1][1]:.4f}  "
                      f"updated {','.join(report.updated)}")

        test_after = evaluate(x_test, *teacher(x_test))
        for i, head in enumerate(("head_a", "head_b")):
            print(f"{head}: train loss {history[0][i]:.4f} -> {history[-1][i]:.4f}   "
                  f"held-out {test_before[i]:.4f} -> {test_after[i]:.4f}")
    finally:
        ag.shutdown()


if __name__ == "__main__":
    main()
