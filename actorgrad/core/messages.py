"""Messages between the caller and workers, and between workers.

Every message is a frozen record. Requests carry ``req``, a number chosen by
the caller; the worker answers each request with exactly one ``Ack`` or
``Failure`` carrying the same number. Everything else is one-way.

Value trees (``args``, ``kwargs``, ``Ack.data``, ``SetState.state``) hold
msgpack-native values, tensors, tuples and ``Slot`` markers; a ``Slot(i)``
stands for the i-th input that arrives as a ``Value`` message from the
producing worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

# An edge that delivers a gradient: (consumer call, consumer slot), or
# (SEED, k) for the k-th seed gradient of a pass.
SEED = -1
Edge = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Slot:
    """Placeholder in an argument tree for an input that arrives as a Value."""

    index: int


@dataclass(frozen=True, slots=True)
class Typed:
    """A container the wire has no native form for, by name: a namedtuple, a dataclass, a
    PackedSequence, or another type registered with ``torch.utils._pytree`` (see core/structure.py).

    ``kind``: "namedtuple", "dataclass", "packed" or "pytree"; ``type``: "module:qualname";
    ``context``: the field names (or the pytree context, a constant tree); ``children``: the values.
    """

    kind: str  # "namedtuple", "dataclass", "packed", "pytree" or "mapping" (an unregistered dict subclass)
    type: str
    context: Any
    children: tuple


@dataclass(frozen=True, slots=True)
class Op:
    """A tensor operation on values of a call's argument tree (core/ops.py): ``fn(*args, **kwargs)``.

    ``fn`` names a function of PyTorch's overridable API (``torch.Tensor.__add__``, ``torch.cat``); the
    receiving worker evaluates it before calling its module, so an operation on Nodes is part of the
    consumer's forward and of its VJP.
    """

    fn: str
    args: tuple
    kwargs: dict


@dataclass(frozen=True, slots=True)
class RefSpec:
    """Where a call's input slot comes from, and whether a gradient goes back."""

    worker: str  # producing worker
    call: int  # producing call
    out: int  # output index of the producing call
    grad: bool  # whether this edge carries a gradient back to the producer


@dataclass(frozen=True, slots=True)
class Forward:
    """Caller -> worker: run one call of the module once every input slot has arrived."""

    req: int
    call: int
    step: int
    args: Any
    kwargs: Any
    refs: tuple[RefSpec, ...]
    save: bool  # False under ag.no_grad(): keep nothing for backward
    # Caller leaves: positions (in core.leaves.tensors_in order) of the argument tensors whose
    # gradient goes back to the caller in the Ack of each Plan that reaches this call.
    leaves: tuple[int, ...] = ()
    # True: no module call; the call's result is its first argument, an expression of Ops over its
    # inputs (an operation on Nodes whose result the caller uses itself: a seed, a fetched value).
    expr: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """Caller -> producer: send output ``out`` of ``call`` to a consumer's slot."""

    call: int
    out: int
    to_worker: str
    to_call: int
    slot: int


@dataclass(frozen=True, slots=True)
class Value:
    """Producer -> consumer: the activation for one input slot of a call."""

    step: int
    call: int  # consumer call
    slot: int
    from_call: int
    tensor: torch.Tensor


@dataclass(frozen=True, slots=True)
class Expect:
    """Part of a Plan: the gradient messages one output of one call waits for."""

    call: int
    out: int
    edges: tuple[Edge, ...]


@dataclass(frozen=True, slots=True)
class SeedGrad:
    """Part of a Plan: the gradient a pass starts from at one output (None: ones)."""

    call: int
    out: int
    index: int
    tensor: Optional[torch.Tensor]


@dataclass(frozen=True, slots=True)
class Plan:
    """Caller -> worker: a pass starts; which gradients to expect, and the seeds here.

    Its Ack's data: ``{"worker", "calls", "applied"}`` and, where calls of the pass took caller
    leaves, ``"leaves": [[call, leaf position, gradient], ...]``.
    """

    req: int
    pass_id: int
    step: int
    expect: tuple[Expect, ...]
    seeds: tuple[SeedGrad, ...]
    # False: a partial backward (``inputs=``) that leaves this worker out: its parameters accumulate
    # nothing from the pass; it only sends input gradients on.
    accumulate: bool = True


@dataclass(frozen=True, slots=True)
class Gradient:
    """Consumer -> producer: the gradient of one output, from one consumer slot."""

    pass_id: int
    step: int
    call: int  # producing call, at the receiver
    out: int
    from_worker: str
    from_call: int
    slot: int
    tensor: Optional[torch.Tensor]  # None: this edge contributes nothing


