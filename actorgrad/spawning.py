"""What ag.spawn checks and builds before a worker starts: names, options, the spec, and who owns which tensor.

Pure bookkeeping without I/O: the runtime hands the resulting ``WorkerSpec``
and options to its transport. ``Ownership`` refuses a parameter, buffer or
module that another worker already holds: each worker keeps its own copy, so a
tied weight would silently untie and drift apart.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import errors as E
from . import pickling
from .core.rules import Rule, make_rule
from .core.worker import WorkerSpec
from .module import has_custom_backward
from .optim import normalize_optimizer

log = logging.getLogger("actorgrad.spawning")

PLACEMENT_STRATEGIES = ("pack", "spread", "strict_pack", "strict_spread")


@dataclass
class WorkerInfo:
    """What the caller knows of a worker without asking it."""

    name: str
    module_class: str
    trainable: bool
    has_optimizer: bool
    custom_rule: bool  # its update rule may use gradients without an optimizer (a callable rule)
    custom_backward: bool
    options: dict[str, Any]
    handle: Any  # handles.Worker
    placed: bool = True  # False while its ag.placement block is open
    optimizer: Any = None  # the optimizer recipe, for ag.graph
    dtypes: tuple[str, ...] = ()  # floating dtypes of its parameters and buffers (worker.to() keeps them)
    update: str = "step"  # its update rule, as repr(worker) names it


@dataclass
class Spawn:
    """A checked ag.spawn: the spec for the transport, the options, and what the caller keeps of it."""

    spec: WorkerSpec
    options: dict[str, Any]
    rule: Rule
    trainable: bool


@dataclass
class Defaults:
    """What the runtime adds to every spec."""

    places_gpus: bool  # the backend reserves GPUs per worker (Ray)
    trace: bool
    check_finite: bool
    deadline: float
    seed: int
    max_restarts: int  # the runtime's default (recovery's), for max_restarts=None


def _optimizer_name(opt: Any) -> Optional[str]:
    if opt is None:
        return None
    cls = getattr(opt, "cls", None)
    return cls.__name__ if cls is not None else getattr(opt, "__name__", type(opt).__name__)


def default_name(module: torch.nn.Module, taken: dict[str, Any], counts: dict[str, int]) -> str:
    """``<ModuleClass>-<n>``, numbered in spawn order, skipping names already taken."""
    cls = type(module).__name__
    n = counts.get(cls, 0)
    while f"{cls}-{n}" in taken:
        n += 1
    counts[cls] = n + 1
    return f"{cls}-{n}"


def check_name(name: Any, taken: dict[str, Any]) -> str:
    """A worker name: a non-empty string, not the caller's, without '#' (epochs), not taken."""
    if not isinstance(name, str) or not name or name == "caller" or "#" in name:
        raise E.ConfigError(f"a worker name must be a non-empty string other than 'caller', without '#', got {name!r}")
    if name in taken:
        raise E.ConfigError(f"a worker named '{name}' already exists; worker names must be unique", worker=name)
    return name


def replica_names(name: str, replicas: Any, update: Any, max_staleness: int, placement: Optional[str],
                  taken: dict[str, Any]) -> tuple[str, ...]:
    """The workers of ``ag.spawn(..., replicas=n)``: ``name``, ``name[1]``, ... (checked); one name for n=1.

    Replicas agree on one update per step (core/replicas.py), so only rules that apply at step close
    make sense for them: a rule that applies per pass (``update="pass"``), a callable or a custom rule
    would update each replica from its own calls' gradients alone, and ``max_staleness`` lets a
    replica run forwards on weights its peers have already left; both are refused.
    """
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise E.ConfigError(f"replicas must be an integer >= 1, got {replicas!r}", worker=name)
    if placement is not None and placement not in PLACEMENT_STRATEGIES:
        raise E.ConfigError(f"replica_placement must be one of {PLACEMENT_STRATEGIES}, got {placement!r}",
                            worker=name)
    if replicas == 1:
        return (name,)
    if update != "step":
        raise E.ConfigError(
            f"update={update!r} with replicas={replicas}: replicas apply one update per step, the sum of all of "
            "their gradients (update=\"step\"); a rule that applies per pass or decides by itself would update "
            "each replica from its own calls alone and they would drift apart", worker=name)
    if max_staleness:
        raise E.ConfigError(
            f"max_staleness={max_staleness} with replicas={replicas} is not supported: every replica applies each "
            "step's update together, so none may run ahead on older weights; use max_staleness=0", worker=name)
    names = (name,) + tuple(f"{name}[{i}]" for i in range(1, replicas))
    for n in names[1:]:
        if n in taken:
            raise E.ConfigError(f"a worker named '{n}' already exists; replica names must be free", worker=name)
    return names


