"""What makes a Worker look like its nn.Module: copies of its tensors, loading, ``.to()``, its repr.

The Worker methods in handles.py are thin; the work is here. Tensors come from one GetState("tensors")
round trip (core/module_state.py); ``repr`` and ``.to()`` read only what the caller kept at
``ag.spawn`` (spawning.WorkerInfo), so they never wait on the worker.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import torch
from torch.nn.modules.module import _IncompatibleKeys

from . import errors as E

__all__ = ["named_tensors", "load_request", "incompatible_keys", "check_to", "describe"]


def named_tensors(data: dict[str, Any], kind: str, prefix: str, recurse: bool,
                  remove_duplicate: bool) -> list[tuple[str, torch.Tensor]]:
    """(name, copy) of ``kind`` ("parameters" or "buffers") as ``nn.Module.named_<kind>`` lists them."""
    copies = list(data["tensors"])
    for i, requires_grad in enumerate(data["requires_grad"]):
        if requires_grad:
            copies[i] = copies[i].requires_grad_(True)
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for name, index in data[kind]:
        if not recurse and "." in name:  # a tensor name has no dot: one with a dot lives in a submodule
            continue
        if remove_duplicate:
            if index in seen:
                continue
            seen.add(index)
        out.append((f"{prefix}.{name}" if prefix else name, copies[index]))
    return out


def load_request(state_dict: Any, strict: bool, worker: str) -> dict[str, Any]:
    """What SetState("load") carries: the tensors (detached), ``strict``, and state_dict()'s version metadata."""
    if not isinstance(state_dict, Mapping):
        raise E.ConfigError(f"load_state_dict needs a mapping of names to tensors, got {type(state_dict).__name__}",
                            worker=worker)
    if not isinstance(strict, bool):
        raise E.ConfigError(f"strict must be True or False, got {strict!r}", worker=worker)
    sd = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
    request: dict[str, Any] = {"state_dict": sd, "strict": strict}
    metadata = getattr(state_dict, "_metadata", None)
    if isinstance(metadata, Mapping):
        # Module versions (BatchNorm reads its own to decide whether num_batches_tracked may be missing).
        request["metadata"] = {str(k): {str(a): b for a, b in v.items() if isinstance(b, (int, str, bool))}
                               for k, v in metadata.items() if isinstance(v, Mapping)}
    return request


def incompatible_keys(reply: Any) -> _IncompatibleKeys:
    """The worker's answer to a load as ``nn.Module.load_state_dict`` returns it."""
    reply = reply if isinstance(reply, dict) else {}
    return _IncompatibleKeys(list(reply.get("missing_keys", ())), list(reply.get("unexpected_keys", ())))