@dataclass(frozen=True, slots=True)
class Close:
    """Caller -> worker: the step is closed; finish its calls and passes here, then answer with a report.

    The answer means "ready": nothing is applied until the caller's Commit, which comes once every
    participant of the step is ready (a step that fails anywhere before that applies nothing).
    """

    req: int
    step: int
    calls: tuple[int, ...]
    passes: tuple[int, ...]
    retain: tuple[tuple[int, int], ...]  # (call, out) the caller may still fetch


@dataclass(frozen=True, slots=True)
class Commit:
    """Caller -> worker: every worker is ready to close this step; apply its update now."""

    step: int


@dataclass(frozen=True, slots=True)
class Abort:
    """Caller -> worker: drop everything of this step; apply nothing from it."""

    step: int
    reason: str


@dataclass(frozen=True, slots=True)
class Release:
    """Caller -> worker: no Node of this call (run under ag.no_grad()) is left; free its outputs now."""

    step: int
    call: int


@dataclass(frozen=True, slots=True)
class Shard:
    """Replica -> replica: this replica's gradient sum of one step, once everything of it is done here.

    Every replica of a replicated worker sends its shard to each other one; each sums all of them
    in replica order, so that all apply the same update (core/replicas.py).
    """

    step: int
    from_worker: str
    grads: dict  # parameter name -> gradient (only the parameters that received one)


@dataclass(frozen=True, slots=True)
class Fetch:
    """Caller -> worker: send back output ``out`` of ``call`` once it is computed."""

    req: int
    call: int
    out: int


@dataclass(frozen=True, slots=True)
class GetState:
    """Caller -> worker: send back state.

    ``what``: "module" (the state_dict), "full" (module, optimizer, schedule, weight versions: a
    checkpoint entry), "stats" and "memory" (what the worker holds), "trace" (timeline events), or
    "update" (the report of the update applied at the last Commit).
    """

    req: int
    what: str


@dataclass(frozen=True, slots=True)
class SetState:
    """Caller -> worker: replace state; ``what`` is "module", "full" (as GetState), or "trace" (on/off)."""

    req: int
    what: str
    state: Any


@dataclass(frozen=True, slots=True)
class Ack:
    """Worker -> caller: a request succeeded; ``data`` is its result."""

    req: int
    data: Any


@dataclass(frozen=True, slots=True)
class OutputMeta:
    """What the caller learns of one output of a call: enough to check seeds and shapes without fetching it."""

    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool


@dataclass(frozen=True, slots=True)
class ForwardDone:
    """Worker -> caller: the reply to a Forward; the call ran and these are its outputs."""

    req: int
    # What the module returned, with Slot(i) where output i (a tensor) is: constants, None and
    # containers (tuples, lists, dicts, Typed) as they were.
    structure: Any
    outputs: tuple[OutputMeta, ...]
    version: int  # the weight version the forward used (negative: a max_staleness snapshot)


@dataclass(frozen=True, slots=True)
class CloseReady:
    """Worker -> caller: the reply to a Close; everything of the step is done here, ready to Commit.

    ``final`` False: the update that Commit applies must be reported after it (its norm is known
    only then): the caller asks with GetState("update") and gets an UpdateReport.
    """

    req: int
    step: int
    calls: int
    passes: int
    applied: bool  # an update of this step was, or will be at Commit, applied
    version: int  # the weight version after this step's Commit
    final: bool
    metrics: dict  # the update's metrics: updates, grad_norm, clipped, staleness, lr, update_norm


@dataclass(frozen=True, slots=True)
class UpdateReport:
    """Worker -> caller: the reply to GetState("update"): what the last committed step's update did."""

    req: int
    step: Optional[int]  # None: no step has committed here yet
    applied: bool
    version: int
    metrics: dict


@dataclass(frozen=True, slots=True)
class Failure:
    """Worker -> caller: a request failed; ``error`` is an errors.to_info record."""

    req: int
    error: dict


Message = Union[
    Forward, Route, Value, Plan, Gradient, Close, Commit, Abort, Fetch, GetState, SetState, Ack, Failure,
    ForwardDone, CloseReady, UpdateReport, Release, Shard,
]
Reply = Union[Ack, Failure, ForwardDone, CloseReady, UpdateReport]
Request = Union[Forward, Plan, Close, Fetch, GetState, SetState]
