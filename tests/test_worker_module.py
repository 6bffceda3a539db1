"""A worker that looks like its module (issue 13), and modules that cannot travel to a worker.

Plain PyTorch is the oracle: ``worker.named_parameters()`` / ``parameters()`` / ``named_buffers()``
/ ``buffers()`` equal the module's after a few training steps (names, values, requires_grad, tied
weights once), and ``worker.load_state_dict(sd, strict)`` returns what ``nn.Module.load_state_dict``
returns, raises where it raises (but loads nothing then). ``worker.to()`` is a no-op where nothing
would change and a ConfigError otherwise; ``repr(worker)`` says where and how it runs. A module that
cannot be pickled (a lock, a generator, an open file, a lambda bound to a lock, a function compiled
by torch.compile) is a ConfigError at ag.spawn on both backends, naming the object's path, and the
runtime stays usable.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import actorgrad as ag
from actorgrad import errors as E
from actorgrad import pickling

ATOL = RTOL = 1e-5
LR, MOMENTUM = 0.05, 0.9


class Net(nn.Module):
    """Every kind of tensor a module lists: a submodule registered twice (tied: its tensors listed once),
    frozen parameters, BatchNorm statistics, a non-persistent buffer, a parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.enc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.dec = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.tied = self.dec  # the same submodule twice: its parameters listed once, as on nn.Module
        self.register_buffer("offset", torch.full((3,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.enc(x)) * self.scale + self.offset
        return self.frozen(torch.tanh(self.tied(h)))


def train(worker: ag.Worker, oracle: nn.Module, steps: int = 3) -> None:
    """``steps`` steps of MSE on the worker and, identically, on the oracle (SGD with momentum)."""
    mse = ag.spawn(nn.MSELoss(), name=f"mse-{worker.name}")
    opt = torch.optim.SGD([p for p in oracle.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randn(8, 3)
        mse(worker(x), y).backward()
        ag.step()
        opt.zero_grad()
        nn.functional.mse_loss(oracle(x), y).backward()
        opt.step()


def spawn_net(name: str = "net") -> tuple[ag.Worker, nn.Module]:
    torch.manual_seed(1)
    module = Net()
    oracle = copy.deepcopy(module)
    return ag.spawn(module, name=name, optimizer=ag.Optim(torch.optim.SGD, lr=LR, momentum=MOMENTUM)), oracle


def same(got: list, want: list, what: str) -> None:
    assert [n for n, _ in got] == [n for n, _ in want], what
    for (n, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b.detach(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} {n}: {m}")
        assert a.requires_grad == b.requires_grad, f"{what} {n}: requires_grad"
        assert a.device.type == "cpu" and a.is_leaf and a.grad_fn is None, f"{what} {n}"


# --- parameters and buffers -------------------------------------------------------------------


def test_named_parameters_and_buffers_equal_the_modules_after_training(backend):
    w, oracle = spawn_net()
    train(w, oracle)
    same(list(w.named_parameters()), list(oracle.named_parameters()), "named_parameters")
    same(list(w.named_parameters(prefix="m", recurse=True)), list(oracle.named_parameters(prefix="m")), "prefix")
    same(list(w.named_parameters(recurse=False)), list(oracle.named_parameters(recurse=False)), "recurse=False")
    same(list(w.named_parameters(remove_duplicate=False)), list(oracle.named_parameters(remove_duplicate=False)),
         "remove_duplicate=False")
    same(list(w.named_buffers()), list(oracle.named_buffers()), "named_buffers")  # running stats, non-persistent
    same(list(w.named_buffers(recurse=False)), list(oracle.named_buffers(recurse=False)), "buffers recurse=False")
    params, want = list(w.parameters()), list(oracle.parameters())
    assert len(params) == len(want)
    for a, b in zip(params, want):
        torch.testing.assert_close(a, b.detach(), atol=ATOL, rtol=RTOL)
    for a, b in zip(w.buffers(), oracle.buffers()):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    # A tensor listed twice (the tied submodule) is one copy, as it is one parameter in the module.
    dup = dict(w.named_parameters(remove_duplicate=False))
    assert dup["dec.weight"] is dup["tied.weight"]
    # Copies: changing one changes nothing in the worker.
    first = next(w.parameters())
    with torch.no_grad():
        first.add_(100.0)
    torch.testing.assert_close(next(w.parameters()), oracle.scale.detach(), atol=ATOL, rtol=RTOL)


def test_tensors_come_in_one_round_trip(backend, monkeypatch):
    w, _ = spawn_net()
    rt = ag.api._current()
    asked: list[str] = []
    real = rt.get_state

    def counting(worker, what, timeout):
        asked.append(what)
        return real(worker, what, timeout)

    monkeypatch.setattr(rt, "get_state", counting)
    names = [n for n, _ in w.named_parameters()]
    assert len(names) == 9 and asked == ["tensors"]
    assert len(list(w.buffers())) == 4 and asked == ["tensors", "tensors"]


# --- load_state_dict ----------------------------------------------------------------------


def test_load_state_dict_returns_and_raises_as_nn_module(backend):
    w, oracle = spawn_net()
    torch.manual_seed(5)
    new = {k: (torch.randn_like(v) if v.is_floating_point() else v + 2) for k, v in oracle.state_dict().items()}
    new["bn.running_var"] = new["bn.running_var"].abs() + 0.1

    # Every key: nothing missing, nothing unexpected (the same named tuple as nn.Module's).
    got, want = w.load_state_dict(new), oracle.load_state_dict(new)
    assert got == want and type(got) is type(want) and repr(got) == repr(want)
    same(list(w.named_parameters()), list(oracle.named_parameters()), "after a full load")

    # strict=False: loads what matches, reports the rest, in nn.Module's order.
    partial = {k: v + 1 for k, v in new.items() if k not in ("enc.bias", "bn.num_batches_tracked")}
    partial["head.weight"] = torch.zeros(2)
    partial["enc.extra"] = torch.zeros(1)
    got, want = w.load_state_dict(partial, strict=False), oracle.load_state_dict(partial, strict=False)
    # (a plain dict has no module versions: BatchNorm fills in its num_batches_tracked, on both)
    assert got == want and got.missing_keys == ["enc.bias"]
    assert got.unexpected_keys == want.unexpected_keys and set(got.unexpected_keys) == {"head.weight", "enc.extra"}
    same(list(w.named_parameters()), list(oracle.named_parameters()), "after strict=False")
    same(list(w.named_buffers()), list(oracle.named_buffers()), "buffers after strict=False")

    # strict=True with missing / unexpected keys: ConfigError naming the worker and the keys; nothing loaded.
    before = w.state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        copy.deepcopy(oracle).load_state_dict(partial)
    with pytest.raises(E.ConfigError) as info:
        w.load_state_dict(partial)
    assert info.value.worker == "net"
    assert "enc.bias" in str(info.value) and "head.weight" in str(info.value) and "strict=False" in str(info.value)
    after = w.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused load changed the worker"

    # A wrong shape: ShapeError, strict or not, and nothing loaded (nn.Module raises too).
    wrong = dict(new, **{"enc.weight": torch.zeros(5, 4), "dec.bias": new["dec.bias"] + 7})
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="size mismatch"):
            copy.deepcopy(oracle).load_state_dict(wrong, strict=strict)
        with pytest.raises(E.ShapeError) as info:
            w.load_state_dict(wrong, strict=strict)
        assert info.value.worker == "net" and "enc.weight" in str(info.value) and "(5, 4)" in str(info.value)
    after = w.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused load changed the worker"

    # state_dict() output carries module versions: BatchNorm then needs num_batches_tracked, as on nn.Module.
    versioned = oracle.state_dict()
    del versioned["bn.num_batches_tracked"]
    with pytest.raises(RuntimeError):
        copy.deepcopy(oracle).load_state_dict(versioned)
    with pytest.raises(E.ConfigError, match="bn.num_batches_tracked"):
        w.load_state_dict(versioned)
    plain = dict(versioned)  # without versions BatchNorm fills it in: no missing key, on both
    assert w.load_state_dict(plain) == oracle.load_state_dict(plain)

    # The worker trains on from the loaded weights exactly as the module (optimizer state kept by both).
    train(w, oracle, steps=2)
    same(list(w.named_parameters()), list(oracle.named_parameters()), "training after loads")
    same(list(w.named_buffers()), list(oracle.named_buffers()), "buffers after loads")


def test_load_state_dict_of_the_workers_own_copies(backend):
    w, oracle = spawn_net()
    with torch.no_grad():
        params = {n: p * 2 for n, p in w.named_parameters()}  # requires_grad copies load as they are
    keys = w.load_state_dict(params, strict=False)
    assert keys == oracle.load_state_dict(params, strict=False)
    assert keys.missing_keys == ["bn.running_mean", "bn.running_var", "tied.weight", "tied.bias"]
    same(list(w.named_parameters()), list(oracle.named_parameters()), "loaded copies")
    with pytest.raises(E.ConfigError, match="strict must be"):
        w.load_state_dict(params, 5.0)  # the old positional timeout
    with pytest.raises(E.ConfigError, match="mapping"):
        w.load_state_dict([("scale", torch.ones(3))])


# --- to() ------------------------------------------------------------------------------


def test_to_is_a_no_op_where_nothing_changes_and_a_config_error_otherwise(backend):
    w = ag.spawn(nn.Linear(4, 3), name="net", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    assert w.to("cpu") is w
    assert w.to(torch.device("cpu"), torch.float32) is w
    assert w.to(dtype=torch.float32, non_blocking=True) is w
    assert w.to(torch.zeros(1)) is w  # a tensor's device and dtype, as nn.Module.to(tensor)
    with pytest.raises(E.ConfigError) as info:
        w.to("cuda")
    assert info.value.worker == "net" and "cannot use a GPU" in str(info.value) and "device='cuda'" in str(info.value)
    with pytest.raises(E.ConfigError) as info:
        w.to(torch.float64)
    assert info.value.worker == "net" and "before spawning" in str(info.value) and "float32" in str(info.value)
    with pytest.raises(E.ConfigError, match="floating point"):
        w.to(torch.int64)
    with pytest.raises(E.ConfigError):
        w.to("not-a-device")
    x = torch.randn(2, 4)
    torch.testing.assert_close(w(x).value(), x @ next(w.parameters()).detach().T + list(w.parameters())[1].detach())
    d = ag.spawn(nn.Linear(2, 2).double(), name="double", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    assert d.to(torch.float64) is d and d.to("cpu", torch.float64) is d


# --- repr ------------------------------------------------------------------------------


def test_repr_says_where_and_how_a_worker_runs_without_asking_it(backend, monkeypatch):
    enc = ag.spawn(nn.Linear(4, 8), name="enc", optimizer=ag.Optim(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
                   update="pass")
    head = ag.spawn(nn.Linear(8, 1), name="head", optimizer=ag.Optim(torch.optim.Adam, betas=(0.8, 0.9)),
                    max_staleness=2, num_cpus=1)
    act = ag.spawn(nn.Tanh())
    rt = ag.api._current()

    def refuse(*args, **kwargs):
        raise AssertionError("repr asked the worker")

    monkeypatch.setattr(rt, "get_state", refuse)
    text = repr(enc)
    assert text.startswith("Worker('enc', Linear, ") and f", {backend}" in text, text
    assert "optimizer=AdamW(lr=0.001, weight_decay=0.01)" in text and "update='pass'" in text, text
    assert "max_staleness" not in text and "num_cpus" not in text, text
    text = repr(head)
    # The learning rate first (its default when not given), then the arguments given.
    assert "optimizer=Adam(lr=0.001, betas=(0.8, 0.9))" in text and "max_staleness=2" in text, text
    assert "num_cpus=1" in text, text
    assert "update=" not in text, text
    assert repr(act) == f"Worker('Tanh-0', Tanh, {backend})" or repr(act).startswith(f"Worker('Tanh-0', Tanh, {backend} on node ")
    monkeypatch.undo()
    act.eval()
    assert "training=False" in repr(act)


# --- modules that cannot be pickled --------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class Holder(nn.Module):
    """A module with an encoder submodule and whatever a case puts into it."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class CompilesInForward(nn.Module):
    """Compiles a function on its first forward and keeps it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.fast = None

    def _impl(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is None:
            self.fast = torch.compile(self._impl, backend="eager")
        return self.fast(x)


def _with_lock() -> nn.Module:
    m = Holder()
    m.encoder._lock = threading.Lock()
    return m


def _with_generator() -> nn.Module:
    m = Holder()
    m.encoder.batches = (i for i in range(3))
    return m


def _with_file(tmp_path) -> nn.Module:
    m = Holder()
    m.log = open(tmp_path / "log.txt", "w")  # noqa: SIM115 - the module holds it open
    return m


def _with_lambda_on_a_lock() -> nn.Module:
    lock = threading.RLock()
    m = Holder()
    m.encoder.guard = lambda: lock  # a lambda bound to an object that cannot be pickled
    return m


def _compiled_in_forward() -> nn.Module:
    m = CompilesInForward()
    # What its first forward stores (without running the compiler here): a compiled function.
    m.fast = torch.compile(m._impl, backend="eager")
    return m


def _with_unpicklable_optimizer_recipe() -> dict:
    lock = threading.Lock()

    def make_sgd(params, guard=lock):
        return torch.optim.SGD(params, lr=0.1)

    return {"module": nn.Linear(4, 4), "optimizer": make_sgd}


def _usable_after(backend_name: str, name: str) -> None:
    """The failed spawn left nothing behind: the same name spawns now, and a step runs."""
    w = ag.spawn(nn.Linear(4, 4), name=name, optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    w(torch.randn(2, 4)).backward(torch.ones(2, 4))
    assert ag.step().updated == [name], backend_name


# (what ag.spawn gets, the path the error names, the kind of object it names)
UNPICKLABLE = {
    "lock": (lambda tmp: {"module": _with_lock()}, "module.encoder._lock", "_thread.lock"),
    "generator": (lambda tmp: {"module": _with_generator()}, "module.encoder.batches", "generator"),
    "open-file": (lambda tmp: {"module": _with_file(tmp)}, "module.log", "TextIOWrapper"),
    "lambda-bound-lock": (lambda tmp: {"module": _with_lambda_on_a_lock()},
                          "module.encoder.guard.__closure__['lock']", "RLock"),
    "torch-compile": (lambda tmp: {"module": _compiled_in_forward()}, "module.fast", "torch.compile"),
    "optimizer-recipe": (lambda tmp: _with_unpicklable_optimizer_recipe(), "optimizer.__defaults__[0]",
                         "_thread.lock"),
}


def test_an_unpicklable_module_is_a_config_error_at_spawn(backend, tmp_path):
    """One test for every case: each spawn fails before a worker starts, and the runtime stays usable."""
    for case, (make, path, kind) in UNPICKLABLE.items():
        args = make(tmp_path)
        args.setdefault("optimizer", ag.Optim(torch.optim.SGD, lr=0.1))
        with pytest.raises(E.ConfigError) as info:
            ag.spawn(args.pop("module"), name="bad", **args)
        text = str(info.value)
        assert info.value.worker == "bad", f"{case}: {text}"
        assert f"{path} (" in text and kind in text and "cannot be pickled" in text, f"{case}: {text}"
    _usable_after(backend, "bad")


def test_the_transports_give_the_same_config_error_without_the_spawn_check(backend, monkeypatch):
    """What the check at ag.spawn would miss still fails as ConfigError: Ray's serialization error and
    the local backend's copy are turned into the same error."""
    monkeypatch.setattr(pickling, "check", lambda spec: None)
    for make in (_with_lock, _with_generator):
        with pytest.raises(E.ConfigError) as info:
            ag.spawn(make(), name="bad")
        assert info.value.worker == "bad" and "module.encoder." in str(info.value), str(info.value)
    monkeypatch.undo()
    _usable_after(backend, "bad")


def test_a_module_that_pickles_but_does_not_deepcopy_spawns_on_both(backend):
    """A tensor attribute with autograd history: deepcopy refuses it, pickling (Ray) takes it; so does local."""
    module = Holder()
    module.cache = module.encoder(torch.randn(2, 4))  # not a leaf
    oracle = copy.deepcopy(Holder())
    oracle.load_state_dict(module.state_dict())
    w = ag.spawn(module, name="cached", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    x = torch.randn(2, 4)
    torch.testing.assert_close(w(x).value(), oracle(x).detach())


def test_the_spawn_check_does_not_copy_the_weights():
    """The check pickles the structure only: its cost does not grow with the weights (a 50 MB module)."""
    import time

    from actorgrad.core.worker import WorkerSpec

    big = nn.Sequential(*(nn.Linear(2048, 2048) for _ in range(3)))
    spec = WorkerSpec(name="big", module=big)
    pickling.check(spec)  # warm
    t0 = time.perf_counter()
    for _ in range(5):
        pickling.check(spec)
    per_check = (time.perf_counter() - t0) / 5
    assert per_check < 0.02, f"{per_check * 1000:.1f} ms per check"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CPU-only machine or CPU build of torch)")
def test_a_gpu_worker_is_a_no_op_on_cuda_and_refuses_cpu(backend):
    w = ag.spawn(nn.Linear(4, 3), name="gpu", device="cuda", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    assert w.to("cuda") is w and w.to("cuda:0") is w and w.to(torch.device("cuda", 0), torch.float32) is w
    with pytest.raises(E.ConfigError) as info:
        w.to("cpu")
    assert info.value.worker == "gpu" and "fixed at ag.spawn" in str(info.value)
    assert all(p.device.type == "cpu" for p in w.parameters())  # the copies come to the caller's CPU
    assert "device='cuda'" in repr(w)
