"""Caller-side handles: Worker, Node, Pass, StepHandle, StepReport. Each method asks the Runtime."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence, Union

import torch
from torch.nn.modules.module import _IncompatibleKeys

from . import modulelike
from .core.caller import PassRecord, StepRecord
from .core.graph import CallRecord
from .core.messages import Op
from .nodeops import NodeOps, meta_of_op


class Runtime(Protocol):
    """What handles ask of the runtime: the few calls a user's handle turns into."""

    closed: bool
    backend: str

    def call(self, worker: str, args: tuple, kwargs: dict) -> Any: ...
    def materialize(self, node: "DerivedNode") -> "Node": ...
    def meta(self, node: "Node") -> tuple[torch.Size, torch.dtype]: ...
    def fetch(self, node: "Node", timeout: Optional[float]) -> torch.Tensor: ...
    def track(self, node: "Node") -> None: ...
    def backward(self, nodes: list[Any], gradients: Optional[list[Any]], inputs: Any = None) -> "Pass": ...
    def poll(self) -> None: ...
    def wait_pass(self, prec: PassRecord, timeout: Optional[float]) -> None: ...
    def wait_step(self, step: StepRecord, timeout: Optional[float]) -> "StepReport": ...
    def get_state(self, worker: str, what: str, timeout: Optional[float]) -> Any: ...
    def set_state(self, worker: str, what: str, state: Any, timeout: Optional[float]) -> Any: ...
    def set_training(self, workers: list[str], mode: bool, timeout: Optional[float]) -> None: ...

__all__ = ["Worker", "Node", "DerivedNode", "Pass", "StepHandle", "StepReport", "WorkerReport"]


