"""The tensor data plane (transport/dataplane.py): large tensors of peer messages over gloo point-to-point,
the envelope over the authenticated channel. The same code carries CUDA tensors over NCCL; on CPU it runs
with gloo here, in every CI run. Plain PyTorch is the oracle, as in test_exact.py.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time

import pytest
import torch
from torch import nn

import actorgrad as ag
from actorgrad import errors as E
from actorgrad.core import codec
from actorgrad.core import messages as m
from actorgrad.transport import dataplane as dp
from conftest import kill_worker, run_bench_module
from test_exact import Mix2

D = 16
BATCH = 8
STEPS = 3

cuda = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 1,
                          reason="no CUDA device here (CPU-only machine or CPU build of torch)")


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, D, generator=g), torch.randn(BATCH, 1, generator=g)


@pytest.fixture
def gloo(ray_session, monkeypatch):
    """A Ray runtime whose every peer tensor (any size) takes the gloo data plane."""
    monkeypatch.setenv("ACTORGRAD_DATA_PLANE_MIN_BYTES", "1")
    ray_session()
    ag.init(backend="ray", timeout=60, data_plane="gloo")
    torch.manual_seed(0)
    yield
    ag.shutdown()


def _dataplane_counts(worker: ag.Worker) -> tuple[int, int, int]:
    """(transfers sent, received, groups held) of a worker's data plane."""
    import ray

    def counts(host):
        d = host._dataplane
        return (d.sent, d.received, d.groups()) if d is not None else (0, 0, 0)

    return ray.get(worker.actor.__ray_call__.remote(counts), timeout=30)


def _set(worker: ag.Worker, **attrs) -> None:
    import ray

    def apply(host):
        for k, v in attrs.items():
            setattr(host._dataplane, k, v)

    ray.get(worker.actor.__ray_call__.remote(apply), timeout=30)


def _close(workers, refs) -> None:
    for w, r in zip(workers, refs):
        sd = w.state_dict()
        for k, v in r.state_dict().items():
            torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-5)


def _chain(steps: int = STEPS):
    """enc -> head -> MSE as workers and as plain PyTorch; returns (workers, oracle modules)."""
    torch.manual_seed(0)
    mods = [nn.Linear(D, D), nn.Sequential(nn.Tanh(), nn.Linear(D, 1))]
    refs = copy.deepcopy(mods)
    ws = [ag.spawn(mods[0], name="enc", optimizer=ag.Optim(torch.optim.SGD, lr=0.1, momentum=0.9)),
          ag.spawn(mods[1], name="head", optimizer=ag.Optim(torch.optim.Adam, lr=0.01))]
    mse = ag.spawn(nn.MSELoss(), name="mse")
    opts = [torch.optim.SGD(refs[0].parameters(), lr=0.1, momentum=0.9),
            torch.optim.Adam(refs[1].parameters(), lr=0.01)]
    for s in range(1, steps + 1):
        x, y = batch(s)
        mse(ws[1](ws[0](x)), y).backward()
        ag.step()
        nn.functional.mse_loss(refs[1](refs[0](x)), y).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    return ws, refs, mse


# --- codec and descriptor units (no processes) ------------------------------------------


def test_tensor_buffers_decode_in_place_and_are_checked_against_the_envelope():
    msg = m.Value(3, 1, 0, 2, torch.randn(4, 5))
    frame = codec.encode_frame(msg).private()
    assert codec.peek(frame) == (m.Value, 3, {0: 80})
    buf = torch.frombuffer(bytearray(frame.buffers[0]), dtype=torch.uint8)
    got = codec.decode_frame(codec.Frame(frame.envelope, [buf], owned=True))
    assert torch.equal(got.tensor, msg.tensor) and got.tensor.data_ptr() == buf.data_ptr()
    # A tensor buffer written as bytes (a channel) is the same frame.
    assert torch.equal(codec.decode(codec.Frame(frame.envelope, [buf]).to_bytes()).tensor, msg.tensor)
    with pytest.raises(E.DecodeError, match="needs 80 bytes, got 79"):
        codec.decode_frame(codec.Frame(frame.envelope, [buf[:79]], owned=True))
    with pytest.raises(E.DecodeError, match="uint8"):
        codec.decode_frame(codec.Frame(frame.envelope, [torch.zeros(20)], owned=True))


