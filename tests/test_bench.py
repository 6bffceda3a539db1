"""`make bench` runs end to end at a tiny size; its exactness checks hold (no timing asserted)."""

from __future__ import annotations

from conftest import run_bench_module


def test_bench_runs_end_to_end_in_a_tiny_size(tmp_path):
    out = tmp_path / "results.md"
    run_bench_module("bench.bench", out)
    table = out.read_text()
    for runner in ("plain, 1 thread", "plain, default threads", "torch.distributed.rpc", "actorgrad local",
                   "actorgrad ray, synchronous", "actorgrad ray, pipelined", "passes together",
                   "plain, backprop (1 process)", "actorgrad ray, backprop through workers",
                   "plain, decoupled greedy (1 process)", "actorgrad ray, decoupled greedy pipelined"):
        assert runner in table, runner
    for floor in ("ray_round_trip_ms", "ray_actor_hop_ms", "actorgrad_request_ms"):
        assert floor in table
    # The small chain's four runners and MNIST-1D's backprop on both backends match plain PyTorch.
    assert table.count("(OK)") == 6 and "MISMATCH" not in table