class Worker:
    """A module living in its own worker; call it like the module."""

    def __init__(self, runtime: Runtime, name: str, actor: Any, module_class: str, training: bool = True) -> None:
        self._runtime = runtime
        self.name = name
        self.actor = actor
        self.module_class = module_class
        self._training = bool(training)  # kept in step by the runtime's set_training
        self._info: Any = None  # spawning.WorkerInfo, set at ag.spawn: what repr() and to() read

    @property
    def training(self) -> bool:
        """Whether the worker's module is in training mode, as ``nn.Module.training``."""
        return self._training

    def train(self, mode: bool = True) -> "Worker":
        """Set the module's mode for the calls issued from now on, as ``nn.Module.train``; returns self."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")  # as nn.Module.train
        self._runtime.set_training([self.name], mode, None)
        return self

    def eval(self) -> "Worker":
        """``train(False)``: BatchNorm uses (and keeps) its running statistics, Dropout is off."""
        return self.train(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One call of the module, at once: what it returns, with a Node at each tensor (``out, (h, c) = lstm(x)``)."""
        return self._runtime.call(self.name, args, kwargs)

    def state_dict(self, timeout: Optional[float] = None) -> dict[str, torch.Tensor]:
        """The module's parameters and buffers, fetched from its worker."""
        return self._runtime.get_state(self.name, "module", timeout)

    def stats(self, timeout: Optional[float] = None) -> dict[str, int]:
        """What the worker holds now: calls, saved graphs, stashed weights, passes, open steps."""
        return self._runtime.get_state(self.name, "stats", timeout)

    def memory(self, timeout: Optional[float] = None) -> dict[str, int]:
        """``stats()`` plus the worker process's memory (rss_bytes; uss_bytes, pss_bytes on Linux) and live tensors."""
        return self._runtime.get_state(self.name, "memory", timeout)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, *,
                        timeout: Optional[float] = None) -> _IncompatibleKeys:
        """Load parameters and buffers into the worker's module as ``nn.Module.load_state_dict`` does.

        ``strict=True`` raises ConfigError on missing or unexpected keys; ``strict=False`` loads the keys
        that match. Returns ``(missing_keys, unexpected_keys)`` as nn.Module does. A wrong shape raises
        ShapeError. Unlike nn.Module, an error loads nothing. The optimizer's state is kept (as a plain
        PyTorch optimizer keeps its state when its module loads weights); forwards from now on use the
        loaded weights, calls already issued keep the weights their forward used.
        """
        request = modulelike.load_request(state_dict, strict, self.name)
        return modulelike.incompatible_keys(self._runtime.set_state(self.name, "load", request, timeout))

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True, *,
                         timeout: Optional[float] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, copy) per parameter, as ``nn.Module.named_parameters``; see ``parameters()`` for the copies."""
        data = self._runtime.get_state(self.name, "tensors", timeout)
        return iter(modulelike.named_tensors(data, "parameters", prefix, recurse, remove_duplicate))

    def parameters(self, recurse: bool = True, *, timeout: Optional[float] = None) -> Iterator[torch.Tensor]:
        """The module's parameters as copies, fetched from the worker in one request.

        Plain CPU tensors (not nn.Parameter), detached from the worker's (changing one changes nothing there:
        use ``load_state_dict``), with ``requires_grad`` as the worker's parameter has it, so frozen ones show.
        Tied parameters come once (and are one tensor), as on nn.Module.
        """
        return iter([t for _, t in self.named_parameters(recurse=recurse, timeout=timeout)])  # fetched now

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True, *,
                      timeout: Optional[float] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, copy) per buffer (non-persistent ones too), as ``nn.Module.named_buffers``."""
        data = self._runtime.get_state(self.name, "tensors", timeout)
        return iter(modulelike.named_tensors(data, "buffers", prefix, recurse, remove_duplicate))

    def buffers(self, recurse: bool = True, *, timeout: Optional[float] = None) -> Iterator[torch.Tensor]:
        """The module's buffers as CPU copies, fetched from the worker in one request."""
        return iter([t for _, t in self.named_buffers(recurse=recurse, timeout=timeout)])

    def to(self, *args: Any, **kwargs: Any) -> "Worker":
        """As ``nn.Module.to`` where a worker allows it: returns self when nothing would change.

        A worker's device and dtype are fixed at ``ag.spawn`` (its process, reserved GPU, optimizer state,
        weight stashes and checkpoints depend on them): ``to()`` to the device it runs on, or to the dtype
        its floating tensors have, is a no-op; any other device or dtype raises ConfigError naming the
        worker (spawn the module with ``device=``, or convert it with ``module.to(dtype)`` before ag.spawn).
        No round trip: it checks what the caller kept at spawn.
        """
        modulelike.check_to(self._info, self.name, args, kwargs)
        return self

    def __repr__(self) -> str:
        identity = getattr(getattr(self._runtime, "transport", None), "identity", None)
        where = identity(self.name) if callable(identity) else None  # Ray: the node, once the worker runs
        return modulelike.describe(self.name, self.module_class, self._info, getattr(self._runtime, "backend", None),
                                   self._training, where)


