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


def test_breakdown_accounts_the_cpu_of_a_small_step_by_thread(tmp_path):
    out = tmp_path / "breakdown.md"
    run_bench_module("bench.breakdown", out)
    text = out.read_text()
    assert "24 caller messages and 15 replies per step" in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] == "caller":
            rows[cells[1]] = float(cells[2])
    # The worker cores run on the local backend's loop thread; the caller's own thread sends and waits.
    assert rows.get("actorgrad-local", 0) > 0 and rows.get("MainThread", 0) > 0
    assert rows["(all threads)"] >= rows["actorgrad-local"] + rows["MainThread"] - 1e-9
