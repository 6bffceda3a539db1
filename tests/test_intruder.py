"""An intruder on the wire: a process without the runtime's secret attacks every worker while training runs.

Every attempt must be refused before a frame is read (no reply, connection closed), no worker dies,
its memory stays bounded, and the training ends exactly equal to plain PyTorch.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import ray
import torch

import actorgrad as ag

pytestmark = pytest.mark.usefixtures("ray_session")

# Runs in a separate process: no Ray client, no secret; only the addresses the test hands it.
INTRUDER = r'''
import json, os, socket, struct, sys, time, msgpack

from actorgrad.core import codec
from actorgrad.core import messages as m

CHALLENGE = 5 + 32  # magic + nonce: what a server says before the client has proven anything


def connect(addr, tcp):
    if tcp:
        s = socket.create_connection((addr["host"], addr["port"]), timeout=20)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(addr["unix"])
    return s


def frame(sender, seq, token, data):
    env = msgpack.packb([0, sender, seq, token], use_bin_type=True)
    return struct.pack("!II", len(env), len(data)) + env + data


def nest(depth):
    inner = msgpack.packb(1)
    for _ in range(depth):
        inner = msgpack.packb(msgpack.ExtType(3, inner))
    return inner


def attempt(addr, tcp, payload):
    """Send payload on a fresh connection; 'refused' if the server closes having said only its challenge."""
    s = connect(addr, tcp)
    got = b""
    try:
        try:
            for part in payload():
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    except socket.timeout:
        return "open"  # the server kept a connection that never authenticated: a failure
    finally:
        s.close()
    return "refused" if len(got) <= CHALLENGE else f"answered {len(got)} bytes"


def hello(identity, mac=None):
    body = msgpack.packb([identity, os.urandom(32), mac or os.urandom(32)], use_bin_type=True)
    return struct.pack("!H", len(body)) + body


ATTACKS = {
    "read_state": lambda: [frame("caller", 0, 1, codec.encode(m.GetState(1, "full")))],
    "overwrite_state": lambda: [frame("caller", 0, 1, codec.encode(m.SetState(1, "module", {})))],
    "abort_far_future": lambda: [b"".join(frame("caller", i, None, codec.encode(m.Abort(10**6 + i, "x")))
                                          for i in range(1025))],
    "spoof_caller": lambda: [hello("caller"), frame("caller", 0, 1, codec.encode(m.GetState(1, "full")))],
    "spoof_worker": lambda: [hello("enc"), frame("enc", 0, None, b"\x93\x05\x01\x01")],
    "garbage": lambda: [os.urandom(1 << 16)],
    "length_2gib": lambda: [struct.pack("!II", 16, 2**31)],
    "hello_2gib": lambda: [b"\xff\xff" + os.urandom(64)],
    "nesting_bomb": lambda: [hello("caller"), frame("caller", 0, 1, nest(200))],
    "nesting_bomb_in_hello": lambda: [struct.pack("!H", 500) + nest(150)[:500]],
    "map_bomb": lambda: [hello("caller"), frame("caller", 0, 1, b"\xdd" + struct.pack("!I", 1 << 24)
                                               + b"\x80" * (1 << 24))],
}


def flood(addr, n):
    """Open n connections at once and hold them: how many does the server keep open?"""
    socks = []
    for _ in range(n):
        give_up = time.monotonic() + 2
        while True:
            try:
                socks.append(connect(addr, False))
                break
            except BlockingIOError:  # the listen backlog is full: the server has not accepted yet
                if time.monotonic() > give_up:
                    break
                time.sleep(0.001)
            except OSError:
                break
    time.sleep(0.5)
    kept = 0
    for s in socks:
        s.setblocking(False)
        try:
            kept += bool(s.recv(64))  # the challenge came: the server keeps it open for a handshake
        except OSError:  # not accepted yet, or refused at once
            pass
    for s in socks:
        s.close()
    return {"opened": len(socks), "kept": kept}


def as_nobody(addr):
    """Another user may not even open the Unix socket."""
    if os.getuid() != 0:
        return "skipped"
    pid = os.fork()
    if pid == 0:
        os.setgid(65534)
        os.setuid(65534)
        try:
            connect(addr, False).close()
            os._exit(1)
        except PermissionError:
            os._exit(0)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return {0: "refused", 1: "connected", 2: "error"}[os.waitstatus_to_exitcode(status)]


addrs = json.loads(sys.argv[1])
out = {}
for name, addr in addrs.items():
    res = {}
    for attack, payload in ATTACKS.items():
        res["unix:" + attack] = attempt(addr, False, payload)
        res["tcp:" + attack] = attempt(addr, True, payload)
    res["nobody"] = as_nobody(addr)
    res["flood"] = flood(addr, 600)
    out[name] = res
print(json.dumps(out))
'''


def _model():
    torch.manual_seed(3)
    return [torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)]


def _data(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g)


def _plain(steps):
    enc, act, head = _model()
    opts = [torch.optim.SGD(enc.parameters(), lr=0.05, momentum=0.9), torch.optim.Adam(head.parameters(), lr=1e-3)]
    for i in range(steps):
        x, y = _data(i)
        loss = torch.nn.functional.mse_loss(head(act(enc(x))), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    return {"enc": enc.state_dict(), "head": head.state_dict()}


def test_an_intruder_without_the_secret_is_refused_everywhere_and_training_stays_exact():
    ag.init(backend="ray", timeout=120)
    try:
        mods = _model()
        enc = ag.spawn(copy.deepcopy(mods[0]), name="enc", optimizer=ag.Optim(torch.optim.SGD, lr=0.05, momentum=0.9))
        act = ag.spawn(mods[1], name="act")
        head = ag.spawn(copy.deepcopy(mods[2]), name="head", optimizer=ag.Optim(torch.optim.Adam, lr=1e-3))
        mse = ag.spawn(torch.nn.MSELoss(), name="mse")
        workers = [enc, act, head, mse]

        def step(i):
            x, y = _data(i)
            mse(head(act(enc(x))), y).backward()
            ag.step()

        steps = 0
        for _ in range(3):
            step(steps)
            steps += 1
        addrs = {w.name: ray.get(w.actor.address.remote(), timeout=60) for w in workers}
        for addr in addrs.values():
            assert addr["host"] not in ("0.0.0.0", "", "::"), addr  # the node's address, not every interface
            assert not addr["unix"].startswith("\0"), addr  # a file with permissions, not the abstract namespace
            assert os.stat(os.path.dirname(addr["unix"])).st_mode & 0o077 == 0
        rss_before = {w.name: w.memory()["rss_bytes"] for w in workers}

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.Popen([sys.executable, "-c", INTRUDER, json.dumps(addrs)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        while proc.poll() is None:  # train while the intruder attacks
            step(steps)
            steps += 1
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        results = json.loads(out)
        print("intruder:", json.dumps(results))
        for _ in range(3):
            step(steps)
            steps += 1

        tried = refused = 0
        for name, res in results.items():
            for attack, outcome in res.items():
                if attack == "flood":
                    # Connections that have not authenticated are capped (and time out); the rest are closed at once.
                    assert outcome["opened"] >= 300 and outcome["kept"] <= 128, (name, outcome)
                    continue
                if outcome == "skipped":
                    continue
                tried += 1
                refused += outcome == "refused"
                assert outcome == "refused", (name, attack, outcome)
        assert tried == refused and tried >= 4 * 22

        for w in workers:
            stats = ray.get(w.actor.channel_stats.remote(), timeout=60)
            assert stats["refused_handshakes"] >= 22, (w.name, stats)
            assert stats["held_bytes"] == 0
            # A 16 MiB bomb was sent to each worker: none of it may stay (nor be decoded into a GiB).
            assert w.memory()["rss_bytes"] - rss_before[w.name] < 200 * 2**20, w.name

        want = _plain(steps)
        for w in (enc, head):
            for k, v in w.state_dict().items():
                torch.testing.assert_close(v, want[w.name][k], rtol=0, atol=1e-5)
    finally:
        ag.shutdown()
