"""Forward with what the VJP needs kept aside, and the VJP itself; plain functions.

Inputs that arrive from other workers become fresh leaves
(``detach().requires_grad_()``), so a call's autograd graph ends at its own
boundary and ``torch.autograd.grad`` yields exactly this worker's part. The
module itself gets a clone of each such leaf, so that in-place operations on
its inputs run as in plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.func import functional_call

from .messages import Slot


@dataclass
class Saved:
    """What one call keeps for its backward: input leaves, outputs, parameter leaves."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    params: dict[str, torch.Tensor] = field(default_factory=dict)


def map_leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every leaf of a tree of lists, tuples and dicts; keep the structure."""
    if isinstance(tree, list):
        return [map_leaves(x, fn) for x in tree]
    if isinstance(tree, tuple):
        return tuple(map_leaves(x, fn) for x in tree)
    if isinstance(tree, dict):
        return {k: map_leaves(v, fn) for k, v in tree.items()}
    return fn(tree)


def fill_slots(tree: Any, values: list[torch.Tensor]) -> Any:
    """Replace every Slot in an argument tree by its arrived value."""
    return map_leaves(tree, lambda x: values[x.index] if isinstance(x, Slot) else x)


def flatten_outputs(result: Any) -> tuple[list[torch.Tensor], bool]:
    """A module's result as a list of tensors, and whether it was a single tensor."""
    if isinstance(result, torch.Tensor):
        return [result], True
    if isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result):
        return list(result), False
    raise TypeError(
        f"forward must return a tensor or a tuple of tensors, got {type(result).__name__}"
    )


def make_leaves(values: list[torch.Tensor], grad: list[bool]) -> list[torch.Tensor]:
    """Inputs from other workers as fresh leaves; floating ones that carry a gradient require it."""
    leaves = []
    for v, g in zip(values, grad):
        leaf = v.detach()
        if g and leaf.is_floating_point():
            leaf.requires_grad_(True)
        leaves.append(leaf)
    return leaves


def run_forward(
    module: torch.nn.Module,
    args: Any,
    kwargs: dict,
    leaves: list[torch.Tensor],
    params: Optional[dict[str, torch.Tensor]],
    save: bool,
) -> tuple[list[torch.Tensor], bool, Optional[Saved]]:
    """Run one call; return outputs, whether it was a single tensor, and what to save."""
    with torch.set_grad_enabled(save):
        # The module gets a copy of each input that requires grad: in plain PyTorch its input is
        # another layer's output, which in-place operations (ReLU(inplace=True), x.add_(1)) may modify;
        # a leaf may not be, and it must keep the value custom backwards see.
        clones: dict[int, torch.Tensor] = {}  # one clone per tensor, even where it is passed twice

        def give(x: Any) -> Any:
            if not (isinstance(x, torch.Tensor) and x.requires_grad):
                return x
            if id(x) not in clones:
                clones[id(x)] = x.clone()
            return clones[id(x)]

        call_args = map_leaves(fill_slots(args, leaves), give)
        call_kwargs = map_leaves(fill_slots(kwargs, leaves), give)
        if params is None:
            result = module(*call_args, **call_kwargs)
        else:
            result = functional_call(module, params, tuple(call_args), call_kwargs)
    outputs, single = flatten_outputs(result)
    if not save:
        return outputs, single, None
    used = params if params is not None else dict(module.named_parameters())
    return outputs, single, Saved(inputs=leaves, outputs=outputs, params=used)


def default_vjp(
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    grad_outputs: list[Optional[torch.Tensor]],
    params: dict[str, torch.Tensor],
) -> tuple[list[Optional[torch.Tensor]], dict[str, torch.Tensor]]:
    """The vector-Jacobian product by torch.autograd.grad over inputs and parameters."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    in_idx = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    names = [n for n, p in params.items() if p.requires_grad]
    input_grads: list[Optional[torch.Tensor]] = [None] * len(inputs)
    if not pairs or not (in_idx or names):
        return input_grads, {}
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[i] for i in in_idx] + [params[n] for n in names],
        [g for _, g in pairs],
        retain_graph=True,
        allow_unused=True,
    )
    for i, g in zip(in_idx, grads[: len(in_idx)]):
        input_grads[i] = g
    param_grads = {n: g for n, g in zip(names, grads[len(in_idx):]) if g is not None}
    return input_grads, param_grads
