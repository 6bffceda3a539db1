"""Diagnosis: exceptions of the user's module become errors that say what went wrong and where."""

import pytest
import torch

from actorgrad import errors as E
from actorgrad.core import messages as m
from actorgrad.core.calls import CallState
from actorgrad.core.diagnose import Diagnosis, describe_missing, first_nonfinite, fmt_edges
from actorgrad.core.passes import PassTable
from actorgrad.core.vjp import Saved


def call(refs=()):
    return CallState(m.Forward(1, 10, 3, [m.Slot(i) for i in range(len(refs))], {}, tuple(refs), True))


def test_errors_name_the_worker_and_keep_the_cause():
    d = Diagnosis("w", torch.nn.Linear(2, 1))
    exc = ValueError("boom")
    err = d.error(E.WorkerError, "it failed", call=10, step=3, exc=exc)
    assert err.worker == "w" and err.call == 10 and err.step == 3 and err.__cause__ is exc
    assert "ValueError: boom" in err.cause_text and "boom" in err.remote_traceback


def test_forward_exceptions_are_classified_by_their_message():
    d = Diagnosis("w", torch.nn.Linear(2, 1))
    lin = torch.nn.Linear(2, 1)
    try:
        lin(torch.ones(3, 5))
    except RuntimeError as exc:
        assert isinstance(d.forward_raised(call(), exc, []), E.ForwardShapeError)
    x = torch.ones(3, 2, dtype=torch.float64)
    try:
        lin(x)
    except RuntimeError as exc:
        err = d.forward_raised(call(), exc, [x])
        assert isinstance(err, E.ForwardDTypeError) and "input 0 has dtype float64" in str(err)
    assert type(d.forward_raised(call(), KeyError("k"), [])) is E.WorkerError


def test_nonfinite_output_says_where_it_came_from():
    d = Diagnosis("w", torch.nn.Identity())
    c = call((m.RefSpec("up", 5, 0, True),))
    nan = torch.tensor([float("nan")])
    assert d.nonfinite_forward(c, [torch.ones(1)], [torch.ones(1)]) is None
    assert "from worker 'up' call 5" in str(d.nonfinite_forward(c, [nan], [nan]))
    assert "appeared here" in str(d.nonfinite_forward(c, [nan], [torch.ones(1)]))
    assert first_nonfinite([torch.ones(1), torch.ones(1, dtype=torch.long), nan]) == 2


def test_custom_backward_results_are_checked():
    d = Diagnosis("w", torch.nn.Linear(2, 1))
    c, saved = call(), Saved([torch.ones(2)], [torch.ones(1)])
    with pytest.raises(E.WorkerError, match="must return"):
        d.check_custom(c, saved, [None])
    with pytest.raises(E.WorkerError, match="1 inputs"):
        d.check_custom(c, saved, ([None, None], {}))
    with pytest.raises(E.ShapeError):
        d.check_custom(c, saved, ([torch.ones(3)], {}))
    with pytest.raises(E.WorkerError, match="unknown parameter"):
        d.check_custom(c, saved, (None, {"nope": torch.ones(1)}))
    ins, params = d.check_custom(c, saved, (None, {"bias": torch.ones(1), "weight": None}))
    assert ins == [None] and list(params) == ["bias"]


def test_describe_missing_lists_inputs_gates_and_gradients():
    waiting = call((m.RefSpec("up", 5, 0, True),))
    gated = call()
    ps = PassTable().add(m.Plan(1, 100, 3, (), ()), 0.0)
    ps.ledger.expect(10, 0, {(m.SEED, 0)})
    lines = describe_missing([waiting, gated], [ps], lambda step: False)
    assert lines == ["call 10 (step 3): forward waits for input slot 0 from 'up' call 5",
                     "call 10 (step 3): forward waits for the update of an earlier step",
                     "call 10 (pass 100): gradient for output 0 from the seed"]
    assert fmt_edges([]) == "nothing more"
