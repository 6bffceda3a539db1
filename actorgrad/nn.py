"""Ready-made learning rules as ag.Module subclasses: feedback alignment, straight-through, synthetic gradients.

Each one is an ordinary module to ``ag.spawn``; what makes it a learning rule is
its ``backward(inputs, outputs, grad_outputs)`` override (see ``ag.Module``) and,
for synthetic gradients, the update rule it is spawned with. The recipes are in
``docs/learning_rules.md``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import torch
from torch.func import functional_call

from .core.vjp import default_vjp
from .errors import ConfigError
from .module import Module
from .optim import Optim

if TYPE_CHECKING:
    from .handles import Node, Pass, Worker

__all__ = ["FeedbackAlignment", "StraightThrough", "SyntheticGradient", "synthetic_call"]

InputGrads = list[Optional[torch.Tensor]]
ParamGrads = dict[str, torch.Tensor]


class FeedbackAlignment(Module, torch.nn.Linear):
    """A linear layer ``y = x W^T + b`` trained by feedback alignment (Lillicrap et al. 2016).

    The parameter gradients are the usual ones (``dW = g^T x``, ``db = sum g``), but the
    gradient sent back to the input is ``g @ B`` with a fixed random matrix ``B`` of shape
    ``(out_features, in_features)`` instead of ``g @ W``: no weight transport. ``B`` is drawn
    once here, uniform in ``±1/sqrt(in_features)`` as nn.Linear draws ``W``, from ``seed`` when
    given (else from torch's global generator); it is a buffer, so it travels with the module,
    is saved by ``ag.save`` and never changes.

    >>> fa = ag.spawn(ag.FeedbackAlignment(784, 256, seed=0), optimizer=ag.Optim(torch.optim.SGD, lr=0.1))  # doctest: +SKIP
    """

    feedback: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, seed: Optional[int] = None,
                 device: Any = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        feedback = torch.empty(out_features, in_features).uniform_(-bound, bound, generator=gen)
        self.register_buffer("feedback", feedback.to(device=device, dtype=dtype or torch.get_default_dtype()))

    def backward(  # type: ignore[override]
        self,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        grad_outputs: Sequence[Optional[torch.Tensor]],
    ) -> tuple[InputGrads, ParamGrads]:
        """Standard parameter gradients; ``grad_out @ B`` for the input."""
        g = grad_outputs[0]
        if g is None:
            return [None] * len(inputs), {}
        # Autograd over the call's own parameters (stashed ones when stale) rather than g^T x by
        # hand: the input may be a constant, which the worker does not hand to backward.
        _, params = default_vjp([], [outputs[0]], [g], self.call_parameters())
        feedback = self.feedback.to(device=g.device, dtype=g.dtype)
        input_grads = [g.matmul(feedback).to(x.dtype) if x.requires_grad else None for x in inputs]
        return input_grads, params


class StraightThrough(Module):
    """Apply a non-differentiable ``fn`` (sign, rounding, sampling, quantisation) with a straight-through gradient.

    Forward: ``fn(x)``, which must return a floating tensor of ``x``'s shape. Backward: the
    output gradient goes to the input unchanged (Bengio et al. 2013), or, with ``clip=c``, only
    where ``|x| <= c`` (``clip=1.0`` for ``fn=torch.sign`` is the hard-tanh estimator of Hubara
    et al. 2016). Parameterless, so the worker needs no optimizer. ``fn`` must be picklable for
    ``backend="ray"`` (torch functions, module-level functions, ``functools.partial``; Ray's
    cloudpickle also takes lambdas).

    >>> binar = ag.spawn(ag.StraightThrough(torch.sign, clip=1.0))           # doctest: +SKIP
    >>> sample = ag.spawn(ag.StraightThrough(torch.bernoulli))               # doctest: +SKIP
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] = torch.sign, *, clip: Optional[float] = None) -> None:
        super().__init__()
        if not callable(fn):
            raise ConfigError(f"StraightThrough needs a callable fn, got {fn!r}")
        if clip is not None and not clip > 0:
            raise ConfigError(f"StraightThrough clip must be a positive number or None, got {clip!r}")
        self.fn = fn
        self.clip = None if clip is None else float(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fn(x)``."""
        y = self.fn(x)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"StraightThrough: fn must return a tensor of the input's shape {tuple(x.shape)}, got {got}")
        return y

    def backward(  # type: ignore[override]
        self,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        grad_outputs: Sequence[Optional[torch.Tensor]],
    ) -> tuple[InputGrads, ParamGrads]:
        """The output gradient, passed straight to the input (zeroed where ``|x| > clip``)."""
        g = grad_outputs[0]
        grads: InputGrads = []
        for x in inputs:
            if g is None or not x.requires_grad:
                grads.append(None)
                continue
            gx = g.to(dtype=x.dtype)
            if self.clip is not None:
                gx = gx * (x.detach().abs() <= self.clip).to(gx.dtype)
            grads.append(gx)
        return grads, {}

    def extra_repr(self) -> str:
        """``fn`` and ``clip``, for repr."""
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"fn={name}" + ("" if self.clip is None else f", clip={self.clip}")


class _GroupedOptim(Optim):
    """``ag.Optim`` whose optimizer puts the predictor's parameters in a parameter group of their own."""

    def __init__(self, cls: type[torch.optim.Optimizer], where: list[bool], predictor: dict, **kwargs: Any) -> None:
        super().__init__(cls, **kwargs)
        self.where = where  # per entry of module.parameters(): whether it is the predictor's
        self.predictor = predictor

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Build the optimizer over ``params``: the module's in one group, the predictor's in another."""
        params = list(params)
        if len(params) != len(self.where):
            raise ConfigError(f"SyntheticGradient.optim was made for {len(self.where)} parameters, "
                              f"the worker's module has {len(params)}")
        main = [p for p, is_pred in zip(params, self.where) if not is_pred]
        pred = [p for p, is_pred in zip(params, self.where) if is_pred]
        groups = ([{"params": main}] if main else []) + ([{"params": pred, **self.predictor}] if pred else [])
        return self.cls(groups, **self.kwargs)

    def __repr__(self) -> str:
        """The recipe, with the predictor group's options."""
        return f"{super().__repr__()[:-1]}, predictor={self.predictor!r})"


class SyntheticGradient(Module):
    """Decoupled neural interface (Jaderberg et al. 2017): ``module`` learns from a predicted gradient at once.

    ``forward(*inputs)`` returns two outputs, ``(h, s)``: ``h = module(*inputs)`` and a scalar
    *synthetic seed* ``s = sum(h * predictor(h))`` whose gradient with respect to ``h`` is the
    predicted gradient ``predictor(h)`` (held constant). The learning rule, spawned with
    ``update="pass"``:

    1. Right after the call, seed ``s.backward()`` (``synthetic_call`` does both). That pass
       runs this worker's VJP with the predicted gradient: the wrapped module's parameter
       gradients, which ``update="pass"`` applies as soon as the pass completes here, without
       waiting for the true gradient; and input gradients, which go on to the producers of the
       inputs (for a chain of these workers, they are the bootstrapped targets of the previous
       one's predictor, as in the paper; pass ``x.detach()`` to keep the pass local).
    2. Later, a pass that reaches ``h`` (say ``loss.backward()``) brings the true gradient
       ``g``. The backward then trains the predictor only: it returns the gradient of
       ``loss(predictor(h), g)`` for the predictor's parameters (mean squared error by default)
       and sends nothing to the inputs and nothing to the module. The last such loss is kept
       in the buffer ``sg_loss`` (``worker.state_dict()["sg_loss"]``; NaN before the first).

    The predictor maps ``h`` to a tensor of ``h``'s shape; the default is a zero-initialised
    ``nn.Linear(features, features)`` over the last dimension (``features`` inferred from the
    last submodule with ``out_features`` when not given), so the first synthetic updates are
    zero. Both passes use the weights that the call's forward used, even after the synthetic
    update has landed (weight stashing). ``optim`` builds an optimizer recipe with the
    predictor in its own parameter group (its own learning rate).

    >>> sg = SyntheticGradient(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh()))
    >>> w = ag.spawn(sg, update="pass", optimizer=sg.optim(torch.optim.SGD, lr=0.1))  # doctest: +SKIP
    >>> h, synthetic = ag.nn.synthetic_call(w, x)                                       # doctest: +SKIP
    >>> mse(head(h), y).backward()                                                      # doctest: +SKIP
    """

    sg_loss: torch.Tensor

    def __init__(self, module: torch.nn.Module, predictor: Optional[torch.nn.Module] = None, *,
                 features: Optional[int] = None,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.mse_loss) -> None:
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"SyntheticGradient wraps a torch.nn.Module, got {type(module).__name__}")
        if predictor is None:
            n = features if features is not None else _infer_features(module)
            predictor = torch.nn.Linear(n, n)
            # Zero output at first: the module starts from no update rather than from noise.
            torch.nn.init.zeros_(predictor.weight)
            torch.nn.init.zeros_(predictor.bias)
        self.module = module
        self.predictor = predictor
        self.loss = loss
        self.register_buffer("sg_loss", torch.tensor(float("nan")))

    def forward(self, *inputs: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, s)``: the module's output and the synthetic seed, ``ds/dh = predictor(h)``."""
        h = self.module(*inputs, **kwargs)
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"SyntheticGradient: the wrapped module must return one tensor, got {type(h).__name__}")
        g_hat = self.predictor(h.detach()).detach()
        if tuple(g_hat.shape) != tuple(h.shape):
            raise ValueError(f"SyntheticGradient: the predictor returned shape {tuple(g_hat.shape)} for an "
                             f"output of shape {tuple(h.shape)}; it must predict a gradient of the output's shape")
        return h, (h * g_hat.to(h.dtype)).sum()

    def backward(  # type: ignore[override]
        self,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        grad_outputs: Sequence[Optional[torch.Tensor]],
    ) -> tuple[InputGrads, ParamGrads]:
        """Seed gradient: the module's VJP of the predicted gradient. True gradient: the predictor's regression."""
        g_true, g_seed = grad_outputs[0], grad_outputs[1]
        params = self.call_parameters()
        input_grads: InputGrads = [None] * len(inputs)
        param_grads: ParamGrads = {}
        if g_seed is not None:
            module_params = {n: p for n, p in params.items() if n.startswith("module.")}
            input_grads, param_grads = default_vjp(list(inputs), [outputs[1]], [g_seed], module_params)
        if g_true is not None:
            param_grads.update(self._predictor_grads(outputs[0], g_true, params))
        return input_grads, param_grads

    def _predictor_grads(self, h: torch.Tensor, g_true: torch.Tensor, params: dict[str, torch.Tensor]) -> ParamGrads:
        prefix = "predictor."
        own = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}
        with torch.enable_grad():
            # The forward kept no graph for the prediction (it is a constant of s); recompute it
            # with the predictor weights that forward used.
            pred = functional_call(self.predictor, own, (h.detach(),))
            loss = self.loss(pred, g_true.detach().to(pred.dtype))
        self.sg_loss.fill_(float(loss.detach()))
        _, grads = default_vjp([], [loss], [torch.ones_like(loss)], own)
        return {prefix + n: g for n, g in grads.items()}

    def optim(self, cls: type[torch.optim.Optimizer], *, predictor: Optional[dict] = None, **kwargs: Any) -> Optim:
        """``ag.Optim(cls, **kwargs)`` with the predictor's parameters in their own group, with ``predictor`` options."""
        pred_ids = {id(p) for p in self.predictor.parameters()}
        where = [id(p) in pred_ids for p in self.parameters()]
        return _GroupedOptim(cls, where, dict(predictor or {}), **kwargs)


def _infer_features(module: torch.nn.Module) -> int:
    """The output width of ``module``: ``out_features`` of its last submodule that has one."""
    for sub in reversed(list(module.modules())):
        n = getattr(sub, "out_features", None)
        if isinstance(n, int):
            return n
    raise ConfigError(f"SyntheticGradient cannot tell the output width of {type(module).__name__}; "
                      "pass features= or a predictor")


def synthetic_call(worker: "Worker", *inputs: Any, **kwargs: Any) -> tuple["Node", Optional["Pass"]]:
    """Call a SyntheticGradient worker and seed its synthetic pass at once; returns ``(h, pass)``.

    Under ``ag.no_grad()`` nothing is seeded and the pass is None.
    """
    out = worker(*inputs, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ConfigError("synthetic_call needs a worker whose module returns (h, s), as SyntheticGradient does",
                          worker=worker.name)
    h, seed = out
    if not seed.call.saved:
        return h, None
    return h, seed.backward()
