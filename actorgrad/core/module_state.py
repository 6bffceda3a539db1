"""A worker's module tensors for the caller, and loading a state_dict into it as nn.Module does.

``tensors_of`` answers GetState("tensors") (``worker.named_parameters()`` and friends): every
parameter and buffer name with the index of its tensor, each tensor sent once, so that tied
weights stay one tensor in the caller's copies too.

``load`` answers SetState("load") (``worker.load_state_dict(sd, strict)``): the keys it reports
are the ones ``nn.Module.load_state_dict`` reports, computed by torch itself, but unlike
nn.Module (which copies every matching tensor before it raises) an error leaves the module
unchanged: a worker's weights must not end up half old, half new.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .. import errors as E

__all__ = ["tensors_of", "load"]


def tensors_of(module: torch.nn.Module) -> dict[str, Any]:
    """Names -> tensor indices for parameters and buffers (duplicates kept), and the tensors as CPU copies."""
    index: dict[int, int] = {}
    tensors: list[torch.Tensor] = []
    requires_grad: list[bool] = []

    def at(t: torch.Tensor) -> int:
        i = index.get(id(t))
        if i is None:
            i = index[id(t)] = len(tensors)
            # No copy here on CPU: the host encodes the reply into a frame of its own.
            tensors.append(t.detach().cpu())
            requires_grad.append(bool(t.requires_grad))
        return i

    return {
        "parameters": [[n, at(p)] for n, p in module.named_parameters(remove_duplicate=False)],
        "buffers": [[n, at(b)] for n, b in module.named_buffers(remove_duplicate=False)],
        "tensors": tensors,
        "requires_grad": requires_grad,
    }


def load(module: torch.nn.Module, request: Any, worker: str) -> dict[str, list[str]]:
    """Load ``request`` ({"state_dict", "strict", "metadata"}); return the missing and unexpected keys."""
    if not isinstance(request, dict) or not isinstance(request.get("state_dict"), dict):
        raise E.ConfigError("load_state_dict needs a dict of tensors", worker=worker)
    strict = bool(request.get("strict", True))
    sd: "OrderedDict[str, Any]" = OrderedDict(request["state_dict"])
    metadata = request.get("metadata")
    if isinstance(metadata, dict):
        # As state_dict() returns it: modules read their version from it (BatchNorm's num_batches_tracked).
        sd._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    _check_tensors(module, sd, worker)
    if strict:
        # torch decides what is missing or unexpected (version hooks included); this dry run loads every
        # module tensor onto itself, which changes no value, so a refused load leaves the module as it was.
        own = module.state_dict(keep_vars=True)
        dry: "OrderedDict[str, Any]" = OrderedDict((k, own[k] if k in own else v) for k, v in sd.items())
        if metadata is not None:
            dry._metadata = sd._metadata  # type: ignore[attr-defined]
        with torch.no_grad():
            keys = module.load_state_dict(dry, strict=False)
        if keys.missing_keys or keys.unexpected_keys:
            parts = []
            if keys.missing_keys:
                parts.append(f"missing keys {list(keys.missing_keys)}")
            if keys.unexpected_keys:
                parts.append(f"unexpected keys {list(keys.unexpected_keys)}")
            raise E.ConfigError(
                f"load_state_dict(strict=True): {'; '.join(parts)}; nothing was loaded. Pass strict=False to load "
                "the keys that match (it returns the missing and unexpected keys, as nn.Module does)", worker=worker)
    try:
        keys = module.load_state_dict(sd, strict=strict)
    except RuntimeError as exc:  # something the checks above did not foresee (a module's own load hook)
        cls = E.ShapeError if "size mismatch" in str(exc) else E.ConfigError
        raise cls(f"load_state_dict failed: {exc}", worker=worker) from None
    return {"missing_keys": list(keys.missing_keys), "unexpected_keys": list(keys.unexpected_keys)}


def _check_tensors(module: torch.nn.Module, sd: dict[str, Any], worker: str) -> None:
    """Refuse, before anything is copied, what nn.Module would refuse after copying the rest: wrong shapes, non-tensors."""
    own = module.state_dict(keep_vars=True)
    bad: list[str] = []
    for key, mine in own.items():
        if key not in sd or not isinstance(mine, torch.Tensor):  # extra state is the module's to check
            continue
        given = sd[key]
        if not isinstance(given, torch.Tensor):
            raise E.ConfigError(f"load_state_dict: '{key}' must be a tensor, got {type(given).__name__}; nothing "
                                "was loaded", worker=worker)
        if torch.nn.parameter.is_lazy(mine):
            continue
        shape = given.shape
        if mine.dim() == 0 and given.dim() == 1 and shape[0] == 1:  # nn.Module accepts this (old checkpoints)
            continue
        if shape != mine.shape:
            bad.append(f"'{key}': the state_dict has shape {tuple(shape)}, the module {tuple(mine.shape)}")
    if bad:
        raise E.ShapeError("load_state_dict: size mismatch for " + "; ".join(bad) + "; nothing was loaded",
                           worker=worker)
