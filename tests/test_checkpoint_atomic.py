"""Crash-proof checkpoints: fault injection at every step of ag.save, real crashes (os._exit) at
every step of the format layer, reader/writer races, concurrent savers, a full disk, a read-only
directory, symbolic links and file permissions."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import actorgrad as ag
from actorgrad import checkpoint as ck
from actorgrad import errors as E
from test_checkpoint import build, train

log = logging.getLogger("test_checkpoint_atomic")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Every os function the format layer calls that touches the disk (reads too: a crash can come anywhere).
OS_OPS = {"open", "write", "read", "pread", "fsync", "close", "replace", "rename", "mkdir", "chmod", "fchmod",
          "unlink", "rmdir", "scandir", "lseek", "dup"}


class Crash(Exception):
    """Stands for the process dying: raised at the k-th operation and, in crash mode, at every later one."""


class Injector:
    """Counts the format layer's disk operations and fails the k-th one."""

    def __init__(self, fail_at: int, mode: str, exc_factory=None) -> None:
        self.fail_at = fail_at
        self.mode = mode  # "error": only the k-th operation fails; "crash": it and everything after it
        self.count = 0
        self.fired = None  # the operation that failed
        self.exc_factory = exc_factory or (lambda op: OSError(errno.EIO, f"injected I/O error in {op}"))

    def hit(self, op: str) -> None:
        self.count += 1
        if self.fired is not None and self.mode == "crash":
            raise Crash(f"after {self.fired}")
        if self.count == self.fail_at:
            self.fired = f"{op} (#{self.count})"
            raise Crash(self.fired) if self.mode == "crash" else self.exc_factory(op)


class Proxy:
    """A module stand-in whose named functions call the injector first."""

    def __init__(self, real, names, injector) -> None:
        self._real, self._names, self._inj = real, names, injector

    def __getattr__(self, attr):
        value = getattr(self._real, attr)
        if attr not in self._names:
            return value

        def wrapped(*args, **kwargs):
            try:
                self._inj.hit(attr)
            except Exception:
                # Linux frees the descriptor even when close fails, and a dying process's files are
                # closed by the kernel (its flock released): the close happens whatever the fault.
                if attr == "close":
                    value(*args, **kwargs)
                raise
            return value(*args, **kwargs)

        return wrapped


def inject(monkeypatch, injector: Injector) -> None:
    """Route every os call and torch.save of actorgrad.checkpoint through the injector."""
    monkeypatch.setattr(ck, "os", Proxy(os, OS_OPS, injector))
    monkeypatch.setattr(ck, "torch", Proxy(torch, {"save"}, injector))


