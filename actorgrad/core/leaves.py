"""Caller leaves: argument tensors with ``requires_grad=True`` whose gradient goes back to the caller.

Both sides name such a tensor by its position among the tensors of a call's argument tree
``(args, kwargs)``, walked in one fixed order (lists and tuples in order, dict values in key
order, as the codec keeps them; a Typed record's children, an Op's arguments then its keyword
values); ``Forward.leaves`` lists those positions.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .messages import Op, Typed


def _walk(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, list):
        return [_walk(x, fn) for x in tree]
    if isinstance(tree, tuple):
        return tuple(_walk(x, fn) for x in tree)
    if isinstance(tree, dict):
        return {k: _walk(v, fn) for k, v in tree.items()}
    if isinstance(tree, Typed):
        return Typed(tree.kind, tree.type, tree.context, tuple(_walk(x, fn) for x in tree.children))
    if isinstance(tree, Op):
        return Op(tree.fn, tuple(_walk(x, fn) for x in tree.args), {k: _walk(v, fn) for k, v in tree.kwargs.items()})
    return tree


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """The tensors of an argument tree, in the order that leaf positions count them."""
    found: list[torch.Tensor] = []
    _walk(tree, lambda t: found.append(t) or t)
    return found


def mark_leaves(tree: Any, positions: tuple[int, ...]) -> tuple[Any, list[torch.Tensor]]:
    """The tree with the tensors at ``positions`` made fresh leaves that require grad, and those leaves.

    IndexError names a position beyond the tree's tensors; TypeError a tensor that cannot require grad.
    """
    wanted = set(positions)
    leaves: dict[int, torch.Tensor] = {}
    count = [0]

    def mark(t: torch.Tensor) -> torch.Tensor:
        i = count[0]
        count[0] += 1
        if i not in wanted:
            return t
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"argument tensor {i} has dtype {str(t.dtype).removeprefix('torch.')}, which cannot "
                            "require grad")
        leaves[i] = t.detach().requires_grad_(True)
        return leaves[i]

    out = _walk(tree, mark)
    missing = sorted(wanted - set(leaves))
    if missing:
        raise IndexError(f"leaf position {missing[0]} is beyond the call's {count[0]} argument tensor(s)")
    return out, [leaves[i] for i in sorted(leaves)]