class Node(NodeOps):
    """A handle on an activation that lives in a worker: output ``out`` of one call.

    Tensor operations on it (``+``, indexing, ``view``, ``torch.cat``, ``torch.relu``...) give
    DerivedNodes: see nodeops.py for where they run.
    """

    __slots__ = ("_runtime", "call", "out", "detached", "_value", "__weakref__")

    def __init__(self, runtime: Runtime, call: CallRecord, out: int, detached: bool = False) -> None:
        self._runtime = runtime
        self.call = call
        self.out = out
        self.detached = detached
        self._value: Optional[torch.Tensor] = None

    @property
    def worker(self) -> str:
        """The name of the worker that holds this activation."""
        return self.call.worker

    @property
    def step(self) -> int:
        """The step this activation belongs to."""
        return self.call.step

    @property
    def shape(self) -> torch.Size:
        """The activation's shape, as ``Tensor.shape`` (``x.shape[0]``); waits for its forward to report it."""
        meta = self.call.meta
        if meta is not None and self.out < len(meta.outputs):
            return torch.Size(meta.outputs[self.out].shape)
        return self.size()

    def value(self, timeout: Optional[float] = None) -> torch.Tensor:
        """Fetch the activation to the caller (waits for its forward)."""
        return self._runtime.fetch(self, timeout)

    def item(self, timeout: Optional[float] = None) -> Union[float, int, bool]:
        """The activation as a Python number (it must hold one element)."""
        return self.value(timeout).item()

    def detach(self) -> "Node":
        """The same value; consumers of the returned node send no gradient back through it."""
        node = Node(self._runtime, self.call, self.out, detached=True)
        node._value = self._value
        self._runtime.track(node)
        return node

    def backward(self, gradient: Optional[torch.Tensor] = None, *, inputs: Any = None) -> "Pass":
        """Start one backward pass seeded here; returns at once (scalars are seeded with 1).

        ``inputs``: the Workers whose parameters accumulate this pass's gradient, as ``inputs=`` of
        ``torch.autograd.backward``; the others only pass gradients on (default: every worker).
        """
        return self._runtime.backward([self], None if gradient is None else [gradient], inputs)

    def _derived(self, op: Op, several: bool = False) -> "DerivedNode":
        return DerivedNode(self._runtime, op, several)

    def _meta_value(self) -> torch.Tensor:
        shape, dtype = self._runtime.meta(self)
        return torch.empty(shape, dtype=dtype, device="meta")

    def __repr__(self) -> str:
        d = ", detached" if self.detached else ""
        return f"Node({self.call.worker!r}, call={self.call.id}, out={self.out}, step={self.call.step}{d})"


class DerivedNode(Node):
    """The result of a tensor operation on Nodes; computed where it is used (see nodeops.py)."""

    __slots__ = ("op", "uses", "real", "several", "_meta", "_first")

    def __init__(self, runtime: Runtime, op: Op, several: bool = False) -> None:
        # call is None until the operation is materialized: the runtime resolves a DerivedNode first.
        super().__init__(runtime, None, 0)  # type: ignore[arg-type]
        self.op = op
        self.uses = 0  # calls it was fused into; a second use materializes it
        self.real: Optional[Node] = None  # the Node of its materialized result
        self.several = several  # a several-tensor result: only its items (GETITEM) are used
        self._meta: Any = None
        self._first: Optional[Node] = None  # see first_base

    def bases(self) -> list[Node]:
        """The computed Nodes this operation reads, in order."""
        import torch.utils._pytree as pytree

        found: list[Node] = []
        for x in pytree.tree_leaves((self.op.args, self.op.kwargs)):
            if isinstance(x, DerivedNode):
                found += [x.real] if x.real is not None else x.bases()
            elif isinstance(x, Node):
                found.append(x)
        return found

    @property
    def first_base(self) -> Node:
        """The first computed Node this operation reads: its worker computes the result. Found once:
        an operand materialized later holds its result in that same worker and step."""
        if self._first is None:
            self._first = self.bases()[0]
        return self._first

    def _meta_value(self) -> Any:
        if self._meta is None:
            self._meta = meta_of_op(self.op)
        return self._meta

    def resolved(self) -> Node:
        """The Node of this operation's result, computing it once (in the worker of its first operand)."""
        return self.real if self.real is not None else self._runtime.materialize(self)

    @property
    def worker(self) -> str:
        """The worker that holds (or would compute) the result: that of its first Node operand."""
        return self.real.worker if self.real is not None else self.first_base.worker

    @property
    def step(self) -> int:
        """The step this value belongs to."""
        return self.first_base.step

    @property
    def shape(self) -> torch.Size:
        """The result's shape, from its operands' shapes (waits for their forwards)."""
        return self.real.shape if self.real is not None else self.size()

    def value(self, timeout: Optional[float] = None) -> torch.Tensor:
        """Compute the result (once) and fetch it to the caller."""
        return self.resolved().value(timeout)

    def detach(self) -> Node:
        """The result, computed; consumers of the returned node send no gradient back through it."""
        return self.resolved().detach()

    def backward(self, gradient: Optional[torch.Tensor] = None, *, inputs: Any = None) -> "Pass":
        """Start one backward pass seeded at this result (computed once, where its first operand lives)."""
        return self._runtime.backward([self], None if gradient is None else [gradient], inputs)

    def __repr__(self) -> str:
        if self.real is not None:
            return f"DerivedNode({self.op.fn}, {self.real!r})"
        return f"DerivedNode({self.op.fn}, of {len(self.bases())} node(s), step={self.step})"