def same(a, b) -> bool:
    """Deep equality of saved states (tensors compared exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def listing(path) -> list[str]:
    return sorted(os.listdir(path))


def pointer(path) -> str:
    with open(os.path.join(path, "LATEST")) as f:
        return f.read().strip()


def to_legacy(src: str, dst: str) -> None:
    """Turn a checkpoint into the old format (meta.msgpack and the files directly in the directory)."""
    os.makedirs(dst)
    vdir = os.path.join(src, pointer(src))
    for name in os.listdir(vdir):
        shutil.copy2(os.path.join(vdir, name), os.path.join(dst, name))


# --- fault injection at every step of ag.save ----------------------------------------------------


@pytest.mark.parametrize("layout, mode", [("new", "crash"), ("new", "error"), ("legacy", "crash"), ("none", "crash")])
def test_fault_at_every_step_of_save_leaves_a_valid_checkpoint(local, tmp_path, monkeypatch, layout, mode):
    """Fail the k-th disk operation of ag.save for every k until a save completes: the path always
    holds the old or the new checkpoint, complete, loadable and equal to one of the two."""
    workers = build()
    train(workers, 2, seed=1)
    template = str(tmp_path / "template")
    ag.save(template)
    _, old = ck.read_checkpoint(template)
    if layout == "legacy":
        to_legacy(template, str(tmp_path / "legacy"))
        template = str(tmp_path / "legacy")
        assert "meta.msgpack" in listing(template) and "LATEST" not in listing(template)
        assert same(ck.read_checkpoint(template)[1], old)
    train(workers, 1, seed=2)
    ref = str(tmp_path / "ref")
    ag.save(ref)
    _, new = ck.read_checkpoint(ref)
    assert not same(new, old)

    outcomes = {"old": 0, "new": 0, "none": 0}
    k = 0
    while True:
        k += 1
        path = str(tmp_path / f"k{k}")
        if layout != "none":
            shutil.copytree(template, path)
        injector = Injector(k, mode)
        with monkeypatch.context() as m:
            inject(m, injector)
            try:
                ag.save(path)
                raised = None
            except Crash as exc:
                raised = exc
            except E.CheckpointError as exc:  # error mode; in crash mode too when torch.save "crashed"
                raised = exc
            # Any other exception (a raw OSError, FileNotFoundError, RuntimeError) fails the test.
        if injector.fired is None:
            assert raised is None
            break
        try:
            _, got = ck.read_checkpoint(path)
        except E.CheckpointError as exc:
            assert layout == "none", f"crash at {injector.fired} lost the checkpoint: {exc}"
            outcomes["none"] += 1
        else:
            which = "old" if same(got, old) else "new" if same(got, new) else None
            assert which is not None, f"crash at {injector.fired} left a checkpoint equal to neither state"
            assert layout != "none" or which == "new"
            outcomes[which] += 1
            ag.load(path)  # loadable by the runtime, not only readable
            ag.load(ref)  # back to the new weights for the next round; a load counts as an update
            ag.save(ref)  # (it bumps the weight version), so "new" is taken again
            _, new = ck.read_checkpoint(ref)
        if mode == "error" and isinstance(raised, E.CheckpointError) and layout == "new":
            # A failed save cleans up after itself: nothing but the old version and the lock stay.
            names = listing(path)
            assert not [n for n in names if n.startswith(".LATEST.tmp")], names
            if pointer(path) == pointer(template):
                assert names == sorted(set(listing(template)) | {".lock"}), (injector.fired, names)
        # The next save after a crash succeeds and removes whatever the crash left.
        ag.save(path)
        assert same(ck.read_checkpoint(path)[1], new)
        assert listing(path) == sorted([".lock", "LATEST", pointer(path)]), (injector.fired, listing(path))
    points = k - 1
    log.info("ag.save %s/%s: %d crash points injected, outcomes %s, 0 checkpoints lost", layout, mode, points,
             outcomes)
    assert points >= 20, points  # every file's open, writes, fsync, close, the pointer, the clean-up
    if layout != "none":
        assert outcomes["old"] > 0 and outcomes["new"] > 0  # the injection spans the switch to the new version


CRASH_SCRIPT = textwrap.dedent(r"""
    import json, os, shutil, sys
    import torch
    from actorgrad import checkpoint as ck
    from actorgrad import errors as E

    root = sys.argv[1]
    OPS = set(sys.argv[2].split(","))

    def entries(value):
        return [(f"w{i}", "torch.nn.Linear", {"update": "step"},
                 {"module": {"weight": torch.full((64, 32), float(value + i))}, "version": value}) for i in range(3)]

    def equals(states, value):
        want = {name: state for name, _, _, state in entries(value)}
        return states.keys() == want.keys() and all(
            torch.equal(states[n]["module"]["weight"], want[n]["module"]["weight"])
            and states[n]["version"] == want[n]["version"] for n in want)

    class Proxy:
        def __init__(self, real, names, hit):
            self.real, self.names, self.hit = real, names, hit
        def __getattr__(self, attr):
            value = getattr(self.real, attr)
            if attr not in self.names:
                return value
            def wrapped(*a, **kw):
                self.hit()
                return value(*a, **kw)
            return wrapped

    template = os.path.join(root, "template")
    ck.write_checkpoint(template, 1, entries(1))
    legacy = os.path.join(root, "legacy")
    os.makedirs(legacy)
    vdir = os.path.join(template, open(os.path.join(template, "LATEST")).read().strip())
    for name in os.listdir(vdir):
        shutil.copy2(os.path.join(vdir, name), os.path.join(legacy, name))

    report = {}
    for layout, src in (("new", template), ("legacy", legacy), ("none", None)):
        counts = {"points": 0, "old": 0, "new": 0, "none": 0, "lost": 0, "wrong": 0, "dirty": 0}
        k = 0
        while True:
            k += 1
            path = os.path.join(root, f"{layout}-{k}")
            if src is not None:
                shutil.copytree(src, path)
            pid = os.fork()
            if pid == 0:
                n = [0]
                def hit():
                    n[0] += 1
                    if n[0] == k:
                        os._exit(77)  # a real crash: no except, no finally, no clean-up
                ck.os = Proxy(os, OPS, hit)
                ck.torch = Proxy(torch, {"save"}, hit)
                ck.write_checkpoint(path, 2, entries(2))
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            assert code in (0, 77), code
            try:
                _, states = ck.read_checkpoint(path)
                which = "old" if equals(states, 1) else "new" if equals(states, 2) else "wrong"
            except E.CheckpointError:
                which = "none" if src is None else "lost"
            counts[which] += 1
            # The next save after the crash works and leaves nothing of the crash behind.
            ck.write_checkpoint(path, 3, entries(3))
            _, states = ck.read_checkpoint(path)
            ok = equals(states, 3) and sorted(os.listdir(path)) == sorted(
                [".lock", "LATEST", open(os.path.join(path, "LATEST")).read().strip()])
            counts["dirty"] += not ok
            shutil.rmtree(path)
            if code == 0:
                break
            counts["points"] += 1
        report[layout] = counts
    print(json.dumps(report))
