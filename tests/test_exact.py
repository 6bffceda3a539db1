"""Exactness: actorgrad against plain PyTorch as the oracle (docs/design.md, semantics 1 and 4).

Seeded random architectures — fan-out, fan-in, multi-output modules, modules
called several times per step, one to three losses, outputs that feed nothing,
parameterless modules, a different optimizer per module — are trained for a
few steps on both backends, and every parameter of every worker must equal a
PyTorch copy of the same modules trained with ``sum(losses).backward()`` and
each module's own ``optimizer.step()``. Further tests cover ``update="pass"``
(each loss's update applied on its own, its gradient taken at the weights its
forward used) and backprop through time with one worker called T times.

Custom modules are defined at module level: Ray workers receive them by pickling.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import actorgrad as ag

D = 4  # every activation in the random DAGs is (BATCH, D), so any node can feed any module
BATCH = 5
STEPS = 4
ATOL = RTOL = 1e-5


# --- modules (module level, so that Ray workers can unpickle them) -------------------------


class Mix2(nn.Module):
    """Fan-in: two inputs, concatenated through one Linear."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.lin = nn.Linear(2 * d, d)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.cat([a, b], dim=-1))


class Split3(nn.Module):
    """Multi-output: returns a tuple of three tensors; the third is a side product."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.d = d
        self.lin = nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        a, b = h[:, : self.d], h[:, self.d :]
        return torch.tanh(a), b * torch.sigmoid(a), h.mean(dim=-1, keepdim=True)


class RNNCell(nn.Module):
    """One step of a recurrence: h' = tanh(W [x_t, h] + b)."""

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in + n_hidden, n_hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(torch.cat([x, h], dim=-1)))


# --- optimizers --------------------------------------------------------------------------

OPTIMS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "sgd_nesterov_wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2)),
    "adam": (torch.optim.Adam, dict(lr=0.01)),
    "adam_wd": (torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.99), weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
}


def ag_optim(key: str) -> ag.Optim:
    cls, kwargs = OPTIMS[key]
    return ag.Optim(cls, **kwargs)


def torch_optim(key: str, module: nn.Module) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMS[key]
    return cls(module.parameters(), **kwargs)


def assert_state_equal(workers: dict, oracle: dict, where: str) -> None:
    """Every parameter (and buffer) of every worker equals its PyTorch copy."""
    for name, w in workers.items():
        got = w.state_dict()
        want = oracle[name].state_dict()
        assert set(got) == set(want), f"{where}: worker {name} state keys {sorted(got)} != {sorted(want)}"
        for key in want:
            torch.testing.assert_close(
                got[key], want[key], atol=ATOL, rtol=RTOL,
                msg=lambda m, name=name, key=key: f"{where}: worker {name}, {key}: {m}",
            )


# --- random programs ---------------------------------------------------------------------

PARAM_KINDS = ("linear", "split", "mix")


@dataclass
class Program:
    """A random architecture: workers, the calls of one step, and the losses."""

    kinds: list[str]  # per module worker: linear | split | mix | tanh | relu
    optims: list[str | None]  # per module worker: key of OPTIMS, None for parameterless
    # one entry per call: (worker index, inputs); an input is ("x", k) (constant) or ("n", j) (pool node j)
    ops: list[tuple[int, list[tuple[str, int]]]] = field(default_factory=list)
    losses: list[int] = field(default_factory=list)  # pool node per loss


