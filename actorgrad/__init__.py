"""actorgrad: train neural networks whose modules are independent workers.

>>> import torch, actorgrad as ag
>>> ag.init(backend="local")                                  # doctest: +SKIP
>>> lin = ag.spawn(torch.nn.Linear(4, 1), optimizer=ag.Optim(torch.optim.SGD, lr=0.1))  # doctest: +SKIP
"""

import logging

from . import errors
from ._version import __version__
from .api import (backward, graph, init, is_initialized, load, no_grad, placement, ready, save, set_training, shutdown,
                  spawn, step, train, trace)
from .core.rules import Rule, UpdateContext, register_rule
from .handles import Node, Pass, StepHandle, StepReport, Worker, WorkerReport
from .module import Module
from . import nn
from .nn import FeedbackAlignment, StraightThrough, SyntheticGradient
from .optim import Optim, Schedule

logging.getLogger("actorgrad").addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "init",
    "shutdown",
    "is_initialized",
    "spawn",
    "ready",
    "backward",
    "step",
    "train",
    "no_grad",
    "set_training",
    "save",
    "load",
    "trace",
    "graph",
    "placement",
    "Optim",
    "Schedule",
    "Module",
    "Worker",
    "Node",
    "Pass",
    "StepHandle",
    "StepReport",
    "WorkerReport",
    "UpdateContext",
    "Rule",
    "register_rule",
    "FeedbackAlignment",
    "StraightThrough",
    "SyntheticGradient",
    "nn",
    "errors",
]