class Pass:
    """One backward pass in flight."""

    def __init__(self, runtime: Runtime, record: PassRecord) -> None:
        self._runtime = runtime
        self._record = record

    @property
    def id(self) -> int:
        """The pass's id (unique in this runtime)."""
        return self._record.id

    @property
    def workers(self) -> list[str]:
        """The workers this pass involves."""
        return sorted(self._record.workers)

    def done(self) -> bool:
        """Whether every worker has finished its part of the pass (without waiting)."""
        self._runtime.poll()
        return not self._record.pending and self._record.error is None

    def wait(self, timeout: Optional[float] = None) -> "Pass":
        """Wait until every worker has finished its part of this pass."""
        self._runtime.wait_pass(self._record, timeout)
        return self

    def __repr__(self) -> str:
        state = "done" if not self._record.pending else f"waiting on {sorted(self._record.pending)}"
        return f"Pass({self.id}, step={self._record.step.id}, {state})"


@dataclass(frozen=True)
class WorkerReport:
    """One worker's part of a step, and what its updates did.

    - ``calls``, ``passes``: calls of this worker in the step, and passes that reached it.
    - ``applied``: whether it applied an update; ``updates``: how many optimizer steps (one with
      ``update="step"``; one per pass with ``update="pass"``); ``version``: updates applied so far.
    - ``grad_norm``: the L2 norm of the gradient of its (last) update, before clipping.
    - ``clipped``: whether ``clip_grad_norm`` / ``clip_grad_value`` changed a gradient.
    - ``update_norm``: the L2 norm of the parameter change its updates made (with
      ``ag.Optim(..., track_update_norm=True)``; else None).
    - ``staleness``: for each update, how many updates the worker had applied between the weights
      that the forwards behind its gradient used and the weights it was applied to; the largest.
      0 with the defaults; k with ``max_staleness=k`` once a pipeline is full; None: no update.
    - ``lr``: the learning rate its (last) update used (first param group; without an update, the
      current one); ``lrs``: the same per param group. None / () without an optimizer.
    """

    name: str
    calls: int
    passes: int
    applied: bool
    grad_norm: Optional[float]
    version: int
    updates: int = 0
    update_norm: Optional[float] = None
    staleness: Optional[int] = None
    lr: Optional[float] = None
    lrs: tuple[float, ...] = ()
    clipped: bool = False
    # A replicated worker: this row is the worker (calls and passes summed over its replicas, the
    # update they all applied); ``replicas`` holds one row per replica.
    replicas: tuple["WorkerReport", ...] = ()

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> "WorkerReport":
        """Build from the report a worker sends when it is ready to close a step."""
        return cls(name=name, calls=int(d["calls"]), passes=int(d["passes"]), applied=bool(d["applied"]),
                   grad_norm=None, version=int(d["version"])).merged(d)

    def merged(self, d: dict[str, Any]) -> "WorkerReport":
        """This report with the update metrics of ``d`` (a worker's report of its updates); a key
        that ``d`` lacks keeps this report's value."""
        lrs = tuple(float(x) for x in (d["lr"] or ())) if "lr" in d else self.lrs
        staleness = d.get("staleness", self.staleness)
        return replace(
            self, applied=bool(d.get("applied", self.applied)), version=int(d.get("version", self.version)),
            updates=int(d.get("updates", self.updates)), grad_norm=d.get("grad_norm", self.grad_norm),
            update_norm=d.get("update_norm", self.update_norm),
            staleness=None if staleness is None else int(staleness),
            lr=lrs[0] if lrs else None, lrs=lrs, clipped=bool(d.get("clipped", self.clipped)))

    def __str__(self) -> str:
        parts = [f"calls={self.calls}", f"passes={self.passes}", f"updates={self.updates}"]
        if self.grad_norm is not None:
            parts.append(f"grad_norm={_num(self.grad_norm)}" + (" (clipped)" if self.clipped else ""))
        if self.update_norm is not None:
            parts.append(f"update_norm={_num(self.update_norm)}")
        if self.lr is not None:
            parts.append(f"lr={_num(self.lr)}")
        if self.staleness is not None:
            parts.append(f"staleness={self.staleness}")
        return f"{self.name}: " + ", ".join(parts)


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