def test_descriptor_round_trip_and_refusals():
    msg = m.Gradient(1, 7, 2, 0, "a", 1, 0, torch.arange(6.0))
    frame = codec.encode_frame(msg).private()
    empty = codec.Frame(frame.envelope, [b""], owned=True)
    data = bytearray(b"".join(bytes(p) for p in dp.pack(["g" * 32, "gloo", "10.0.0.1", 1234, [[0, 5]]], empty)))
    desc, back = dp.unpack(data)
    assert desc == ["g" * 32, "gloo", "10.0.0.1", 1234, [[0, 5]]]
    assert codec.peek(back) == (m.Gradient, 7, {0: 24}) and len(back.buffers[0]) == 0
    for bad in (b"", b"\xff\xff\x00\x00", bytes(data[:6])):
        with pytest.raises(ValueError):
            dp.unpack(bytearray(bad))
    bad_backend = bytearray(b"".join(bytes(p) for p in dp.pack(["g", "mpi", "h", 1, [[0, 5]]], empty)))
    with pytest.raises(ValueError):
        dp.unpack(bad_backend)


def test_choice_per_pair():
    me = {"node": "n1", "pid": 1, "device": "cpu"}
    same_proc, other = dict(me), {"node": "n1", "pid": 2, "device": "cpu"}
    gpu = {"node": "n1", "pid": 3, "device": "cuda:0"}
    assert dp.choose("gloo", 10, me, same_proc, False) == (None, 0)  # one process: no copy as today
    assert dp.choose("gloo", 10, me, other, False) == ("gloo", 10)
    assert dp.choose("channel", 10, me, other, False) == (None, 0)
    assert dp.choose("auto", 10, me, None, False) == (None, 0)  # peer not known yet: the channel
    assert dp.choose("auto", 10, me, other, False) == (None, 0)  # CPU pairs: the authenticated channel
    assert dp.choose("auto", 10, me, gpu, True) == ("nccl", dp.AUTO_NCCL_BYTES)
    assert dp.choose("auto", 10, me, gpu, False) == (None, 0)  # mixed
    assert dp.choose("nccl", 10, me, other, False) == (None, 0)
    with pytest.raises(E.ConfigError, match="data_plane"):
        dp.check_mode("rdma")


def _pair(timeout: float = 10.0, max_bytes: int = 1 << 30):
    """Two data planes in this process, a -> b over gloo on the loopback address (a claims another pid)."""
    loop = asyncio.new_event_loop()
    fails: list = []
    make = lambda name: dp.DataPlane(name, "gloo", timeout, 1, torch.device("cpu"), "node", "127.0.0.1", loop,  # noqa: E731
                                     lambda step, text: fails.append((name, step, text)), max_bytes=max_bytes)
    a, b = make("a"), make("b")
    a.me["pid"] = -1
    a.peers["b"] = {"node": "node", "pid": os.getpid(), "device": "cpu"}
    return loop, a, b, fails