def build(module: torch.nn.Module, name: str, *, optimizer: Any, update: Any, max_staleness: int,
          num_cpus: Optional[float], num_gpus: Optional[float], resources: Optional[dict], device: Any,
          max_restarts: Optional[int], defaults: Defaults) -> Spawn:
    """Check every argument of ag.spawn; build the worker's spec and options."""
    opt = normalize_optimizer(optimizer, name)
    try:
        rule = make_rule(update)
    except E.ConfigError as err:
        err.worker = name
        raise
    if not isinstance(max_staleness, int) or isinstance(max_staleness, bool) or max_staleness < 0:
        raise E.ConfigError(f"max_staleness must be an integer >= 0, got {max_staleness!r}", worker=name)
    params = list(module.parameters())
    if opt is not None and not params:
        raise E.ConfigError("the module has no parameters, so it cannot have an optimizer", worker=name)
    for label, val in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if val is not None and (not isinstance(val, (int, float)) or val < 0):
            raise E.ConfigError(f"{label} must be a number >= 0, got {val!r}", worker=name)
    if device is not None:
        try:
            device = str(torch.device(device))
        except (RuntimeError, TypeError) as exc:
            raise E.ConfigError(f"invalid device {device!r}: {exc}", worker=name) from None
    # A GPU worker: device="cuda" needs a GPU from Ray (which hides GPUs from actors that
    # did not ask for one), and num_gpus >= 1 means the module lives on it.
    if device is not None and device.startswith("cuda") and not num_gpus and defaults.places_gpus:
        num_gpus = 1
    if device is None and num_gpus and num_gpus >= 1:
        device = "cuda"
    if device is not None and device.startswith("cuda") and not defaults.places_gpus \
            and not torch.cuda.is_available():
        raise E.PlacementError(f"device={device!r} asked for, but this process has no CUDA device", worker=name)
    if max_restarts is not None and (not isinstance(max_restarts, int) or isinstance(max_restarts, bool)
                                     or max_restarts < -1):
        raise E.ConfigError(f"max_restarts must be an integer >= 0 (or -1: no limit), got {max_restarts!r}",
                            worker=name)
    if resources is not None and not (isinstance(resources, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in resources.items())):
        raise E.ConfigError(f"resources must map names to amounts >= 0, got {resources!r}", worker=name)
    if max_restarts is None:
        max_restarts = defaults.max_restarts
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": resources, "device": device,
               "update": update if isinstance(update, str) else "callable", "max_staleness": max_staleness,
               "optimizer": _optimizer_name(opt), "max_restarts": max_restarts}
    # A registered rule travels built: a Ray worker's process never saw the user's register_rule.
    spec = WorkerSpec(name=name, module=module, optimizer=opt, update=rule if isinstance(update, str) else update,
                      max_staleness=max_staleness, device=device, num_threads=int(num_cpus) if num_cpus else None,
                      trace=defaults.trace, check_finite=defaults.check_finite, deadline=defaults.deadline,
                      custom_backward=has_custom_backward(module), seed=defaults.seed)
    # Here, not in the transport: both backends refuse the same module with the same error, before any
    # worker starts (Ray would raise its own serialization error; the local backend only deep-copies).
    pickling.check(spec)
    return Spawn(spec, options, rule, trainable=any(p.requires_grad for p in params))


