"""Messages per step: a step that repeats the previous one sends exactly as many, on both backends.

The counts are the protocol's cost on a latency-bound model (see bench/results.md): a change that
adds a message per call or per worker fails here, with the numbers, rather than showing up only as
a slower `make bench`. A change that removes messages updates the expected numbers below.
"""

from __future__ import annotations

import torch

import actorgrad as ag

STAGES = 4
WORKERS = STAGES + 1  # the stages and the loss
# Per step of the chain below, from the caller: a Forward per worker, a Route per stage (where its
# output goes), a Plan per worker (the pass), a Close and a Commit per worker.
CALLER_MESSAGES = WORKERS + STAGES + WORKERS + WORKERS + WORKERS
# Replies: ForwardDone per call, one per Plan, CloseReady per worker.
REPLIES = 3 * WORKERS
# Between workers: the activations forward and the gradients back, one message per edge each.
PEER_MESSAGES = 2 * STAGES


def _chain(d: int = 16):
    torch.manual_seed(0)
    stages = [ag.spawn(torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh()), name=f"s{i}",
                       optimizer=ag.Optim(torch.optim.SGD, lr=0.01)) for i in range(STAGES)]
    loss = ag.spawn(torch.nn.MSELoss(), name="mse")
    return stages, loss


def _step(stages, loss, d: int = 16) -> ag.StepReport:
    h = torch.randn(8, d)
    for s in stages:
        h = s(h)
    loss(h, torch.randn(8, d)).backward()
    return ag.step()


def _worker_totals(workers) -> tuple[int, int]:
    stats = [w.stats() for w in workers]
    return sum(s["messages_in"] for s in stats), sum(s["messages_out"] for s in stats)


def test_a_repeated_step_sends_the_same_number_of_messages(backend):
    stages, loss = _chain()
    workers = [*stages, loss]
    for _ in range(2):  # the first step learns result structures; later ones must not differ
        _step(stages, loss)
    reports = []
    for _ in range(3):
        in0, out0 = _worker_totals(workers)
        report = _step(stages, loss)
        in1, out1 = _worker_totals(workers)
        # Each worker's stats() request is a message it handles too.
        reports.append((report.messages, report.replies, in1 - in0 - WORKERS, out1 - out0))
    # A step's Commits leave when it closes, so every step's own messages are counted in its report.
    expected = (CALLER_MESSAGES, REPLIES, CALLER_MESSAGES + PEER_MESSAGES, PEER_MESSAGES)
    for got in reports:
        assert got == expected, (
            f"(caller messages, replies, handled by workers, sent between workers) per step: got {got}, "
            f"expected {expected}")


def test_the_step_report_and_trace_carry_the_counts(backend, tmp_path):
    stages, loss = _chain()
    _step(stages, loss)
    with ag.trace(str(tmp_path / "t.json")) as path:
        report = _step(stages, loss)
    assert report.to_dict()["messages"] == CALLER_MESSAGES and report.to_dict()["replies"] == REPLIES
    import json

    with open(path) as f:
        events = json.load(f)["traceEvents"]
    marks = [e["args"] for e in events if e.get("name") == "step" and e.get("ph") == "i"]
    assert {"step": report.step, "messages": CALLER_MESSAGES, "replies": REPLIES} in marks