""")


def test_real_crash_at_every_step_of_write_checkpoint(tmp_path):
    """A process that dies (os._exit, no clean-up) before any disk operation of write_checkpoint,
    for every operation in turn: the checkpoint is always the old or the new one, never lost."""
    ops = ",".join(sorted(OS_OPS))
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), ops], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("real crashes in write_checkpoint: %s", report)
    for layout, counts in report.items():
        assert counts["points"] >= 20, (layout, counts)
        assert counts["lost"] == 0 and counts["wrong"] == 0 and counts["dirty"] == 0, (layout, counts)
        if layout != "none":
            assert counts["old"] > 0 and counts["new"] > 0, (layout, counts)
            assert counts["none"] == 0


# --- readers and writers at the same time ----------------------------------------------------------


def entries(value, n=3, size=(128, 64)):
    """Worker entries whose every tensor holds ``value``: a reader can tell a mix of two saves."""
    return [(f"w{i}", "torch.nn.Linear", {"update": "step"},
             {"module": {"weight": torch.full(size, float(value))}, "version": value}) for i in range(n)]


def consistent(meta, states) -> bool:
    """Every file of what a reader got belongs to the save its metadata names."""
    value = meta["step"]
    return len(states) == 3 and all(
        s["version"] == value and bool((s["module"]["weight"] == value).all()) for s in states.values())


def test_reader_never_sees_a_missing_or_mixed_checkpoint_while_a_writer_saves(tmp_path):
    path = str(tmp_path / "ckpt")
    ck.write_checkpoint(path, 0, entries(0))
    stop = threading.Event()
    saves, writer_errors = [0], []

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                ck.write_checkpoint(path, i, entries(i))
                saves[0] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                writer_errors.append(repr(exc))

    t = threading.Thread(target=writer)
    t.start()
    failures, mixed, seen, loads = [], 0, set(), 0
    try:
        # At least 200 loads, and on until the writer has replaced the checkpoint 10 times under the
        # reader (a count of events, not of time: a loaded machine only makes it take longer).
        while loads < 200 or len(seen) < 10:
            loads += 1
            try:
                meta, states = ck.read_checkpoint(path)
            except Exception as exc:  # noqa: BLE001 - a failed load is what this test counts
                failures.append(repr(exc))
                continue
            mixed += not consistent(meta, states)
            seen.add(meta["step"])
    finally:
        stop.set()
        t.join()
    log.info("reader/writer race (threads): %d loads, %d failed, %d mixed, %d saves, %d versions seen",
             loads, len(failures), mixed, saves[0], len(seen))
    assert failures == [] and mixed == 0 and writer_errors == []
    assert saves[0] >= 10 and len(seen) >= 10  # the writer really replaced the checkpoint under the reader


WRITER_SCRIPT = textwrap.dedent(r"""
    import os, sys, torch
    import actorgrad as ag
    path, stop = sys.argv[1], sys.argv[2]
    ag.init(backend="local")
    a = ag.spawn(torch.nn.Linear(64, 64), name="a", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    b = ag.spawn(torch.nn.Linear(64, 64), name="b", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    i = 0
    while not os.path.exists(stop):
        i += 1
        for w in (a, b):
            w.load_state_dict({"weight": torch.full((64, 64), float(i)), "bias": torch.full((64,), float(i))})
        ag.save(path)
        print(i, flush=True)
    ag.shutdown()
""")


def test_ag_load_in_one_process_while_ag_save_runs_in_another(local, tmp_path):
    path = str(tmp_path / "ckpt")
    stop = str(tmp_path / "stop")
    a = ag.spawn(torch.nn.Linear(64, 64), name="a", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    b = ag.spawn(torch.nn.Linear(64, 64), name="b", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, path, stop], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(path, "LATEST")):  # the writer's first save
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        failures, mixed, seen, loads = [], 0, set(), 0
        while loads < 200 or len(seen) < 5:  # on until the loads really raced 5 saves (events, not time)
            loads += 1
            try:
                ag.load(path)
            except Exception as exc:  # noqa: BLE001 - a failed load is what this test counts
                failures.append(repr(exc))
                continue
            wa, wb = a.state_dict(), b.state_dict()
            value = wa["weight"][0, 0].item()
            mixed += not all(bool((t == value).all()) for t in (*wa.values(), *wb.values()))
            seen.add(value)
    finally:
        open(stop, "w").close()
        out, err = proc.communicate(timeout=120)
    saves = len(out.split())
    log.info("reader/writer race (processes, ag.save/ag.load): %d loads, %d failed, %d mixed, %d saves, "
             "%d versions seen", loads, len(failures), mixed, saves, len(seen))
    assert proc.returncode == 0, err[-3000:]
    assert failures == [] and mixed == 0
    assert len(seen) >= 5  # the loads really raced the saves


# --- concurrent savers ---------------------------------------------------------------------------


def test_concurrent_savers_in_threads_are_serialized(tmp_path):
    path = str(tmp_path / "ckpt")
    errors, done = [], []

    def saver(base):
        for i in range(15):
            try:
                ck.write_checkpoint(path, base + i, entries(base + i))
                done.append(base + i)
            except Exception as exc:  # noqa: BLE001 - any exception fails the test below
                errors.append(repr(exc))

    threads = [threading.Thread(target=saver, args=(b,)) for b in (100, 200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(done) == 30
    meta, states = ck.read_checkpoint(path)
    assert consistent(meta, states) and meta["step"] in done
    assert listing(path) == sorted([".lock", "LATEST", pointer(path)])


SAVER_SCRIPT = textwrap.dedent(r"""
    import sys, torch
    from actorgrad import checkpoint as ck
    path, base = sys.argv[1], int(sys.argv[2])
    for i in range(base, base + 15):
        ck.write_checkpoint(path, i, [(f"w{j}", "torch.nn.Linear", {"update": "step"},
                                       {"module": {"weight": torch.full((128, 64), float(i))}, "version": i})
                                      for j in range(3)])
""")


def test_concurrent_savers_in_processes_are_serialized(tmp_path):
    path = str(tmp_path / "ckpt")
    procs = [subprocess.Popen([sys.executable, "-c", SAVER_SCRIPT, path, str(base)], stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for base in (100, 200)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code == 0, err[-3000:]  # a raw FileNotFoundError (the old two-rename scheme) would show here
    meta, states = ck.read_checkpoint(path)
    assert consistent(meta, states) and meta["step"] in (114, 214)
    assert listing(path) == sorted([".lock", "LATEST", pointer(path)])


def test_a_saver_that_cannot_get_the_lock_in_time_gets_a_checkpoint_error(tmp_path):
    import fcntl

    path = str(tmp_path / "ckpt")
    ck.write_checkpoint(path, 1, entries(1))
    fd = os.open(os.path.join(path, ".lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another saver holds the lock
        with pytest.raises(E.CheckpointError, match="another saver"):
            ck.write_checkpoint(path, 2, entries(2), lock_timeout=0.2)
    finally:
        os.close(fd)
    assert consistent(*ck.read_checkpoint(path)) and ck.read_meta(path)["step"] == 1
    ck.write_checkpoint(path, 2, entries(2), lock_timeout=5)
    assert ck.read_meta(path)["step"] == 2


# --- disk full, read-only directory --------------------------------------------------------------


class FailingOS:
    """os for actorgrad.checkpoint, with one function raising an OSError (when ``when`` says so)."""

    def __init__(self, name, err, when=lambda *a, **kw: True) -> None:
        self.name, self.err, self.when = name, err, when

    def __getattr__(self, attr):
        value = getattr(os, attr)
        if attr != self.name:
            return value

        def failing(*args, **kwargs):
            if self.when(*args, **kwargs):
                raise OSError(self.err, os.strerror(self.err))
            return value(*args, **kwargs)

        return failing


def saved_and_untouched(path, old_listing, old_states):
    assert listing(path) == old_listing  # no temporary files, no half version
    assert same(ck.read_checkpoint(path)[1], old_states)


def test_disk_full_while_writing_raises_checkpoint_error_and_keeps_the_old_checkpoint(local, tmp_path, monkeypatch):
    workers = build()
    path = str(tmp_path / "ckpt")
    ag.save(path)
    before, old = listing(path), ck.read_checkpoint(path)[1]
    train(workers, 1, seed=3)
    monkeypatch.setattr(ck, "os", FailingOS("write", errno.ENOSPC))
    with pytest.raises(E.CheckpointError, match="no space left on device while writing the state of worker") as info:
        ag.save(path)
    assert info.value.worker == "act"  # the first worker in name order
    monkeypatch.undo()
    saved_and_untouched(path, before, old)
    ag.load(path)
    ag.save(path)  # and the next save works


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount rights; skipped where there are none)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_a_really_full_disk_raises_checkpoint_error_naming_no_space(local, tmp_path, tiny_fs):
    ag.spawn(torch.nn.Linear(16, 16), name="small", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    path = os.path.join(tiny_fs, "ckpt")
    ag.save(path)
    before, old = listing(path), ck.read_checkpoint(path)[1]
    ag.spawn(torch.nn.Linear(512, 512), name="big", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))  # 1 MiB of weights
    with pytest.raises(E.CheckpointError, match="no space left on device") as info:
        ag.save(path)
    assert info.value.worker == "big" and "unexpected pos" not in str(info.value)
    saved_and_untouched(path, before, old)
    assert listing(tiny_fs) == ["ckpt"]


@pytest.mark.parametrize("err, cause", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_read_only_directory_raises_checkpoint_error_naming_the_cause(local, tmp_path, monkeypatch, err, cause):
    build()
    path = str(tmp_path / "ckpt")
    ag.save(path)
    before, old = listing(path), ck.read_checkpoint(path)[1]
    # root ignores chmod, so the refusal comes from a patched os: creating anything fails.
    creating = lambda p, flags=0, *a, **kw: bool(flags & os.O_CREAT)  # noqa: E731
    monkeypatch.setattr(ck, "os", FailingOS("open", err, when=creating))
    with pytest.raises(E.CheckpointError, match=cause):
        ag.save(path)
    monkeypatch.setattr(ck, "os", FailingOS("mkdir", err))
    with pytest.raises(E.CheckpointError, match=f"{cause} while creating"):
        ag.save(str(tmp_path / "fresh"))
    with pytest.raises(E.CheckpointError, match=cause):
        ag.save(path)
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / "fresh")
    saved_and_untouched(path, before, old)


# --- symbolic links, permissions, foreign directories ----------------------------------------------


def _link_latest(path, tmp_path):
    target = tmp_path / "elsewhere"
    shutil.copy2(os.path.join(path, "LATEST"), target)
    os.unlink(os.path.join(path, "LATEST"))
    os.symlink(target, os.path.join(path, "LATEST"))


def _link_version(path, tmp_path):
    v = pointer(path)
    shutil.move(os.path.join(path, v), tmp_path / "moved")
    os.symlink(tmp_path / "moved", os.path.join(path, v))


def _link_file(name):
    def link(path, tmp_path):
        f = os.path.join(path, pointer(path), name)
        shutil.copy2(f, tmp_path / "copy")
        os.unlink(f)
        os.symlink(tmp_path / "copy", f)
    return link


def _link_legacy_meta(path, tmp_path):
    to_legacy(path, str(tmp_path / "legacy"))
    shutil.rmtree(path)
    shutil.move(str(tmp_path / "legacy"), path)
    _link_plain(os.path.join(path, "meta.msgpack"), tmp_path)


def _link_plain(f, tmp_path):
    shutil.copy2(f, tmp_path / "copy")
    os.unlink(f)
    os.symlink(tmp_path / "copy", f)


@pytest.mark.parametrize("make_link", [_link_latest, _link_version, _link_file("meta.msgpack"), _link_file("0.pt"),
                                       _link_legacy_meta],
                         ids=["LATEST", "version-dir", "meta", "worker-file", "legacy-meta"])
def test_symbolic_links_inside_a_checkpoint_are_refused(local, tmp_path, make_link):
    build()
    path = str(tmp_path / "ckpt")
    ag.save(path)
    make_link(path, tmp_path)
    with pytest.raises(E.CheckpointError, match="symbolic link"):
        ag.load(path)
    with pytest.raises(E.CheckpointError, match="symbolic link"):
        ck.verify(path)


def test_a_symbolic_link_as_lock_file_is_refused(tmp_path):
    path = str(tmp_path / "ckpt")
    ck.write_checkpoint(path, 1, entries(1))
    os.unlink(os.path.join(path, ".lock"))
    os.symlink(tmp_path / "victim", os.path.join(path, ".lock"))
    with pytest.raises(E.CheckpointError, match="symbolic link"):
        ck.write_checkpoint(path, 2, entries(2))
    assert not os.path.exists(tmp_path / "victim")


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_files_and_directories_are_private_whatever_the_umask(local, tmp_path, umask):
    build()
    path = str(tmp_path / "ckpt")
    old = os.umask(umask)
    try:
        ag.save(path)
        ag.save(path)  # the second save creates the pointer by rename and a second version
    finally:
        os.umask(old)
    modes = {}
    for dirpath, dirnames, filenames in os.walk(path):
        modes[dirpath] = stat.S_IMODE(os.stat(dirpath).st_mode)
        for f in filenames:
            modes[os.path.join(dirpath, f)] = stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode)
    assert len(modes) == 9  # path, version dir, LATEST, .lock, meta.msgpack, 4 workers
    for p, mode in modes.items():
        assert mode == (0o700 if os.path.isdir(p) else 0o600), (p, oct(mode))
    ag.load(path)


def test_saving_into_a_directory_that_is_not_a_checkpoint_is_refused(local, tmp_path):
    build()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(E.CheckpointError, match="not a checkpoint"):
        ag.save(str(tmp_path / "mine"))
    assert listing(tmp_path / "mine") == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(E.CheckpointError, match="not a directory"):
        ag.save(str(tmp_path / "file"))


def test_old_format_checkpoints_load_and_are_converted_in_place(local, tmp_path):
    workers = build()
    train(workers, 2, seed=1)
    new_format = str(tmp_path / "new")
    ag.save(new_format)
    _, saved = ck.read_checkpoint(new_format)
    legacy = str(tmp_path / "legacy")
    to_legacy(new_format, legacy)
    meta = ck.read_meta(legacy)
    assert meta["step"] == 2 and all("/" not in w["file"] for w in meta["workers"])
    train(workers, 1, seed=2)
    ag.load(legacy)
    assert same(ck.read_checkpoint(legacy)[1], saved)
    ag.save(legacy)  # converts: the pointer appears, then the old files go
    assert listing(legacy) == sorted([".lock", "LATEST", pointer(legacy)])
    converted = ck.read_checkpoint(legacy)[1]
    for state in (*converted.values(), *saved.values()):
        state.pop("version")  # a load counts as an update of the weights
    assert same(converted, saved)


# --- integrity and (optional) authenticity ---------------------------------------------------------


def _rewrite_with_valid_checksum(path):
    """Change a worker file and recompute its SHA-256 in the metadata: what anyone with write access can do."""
    import hashlib

    import msgpack

    vdir = os.path.join(path, pointer(path))
    meta = msgpack.unpackb(open(os.path.join(vdir, "meta.msgpack"), "rb").read(), raw=False)
    entry = next(w for w in meta["workers"] if w["name"] == "enc")
    state = torch.load(os.path.join(vdir, entry["file"]), weights_only=True)
    state["module"]["weight"] = state["module"]["weight"] + 1
    torch.save(state, os.path.join(vdir, entry["file"]))
    entry["sha256"] = hashlib.sha256(open(os.path.join(vdir, entry["file"]), "rb").read()).hexdigest()
    with open(os.path.join(vdir, "meta.msgpack"), "wb") as f:
        f.write(msgpack.packb(meta, use_bin_type=True))


def test_checksums_give_integrity_and_a_signing_key_gives_authenticity(local, tmp_path, monkeypatch):
    build()
    path = str(tmp_path / "ckpt")
    ag.save(path, key="secret")
    ag.load(path, key="secret")
    ag.load(path)  # no key: integrity is still checked, the signature is not needed
    with pytest.raises(E.CheckpointError, match="signature"):
        ag.load(path, key="other")
    _rewrite_with_valid_checksum(path)
    ck.verify(path)  # checksums alone cannot tell: integrity, not authenticity
    with pytest.raises(E.CheckpointError, match="signature"):
        ag.load(path, key="secret")

    unsigned = str(tmp_path / "unsigned")
    ag.save(unsigned)
    with pytest.raises(E.CheckpointError, match="not signed"):
        ag.load(unsigned, key="secret")
    monkeypatch.setenv(ck.KEY_ENV, "from-env")
    signed = str(tmp_path / "signed")
    ag.save(signed)
    ag.load(signed)
    monkeypatch.setenv(ck.KEY_ENV, "another")
    with pytest.raises(E.CheckpointError, match="signature"):
        ag.load(signed)


@pytest.mark.parametrize("layout", ["new", "legacy"])
def test_a_reader_whose_version_is_removed_under_it_follows_the_new_pointer(tmp_path, monkeypatch, layout):
    """Deterministic form of the race: a save moves the pointer and removes the version the reader
    just read the pointer of (or, for an old-format checkpoint, converts it) before the reader opens it."""
    path = str(tmp_path / "ckpt")
    ck.write_checkpoint(str(tmp_path / "first"), 1, entries(1))
    if layout == "new":
        shutil.copytree(tmp_path / "first", path)
    else:
        to_legacy(str(tmp_path / "first"), path)
    real, followed = ck._open_version, []

    def racing(path_, pfd, version, sign):
        if not followed:
            ck.write_checkpoint(path, 2, entries(2))  # removes what ``version`` names
        followed.append(version)
        return real(path_, pfd, version, sign)

    monkeypatch.setattr(ck, "_open_version", racing)
    meta, states = ck.read_checkpoint(path)
    assert meta["step"] == 2 and consistent(meta, states)
    assert len(followed) == 2 and followed[0] != followed[1]  # it followed the moved pointer