def _run_until(loop, cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        loop.run_until_complete(asyncio.sleep(0.01))


def _wire(parts: list) -> bytearray:
    return bytearray(b"".join(bytes(p) for p in parts))


def test_a_tensor_crosses_two_data_planes_and_a_deadline_fails_its_step():
    loop, a, b, fails = _pair()
    try:
        msg = m.Value(3, 1, 0, 2, torch.randn(64, 64))
        got: list = []
        assert b.incoming("a", "a", _wire(a.outgoing("b", codec.encode_frame(msg).private())), got.append)
        _run_until(loop, lambda: got)
        out = codec.decode_frame(got[0])
        assert torch.equal(out.tensor, msg.tensor) and a.sent == 1 and b.received == 1 and not fails
        # b never posts its recv: a's send misses its deadline and fails step 4 on a, naming b.
        a.timeout = b.timeout = 0.5
        b.skip_recv = True
        late: list = []
        msg = m.Gradient(1, 4, 2, 0, "a", 1, 0, torch.randn(32))
        assert b.incoming("a", "a", _wire(a.outgoing("b", codec.encode_frame(msg).private())), late.append)
        _run_until(loop, lambda: fails and late)
        name, step, text = fails[0]
        assert (name, step) == ("a", 4) and "data plane" in text and "'b'" in text and "Gradient of step 4" in text
        with pytest.raises(E.DecodeError, match="needs 128 bytes, got 0"):
            codec.decode_frame(late[0])  # delivered without its tensor: the Host drops it, later frames flow
        assert "b" not in a._out  # the broken group is dropped; the next transfer makes a new one
    finally:
        a.close()
        b.close()
        loop.close()


def test_incoming_refuses_what_the_envelope_does_not_back():
    loop, a, b, _ = _pair(max_bytes=100)
    try:
        frame = codec.encode_frame(m.Value(3, 1, 0, 2, torch.randn(8))).private()  # 32 bytes
        empty = codec.Frame(frame.envelope, [b""], owned=True)
        full = _wire(dp.pack(["g", "gloo", "127.0.0.1", 1, [[0, 0]]], frame))  # the buffer is not empty
        assert not b.incoming("a", "a", full, lambda f: None)
        missing = _wire(dp.pack(["g", "gloo", "127.0.0.1", 1, [[1, 0]]], empty))  # no such buffer
        assert not b.incoming("a", "a", missing, lambda f: None)
        ack = codec.encode_frame(m.Ack(1, torch.randn(8))).private()  # not a peer message
        assert not b.incoming("a", "a", _wire(dp.pack(["g", "gloo", "h", 1, [[0, 0]]],
                                                      codec.Frame(ack.envelope, [b""], owned=True))), lambda f: None)
        big = codec.encode_frame(m.Value(3, 1, 0, 2, torch.randn(64))).private()  # 256 > max_bytes
        assert not b.incoming("a", "a", _wire(dp.pack(["g", "gloo", "h", 1, [[0, 0]]],
                                                      codec.Frame(big.envelope, [b""], owned=True))), lambda f: None)
    finally:
        a.close()
        b.close()
        loop.close()


def test_init_validates_data_plane_and_local_ignores_it():
    with pytest.raises(E.ConfigError, match="data_plane must be one of"):
        ag.init(backend="local", data_plane="tcp")
    ag.init(backend="local", data_plane="gloo")
    try:
        w = ag.spawn(nn.Linear(2, 2), name="lin")
        assert w(torch.ones(1, 2)).value().shape == (1, 2)
    finally:
        ag.shutdown()


# --- on Ray, with gloo --------------------------------------------------------------------


def test_two_stage_chain_trains_exactly_over_gloo(gloo):
    ws, refs, _ = _chain()
    _close(ws, refs)
    # Activations enc -> head and gradients head -> enc went over gloo (but the first message to a peer,
    # sent while its address is still being looked up, which takes the channel).
    sent, _, groups = _dataplane_counts(ws[0])
    back, received, _ = _dataplane_counts(ws[1])
    assert sent >= STEPS - 1 and received >= STEPS - 1 and back >= STEPS - 1 and groups >= 1


def test_fan_in_trains_exactly_over_gloo(gloo):
    torch.manual_seed(0)
    mods = [nn.Linear(D, D), nn.Linear(D, D), Mix2(D), nn.Linear(D, 1)]
    refs = copy.deepcopy(mods)
    a = ag.spawn(mods[0], name="a", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    b = ag.spawn(mods[1], name="b", optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
    mix = ag.spawn(mods[2], name="mix", optimizer=ag.Optim(torch.optim.SGD, lr=0.05, momentum=0.9))
    head = ag.spawn(mods[3], name="head", optimizer=ag.Optim(torch.optim.Adam, lr=0.02))
    mse = ag.spawn(nn.MSELoss(), name="mse")
    opts = [torch.optim.SGD(refs[0].parameters(), lr=0.1), torch.optim.Adam(refs[1].parameters(), lr=0.01),
            torch.optim.SGD(refs[2].parameters(), lr=0.05, momentum=0.9),
            torch.optim.Adam(refs[3].parameters(), lr=0.02)]
    for s in range(1, STEPS + 1):
        x, y = batch(s)
        h = a(x)
        mse(head(mix(h, b(h))), y).backward()  # fan-out of h, fan-in at mix
        ag.step()
        r = refs[0](x)
        nn.functional.mse_loss(refs[3](refs[2](r, refs[1](r))), y).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    _close([a, b, mix, head], refs)
    assert _dataplane_counts(mix)[1] >= 2 * (STEPS - 1)  # both inputs of (nearly) every step came over gloo


def test_channel_and_gloo_give_identical_parameters(ray_session, monkeypatch):
    monkeypatch.setenv("ACTORGRAD_DATA_PLANE_MIN_BYTES", "1")
    ray_session()
    got = {}
    for mode in ("channel", "gloo"):
        ag.init(backend="ray", timeout=60, data_plane=mode)
        try:
            ws, _, _ = _chain()
            got[mode] = [w.state_dict() for w in ws]
            assert (_dataplane_counts(ws[0])[0] > 0) == (mode == "gloo")
        finally:
            ag.shutdown()
    for a, b in zip(got["channel"], got["gloo"]):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k  # bit for bit: the same bytes, another road


def test_a_receiver_that_never_posts_its_recv_fails_the_step_by_name(ray_session, monkeypatch):
    monkeypatch.setenv("ACTORGRAD_DATA_PLANE_MIN_BYTES", "1")
    ray_session()
    ag.init(backend="ray", timeout=4, data_plane="gloo")
    try:
        ws, _, mse = _chain(steps=2)  # groups are up
        _set(ws[1], skip_recv=True)
        x, y = batch(9)
        t0 = time.monotonic()
        with pytest.raises(E.ActorgradError) as info:
            mse(ws[1](ws[0](x)), y).backward()
            ag.step()
        assert time.monotonic() - t0 < 30  # a deadline, not a hang
        err = info.value
        assert err.step == 3 and err.worker in ("enc", "head")
        assert "data plane" in str(err) and "'head'" in str(err), str(err)
        # The pair makes a new group and the runtime goes on.
        _set(ws[1], skip_recv=False)
        time.sleep(0.5)
        mse(ws[1](ws[0](x)), y).backward()
        assert ag.step().step == 4
    finally:
        ag.shutdown()


def test_sender_deadline_names_worker_and_step(ray_session, monkeypatch):
    """The sender's own deadline (its receive never posted) fails the step with a data-plane error."""
    monkeypatch.setenv("ACTORGRAD_DATA_PLANE_MIN_BYTES", "1")
    ray_session()
    ag.init(backend="ray", timeout=60, data_plane="gloo")
    try:
        ws, _, mse = _chain(steps=2)
        _set(ws[1], skip_recv=True, timeout=30.0)
        _set(ws[0], timeout=1.0)
        x, y = batch(9)
        t0 = time.monotonic()
        with pytest.raises(E.StepAborted) as info:
            mse(ws[1](ws[0](x)), y).backward()
            ag.step()
        assert time.monotonic() - t0 < 20  # the sender's 1 s, not the receiver's or the caller's deadline
        text = str(info.value)
        assert info.value.worker == "enc" and info.value.step == 3
        assert "data plane" in text and "send" in text and "'head'" in text and "step 3" in text, text
    finally:
        ag.shutdown()


@pytest.fixture
def recovering_gloo(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTORGRAD_DATA_PLANE_MIN_BYTES", "1")
    ray_session()
    ag.init(backend="ray", timeout=60, recover=True, checkpoint_every=2, checkpoint_dir=str(tmp_path / "ckpt"),
            data_plane="gloo")
    yield
    ag.shutdown()


def test_recovery_after_a_kill_with_gloo_on(recovering_gloo):
    torch.manual_seed(0)
    mods = [nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 1)]
    refs = copy.deepcopy(mods)
    ws = [ag.spawn(mod, name=n, optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
          for n, mod in zip(("enc", "mid", "head"), mods)]
    act = ag.spawn(nn.Tanh(), name="act")
    mse = ag.spawn(nn.MSELoss(), name="mse")
    opts = [torch.optim.Adam(r.parameters(), lr=0.01) for r in refs]
    steps = 6
    for s in range(1, steps + 1):
        x, y = batch(s)
        nn.functional.mse_loss(refs[2](torch.tanh(refs[1](refs[0](x)))), y).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    killed = []

    def fn(s: int) -> None:
        if s == 4 and not killed:
            kill_worker(ws[1].actor, no_restart=False)  # Ray restarts it; groups are made anew
            killed.append(s)
        x, y = batch(s)
        mse(ws[2](act(ws[1](ws[0](x)))), y).backward()

    reports = ag.train(fn, steps)
    assert killed == [4] and [r.step for r in reports] == list(range(1, steps + 1))
    _close(ws, refs)
    assert _dataplane_counts(ws[1])[1] > 0  # the restarted process received over gloo


# --- GPU (skipped without CUDA) -----------------------------------------------------------


@cuda
def test_cuda_workers_train_exactly_over_nccl(ray_session, monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL point-to-point between two processes needs two GPUs here")
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setenv("ACTORGRAD_DATA_PLANE_MIN_BYTES", "1")
    ray_session()
    ag.init(backend="ray", timeout=60, data_plane="nccl")
    try:
        torch.manual_seed(0)
        mods = [nn.Linear(D, D), nn.Linear(D, 1)]
        refs = [copy.deepcopy(mod).double() for mod in mods]
        ws = [ag.spawn(copy.deepcopy(mod), name=f"g{i}", device="cuda", num_gpus=1,
                       optimizer=ag.Optim(torch.optim.SGD, lr=0.1)) for i, mod in enumerate(mods)]
        mse = ag.spawn(nn.MSELoss(), name="mse")
        opts = [torch.optim.SGD(r.parameters(), lr=0.1) for r in refs]
        for s in range(1, STEPS + 1):
            x, y = batch(s)
            mse(ws[1](ws[0](x)), y).backward()
            ag.step()
            nn.functional.mse_loss(refs[1](refs[0](x.double())), y.double()).backward()
            for o in opts:
                o.step()
                o.zero_grad()
        for w, r in zip(ws, refs):
            for k, v in r.state_dict().items():
                torch.testing.assert_close(w.state_dict()[k].double(), v, atol=1e-5, rtol=1e-4)
        assert _dataplane_counts(ws[0])[0] >= STEPS
    finally:
        ag.shutdown()


# --- the benchmark and the GPU check ------------------------------------------------------


def test_bench_dataplane_runs_end_to_end_in_a_tiny_size(tmp_path):
    out = tmp_path / "dataplane.md"
    run_bench_module("bench.dataplane", out)
    table = out.read_text()
    for row in ("data_plane='channel'", "data_plane='gloo'", "data_plane='auto'", "| 8 KiB |", "gloo / channel"):
        assert row in table, row


def test_gpu_check_skips_cleanly_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run `make gpu-check`")
    from bench import gpu_check

    assert gpu_check.main([]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out
