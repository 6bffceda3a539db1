"""Porting PyTorch models as they are written (issue 13): nested outputs and inputs, operations on Nodes.

Each model is trained twice from the same weights, in plain PyTorch and cut into actorgrad workers by
a user, and every parameter must agree to 1e-5: a character-level Transformer block whose residuals
and loss are operations on Nodes, an LSTM language model with ``(out, (h, c))`` and truncated BPTT,
modules returning dicts and dataclasses, namedtuple and PackedSequence arguments, and gradient
accumulation with ``(loss / K).backward()``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import actorgrad as ag
from actorgrad import errors as E

ATOL = RTOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=(lambda m: f"{msg}: {m}") if msg else None)


def same_parameters(workers: dict, modules: dict) -> None:
    for name, w in workers.items():
        got = w.state_dict()
        for k, v in modules[name].state_dict().items():
            close(got[k], v, f"{name}.{k}")


# --- a character-level Transformer block ---------------------------------------------------------

TEXT = ("to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles")
VOCAB = sorted(set(TEXT))
D, HEADS, T, B = 32, 4, 16, 8


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB), D)
        self.pos = nn.Embedding(T, D)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1]))


class Attention(nn.Module):
    """Pre-norm causal self-attention; returns what nn.MultiheadAttention returns: ``(out, None)``."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        # bias=False: the key bias's true gradient is zero (softmax ignores a constant per row), so what it
        # gets is rounding noise, which Adam scales up to full steps; a Ray worker computes with one thread
        # and plain PyTorch here with two, so the noise (not the math) would differ.
        self.mha = nn.MultiheadAttention(D, HEADS, bias=False, batch_first=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor):
        x = self.ln(h)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.out = nn.Linear(D, len(VOCAB))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(h))


def char_batches(steps: int, seed: int = 0):
    data = torch.tensor([VOCAB.index(c) for c in TEXT])
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        yield x, y


def transformer_step(parts, x, y, mask):
    """One forward written as in plain PyTorch: residuals, a reshape and the loss on the outputs."""
    h = parts["embed"](x)
    a, _ = parts["attn"](h, mask)
    h = h + a
    h = h + parts["mlp"](h)
    logits = parts["head"](h)
    return F.cross_entropy(logits.view(-1, len(VOCAB)), y.view(-1))


def test_transformer_block_trains_exactly_as_in_pytorch(backend):
    torch.manual_seed(0)
    modules = {"embed": Embed(), "attn": Attention(), "mlp": MLP(), "head": Head()}
    plain = copy.deepcopy(modules)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=3e-3) for k, m in plain.items()}
    workers = {k: ag.spawn(m, name=k, optimizer=ag.Optim(torch.optim.AdamW, lr=3e-3)) for k, m in modules.items()}
    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    losses = []
    for x, y in char_batches(20):
        loss = transformer_step(workers, x, y, mask)
        loss.backward()
        losses.append(loss.item())
        ag.step()
        ref = transformer_step(plain, x, y, mask)
        ref.backward()
        for o in opts.values():
            o.step()
            o.zero_grad()
        assert abs(losses[-1] - ref.item()) < 1e-4
    same_parameters(workers, plain)
    assert losses[-1] < losses[0]  # it learns


# --- an LSTM language model: (out, (h, c)) and truncated BPTT -------------------------------------


class LSTMCore(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 24, batch_first=True)

    def forward(self, x: torch.Tensor, state=None):
        return self.lstm(x, state)


