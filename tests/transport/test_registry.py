"""The backend registry, and both transports against the Transport protocol."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing

import pytest
import torch

import actorgrad as ag
from actorgrad import errors as E
from actorgrad import transport
from actorgrad.core import codec
from actorgrad.core import messages as m
from actorgrad.transport.base import Capabilities, Transport
from actorgrad.transport.local import LocalTransport

PROTOCOL_METHODS = ["spawn", "notify", "request", "probe", "starting", "check_feasible", "place_group", "reset",
                    "kill", "close"]


def _transports() -> list[type]:
    from actorgrad.transport.ray import RayTransport

    return [LocalTransport, RayTransport]


def test_the_protocol_names_every_method_the_runtime_uses():
    declared = [n for n, v in vars(Transport).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert sorted(declared) == sorted(PROTOCOL_METHODS)
    assert set(typing.get_type_hints(Transport)) >= {"name", "capabilities"}


@pytest.mark.parametrize("cls", _transports(), ids=lambda c: c.__name__)
def test_both_transports_implement_the_protocol_with_its_signatures(cls):
    assert isinstance(cls.name, str) and isinstance(cls.capabilities, Capabilities)
    for name in PROTOCOL_METHODS:
        want = inspect.signature(getattr(Transport, name))
        got = inspect.signature(getattr(cls, name))
        assert list(got.parameters) == list(want.parameters), (cls.__name__, name)
        for p, q in zip(got.parameters.values(), want.parameters.values()):
            assert (p.kind, p.annotation, p.default) == (q.kind, q.annotation, q.default), (cls.__name__, name, p)
        assert got.return_annotation == want.return_annotation, (cls.__name__, name)
        assert (getattr(cls, name).__doc__ or "").strip(), (cls.__name__, name)


def test_capabilities_say_what_each_backend_can_do():
    from actorgrad.transport.ray import RayTransport

    assert LocalTransport.capabilities == Capabilities(messages=True)  # handed over in process, not encoded
    assert RayTransport.capabilities == Capabilities(places_gpus=True, placement_groups=True, restarts_workers=True)


def test_local_and_ray_are_registered_and_local_needs_no_ray():
    assert set(transport.backends()) >= {"local", "ray"}
    code = ("import sys, actorgrad as ag; ag.init(backend='local'); ag.shutdown(); "
            "assert 'ray' not in sys.modules, 'backend=local imported Ray'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_unknown_backend_names_the_registered_ones():
    with pytest.raises(E.ConfigError) as info:
        ag.init(backend="carrier-pigeon")
    assert "local" in str(info.value) and "ray" in str(info.value) and "carrier-pigeon" in str(info.value)
    with pytest.raises(E.ConfigError, match="takes no Ray address"):
        ag.init(backend="local", address="ray://elsewhere:10001")


def test_a_registered_backend_is_what_init_builds(monkeypatch):
    monkeypatch.setattr(transport, "_BACKENDS", dict(transport._BACKENDS))
    made: list = []

    def factory(address, **options):
        made.append((address, options))
        t = LocalTransport()
        t.name = "mine"  # an instance attribute: the class keeps "local"
        return t

    transport.register_backend("mine", factory)
    assert "mine" in transport.backends()
    try:
        rt = ag.init(backend="mine")
        assert rt.backend == "mine" and made == [(None, {})]
        w = ag.spawn(torch.nn.Linear(2, 1))
        assert w(torch.ones(1, 2)).value().shape == (1, 1)
    finally:
        ag.shutdown()
    with pytest.raises(E.ConfigError):
        transport.register_backend("", factory)
    with pytest.raises(E.ConfigError):
        transport.register_backend("broken", "not callable")


def test_local_transport_round_trip_and_probe():
    t = LocalTransport()
    try:
        spec = __import__("actorgrad.core.worker", fromlist=["WorkerSpec"]).WorkerSpec("w", torch.nn.Linear(3, 2))
        assert t.spawn(spec, {}) is None and t.starting("w") is None
        t.check_feasible("w", {"CPU": 1.0})
        assert t.place_group("pack", [{"CPU": 1.0}], ["w"], 1.0) is None
        # Messages are handed over as objects (capabilities.messages); a frame is still taken.
        state = t.request("w", 0, m.GetState(1, "module")).result(10)
        assert isinstance(state, m.Ack) and set(state.data) == {"weight", "bias"}
        state = t.request("w", 1, codec.encode_frame(m.GetState(2, "module"))).result(10)
        assert isinstance(state, m.Ack) and set(state.data) == {"weight", "bias"}
        answers = t.probe(["w", "gone"], 5.0)
        assert answers["gone"] == ["(not running)"] and isinstance(answers["w"], list)
        with pytest.raises(E.WorkerDied):
            t.notify("gone", 0, codec.encode_frame(m.Commit(1)))
    finally:
        t.close()


def test_local_transport_copies_what_the_caller_may_change():
    t = LocalTransport()
    try:
        from actorgrad.core.worker import WorkerSpec

        t.spawn(WorkerSpec("w", torch.nn.Linear(2, 2)), {})
        weights = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
        fut = t.request("w", 0, m.SetState(1, "module", weights))
        weights["weight"].fill_(7.0)  # the caller changes its tensor before the worker may have read it
        fut.result(10)
        state = t.request("w", 1, m.GetState(2, "module")).result(10)
        assert torch.equal(state.data["weight"], torch.zeros(2, 2))
        state.data["weight"].fill_(5.0)  # nor does the caller share the worker's tensors
        again = t.request("w", 2, m.GetState(3, "module")).result(10)
        assert torch.equal(again.data["weight"], torch.zeros(2, 2))
    finally:
        t.close()