def _make_modules(kinds: list[str]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for kind in kinds:
        out.append({"linear": lambda: nn.Linear(D, D), "split": Split3, "mix": Mix2,
                    "tanh": nn.Tanh, "relu": nn.ReLU}[kind]())
    return out


def _outputs_to_pool(kind: str) -> int:
    """How many outputs of a call enter the pool of nodes later calls may use (Split3's third: none)."""
    return 2 if kind == "split" else 1


def _simulate(prog: Program) -> tuple[list[int], list[int], list[set[int]]]:
    """Per pool node: its producing op; consumers per node; per op, the set of workers upstream of it."""
    node_op: list[int] = []
    uses = []
    upstream: list[set[int]] = []
    for i, (w, ins) in enumerate(prog.ops):
        up = {w}
        for src, j in ins:
            if src == "n":
                uses.append(j)
                up |= upstream[node_op[j]]
        upstream.append(up)
        node_op.extend([i] * _outputs_to_pool(prog.kinds[w]))
    uses.extend(prog.losses)
    counts = [uses.count(j) for j in range(len(node_op))]
    return node_op, counts, upstream


def _features_ok(prog: Program) -> bool:
    node_op, counts, upstream = _simulate(prog)
    calls = [w for w, _ in prog.ops]
    params = [i for i, k in enumerate(prog.kinds) if k in PARAM_KINDS]
    trained = set().union(*(upstream[node_op[j]] for j in prog.losses))
    return (
        any(c >= 2 for c in counts)  # fan-out
        and any(prog.kinds[w] == "mix" and all(s == "n" for s, _ in ins) and ins[0] != ins[1]
                for w, ins in prog.ops)  # fan-in of two different nodes
        and any(prog.kinds[w] == "split" for w in calls)  # multi-output (its third output feeds nothing)
        and any(calls.count(w) >= 2 for w in params)  # a parametric module called several times
        and any(prog.kinds[w] in ("tanh", "relu") for w in calls)  # a parameterless module
        and any(c == 0 for c in counts)  # a pool node that feeds nothing (besides Split3's third output)
        and trained == set(range(len(prog.kinds)))  # every worker lies on a path to a loss
        and len({prog.optims[w] for w in params}) >= 2
    )


def random_program(seed: int) -> Program:
    """A seeded random architecture that has every feature of the issue (rejection sampling)."""
    rng = random.Random(seed)
    for _ in range(100_000):
        extra = rng.choice(PARAM_KINDS)
        kinds = ["linear", "split", "mix", "linear", rng.choice(["tanh", "relu"])]
        if rng.random() < 0.5:
            kinds.append(extra)
        params = [i for i, k in enumerate(kinds) if k in PARAM_KINDS]
        optims: list[str | None] = [None] * len(kinds)
        for i in params:
            optims[i] = rng.choice(sorted(OPTIMS))
        # Always one SGD with momentum and one Adam among the modules.
        a, b = rng.sample(params, 2)
        optims[a] = rng.choice(["sgd_momentum", "sgd_nesterov_wd"])
        optims[b] = rng.choice(["adam", "adam_wd"])
        prog = Program(kinds, optims)

        prog.ops.append((0, [("x", 0)]))  # the first call takes the constant input
        n_nodes = 1
        for _ in range(rng.randint(5, 8)):
            w = rng.randrange(len(kinds))

            def pick() -> tuple[str, int]:
                if rng.random() < 0.6:
                    return ("n", rng.randrange(max(0, n_nodes - 3), n_nodes))
                return ("n", rng.randrange(n_nodes))

            if kinds[w] == "mix":
                ins = [pick(), ("x", 1) if rng.random() < 0.25 else pick()]
                if rng.random() < 0.5:
                    ins.reverse()
                if ins[0][0] == "x" and ins[1][0] == "x":
                    continue
            else:
                ins = [pick()]
            prog.ops.append((w, ins))
            n_nodes += _outputs_to_pool(kinds[w])
        n_losses = rng.randint(1, 3)
        _, counts, _ = _simulate(prog)
        sinks = [j for j in range(n_nodes) if counts[j] == 0]
        rng.shuffle(sinks)
        prog.losses = (sinks + [rng.randrange(n_nodes) for _ in range(n_losses)])[:n_losses]
        if _features_ok(prog):
            return prog
    raise AssertionError(f"no program with every feature for seed {seed}")


def run_program(prog: Program, call, loss, xs: list, ys: list) -> list:
    """Issue the calls of one step through ``call(worker index, *inputs)``; return the losses."""
    pool: list = []
    for w, ins in prog.ops:
        args = [xs[j] if src == "x" else pool[j] for src, j in ins]
        out = call(w, *args)
        if isinstance(out, tuple):
            assert len(out) == 3
            pool.extend(out[: _outputs_to_pool(prog.kinds[w])])  # out[2] feeds nothing
        else:
            pool.append(out)
    return [loss(pool[j], ys[i]) for i, j in enumerate(prog.losses)]


def step_data(seed: int, step: int, n_losses: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * seed + step)
    xs = [torch.randn(BATCH, D, generator=g) for _ in range(2)]
    ys = [torch.randn(BATCH, D, generator=g) for _ in range(n_losses)]
    return xs, ys


# --- the tests ---------------------------------------------------------------------------


def test_random_programs_have_every_feature():
    """The generator itself: every seed used below yields a DAG with every feature."""
    for seed in range(20):
        prog = random_program(seed)
        assert _features_ok(prog)
        assert 1 <= len(prog.losses) <= 3
        assert len(prog.kinds) + 1 <= 8  # module workers plus the loss worker


@pytest.mark.parametrize("seed", [2, 10, 14])  # 1, 3 and 2 losses; relu and tanh; 5 and 6 modules
def test_random_dag_equals_pytorch(backend, seed):
    prog = random_program(seed)
    torch.manual_seed(seed)
    modules = _make_modules(prog.kinds)
    oracle = [copy.deepcopy(mod) for mod in modules]
    oracle_opts = [torch_optim(k, mod) if k else None for k, mod in zip(prog.optims, oracle)]
    oracle_mse = nn.MSELoss()

    workers = [
        ag.spawn(mod, optimizer=ag_optim(k) if k else None, name=f"{kind}{i}")
        for i, (mod, kind, k) in enumerate(zip(modules, prog.kinds, prog.optims))
    ]
    mse = ag.spawn(nn.MSELoss(), name="mse")
    by_name = {w.name: w for w in workers}
    oracle_by_name = {w.name: o for w, o in zip(workers, oracle)}
    trainable = sorted(w.name for w, k in zip(workers, prog.kinds) if k in PARAM_KINDS)
    assert_state_equal(by_name, oracle_by_name, f"seed {seed}, before training")

    for step in range(STEPS):
        xs, ys = step_data(seed, step, len(prog.losses))

        losses = run_program(prog, lambda w, *a: workers[w](*a), mse, xs, ys)
        assert len(losses) == len(prog.losses)
        passes = [lo.backward() for lo in losses]  # one independent pass per loss
        got_losses = [lo.item() for lo in losses]
        report = ag.step()
        not_done = [repr(p) for p in passes if not p.done()]  # ag.step() waits for every pass of the step

        for opt in oracle_opts:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        want = run_program(prog, lambda w, *a: oracle[w](*a), oracle_mse, xs, ys)
        sum(want).backward()
        for opt in oracle_opts:
            if opt is not None:
                opt.step()

        where = f"seed {seed}, step {step}"
        torch.testing.assert_close(torch.tensor(got_losses), torch.tensor([v.item() for v in want]),
                                   atol=ATOL, rtol=RTOL, msg=lambda m: f"{where}: losses: {m}")
        assert_state_equal(by_name, oracle_by_name, where)
        assert report.updated == trainable, where
        assert not not_done, f"{where}: passes not done after ag.step() returned: {not_done}"


@pytest.mark.parametrize("trunk_opt, ordered", [("sgd", False), ("adam", True), ("sgd_momentum", True)])
def test_update_pass_equals_per_loss_updates(backend, trunk_opt, ordered):
    """update="pass": the trunk applies each loss's update on its own, each gradient taken at the
    weights its forward used; the heads (update="step") match sum(losses).backward()."""
    torch.manual_seed(7)
    trunk = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, D))  # param grads depend on the weights
    head_a = nn.Linear(D, 1)
    head_b = nn.Sequential(nn.Tanh(), nn.Linear(D, 2))
    o_trunk, o_a, o_b = (copy.deepcopy(mod) for mod in (trunk, head_a, head_b))
    opt_trunk = torch_optim(trunk_opt, o_trunk)
    opt_a = torch_optim("adam", o_a)
    opt_b = torch_optim("sgd_momentum", o_b)

    w_trunk = ag.spawn(trunk, name="trunk", optimizer=ag_optim(trunk_opt), update="pass")
    w_a = ag.spawn(head_a, name="head_a", optimizer=ag_optim("adam"))
    w_b = ag.spawn(head_b, name="head_b", optimizer=ag_optim("sgd_momentum"))
    mse = ag.spawn(nn.MSELoss(), name="mse")
    workers = {"trunk": w_trunk, "head_a": w_a, "head_b": w_b}
    oracle = {"trunk": o_trunk, "head_a": o_a, "head_b": o_b}

    g = torch.Generator().manual_seed(3)
    reports = []
    for step in range(STEPS):
        x = torch.randn(BATCH, D, generator=g)
        ya, yb = torch.randn(BATCH, 1, generator=g), torch.randn(BATCH, 2, generator=g)

        h = w_trunk(x)
        la = mse(w_a(h), ya)
        lb = mse(w_b(h), yb)
        pa = la.backward()
        if ordered:
            pa.wait()  # pass A has updated the trunk before pass B starts
        pb = lb.backward()
        pb.wait()
        pa.wait()
        got = [la.item(), lb.item()]
        report = ag.step()

        for opt in (opt_trunk, opt_a, opt_b):
            opt.zero_grad(set_to_none=True)
        oh = o_trunk(x)
        La = nn.functional.mse_loss(o_a(oh), ya)
        Lb = nn.functional.mse_loss(o_b(oh), yb)
        params = list(o_trunk.parameters())
        ga = torch.autograd.grad(La, params, retain_graph=True)  # both at the forward's weights
        gb = torch.autograd.grad(Lb, params, retain_graph=True)
        (La + Lb).backward()
        opt_a.step()
        opt_b.step()
        for grads in (ga, gb):  # one update per loss, A first
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt_trunk.step()

        where = f"step {step}"
        torch.testing.assert_close(torch.tensor(got), torch.tensor([La.item(), Lb.item()]), atol=ATOL, rtol=RTOL)
        assert_state_equal(workers, oracle, where)
        reports.append(report)

    # The trunk applied two updates in every step (one per pass): each report says it updated.
    for step, report in enumerate(reports):
        assert report.updated == ["head_a", "head_b", "trunk"], f"step {step}: {report.workers}"
        assert report.workers["trunk"].applied, f"step {step}"


