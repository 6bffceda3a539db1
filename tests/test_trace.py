"""The timeline: Chrome trace JSON with one track per worker, and its rendering."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import actorgrad as ag


def _train(steps=2):
    enc = ag.spawn(torch.nn.Linear(3, 4), name="enc", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    head = ag.spawn(torch.nn.Linear(4, 1), name="head", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    for _ in range(steps):
        mse(head(enc(torch.randn(4, 3))), torch.randn(4, 1)).backward()
        ag.step()


def _check_chrome_trace(path, workers):
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"]
    tracks = {ev["pid"]: ev["args"]["name"] for ev in events if ev["ph"] == "M" and ev["name"] == "process_name"}
    assert sorted(tracks.values()) == sorted(workers + ["caller"])
    assert len(set(tracks)) == len(tracks)  # one track (pid) per worker
    spans = [ev for ev in events if ev["ph"] == "X"]
    for ev in spans:
        assert {"name", "ts", "dur", "pid", "tid"} <= ev.keys() and ev["dur"] >= 0 and ev["pid"] in tracks
    kinds = {(tracks[ev["pid"]], ev["cat"]) for ev in spans}
    for w in ("enc", "head"):
        assert (w, "forward") in kinds and (w, "backward") in kinds and (w, "update") in kinds
    assert ("mse", "backward") in kinds
    back = [ev for ev in spans if ev["cat"] == "backward"]
    assert all("pass_id" in ev["args"] and "call" in ev["args"] for ev in back)
    sends = [ev for ev in events if ev["ph"] == "i" and ev["name"] == "send"]
    assert any(ev["args"]["type"] == "Gradient" for ev in sends)
    return data


def test_trace_context_writes_a_chrome_trace(backend, tmp_path):
    path = str(tmp_path / "run.json")
    with ag.trace(path):
        _train()
    _check_chrome_trace(path, ["enc", "head", "mse"])


def test_init_trace_is_written_at_shutdown(tmp_path):
    path = str(tmp_path / "init.json")
    ag.init(backend="local", trace=path)
    try:
        _train()
    finally:
        ag.shutdown()
    _check_chrome_trace(path, ["enc", "head", "mse"])


def test_trace_command_renders_a_png(local, tmp_path):
    path = str(tmp_path / "run.json")
    with ag.trace(path):
        _train()
    png = tmp_path / "timeline.png"
    out = subprocess.run([sys.executable, "-m", "actorgrad", "trace", path, "--png", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "enc" in out.stdout and "backward" in out.stdout