def info_of(s: Spawn, handle: Any, placed: bool) -> WorkerInfo:
    """What the caller keeps of a spawned worker."""
    spec = s.spec
    module = spec.module
    dtypes = {str(t.dtype) for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
    label = s.options.get("update", "step")  # the rule's name; spec.update holds it built
    if label == "callable":
        label = getattr(spec.update, "__qualname__", None) or type(spec.update).__name__
    info = WorkerInfo(name=spec.name, module_class=type(module).__name__, trainable=s.trainable,
                      has_optimizer=spec.optimizer is not None, custom_rule=not s.rule.needs_optimizer,
                      custom_backward=spec.custom_backward, options=s.options, handle=handle, placed=placed,
                      optimizer=spec.optimizer, dtypes=tuple(sorted(dtypes)), update=str(label))
    if handle is not None:
        handle._info = info  # what repr(worker) and worker.to() read: no round trip
    return info


def bundles(members: list[tuple[WorkerSpec, dict[str, Any]]]) -> list[dict[str, float]]:
    """One placement-group bundle per worker: its CPUs (a sliver when none), GPUs and custom resources."""
    out = []
    for _, options in members:
        bundle = {"CPU": float(options.get("num_cpus") or 0.01)}
        if options.get("num_gpus"):
            bundle["GPU"] = float(options["num_gpus"])
        bundle.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
        out.append(bundle)
    return out


class Ownership:
    """Which worker holds which module, parameter and buffer object (by identity, weakly)."""

    def __init__(self) -> None:
        # id -> (weak reference, worker, parameter or module name); an id is reused once its object is
        # collected, so the reference must still point at the same object.
        self._owned: dict[int, tuple[weakref.ref, str, str]] = {}

    def __len__(self) -> int:
        return len(self._owned)

    def owner(self, obj: Any, live: Any) -> Optional[tuple[str, str]]:
        """(worker, name) holding ``obj``, if that worker is still among ``live``."""
        entry = self._owned.get(id(obj))
        # A worker no longer in the runtime (an abandoned placement block) owns nothing.
        if entry is None or entry[0]() is not obj or entry[1] not in live:
            return None
        return entry[1], entry[2]

    def check(self, module: torch.nn.Module, name: str, live: Any) -> None:
        """Refuse a module, parameter or buffer that another worker already holds (it would be silently untied)."""
        owner = self.owner(module, live)
        if owner is not None:
            raise E.ConfigError(
                f"this module object was already spawned as worker '{owner[0]}'; each worker gets its own copy, so "
                f"the two would train apart. To use one module several times, call worker '{owner[0]}' several "
                "times (weight sharing is one worker called several times); for an independent copy spawn "
                "copy.deepcopy(module)", worker=name)
        tensors = [("parameter", n, t) for n, t in module.named_parameters(remove_duplicate=False)]
        tensors += [("buffer", n, t) for n, t in module.named_buffers(remove_duplicate=False)]
        for kind, pname, t in tensors:
            owner = self.owner(t, live)
            if owner is not None:
                raise E.ConfigError(
                    f"{kind} '{pname}' is the same tensor as '{owner[1]}' of worker '{owner[0]}' (tied weights); "
                    "each worker holds its own copy, so the two would be silently untied and drift apart. Put the "
                    "modules that share it into one worker and call that worker several times (e.g. one worker "
                    "holding both the embedding and the output head)", worker=name)

    def own(self, module: torch.nn.Module, name: str) -> None:
        """Record the module, its parameters and its buffers as held by worker ``name``."""
        for gone in [k for k, (ref, _, _) in self._owned.items() if ref() is None]:
            del self._owned[gone]
        # Submodules are not recorded: sharing a stateless one (an activation) is harmless, and a stateful
        # one is caught by its tensors.
        objs: list[tuple[str, Any]] = [("", module)]
        objs += list(module.named_parameters(remove_duplicate=False))
        objs += list(module.named_buffers(remove_duplicate=False))
        mine: dict[int, tuple[weakref.ref, str, str]] = {}
        for label, obj in objs:  # a weight tied inside the module keeps its first name
            mine.setdefault(id(obj), (weakref.ref(obj), name, label))
        self._owned.update(mine)