def test_lstm_language_model_with_truncated_bptt(backend):
    torch.manual_seed(1)
    V, chunk = 20, 6
    modules = {"emb": nn.Embedding(V, 16), "rnn": LSTMCore(), "dec": nn.Linear(24, V)}
    plain = copy.deepcopy(modules)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.5) for k, m in plain.items()}
    workers = {k: ag.spawn(m, name=k, optimizer=ag.Optim(torch.optim.SGD, lr=0.5)) for k, m in modules.items()}
    seq = torch.randint(0, V, (4, 4 * chunk + 1), generator=torch.Generator().manual_seed(2))
    state = ref_state = None
    for i in range(0, 4 * chunk, chunk):
        x, y = seq[:, i:i + chunk], seq[:, i + 1:i + chunk + 1]
        out, (h, c) = workers["rnn"](workers["emb"](x), state)
        loss = F.cross_entropy(workers["dec"](out).reshape(-1, V), y.reshape(-1))
        loss.backward()
        ag.step()
        state = (h.value(), c.value())  # truncated: the next chunk starts from the values, as .detach() does
        r_out, (rh, rc) = plain["rnn"](plain["emb"](x), ref_state)
        r_loss = F.cross_entropy(plain["dec"](r_out).reshape(-1, V), y.reshape(-1))
        r_loss.backward()
        for o in opts.values():
            o.step()
            o.zero_grad()
        ref_state = (rh.detach(), rc.detach())
        close(state[0], ref_state[0], "h")
    same_parameters(workers, plain)


def test_state_passed_between_steps_as_nodes_of_one_step(backend):
    """Within one step the LSTM state flows as Nodes: full BPTT through three chunks."""
    torch.manual_seed(3)
    rnn = LSTMCore()
    plain = copy.deepcopy(rnn)
    w = ag.spawn(rnn, optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    xs = [torch.randn(2, 3, 16) for _ in range(3)]
    state, ref_state, total, ref_total = None, None, 0, 0
    for x in xs:
        out, state = w(x, state)
        r_out, ref_state = plain(x, ref_state)
        total = total + (out ** 2).mean()
        ref_total = ref_total + (r_out ** 2).mean()
    total.backward()
    ag.step()
    ref_total.backward()
    opt.step()
    same_parameters({"w": w}, {"w": plain})


# --- dicts, dataclasses, namedtuples, PackedSequence ---------------------------------------------


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor
    hidden: torch.Tensor
    loss: Optional[torch.Tensor] = None
    note: str = "ok"


Pair = collections.namedtuple("Pair", "left right")


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, pair, scale: float = 1.0):
        assert type(pair).__name__ == "Pair" and pair._fields == ("left", "right"), type(pair)
        h = torch.tanh(self.a(pair.left + pair.right))
        return {"hidden": h, "logits": self.b(h) * scale, "extra": [None, 3]}


class DataclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(6, 3)

    def forward(self, h: torch.Tensor, target: torch.Tensor) -> ModelOutput:
        logits = self.l(h)
        return ModelOutput(logits=logits, hidden=h, loss=F.cross_entropy(logits, target))


def test_dict_and_dataclass_outputs_and_namedtuple_arguments(backend):
    torch.manual_seed(4)
    modules = {"enc": DictNet(), "cls": DataclassNet()}
    plain = copy.deepcopy(modules)
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-2) for k, m in plain.items()}
    workers = {k: ag.spawn(m, name=k, optimizer=ag.Optim(torch.optim.Adam, lr=1e-2)) for k, m in modules.items()}
    for step in range(4):
        x1, x2, t = torch.randn(5, 6), torch.randn(5, 6), torch.randint(0, 3, (5,))
        out = workers["enc"](Pair(x1, x2), scale=0.5)
        assert set(out) == {"hidden", "logits", "extra"} and out["extra"] == [None, 3]
        res = workers["cls"](out["hidden"], t)
        assert isinstance(res, ModelOutput) and res.note == "ok"
        total = res.loss + (out["logits"] ** 2).mean()
        total.backward()
        ag.step()
        r = plain["enc"](Pair(x1, x2), scale=0.5)
        rr = plain["cls"](r["hidden"], t)
        (rr.loss + (r["logits"] ** 2).mean()).backward()
        for o in opts.values():
            o.step()
            o.zero_grad()
    same_parameters(workers, plain)


class Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 5)

    def forward(self, packed: PackedSequence):
        assert isinstance(packed, PackedSequence), type(packed)
        out, h = self.rnn(packed)
        return out, h


def test_packed_sequence_in_and_out(backend):
    torch.manual_seed(5)
    m = Packed()
    plain = copy.deepcopy(m)
    w = ag.spawn(m, optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    x = torch.randn(6, 3, 4)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]))
    out, h = w(packed)
    assert isinstance(out, PackedSequence)
    assert isinstance(out.data, ag.Node)
    r_out, r_h = plain(packed)
    close(out.data.value(), r_out.data)
    (out.data.sum() + h.sum()).backward()
    ag.step()
    (r_out.data.sum() + r_h.sum()).backward()
    opt.step()
    same_parameters({"w": w}, {"w": plain})


# --- operations on Nodes --------------------------------------------------------------------------


def test_gradient_accumulation_with_scaled_losses(backend):
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    plain = copy.deepcopy(net)
    w = ag.spawn(net, optimizer=ag.Optim(torch.optim.SGD, lr=0.1, momentum=0.9))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    K = 4
    for step in range(3):
        batches = [(torch.randn(4, 5), torch.randn(4, 1)) for _ in range(K)]
        for x, y in batches:
            loss = F.mse_loss(w(x), y)
            (loss / K).backward()
        ag.step()
        for x, y in batches:
            (F.mse_loss(plain(x), y) / K).backward()
        opt.step()
        opt.zero_grad()
    same_parameters({"w": w}, {"w": plain})


