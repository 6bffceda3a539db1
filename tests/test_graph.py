"""ag.graph(): the worker graph of a step as Graphviz DOT (and PNG with Graphviz).

The DOT is read back with a small DOT reader (below) that checks the syntax
this module relies on: balanced braces and brackets, terminated strings and
HTML labels, and every edge endpoint declared as a node.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

import actorgrad as ag
from actorgrad import viz

HAS_DOT = shutil.which("dot") is not None


class Cell(nn.Module):
    """h' = tanh(W [x; h]): a recurrent cell, called once per time step."""

    def __init__(self, d_in: int = 2, d_h: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in + d_h, d_h)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(torch.cat([x, h], dim=-1)))


# --- a small DOT reader -------------------------------------------------------------------


def tokens(src: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of DOT: id, str (quoted; only \\" unescaped, as in DOT), html, or punctuation."""
    out, i, n = [], 0, len(src)
    while i < n:
        ch = src[i]
        if ch.isspace():
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif ch == '"':
            j, buf = i + 1, []
            while True:
                assert j < n, f"unterminated string at {i}"
                if src[j] == "\\" and j + 1 < n and src[j + 1] == '"':
                    buf.append('"')
                    j += 2
                elif src[j] == '"':
                    break
                else:
                    buf.append(src[j])
                    j += 1
            out.append(("str", "".join(buf)))
            i = j + 1
        elif ch == "<":
            depth, j = 0, i
            while True:
                assert j < n, f"unterminated HTML label at {i}"
                depth += {"<": 1, ">": -1}.get(src[j], 0)
                j += 1
                if depth == 0:
                    break
            out.append(("html", src[i + 1:j - 1]))
            i = j
        elif src.startswith("->", i):
            out.append(("op", "->"))
            i += 2
        elif ch in "{}[];,=":
            out.append(("op", ch))
            i += 1
        else:
            m = re.match(r"[A-Za-z0-9_.\-#]+", src[i:])
            assert m, f"unexpected character {ch!r} at {i}"
            out.append(("id", m.group(0)))
            i += len(m.group(0))
    return out


def parse_dot(src: str) -> tuple[dict[str, dict[str, str]], list[tuple[str, str, dict[str, str]]], dict[str, str]]:
    """Nodes (id -> attributes), edges (tail, head, attributes) and graph attributes of a digraph."""
    toks = tokens(src)
    assert toks[:3] == [("id", "digraph"), ("id", "actorgrad"), ("op", "{")], toks[:3]
    depth = 0
    for _, t in toks:
        if t in "{[":
            depth += 1
        elif t in "}]":
            depth -= 1
            assert depth >= 0, "unbalanced braces"
    assert depth == 0, "unbalanced braces"
    assert toks[-1] == ("op", "}")
    nodes: dict[str, dict[str, str]] = {}
    edges: list[tuple[str, str, dict[str, str]]] = []
    gattrs: dict[str, str] = {}
    i = 3

    def attrs(i: int) -> tuple[dict[str, str], int]:
        got: dict[str, str] = {}
        if toks[i] != ("op", "["):
            return got, i
        i += 1
        while toks[i] != ("op", "]"):
            key = toks[i][1]
            assert toks[i + 1] == ("op", "="), f"attribute {key} without a value"
            got[key] = toks[i + 2][1]
            i += 3
            if toks[i] == ("op", ","):
                i += 1
        return got, i + 1

    while toks[i] != ("op", "}"):
        kind, text = toks[i]
        if kind == "id" and text in ("graph", "node", "edge"):
            a, i = attrs(i + 1)
            if text == "graph":
                gattrs.update(a)
        else:
            assert kind in ("id", "str"), f"a statement cannot start with {toks[i]}"
            if toks[i + 1] == ("op", "->"):
                head = toks[i + 2]
                assert head[0] in ("id", "str")
                a, i = attrs(i + 3)
                edges.append((text, head[1], a))
            else:
                a, i = attrs(i + 1)
                assert text not in nodes, f"node {text!r} declared twice"
                nodes[text] = a
        assert toks[i] == ("op", ";"), f"statement not terminated at token {i}: {toks[i]}"
        i += 1
    for tail, head, _ in edges:
        assert tail in nodes and head in nodes, f"edge {tail!r} -> {head!r} uses an undeclared node"
    return nodes, edges, gattrs


def loss_cells(node: dict[str, str]) -> set[int]:
    """The losses listed in a worker node's bottom row."""
    return {int(k) for k in re.findall(r">loss (\d+)<", node["label"])}


def check_with_graphviz(dot: str) -> None:
    """Graphviz itself accepts the source, with every node and edge (when it is installed)."""
    if not HAS_DOT:
        return
    out = subprocess.run(["dot", "-Tplain"], input=dot.encode(), capture_output=True, timeout=60, check=True)
    assert b"Warning" not in out.stderr and b"Error" not in out.stderr, out.stderr
    nodes, edges, _ = parse_dot(dot)
    plain = out.stdout.decode().splitlines()
    assert sum(line.startswith("node ") for line in plain) == len(nodes)
    assert sum(line.startswith("edge ") for line in plain) == len(edges)


def sgd(lr: float = 0.1, **kw) -> ag.Optim:
    return ag.Optim(torch.optim.SGD, lr=lr, **kw)


# --- the quickstart model ---------------------------------------------------------------


def quickstart_step():
    """The README's two-head model plus a probe on detached features; three passes, one step."""
    enc = ag.spawn(nn.Linear(4, 8), name="enc", optimizer=sgd(0.1))
    act = ag.spawn(nn.Tanh(), name="act")
    head_a = ag.spawn(nn.Linear(8, 1), name="head_a", optimizer=ag.Optim(torch.optim.Adam, lr=1e-3))
    head_b = ag.spawn(nn.Linear(8, 1), name="head_b", optimizer=sgd(0.05))
    probe = ag.spawn(nn.Linear(8, 1), name="probe", optimizer=sgd(0.2), update="pass")
    mse = ag.spawn(nn.MSELoss(), name="mse")
    x, ya, yb = torch.randn(32, 4), torch.randn(32, 1), torch.randn(32, 1)
    h = act(enc(x))
    la = mse(head_a(h), ya)
    lb = mse(head_b(h), yb)
    lp = mse(probe(h.detach()), ya)
    passes = [la.backward(), lb.backward(), lp.backward()]
    ag.step()
    return passes


def test_quickstart_graph(backend):
    pa, pb, pp = quickstart_step()
    dot = ag.graph()
    nodes, edges, gattrs = parse_dot(dot)
    check_with_graphviz(dot)
    workers = {"enc", "act", "head_a", "head_b", "probe", "mse"}
    assert set(nodes) == workers | {"loss 1", "loss 2", "loss 3"}
    assert "step 1," in gattrs["label"] and "3 backward passes" in gattrs["label"]

    pairs = [(t, h) for t, h, _ in edges]
    assert len(pairs) == len(set(pairs)), "one edge per worker pair and kind"
    assert set(pairs) == {
        ("enc", "act"), ("act", "head_a"), ("act", "head_b"), ("act", "probe"),
        ("head_a", "mse"), ("head_b", "mse"), ("probe", "mse"),
        ("mse", "loss 1"), ("mse", "loss 2"), ("mse", "loss 3"),
    }
    attrs = {(t, h): a for t, h, a in edges}
    assert attrs[("act", "probe")].get("style") == "dashed" and "detached" in attrs[("act", "probe")]["label"]
    for pair, a in attrs.items():
        if pair != ("act", "probe"):
            assert "style" not in a, pair
    assert attrs[("enc", "act")]["label"].startswith("1 call\\n")
    assert "[32, 8]" in attrs[("enc", "act")]["label"]

    # Which losses reach which worker: loss k is the k-th backward() of the step.
    reach = {w: loss_cells(nodes[w]) for w in workers}
    assert reach == {"enc": {1, 2}, "act": {1, 2}, "head_a": {1}, "head_b": {2}, "probe": {3}, "mse": {1, 2, 3}}
    for k, p in enumerate((pa, pb, pp), start=1):
        assert sorted(w for w in workers if k in reach[w]) == p.workers
        assert f"pass {p.id}" in nodes[f"loss {k}"]["label"]
        assert f"mse #{k}" in nodes[f"loss {k}"]["label"]
    # A gradient edge is drawn in the colours of the losses that send gradients along it.
    colour = {k: nodes[f"loss {k}"]["color"] for k in (1, 2, 3)}
    assert attrs[("enc", "act")]["color"] == f"{colour[1]}:{colour[2]}"
    assert attrs[("act", "head_a")]["color"] == colour[1]
    assert attrs[("probe", "mse")]["color"] == colour[3]

    label = nodes["head_a"]["label"]
    assert "Linear, Adam lr=0.001" in label and "update=step, max_staleness=0" in label and "1 call<" in label
    assert "Tanh, no optimizer" in nodes["act"]["label"]
    assert "update=pass" in nodes["probe"]["label"]
    assert "3 calls<" in nodes["mse"]["label"]

    # The same picture as plain data.
    rt = ag.api._current()
    with rt._lock:
        g = viz.from_runtime(rt)
    assert g.step == 1 and g.closed and [p.id for p in g.passes] == [pa.id, pb.id, pp.id]
    assert {w: {i + 1 for i in ks} for w, ks in g.reached_by().items()} == reach


def test_recurrence_and_no_grad_aggregate_per_worker_pair(local):
    """A cell called T times draws one self-loop; no_grad calls draw dotted edges; micro-batch passes merge."""
    T = 5
    cell = ag.spawn(Cell(), name="cell", optimizer=sgd(), max_staleness=1)
    head = ag.spawn(nn.Linear(4, 1), name="head", optimizer=sgd())
    mse = ag.spawn(nn.MSELoss(), name="mse")
    xs, h = torch.randn(T, 3, 2), torch.zeros(3, 4)
    for t in range(T):
        h = cell(xs[t], h)
    with ag.no_grad():
        head(h)
    losses = [mse(head(h), torch.randn(3, 1)) for _ in range(4)]
    for loss in losses:
        loss.backward()
    ag.step()

    dot = ag.graph()
    nodes, edges, _ = parse_dot(dot)
    check_with_graphviz(dot)
    assert set(nodes) == {"cell", "head", "mse", "loss 1"}, "four passes seeded alike, reaching alike: one loss"
    assert "4 passes" in nodes["loss 1"]["label"] and "4 seeds: 4 in mse" in nodes["loss 1"]["label"]
    keyed = {(t, h, a.get("style", "solid")): a for t, h, a in edges}
    assert len(keyed) == len(edges)
    assert set(keyed) == {("cell", "cell", "solid"), ("cell", "head", "solid"), ("cell", "head", "dotted"),
                          ("head", "mse", "solid"), ("mse", "loss 1", "solid")}
    assert keyed[("cell", "cell", "solid")]["label"].startswith(f"{T - 1} calls\\n")
    assert keyed[("cell", "head", "solid")]["label"].startswith("4 calls\\n")
    assert keyed[("cell", "head", "dotted")]["label"] == "1 call\\n[3, 4]\\nno_grad"
    assert keyed[("mse", "loss 1", "solid")]["label"] == "4 seeds"
    assert f"{T} calls<" in nodes["cell"]["label"] and "max_staleness=1" in nodes["cell"]["label"]
    assert "5 calls (1 no_grad)" in nodes["head"]["label"]


# --- which step, and files --------------------------------------------------------------


def test_which_step_is_drawn(local):
    with pytest.raises(ag.errors.ConfigError, match="nothing to draw yet"):
        ag.graph()
    lin = ag.spawn(nn.Linear(2, 2), name="lin", optimizer=sgd())
    other = ag.spawn(nn.Linear(2, 2), name="other", optimizer=sgd())
    lin(torch.randn(1, 2))
    _, _, g = parse_dot(ag.graph())
    assert "step 1 (open)" in g["label"], "before any step closed, the current step is drawn"
    ag.step()
    ag.step()  # an empty step: nothing to draw, the picture stays
    other(torch.randn(1, 2))
    nodes, _, g = parse_dot(ag.graph())
    assert set(nodes) == {"lin"} and "step 1," in g["label"], "the last closed step, not the open one"
    nodes, _, g = parse_dot(ag.graph(step=3))
    assert set(nodes) == {"other"} and "step 3 (open)" in g["label"]
    with pytest.raises(ag.errors.ConfigError, match="no graph of step 7"):
        ag.graph(step=7)


def test_failed_step_is_drawn_with_its_error(local):
    lin = ag.spawn(nn.Linear(4, 2), name="lin", optimizer=sgd())
    lin(torch.randn(3, 5))  # the wrong width: the forward fails in the worker
    with pytest.raises(ag.errors.ActorgradError):
        ag.step()
    nodes, _, g = parse_dot(ag.graph())
    assert set(nodes) == {"lin"} and "failed:" in g["label"] and "'lin'" in g["label"]


def test_names_that_need_escaping(local):
    """Quotes, backslashes and HTML characters in names; a worker named like a loss node."""
    a = ag.spawn(nn.Linear(2, 2), name='a "quoted" \\ name', optimizer=sgd())
    b = ag.spawn(nn.Linear(2, 1), name="<b & c>", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    loss = ag.spawn(nn.MSELoss(), name="loss 1")
    loss(b(a(torch.randn(3, 2))), torch.randn(3, 1)).backward()
    ag.step()
    dot = ag.graph()
    nodes, edges, _ = parse_dot(dot)
    check_with_graphviz(dot)
    # Node ids are written with \\ kept as is (DOT unescapes only \"): the reader keeps them too.
    assert set(nodes) == {'a "quoted" \\\\ name', "<b & c>", "loss 1", "loss 1'"}
    assert ("loss 1", "loss 1'") in {(t, h) for t, h, _ in edges}
    assert "&lt;b &amp; c&gt;" in nodes["<b & c>"]["label"] and "(callable)" in nodes["<b & c>"]["label"]


def quick_graph() -> None:
    lin = ag.spawn(nn.Linear(2, 1), name="lin", optimizer=sgd())
    ag.backward(lin(torch.randn(3, 2)), gradients=[torch.ones(3, 1)])
    ag.step()


def test_writes_dot_and_refuses_unknown_suffixes(local, tmp_path):
    quick_graph()
    dot = ag.graph(tmp_path / "g.dot")
    assert (tmp_path / "g.dot").read_text() == dot
    assert ag.graph(str(tmp_path / "g.gv")) == dot
    with pytest.raises(ag.errors.ConfigError, match=r"\.dot or \.gv"):
        ag.graph(tmp_path / "g.txt")


def test_image_without_graphviz_is_a_clear_error(local, tmp_path, monkeypatch):
    quick_graph()
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    with pytest.raises(ag.errors.ConfigError, match=r"install graphviz.*\.dot"):
        ag.graph(tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.skipif(not HAS_DOT, reason="Graphviz's dot is not installed")
def test_png_and_svg_with_graphviz(local, tmp_path):
    quick_graph()
    ag.graph(tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ag.graph(tmp_path / "g.svg")
    assert "<svg" in (tmp_path / "g.svg").read_text()


def test_optimizer_descriptions(local):
    assert viz.describe_optimizer(None) is None
    assert viz.describe_optimizer(ag.Optim(torch.optim.SGD, lr=0.5, momentum=0.9)) == "SGD lr=0.5"
    default_lr = torch.optim.Adam([nn.Parameter(torch.zeros(1))]).defaults["lr"]
    assert viz.describe_optimizer(ag.Optim(torch.optim.Adam)) == f"Adam lr={default_lr:g}"

    def make_opt(params):
        return torch.optim.SGD(params, lr=0.1)

    assert viz.describe_optimizer(make_opt) == "make_opt (callable)"
    # A recipe with an LR schedule names the scheduler too, in the worker's node as well.
    spec = ag.Optim(torch.optim.SGD, lr=0.1, schedule=ag.Schedule(torch.optim.lr_scheduler.StepLR, step_size=1))
    assert viz.describe_optimizer(spec) == "SGD lr=0.1, StepLR"
    lin = ag.spawn(nn.Linear(2, 3), name="sched", optimizer=spec)
    lin(torch.randn(4, 2)).value()
    nodes, _, _ = parse_dot(ag.graph())
    assert "<B>sched</B>" in nodes["sched"]["label"]
    assert "Linear, SGD lr=0.1, StepLR<" in nodes["sched"]["label"]


def test_graph_needs_a_runtime():
    ag.shutdown()
    with pytest.raises(ag.errors.ConfigError, match="not running"):
        ag.graph()
