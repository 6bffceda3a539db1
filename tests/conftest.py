"""Shared fixtures: every end-to-end test runs once per backend.

Ray is started once per session (tests start it themselves; CI has none
running) and every test gets a fresh actorgrad runtime on it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import actorgrad as ag

BACKENDS = ["local", "ray"]


def ray_init_args() -> dict:
    """How the tests start Ray: two CPUs, and workers that can import the test modules."""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here, os.path.dirname(here)] + [p for p in sys.path if p and os.path.isdir(p)]
    return {
        "address": "local",  # our own instance, even if a `ray start` cluster runs on this machine
        "num_cpus": 2,
        "logging_level": "ERROR",
        "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}},
    }


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by the session; (re)started when a test module shut it down."""
    import ray

    def ensure():
        if not ray.is_initialized():
            ray.init(**ray_init_args())
        return ray

    ensure()
    yield ensure
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend name; a runtime on it is running for the duration of the test."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")()
    ag.init(backend=request.param, timeout=60)
    torch.manual_seed(0)
    yield request.param
    ag.shutdown()


@pytest.fixture
def local():
    """A local-backend runtime, for tests that need only one backend."""
    ag.init(backend="local", timeout=30)
    torch.manual_seed(0)
    yield "local"
    ag.shutdown()
