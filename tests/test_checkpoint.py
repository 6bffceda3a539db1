"""ag.save / ag.load: exact resume (Adam moments included), atomic writes, clear errors."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch

import actorgrad as ag
from actorgrad import errors as E
from actorgrad.checkpoint import read_meta


def build(seed=0):
    torch.manual_seed(seed)
    enc = ag.spawn(torch.nn.Linear(4, 6), name="enc", optimizer=ag.Optim(torch.optim.Adam, lr=0.01))
    act = ag.spawn(torch.nn.Tanh(), name="act")
    head = ag.spawn(torch.nn.Linear(6, 1), name="head", optimizer=ag.Optim(torch.optim.SGD, lr=0.05, momentum=0.9))
    mse = ag.spawn(torch.nn.MSELoss(), name="mse")
    return enc, act, head, mse


def train(workers, steps, seed):
    enc, act, head, mse = workers
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
        mse(head(act(enc(x))), y).backward()
        ag.step()


def params(workers):
    return {w.name: w.state_dict() for w in workers}


def test_resume_equals_uninterrupted_run(backend, tmp_path):
    workers = build()
    train(workers, 3, seed=1)
    ag.save(str(tmp_path / "ckpt"))
    train(workers, 3, seed=2)
    expected = params(workers)

    ag.shutdown()
    ag.init(backend=backend)
    workers = build(seed=123)  # different initial weights: everything must come from the checkpoint
    ag.load(str(tmp_path / "ckpt"))
    train(workers, 3, seed=2)
    got = params(workers)
    for name in expected:
        for k in expected[name]:
            torch.testing.assert_close(got[name][k], expected[name][k], atol=1e-6, rtol=1e-6)
    report = ag.step()
    assert report.step == 7  # the step counter came back too


def test_save_refuses_an_open_step(backend, tmp_path):
    enc, act, head, mse = build()
    out = enc(torch.randn(2, 4))
    with pytest.raises(E.CheckpointError) as info:
        ag.save(str(tmp_path / "ckpt"))
    assert "ag.step()" in str(info.value)
    assert out is not None
    ag.step()
    ag.save(str(tmp_path / "ckpt"))
    assert read_meta(str(tmp_path / "ckpt"))["step"] == 1


def test_overwrite_is_atomic_and_leaves_no_temporary_files(backend, tmp_path):
    workers = build()
    path = str(tmp_path / "ckpt")
    ag.save(path)
    first = (tmp_path / "ckpt" / "LATEST").read_text().strip()
    train(workers, 1, seed=3)
    ag.save(path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    current = (tmp_path / "ckpt" / "LATEST").read_text().strip()
    assert current != first  # a new version, and the old one is gone
    assert sorted(os.listdir(path)) == sorted([".lock", "LATEST", current])
    assert sorted(os.listdir(os.path.join(path, current))) == ["0.pt", "1.pt", "2.pt", "3.pt", "meta.msgpack"]


def test_tampered_truncated_and_mismatched_checkpoints_raise_checkpoint_errors(backend, tmp_path):
    workers = build()
    path = tmp_path / "ckpt"
    ag.save(str(path))
    files = sorted(w["file"] for w in read_meta(str(path))["workers"])  # relative to path
    version = (path / "LATEST").read_text().strip()

    bad = tmp_path / "tampered"
    import shutil

    shutil.copytree(path, bad)
    data = bytearray((bad / files[0]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / files[0]).write_bytes(bytes(data))
    with pytest.raises(E.CheckpointError) as info:
        ag.load(str(bad))
    assert "checksum" in str(info.value) and info.value.worker is not None

    cut = tmp_path / "truncated"
    shutil.copytree(path, cut)
    meta = (cut / version / "meta.msgpack").read_bytes()
    (cut / version / "meta.msgpack").write_bytes(meta[: len(meta) // 2])
    with pytest.raises(E.CheckpointError):
        ag.load(str(cut))

    with pytest.raises(E.CheckpointError):
        ag.load(str(tmp_path / "nowhere"))

    ag.spawn(torch.nn.Linear(2, 2), name="extra", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    with pytest.raises(E.CheckpointError) as info:
        ag.load(str(path))
    assert info.value.worker == "extra"
    train(workers, 1, seed=4)  # still usable


def test_checkpoint_of_wrong_shapes_names_the_worker(backend, tmp_path):
    enc = ag.spawn(torch.nn.Linear(4, 6), name="enc", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    ag.save(str(tmp_path / "ckpt"))
    ag.shutdown()
    ag.init(backend=backend)
    ag.spawn(torch.nn.Linear(4, 5), name="enc", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    with pytest.raises(E.CheckpointError) as info:
        ag.load(str(tmp_path / "ckpt"))
    assert info.value.worker == "enc" and "size mismatch" in str(info.value)
    assert enc is not None


# The options the loader requires to match (checkpoint._MUST_MATCH): the checkpoint's "enc" (see
# build()) has update="step", max_staleness=0 and Adam; the new "enc" differs in one of them.
OTHER_OPTIONS = [
    pytest.param({"update": "pass"}, "update='step'", "update='pass'", id="update"),
    pytest.param({"max_staleness": 1}, "max_staleness=0", "max_staleness=1", id="max_staleness"),
    pytest.param({"optimizer": ag.Optim(torch.optim.SGD, lr=0.01)}, "optimizer='Adam'", "optimizer='SGD'",
                 id="optimizer"),
]


@pytest.mark.parametrize("changed, saved_text, running_text", OTHER_OPTIONS)
def test_checkpoint_of_other_options_names_the_option(backend, tmp_path, changed, saved_text, running_text):
    workers = build()
    train(workers, 1, seed=1)
    ag.save(str(tmp_path / "ckpt"))
    saved = params(workers)
    ag.shutdown()
    ag.init(backend=backend)
    torch.manual_seed(7)  # other weights than the checkpoint's, so that a partial load would show
    enc_opts = {"optimizer": ag.Optim(torch.optim.Adam, lr=0.01), **changed}
    workers = (
        ag.spawn(torch.nn.Linear(4, 6), name="enc", **enc_opts),
        ag.spawn(torch.nn.Tanh(), name="act"),
        ag.spawn(torch.nn.Linear(6, 1), name="head", optimizer=ag.Optim(torch.optim.SGD, lr=0.05, momentum=0.9)),
        ag.spawn(torch.nn.MSELoss(), name="mse"),
    )
    before = params(workers)
    for name in ("enc", "head"):
        assert not torch.equal(before[name]["weight"], saved[name]["weight"])
    message = f"the checkpoint was taken with {saved_text} for this worker, but it runs with {running_text}"
    with pytest.raises(E.CheckpointError, match=re.escape(message)) as info:
        ag.load(str(tmp_path / "ckpt"))
    assert info.value.worker == "enc"
    after = params(workers)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys()
        for k in before[name]:
            assert torch.equal(after[name][k], before[name][k]), (name, k)


def test_stale_pipeline_resumes_exactly(backend, tmp_path):
    """max_staleness=1: the checkpoint carries the stale weight snapshots, so a resumed pipelined
    run uses the same old weights as the uninterrupted one."""

    def spawn_stale(seed):
        torch.manual_seed(seed)
        enc = ag.spawn(torch.nn.Linear(4, 6), name="enc", optimizer=ag.Optim(torch.optim.SGD, lr=0.1),
                       max_staleness=1)
        head = ag.spawn(torch.nn.Linear(6, 1), name="head", optimizer=ag.Optim(torch.optim.SGD, lr=0.1),
                        max_staleness=1)
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")
        return enc, head, mse

    def run(workers, steps, seed):
        enc, head, mse = workers
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
            mse(head(enc(x)), y).backward()
            ag.step(wait=False)

    workers = spawn_stale(0)
    run(workers, 4, seed=1)
    ag.save(str(tmp_path / "ckpt"))  # waits for the steps in flight; the next forward uses step 3's weights
    run(workers, 4, seed=2)
    ag.step()  # drain
    expected = {w.name: w.state_dict() for w in workers}

    ag.shutdown()
    ag.init(backend=backend)
    workers = spawn_stale(7)
    ag.load(str(tmp_path / "ckpt"))
    run(workers, 4, seed=2)
    ag.step()
    for w in workers:
        for k, v in w.state_dict().items():
            torch.testing.assert_close(v, expected[w.name][k], atol=1e-6, rtol=1e-6)


def test_rewind_in_the_same_process_equals_a_run_restarted_from_the_checkpoint(backend, tmp_path):
    workers = build()
    train(workers, 2, seed=1)
    path = str(tmp_path / "ckpt")
    ag.save(path)
    saved = params(workers)
    train(workers, 3, seed=2)  # steps that the rewind throws away
    half = workers[0](torch.randn(8, 4))  # and a step left open, with a call in flight
    ag.load(path)
    assert {n: {k: v for k, v in sd.items()} for n, sd in params(workers).items()}.keys() == saved.keys()
    for name, sd in params(workers).items():
        for k, v in sd.items():
            torch.testing.assert_close(v, saved[name][k], atol=0, rtol=0)
    with pytest.raises(E.ActorgradError):  # the open step was abandoned by the rewind
        half.value(timeout=30)
    train(workers, 3, seed=3)
    rewound = params(workers)
    assert ag.step().step == 6  # the counter went back to the checkpoint's step (2) and on

    # The same from a fresh runtime restored from the same state: the oracle for the rewind.
    ag.shutdown()
    ag.init(backend=backend)
    again = build(seed=99)
    ag.load(path)
    train(again, 3, seed=3)
    for name, sd in params(again).items():
        for k, v in sd.items():
            torch.testing.assert_close(rewound[name][k], v, atol=1e-6, rtol=1e-6)


def test_load_twice_and_after_a_refused_checkpoint_training_goes_on(backend, tmp_path):
    workers = build()
    train(workers, 2, seed=1)
    good = str(tmp_path / "good")
    ag.save(good)
    bad = tmp_path / "bad"
    ag.save(str(bad))
    version = (bad / "LATEST").read_text().strip()
    (bad / version / "0.pt").write_bytes(b"corrupt")
    for _ in range(2):
        ag.load(good)
        train(workers, 2, seed=4)
    with pytest.raises(E.CheckpointError):
        ag.load(str(bad))
    train(workers, 1, seed=5)  # a refused load changes nothing: the runtime goes on
    ag.load(good)
    train(workers, 2, seed=4)
    ag.step()