@pytest.mark.parametrize("n_losses", [1, 2])
def test_recurrence_bptt_equals_pytorch(backend, n_losses):
    """One RNN-cell worker called T times per step: backprop through time by messages."""
    T, n_in, n_hidden = 5, 3, D
    torch.manual_seed(5)
    cell, head = RNNCell(n_in, n_hidden), nn.Linear(n_hidden, 2)
    o_cell, o_head = copy.deepcopy(cell), copy.deepcopy(head)
    opt_cell, opt_head = torch_optim("adam", o_cell), torch_optim("sgd_momentum", o_head)

    w_cell = ag.spawn(cell, name="cell", optimizer=ag_optim("adam"))
    w_head = ag.spawn(head, name="head", optimizer=ag_optim("sgd_momentum"))
    mse = ag.spawn(nn.MSELoss(), name="mse")
    workers, oracle = {"cell": w_cell, "head": w_head}, {"cell": o_cell, "head": o_head}

    def unroll(cell_fn, head_fn, loss_fn, xs, h0, ys):
        h, hs = h0, []
        for t in range(T):
            h = cell_fn(xs[t], h)
            hs.append(h)
        at = [T - 1, T // 2][:n_losses]  # the last state, and one in the middle
        return [loss_fn(head_fn(hs[t]), y) for t, y in zip(at, ys)]

    g = torch.Generator().manual_seed(9)
    for step in range(STEPS + 1):
        xs = [torch.randn(BATCH, n_in, generator=g) for _ in range(T)]
        ys = [torch.randn(BATCH, 2, generator=g) for _ in range(n_losses)]
        h0 = torch.zeros(BATCH, n_hidden)

        losses = unroll(w_cell, w_head, mse, xs, h0, ys)
        for lo in losses:
            lo.backward()
        got = [lo.item() for lo in losses]
        report = ag.step()
        assert report.workers["cell"].calls == T
        assert report.workers["cell"].applied

        opt_cell.zero_grad(set_to_none=True)
        opt_head.zero_grad(set_to_none=True)
        want = unroll(o_cell, o_head, nn.functional.mse_loss, xs, h0, ys)
        sum(want).backward()
        opt_cell.step()
        opt_head.step()

        torch.testing.assert_close(torch.tensor(got), torch.tensor([w.item() for w in want]), atol=ATOL, rtol=RTOL)
        assert_state_equal(workers, oracle, f"step {step}")