@dataclass(frozen=True)
class StepReport:
    """What a closed step did: per worker, its calls, passes, whether it updated, and update metrics.

    ``str(report)`` is a table with one row per worker; ``report.to_dict()`` gives plain values
    for a logger.
    """

    step: int
    workers: dict[str, WorkerReport] = field(default_factory=dict)
    passes: int = 0
    seconds: float = 0.0
    # The caller's messages to workers for this step (calls, routes, plans, close, commit) and the
    # replies it got: a step that repeats the previous one sends as many (see bench/results.md).
    messages: int = 0
    replies: int = 0

    @property
    def updated(self) -> list[str]:
        """Names of the workers that applied an update in this step."""
        return sorted(n for n, w in self.workers.items() if w.applied)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain values: step, passes, seconds, and per worker its fields."""
        return {"step": self.step, "passes": self.passes, "seconds": self.seconds, "messages": self.messages,
                "replies": self.replies, "workers": {n: asdict(w) for n, w in self.workers.items()}}

    def __repr__(self) -> str:
        return (f"StepReport(step={self.step}, workers={len(self.workers)}, updated={self.updated}, "
                f"passes={self.passes}, {self.seconds * 1000:.1f} ms)")

    def __str__(self) -> str:
        head = (f"step {self.step}: {self.passes} pass{'es' if self.passes != 1 else ''}, "
                f"{len(self.updated)}/{len(self.workers)} workers updated, {self.seconds * 1000:.1f} ms, "
                f"{self.messages} messages, {self.replies} replies")
        if not self.workers:
            return head
        cols = ["worker", "calls", "passes", "updates", "grad_norm", "clipped", "update_norm", "lr", "staleness"]
        rows = [[w.name, str(w.calls), str(w.passes), str(w.updates), _num(w.grad_norm),
                 "yes" if w.clipped else "-", _num(w.update_norm),
                 _num(w.lr) if len(w.lrs) <= 1 else "/".join(_num(x) for x in w.lrs),
                 "-" if w.staleness is None else str(w.staleness)]
                for w in self.workers.values() for w in (w, *w.replicas)]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = [head, "  " + "  ".join(c.ljust(wd) for c, wd in zip(cols, widths)).rstrip()]
        lines += ["  " + "  ".join(v.ljust(wd) for v, wd in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


class StepHandle:
    """A closed step whose updates may still be landing (``ag.step(wait=False)``)."""

    def __init__(self, runtime: Runtime, record: StepRecord) -> None:
        self._runtime = runtime
        self._record = record

    @property
    def step(self) -> int:
        """The step's number."""
        return self._record.id

    def done(self) -> bool:
        """Whether every worker has applied this step's update (without waiting)."""
        self._runtime.poll()
        return self._record.report is not None

    def wait(self, timeout: Optional[float] = None) -> StepReport:
        """Wait until every worker has applied this step's update; return the report."""
        return self._runtime.wait_step(self._record, timeout)

    def __repr__(self) -> str:
        return f"StepHandle(step={self.step}, done={self._record.report is not None})"


def as_nodes(nodes: Sequence[Any]) -> list[Node]:
    """Flatten arguments of ag.backward (nodes, or tuples of nodes)."""
    out: list[Node] = []
    for n in nodes:
        if isinstance(n, (tuple, list)):
            out.extend(as_nodes(n))
        else:
            out.append(n)
    return out
