"""ag.Module: an nn.Module whose backward may be overridden (custom gradient rules)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .core.vjp import default_vjp

__all__ = ["Module"]


class Module(torch.nn.Module):
    """A torch.nn.Module whose worker calls ``backward`` for each call's VJP.

    Override ``backward`` to replace the gradient rule of this module
    (feedback alignment, straight-through, synthetic gradients). The worker
    calls it once per call and pass with:

    - ``inputs``: the input tensors that arrived from other workers, in the
      order they appear in the call's arguments (constants are not included);
    - ``outputs``: the tensors the forward returned, as it returned them;
    - ``grad_outputs``: one gradient per output, ``None`` where none came back.

    It returns ``(input_grads, param_grads)``: one gradient (or ``None``, which
    sends nothing back) per input, and ``{parameter name: gradient}``; a
    parameter missing from the dict gets no gradient.
    """

    def backward(  # type: ignore[override]
        self,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        grad_outputs: Sequence[Optional[torch.Tensor]],
    ) -> tuple[list[Optional[torch.Tensor]], dict[str, torch.Tensor]]:
        """The default rule: the VJP by torch.autograd.grad over inputs and parameters."""
        return default_vjp(list(inputs), list(outputs), list(grad_outputs), self.call_parameters())

    def call_parameters(self) -> dict[str, torch.Tensor]:
        """The parameter tensors the current call's forward used (stashed weights when stale)."""
        params = self.__dict__.get("_actorgrad_params")
        return params if params is not None else dict(self.named_parameters())


def has_custom_backward(module: torch.nn.Module) -> bool:
    """Whether the module overrides ag.Module.backward."""
    return isinstance(module, Module) and type(module).backward is not Module.backward
