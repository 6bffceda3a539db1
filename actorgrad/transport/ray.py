"""Ray transport: each worker is a named async actor hosting a WorkerCore.

Messages go from worker to worker as fire-and-forget actor calls
(``deliver``); the caller's requests are actor calls whose result is the
encoded reply. Ray does placement, lifecycle, failure detection and, for
large frames, the object store. This is the only module that imports Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import sys
import uuid
from typing import Any, Optional

import ray
import ray.exceptions

from .. import errors as E
from ..core.worker import WorkerCore, WorkerSpec
from .base import CALLER, Host

log = logging.getLogger("actorgrad.transport.ray")

# Every pending request holds one slot of an async actor; they must never run out.
_MAX_CONCURRENCY = 100_000


class RayHost:
    """The actor: a thin shell around Host and WorkerCore."""

    def __init__(self, spec: WorkerSpec, namespace: str) -> None:
        import torch

        torch.set_num_threads(max(1, int(spec.num_threads or 1)))
        logging.basicConfig(level=logging.WARNING)
        self._spec = spec
        self._namespace = namespace
        self._core = WorkerCore(spec)
        self._host: Optional[Host] = None
        self._peers: dict[str, Any] = {}

    def _ensure_host(self) -> Host:
        if self._host is None:
            self._host = Host(self._core, self._send, asyncio.get_running_loop())
        return self._host

    def _send(self, to: str, sender: str, seq: int, data: bytes) -> None:
        peer = self._peers.get(to)
        if peer is None:
            try:
                peer = ray.get_actor(to, namespace=self._namespace)
            except ValueError:
                log.error("%s: no worker named %s; message dropped", sender, to)
                return
            self._peers[to] = peer
        peer.deliver.remote(sender, seq, data)

    async def deliver(self, sender: str, seq: int, data: bytes) -> None:
        """A one-way frame from a peer or the caller."""
        self._ensure_host().accept(sender, seq, data)

    async def request(self, sender: str, seq: int, data: bytes) -> bytes:
        """A frame that expects a reply; returns the encoded reply."""
        fut = asyncio.get_running_loop().create_future()

        def reply(payload: bytes) -> None:
            if not fut.done():
                fut.set_result(payload)

        self._ensure_host().accept(sender, seq, data, reply)
        return await fut

    async def probe(self) -> list[str]:
        """What this worker still waits for."""
        return self._ensure_host().describe_missing()

    async def ping(self) -> str:
        """Readiness check; returns the worker's name."""
        self._ensure_host()
        return self._core.name

    async def stop(self) -> None:
        """Stop the host loop cleanly before the process is killed."""
        if self._host is not None:
            self._host.stop()
            try:
                await self._host.task
            except BaseException:  # cancelled: that is the point
                pass

    async def node_id(self) -> str:
        """The Ray node this worker runs on."""
        return ray.get_runtime_context().get_node_id()


def _register_user_modules(*objs: Any) -> None:
    """Ship classes defined outside installed packages (scripts, test files) by value."""
    try:
        from ray import cloudpickle
    except ImportError:  # pragma: no cover
        return
    for obj in objs:
        cls = obj if isinstance(obj, type) else type(obj)
        mod = sys.modules.get(getattr(cls, "__module__", ""), None)
        if mod is None or mod.__name__ in ("__main__", "builtins"):
            continue
        path = getattr(mod, "__file__", None) or ""
        if not path or "site-packages" in path or "dist-packages" in path or path.startswith(sys.prefix + os.sep + "lib"):
            continue
        if mod.__name__.split(".")[0] in ("actorgrad", "torch", "ray"):
            continue
        try:
            cloudpickle.register_pickle_by_value(mod)
        except Exception:  # already registered, or not a module cloudpickle accepts
            pass


class RayTransport:
    """Workers as Ray actors in a namespace of their own."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, **ray_kwargs: Any) -> None:
        self.started_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
            if address is None:
                # Workers of an embedded instance import what this script imports.
                paths = [p for p in sys.path if p and os.path.isdir(p)]
                env = dict(ray_kwargs.pop("runtime_env", None) or {})
                env.setdefault("env_vars", {}).setdefault("PYTHONPATH", os.pathsep.join(paths))
                kwargs["runtime_env"] = env
            kwargs.update(ray_kwargs)
            ray.init(address=address, **kwargs)
            self.started_ray = True
        self.namespace = f"actorgrad-{uuid.uuid4().hex[:8]}"
        self._actors: dict[str, Any] = {}

    def spawn(self, spec: WorkerSpec, options: dict[str, Any]) -> Any:
        """Create the named actor; returns its handle (creation continues in the background)."""
        _register_user_modules(spec.module, *(type(m) for m in spec.module.modules()))
        if spec.update is not None and callable(spec.update):
            _register_user_modules(spec.update)
        opts: dict[str, Any] = {
            "name": spec.name,
            "namespace": self.namespace,
            "num_cpus": options.get("num_cpus") or 0,
            "max_concurrency": _MAX_CONCURRENCY,
            "max_restarts": 0,
        }
        if options.get("num_gpus"):
            opts["num_gpus"] = options["num_gpus"]
        if options.get("resources"):
            opts["resources"] = dict(options["resources"])
        actor = ray.remote(RayHost).options(**opts).remote(spec, self.namespace)
        self._actors[spec.name] = actor
        return actor

    def _actor(self, worker: str) -> Any:
        actor = self._actors.get(worker)
        if actor is None:
            raise E.WorkerDied("the worker is not running", worker=worker)
        return actor

    def post(self, worker: str, seq: int, data: bytes) -> None:
        """Send a one-way message from the caller."""
        self._actor(worker).deliver.remote(CALLER, seq, data)

    def request(self, worker: str, seq: int, data: bytes) -> cf.Future:
        """Send a request; the future yields the encoded reply or raises WorkerDied."""
        ref = self._actor(worker).request.remote(CALLER, seq, data)
        out: cf.Future = cf.Future()

        def done(f: cf.Future) -> None:
            try:
                out.set_result(f.result())
            except ray.exceptions.RayActorError as exc:
                out.set_exception(E.WorkerDied(f"the worker's process died or could not start: {exc}", worker=worker))
            except Exception as exc:  # Ray-level failure on the way
                out.set_exception(E.WorkerError(f"Ray could not deliver the request: {exc}", worker=worker))

        ref.future().add_done_callback(done)
        return out

    def probe(self, worker: str, timeout: float) -> list[str]:
        """Ask a worker what it still waits for (bounded by ``timeout``)."""
        try:
            return ray.get(self._actor(worker).probe.remote(), timeout=timeout)
        except Exception as exc:
            return [f"(no answer: {type(exc).__name__})"]

    def kill(self, worker: str) -> None:
        """Stop one worker."""
        actor = self._actors.pop(worker, None)
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass

    def close(self) -> None:
        """Stop and kill every worker; shut Ray down if this transport started it."""
        try:
            ray.wait([a.stop.remote() for a in self._actors.values()], num_returns=len(self._actors), timeout=5)
        except Exception:  # dead workers cannot stop themselves
            pass
        for name in list(self._actors):
            self.kill(name)
        if self.started_ray:
            ray.shutdown()