def check_to(info: Any, worker: str, args: tuple, kwargs: dict) -> None:
    """Accept ``worker.to(...)`` arguments that leave the worker as it is; ConfigError for a move or cast."""
    try:
        device, dtype, _non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    except (TypeError, RuntimeError) as exc:
        raise E.ConfigError(f"worker.to{_args(args, kwargs)}: {exc}", worker=worker) from None
    if info is None:
        raise E.ConfigError("this worker is not part of a running runtime (spawned before the last ag.init()?)",
                            worker=worker)
    options = info.options
    here = torch.device(options.get("device") or "cpu")
    if device is not None and not _same_device(torch.device(device), here):
        target = torch.device(device)
        if target.type == "cuda" and here.type != "cuda":
            raise E.ConfigError(
                f"worker.to({str(target)!r}): this worker runs on {here} and its process cannot use a GPU (it was "
                "spawned without device='cuda' or num_gpus=, so none was reserved for it; on Ray its process does "
                "not even see one). A worker's device is fixed at ag.spawn: spawn the module with device='cuda' "
                "(Ray then reserves a GPU), or num_gpus=1", worker=worker)
        raise E.ConfigError(
            f"worker.to({str(target)!r}): this worker runs on {here}; a worker's device is fixed at ag.spawn (its "
            f"optimizer state, weight stashes and reserved resources are there). Spawn the module with "
            f"device={str(target)!r} instead", worker=worker)
    if dtype is not None:
        if not (dtype.is_floating_point or dtype.is_complex):
            raise E.ConfigError(f"worker.to() only accepts floating point or complex dtypes, got {dtype} (as "
                                "nn.Module.to)", worker=worker)
        if any(d != str(dtype) for d in info.dtypes):
            raise E.ConfigError(
                f"worker.to({dtype}): this worker's module holds {', '.join(info.dtypes)} tensors, and a worker's "
                "dtype is fixed at ag.spawn (its optimizer state, weight stashes and checkpoints keep it). Convert "
                f"the module before spawning it (ag.spawn(module.to({dtype}), ...)), or cast inside its forward "
                "(e.g. torch.autocast)", worker=worker)
    if memory_format is not None and memory_format != torch.preserve_format:
        raise E.ConfigError(f"worker.to(memory_format={memory_format}): convert the module before ag.spawn",
                            worker=worker)


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" is the worker's current device: index 0 in its process (Ray shows it only the GPUs it reserved).
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _args(args: tuple, kwargs: dict) -> str:
    return "(" + ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]) + ")"


def describe(name: str, module_class: str, info: Any, backend: Optional[str], training: bool,
             where: Optional[dict] = None) -> str:
    """``Worker('enc', Linear, ray on node 1a2b3c4d (10.0.0.2), num_cpus=1, optimizer=AdamW(lr=0.001))``."""
    parts = [repr(name), module_class]
    if info is None:
        return f"Worker({', '.join(parts)})"
    options = info.options
    place = backend or "?"
    if where and where.get("node_id"):
        place += f" on node {str(where['node_id'])[:8]}" + (f" ({where['ip']})" if where.get("ip") else "")
    parts.append(place)
    if options.get("replicas"):
        parts.append(f"replicas={options['replicas']}")
    for key in ("num_cpus", "num_gpus", "resources", "device"):
        if options.get(key) not in (None, {}, 0):
            parts.append(f"{key}={options[key]!r}")
    if info.optimizer is not None:
        parts.append(f"optimizer={_optimizer(info.optimizer)}")
    if info.update != "step":
        parts.append(f"update={info.update!r}")
    if options.get("max_staleness"):
        parts.append(f"max_staleness={options['max_staleness']}")
    if options.get("max_restarts"):
        parts.append(f"max_restarts={options['max_restarts']}")
    if not training:
        parts.append("training=False")
    if not info.placed:
        parts.append("not started (its ag.placement block is open)")
    return f"Worker({', '.join(parts)})"


def _optimizer(spec: Any) -> str:
    """``AdamW(lr=0.001, weight_decay=0.01)``: the class, the learning rate (its default if not given), the
    arguments given; then the extras (schedule, clipping)."""
    cls = getattr(spec, "cls", None)
    if cls is None:  # a plain callable params -> optimizer
        return getattr(spec, "__qualname__", None) or type(spec).__name__
    kwargs = dict(getattr(spec, "kwargs", {}) or {})
    if "lr" not in kwargs:
        try:
            default = inspect.signature(cls).parameters.get("lr")
        except (TypeError, ValueError):
            default = None
        if default is not None and default.default is not inspect.Parameter.empty:
            kwargs = {"lr": default.default, **kwargs}
    args = [f"{k}={_short(v)}" for k, v in kwargs.items()]
    text = f"{cls.__name__}({', '.join(args)})"
    extras = []
    if getattr(spec, "schedule", None) is not None:
        extras.append(f"schedule={spec.schedule!r}")
    for label in ("clip_grad_norm", "clip_grad_value"):
        if getattr(spec, label, None) is not None:
            extras.append(f"{label}={getattr(spec, label)!r}")
    return text + (f", {', '.join(extras)}" if extras else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