def test_operations_between_workers_are_exact(backend):
    """Arithmetic with constants, indexing, views, reductions, cat/stack, elementwise functions, apply."""
    torch.manual_seed(7)
    a, b = nn.Linear(4, 6), nn.Linear(4, 6)
    pa, pb = copy.deepcopy(a), copy.deepcopy(b)
    wa = ag.spawn(a, optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    wb = ag.spawn(b, optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    opt = torch.optim.SGD(list(pa.parameters()) + list(pb.parameters()), lr=0.1)
    x = torch.randn(3, 4)

    def f(A, B):
        y, z = A(x), B(x)
        u = -(2.0 * y - z / 3 + 1) ** 2
        v = torch.cat([u[:, :3], torch.tanh(z)[:, 3:]], dim=1).view(3, 2, 3).transpose(1, 2).flatten(1)
        s = torch.stack([v.sum(0), v.mean(0)]).permute(1, 0).reshape(-1)
        swish = lambda q: torch.relu(q) * torch.sigmoid(q)  # noqa: E731
        t = (s.apply(swish) if isinstance(s, ag.Node) else swish(s)) + F.softplus(y).sum()
        return t.sum() + (y @ z.T).abs().mean()

    loss = f(wa, wb)
    ref = f(pa, pb)
    close(loss.value(), ref.detach())
    loss.backward()
    ag.step()
    ref.backward()
    opt.step()
    same_parameters({"a": wa, "b": wb}, {"a": pa, "b": pb})


def test_an_operation_fused_into_a_consumer_adds_no_call(backend):
    h = ag.spawn(nn.Linear(4, 4), name="h", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    g = ag.spawn(nn.Linear(4, 4), name="g", optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    x = torch.randn(2, 4)
    out = g(h(x) * 2 + 1)
    assert type(out) is ag.Node
    out.sum().backward()  # materialized once, in g's worker (its first operand)
    report = ag.step()
    assert report.workers["h"].calls == 1 and report.workers["g"].calls == 2


def test_unsupported_operations_name_themselves(backend):
    w = ag.spawn(nn.Linear(3, 3), optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    y = w(torch.randn(2, 3))
    with pytest.raises(E.ConfigError, match="add_.*in-place"):
        y.add_(1)
    with pytest.raises(E.ConfigError, match="__setitem__"):
        y[0] = 1.0
    with pytest.raises(E.ConfigError, match="item|value"):
        float(y)
    with pytest.raises(E.ConfigError, match="truth value"):
        if y:
            pass
    with pytest.raises(E.ConfigError, match="tolist"):
        y.tolist()
    with pytest.raises(E.ConfigError, match="out="):
        torch.add(y, 1, out=torch.empty(2, 3))
    with pytest.raises(AttributeError, match="no_such_method"):
        y.no_such_method()
    y.sum().backward()  # the step is still usable
    ag.step()


def test_the_error_of_a_failed_first_forward_comes_where_its_result_is_used(backend):
    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("kaboom in forward")

    w = ag.spawn(Fails())
    out = w(torch.randn(2))
    with pytest.raises(E.WorkerError, match="kaboom") as info:
        a, b = out  # not "cannot unpack non-iterable Node object"
    assert info.value.worker == w.name and "kaboom" in str(info.value)
    with pytest.raises(E.WorkerError, match="kaboom"):
        ag.step()
    ok = ag.spawn(nn.Linear(2, 2), optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    ok(torch.randn(1, 2)).sum().backward()
    ag.step()


def test_comparisons_and_shape_questions_work_as_on_tensors(backend):
    torch.manual_seed(8)
    net = nn.Linear(4, 3)
    w = ag.spawn(copy.deepcopy(net))
    x, t = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with ag.no_grad():
        logits = w(x)
        acc = (logits.argmax(-1) == t).float().mean().item()
        assert logits.size() == (10, 3) and logits.size(-1) == 3 and len(logits) == 10 and logits.ndim == 2
        assert logits.shape[0] == 10 and logits.argmax(-1).shape == (10,)  # answered from shapes alone
        first, *rest = logits  # iterates over the first dimension, as a tensor does
        assert len(rest) == 9
        close(first.value(), net(x)[0].detach())
        assert (logits != logits).sum().item() == 0
    assert acc == (net(x).argmax(-1) == t).float().mean().item()
    assert len({logits, logits}) == 1  # hashing stays by identity
    ag.step()


class Registered(collections.OrderedDict):
    """A container known to torch.utils._pytree only by registration, as Hugging Face's ModelOutput is."""


torch.utils._pytree.register_pytree_node(
    Registered, lambda d: (list(d.values()), list(d.keys())),
    lambda values, keys: Registered(zip(keys, values)), serialized_type_name="test_port.Registered")


class RegisteredNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> Registered:
        y = self.l(x)
        return Registered(logits=y, pooled=y.mean(0))


def test_a_pytree_registered_output_type_survives_the_trip(backend):
    torch.manual_seed(9)
    net = RegisteredNet()
    plain = copy.deepcopy(net)
    w = ag.spawn(net, optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    out = w(x)
    assert type(out) is Registered and list(out) == ["logits", "pooled"]
    (out["logits"].sum() + out["pooled"].pow(2).sum()).backward()
    ag.step()
    r = plain(x)
    (r["logits"].sum() + r["pooled"].pow(2).sum()).backward()
    opt.step()
    same_parameters({"w": w}, {"w": plain})


def test_nodes_passed_on_are_freed_without_the_garbage_collector(local):
    """Reference counting alone frees a Node once the user drops it (the soak test counts on it: a Node
    held until the collector runs keeps its worker's output past the step)."""
    import gc
    import weakref

    class Takes(nn.Module):
        def forward(self, d):
            return d["h"] + d["pair"].left

    a = ag.spawn(nn.Linear(3, 3), optimizer=ag.Optim(torch.optim.SGD, lr=0.1))
    b = ag.spawn(Takes())
    gc.disable()
    try:
        x = torch.randn(2, 3, requires_grad=True)
        h = a(x)
        probe = weakref.ref(h)
        out = b({"h": h * 2, "pair": Pair(h, None)})
        out.sum().backward()
        del h
        assert probe() is None
    finally:
        gc.enable()
    ag.step()
    assert x.grad is not None
