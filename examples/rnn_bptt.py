"""An RNN trained by backprop through time: one cell worker, called T times per step.

The task: read a sequence of T numbers in [-1, 1] and output their sum. The
recurrent cell is a single worker that holds one set of weights; each step
calls it T times, so its worker keeps T calls for the backward pass, sums the
gradients of all of them (exactly as ``loss.backward()`` on the unrolled graph
in PyTorch would), and applies its optimizer once when ``ag.step()`` closes
the step.

    python examples/rnn_bptt.py                       # embedded local Ray
    python examples/rnn_bptt.py --backend local       # one process, no Ray
"""

from __future__ import annotations

import argparse

import torch

import actorgrad as ag


# Custom modules live at module top level: they are pickled to Ray workers.
class RNNCell(torch.nn.Module):
    """h' = tanh(W [x_t; h] + b)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(input_size + hidden_size, hidden_size)

    def forward(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(torch.cat([x_t, h], dim=-1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["ray", "local"], default="ray")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # the modules' initial weights
    data = torch.Generator().manual_seed(args.seed + 1)
    T, H = args.seq_len, args.hidden

    ag.init(backend=args.backend)
    try:
        cell = ag.spawn(RNNCell(1, H), name="cell", optimizer=ag.Optim(torch.optim.Adam, lr=0.02))
        head = ag.spawn(torch.nn.Linear(H, 1), name="head", optimizer=ag.Optim(torch.optim.Adam, lr=0.02))
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")

        # Predicting 0 for every sequence scores Var(sum) = T/3.
        print(f"seq_len {T}, hidden {H}: predicting 0 gives a loss of about {T / 3:.3f}")
        losses: list[float] = []
        for step in range(1, args.steps + 1):
            x = torch.rand(args.batch, T, 1, generator=data) * 2 - 1
            y = x.sum(dim=1)

            h = torch.zeros(args.batch, H)   # the initial state: a constant, no gradient goes to it
            for t in range(T):
                h = cell(x[:, t], h)          # the same worker, T calls: a Node chain through "cell"
            loss = mse(head(h), y)
            loss.backward()
            report = ag.step()

            losses.append(loss.item())
            if step == 1:
                print(f"calls per step: cell {report.workers['cell'].calls}, head {report.workers['head'].calls}")
            if step == 1 or step % 10 == 0 or step == args.steps:
                print(f"step {step:4d}  loss {losses[-1]:.4f}")

        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    finally:
        ag.shutdown()


if __name__ == "__main__":
    main()
