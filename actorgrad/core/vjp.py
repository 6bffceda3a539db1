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

from . import ops
from .messages import Op, Slot, Typed
from .structure import TypeResolver, decode, encode


@dataclass
class Saved:
    """What one call keeps for its backward: input leaves, outputs, parameter leaves."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    params: dict[str, torch.Tensor] = field(default_factory=dict)


def map_leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every leaf of a wire tree (lists, tuples, dicts, Typed, Op); keep the structure."""
    if isinstance(tree, list):
        return [map_leaves(x, fn) for x in tree]
    if isinstance(tree, tuple):
        return tuple(map_leaves(x, fn) for x in tree)
    if isinstance(tree, dict):
        return {k: map_leaves(v, fn) for k, v in tree.items()}
    if isinstance(tree, Typed):
        return Typed(tree.kind, tree.type, tree.context, tuple(map_leaves(x, fn) for x in tree.children))
    if isinstance(tree, Op):
        return Op(tree.fn, tuple(map_leaves(x, fn) for x in tree.args),
                  {k: map_leaves(v, fn) for k, v in tree.kwargs.items()})
    return fn(tree)


_SINGLE = Slot(0)


def flatten_outputs(result: Any) -> tuple[list[torch.Tensor], Any]:
    """A module's result as its tensors and its structure (a wire tree with Slot(i) at tensor i)."""
    if isinstance(result, torch.Tensor):
        return [result], _SINGLE
    outputs: list[torch.Tensor] = []

    def leaf(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            outputs.append(x)
            return Slot(len(outputs) - 1)
        raise TypeError(f"forward returned a {type(x).__name__} at result{path}; a worker may return tensors, "
                        "None and constants, nested in tuples, lists, dicts, namedtuples and dataclasses")

    return outputs, encode(result, leaf)


def build_arguments(tree: Any, leaves: list[torch.Tensor], types: TypeResolver,
                    give: Callable[[Any], Any] = lambda x: x) -> Any:
    """An argument tree's value: Slots filled (through ``give``), containers built, Ops evaluated."""
    def leaf(x: Any) -> Any:
        if type(x) is Slot:
            return give(leaves[x.index])
        args = tuple(decode(a, leaf, types) for a in x.args)
        kwargs = {k: decode(v, leaf, types) for k, v in x.kwargs.items()}
        return ops.evaluate(x, args, kwargs)

    try:
        return decode(tree, leaf, types)
    finally:
        del leaf  # it refers to itself: without this the inputs would wait for the garbage collector


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
    types: Optional[TypeResolver] = None,
    expr: bool = False,
) -> tuple[list[torch.Tensor], Any, Optional[Saved]]:
    """Run one call; return its output tensors, its result's structure, and what to save.

    ``expr``: the call runs no module; its result is its first argument (an expression of Ops).
    """
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

        types = types or TypeResolver()
        call_args = build_arguments(args, leaves, types, give)
        call_kwargs = build_arguments(kwargs, leaves, types, give)
        if expr:
            result = call_args[0]
            if not isinstance(result, torch.Tensor):
                raise TypeError(f"an operation on Nodes gave a {type(result).__name__}, not a tensor")
        elif params is None:
            result = module(*call_args, **call_kwargs)
        else:
            result = functional_call(module, params, tuple(call_args), call_kwargs)
    outputs, structure = flatten_outputs(result)
    if not save:
        return outputs, structure, None
    used = {} if expr else params if params is not None else dict(module.named_parameters())
    return outputs, structure, Saved(inputs=leaves, outputs=outputs, params=used)


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
