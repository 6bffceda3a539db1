"""Ray transport: each worker is a named async actor hosting a WorkerCore.

Ray does placement, lifecycle and failure detection. Messages themselves go
over direct channels (channels.py): each worker serves a Unix socket and a
TCP port whose address the others learn through Ray, and the caller keeps one
connection per worker on an IO thread; a connection that drops fails every
request waiting on it with WorkerDied. With ``channels=False`` (or when a
channel cannot be opened) messages go as fire-and-forget actor calls
(``deliver``) and requests as actor calls instead, each frame as one bytes
object (``Frame.to_bytes``). Large tensors of peer messages may travel beside their
envelope over the data plane (dataplane.py, ``ag.init(data_plane=...)``).
This is the only module that imports Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import itertools
import logging
import os
import pickle
import sys
import threading
import time
import uuid
from typing import Any, Optional

import ray
import ray.exceptions

from .. import errors as E
from .. import pickling
from ..core import codec
from ..core import messages as m
from ..core.worker import WorkerCore, WorkerSpec
from . import death
from .base import CALLER, Capabilities, Data, Host, Outbound, ReplyFn, epoch_of, name_of, sender_key
from .channels import MSG, OOB, Channel, ChannelConfig, ChannelServer, pack_frame
from .dataplane import DataPlane, check_mode, min_bytes_from_env
from .startup import POOL_ENV, worker_process_setup

log = logging.getLogger("actorgrad.transport.ray")

# Every pending request holds one slot of an async actor; they must never run out.
_MAX_CONCURRENCY = 100_000
# Ray passes arguments up to this size inside the task spec (max_direct_call_object_size).
_INLINE_BYTES = 100 * 1024
# The Ray instance ag.init starts itself (never one it joins). Every worker is an actor that gets a
# process of its own when spawned: processes Ray starts ahead of time for tasks (prestart) are never
# used by the runtime and would import Ray and burn CPU while the workers start.
EMBEDDED_SYSTEM_CONFIG: dict[str, Any] = {
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
}


class RayHost:
    """The actor: a thin shell around Host and WorkerCore."""

    def __init__(self, spec: WorkerSpec, namespace: str, epoch: int = 0,
                 channel_config: Optional[ChannelConfig] = None) -> None:
        import torch

        worker_process_setup()  # before the core builds its optimizer
        torch.set_num_threads(max(1, int(spec.num_threads or 1)))
        logging.basicConfig(level=logging.WARNING)
        self._spec = spec
        self._namespace = namespace
        self._core = WorkerCore(spec)
        self._host: Optional[Host] = None
        self._peers: dict[str, Any] = {}
        self._channels: dict[str, Channel] = {}
        self._server: Optional[ChannelServer] = None
        self._node = ray.get_runtime_context().get_node_id()
        self._epoch = epoch
        # The runtime's channel secret and limits, handed over by Ray (authenticated); None: Ray calls only.
        self._config = channel_config
        self._dataplane: Optional[DataPlane] = None  # made with the channel server (needs the loop)

    def _ensure_host(self) -> Host:
        if self._host is None:
            self._host = Host(self._core, self._send, asyncio.get_running_loop(), inline=True, epoch=self._epoch)
            # CUDA tensors to peers stay on the device where NCCL may carry them (see [Note: data plane]).
            self._host.device_buffers = (self._core.device.type == "cuda" and self._config is not None
                                         and self._config.data_plane in ("auto", "nccl"))
        return self._host

    def _accept(self, sender: str, seq: int, data: Data, reply: Optional[ReplyFn] = None) -> bool:
        return self._ensure_host().accept(sender, seq, data, reply)

    def _sender_gone(self, sender: str) -> None:
        if self._host is not None:
            self._host.forget(sender)

    async def reset(self, epoch: int) -> str:
        """Recovery: forget every step and peer connection, and take frames of ``epoch`` only."""
        if self._host is not None:
            await self._host.quiesce()
            self._host = None
        self._core.reset()
        self._epoch = epoch
        if self._dataplane is not None:
            self._dataplane.reset()  # its peers may be new processes: every group is made anew
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(ch.closed() for ch in channels), return_exceptions=True)
        self._ensure_host()
        return self._core.name

    async def address(self) -> dict:
        """Start serving direct channels (once); return where peers connect."""
        host = self._ensure_host()
        if self._server is None:
            if self._config is None:
                raise E.ConfigError("this worker was started without channels", worker=self._core.name)
            ip = ray.util.get_node_ip_address()
            if self._config.data_plane != "channel":
                self._dataplane = DataPlane(self._core.name, self._config.data_plane,
                                            self._config.data_plane_timeout, self._config.data_plane_min_bytes,
                                            self._core.device, self._node, ip, asyncio.get_running_loop(),
                                            self._dataplane_failed, max_bytes=self._config.max_frame)
            self._server = ChannelServer(self._accept, self._core.name, ip, self._config, gone=self._sender_gone,
                                         oob=self._accept_oob if self._dataplane is not None else None)
            self._server_started = asyncio.ensure_future(self._server.start(self._node))
        # Peers and the caller may ask at the same time: all wait for the one start.
        addr = await asyncio.shield(self._server_started)
        # Who we are, for a peer's data plane choice (same process? both on CUDA?).
        return {**addr, "pid": os.getpid(), "device": str(self._core.device)}

    async def _peer_address(self, to: str) -> dict:
        addr = await self._peer(to).address.remote()
        if self._dataplane is not None:
            self._dataplane.peers[to] = {k: addr.get(k) for k in ("node", "pid", "device")}
        return addr

    def _accept_oob(self, sender: str, seq: int, data: bytearray, reply: Optional[ReplyFn] = None) -> bool:
        """A peer message whose large tensors come over the data plane: delivered once they have."""
        if self._dataplane is None:
            return False
        if epoch_of(sender) != self._epoch:
            log.debug("%s: data-plane frame of another epoch from %s dropped", self._core.name, sender)
            return True
        return self._dataplane.incoming(sender, name_of(sender), data, lambda frame: self._accept(sender, seq, frame))

    def _dataplane_failed(self, step: Optional[int], text: str) -> None:
        """A transfer of ``step`` failed here: fail the step on this worker, naming it (the caller aborts it)."""
        if step is not None and self._host is not None:
            self._host.inject(m.Abort(step, text))

    def _peer(self, to: str) -> Any:
        peer = self._peers.get(to)
        if peer is None:
            peer = _lookup(to, self._namespace)
            self._peers[to] = peer
        return peer

    def _send(self, to: str, sender: str, seq: int, frame: codec.Frame) -> None:
        if self._server is not None:  # channels are on: the caller asked for our address
            ch = self._channels.get(to)
            if ch is None:
                assert self._config is not None  # a server implies a config
                ch = Channel(asyncio.get_running_loop(), to, lambda: self._peer_address(to), self._node,
                             self._config, identity=self._core.name)
                self._channels[to] = ch
            if ch.failed is None:
                parts = self._dataplane.outgoing(to, frame) if self._dataplane is not None else None
                if parts is not None:
                    ch.send(pack_frame(OOB, sender, seq, None, parts))
                else:
                    ch.send(pack_frame(MSG, sender, seq, None, frame))
                return
            log.warning("%s: channel to %s failed (%s); using a Ray call", sender, to, ch.failed)
        peer = self._peers.get(to)
        if peer is None:
            try:
                peer = _lookup(to, self._namespace)
            except ValueError:
                log.error("%s: no worker named %s; message dropped", sender, to)
                return
            self._peers[to] = peer
        peer.deliver.remote(sender, seq, frame.to_bytes())

    async def deliver(self, sender: str, seq: int, data: bytes) -> None:
        """A one-way frame (its bytes) from a peer or the caller."""
        self._ensure_host().accept(sender, seq, data)

    async def request(self, sender: str, seq: int, data: bytes) -> bytes:
        """A frame (its bytes) that expects a reply; returns the reply's bytes."""
        fut = asyncio.get_running_loop().create_future()

        def reply(answer: codec.Frame) -> None:
            if not fut.done():
                fut.set_result(answer.to_bytes())

        self._ensure_host().accept(sender, seq, data, reply)
        return await fut

    async def channel_stats(self) -> dict:
        """What this worker's channel server has accepted and refused, and what its Host holds back."""
        import dataclasses

        out = dataclasses.asdict(self._server.stats) if self._server is not None else {}
        out["held_bytes"] = self._host.held_bytes() if self._host is not None else 0
        return out

    async def probe(self) -> list[str]:
        """What this worker still waits for."""
        return self._ensure_host().describe_missing()

    async def ping(self) -> str:
        """Readiness check; returns the worker's name."""
        self._ensure_host()
        return self._core.name

    async def settle(self, timeout: float) -> bool:
        """After stop(): whether the core went idle within ``timeout`` s (a forward on its compute thread runs on)."""
        return self._host is None or await self._host.settle(timeout)

    async def stop(self) -> None:
        """Stop the host loop cleanly before the process is killed."""
        if self._server is not None:
            # A server still starting would listen after close(): with the secret of a runtime that is gone.
            await asyncio.gather(self._server_started, return_exceptions=True)
        await asyncio.gather(*(ch.closed() for ch in self._channels.values()), return_exceptions=True)
        if self._dataplane is not None:
            self._dataplane.close()
        if self._server is not None:
            self._server.close()
        if self._host is not None:
            self._host.stop()
            try:
                await self._host.task
            except BaseException:  # cancelled: that is the point
                pass

    async def node_id(self) -> str:
        """The Ray node this worker runs on."""
        return ray.get_runtime_context().get_node_id()


# What a shared process answers for one of its workers: RayHost's remote interface.
_MEMBER_METHODS = frozenset({"address", "deliver", "request", "channel_stats", "probe", "ping", "stop", "reset",
                             "node_id"})
# Ray's internal KV: worker name -> the shared process (actor name) that hosts it, for peers' lookups.
_KV_NAMESPACE = "actorgrad"

# [Note: process pool]
# Starting a worker process costs seconds of CPU (the interpreter, Ray, torch: about 4.6 s on a
# 2-core machine), which a run of a few steps, a sweep that calls ag.init/ag.shutdown per trial,
# or a test suite pays again for every worker. With ACTORGRAD_REUSE_PROCESSES=1, a runtime that
# joined a Ray instance it did not start hosts each plain worker (no CPUs, GPUs, resources,
# placement group, restarts or replicas asked for) as the only member of a RayProcess from a pool;
# ag.shutdown() removes the worker and hands the empty process back to the pool, and the next
# runtime of the same driver and Ray session takes it (rebind: its namespace and channel secret)
# instead of starting one. A process that does not answer rebind in time is killed and replaced.
# What a process keeps between runtimes is what any Python process keeps (imported modules,
# torch's global settings); a worker's own state (module, optimizer, channels, data plane) goes
# with it. Off by default: idle processes hold memory until the driver exits.
_POOL_NAMESPACE = "actorgrad-pool"
# Options that give a worker a process of its own (never shared, never pooled).
_OWN_PROCESS_OPTIONS = ("num_cpus", "num_gpus", "resources", "placement_group", "max_restarts", "replicas")
_POOL_MAX = 16  # idle processes kept per driver (each holds what its last worker's peak left it)
_POOL_REBIND_TIMEOUT = 5.0
_pool: dict[str, list[tuple[str, Any]]] = {}  # Ray session and job -> idle processes (name, handle)
_pool_lock = threading.Lock()


def _device_type(device: Optional[str]) -> str:
    """The type of a worker's device spec ("cpu" when none is given)."""
    return str(device or "cpu").split(":", 1)[0]


def _pool_key() -> str:
    """Which pool this driver's runtimes share: processes of another Ray session or job are not ours."""
    ctx = ray.get_runtime_context()
    return f"{ctx.get_session_name()}/{ctx.get_job_id()}"


def _take_pooled(namespace: str, config: Optional[ChannelConfig]) -> Optional[tuple[str, Any]]:
    """An idle pooled process rebound to this runtime, or None when the pool has none that answers."""
    key = _pool_key()
    while True:
        with _pool_lock:
            for k in [k for k in _pool if k != key]:  # another Ray session's handles are dead
                del _pool[k]
            idle = _pool.get(key)
            if not idle:
                return None
            name, handle = idle.pop()
        try:
            ray.get(handle.rebind.remote(namespace, config), timeout=_POOL_REBIND_TIMEOUT)
            return name, handle
        except Exception as exc:  # dead, or stuck in a former worker's compute: never reused
            log.debug("pooled process %s not reused: %r", name, exc)
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass


def _give_back(name: str, handle: Any) -> bool:
    """Put an emptied process into the pool; False when the pool is full (the caller kills it)."""
    with _pool_lock:
        idle = _pool.setdefault(_pool_key(), [])
        if len(idle) >= _POOL_MAX:
            return False
        idle.append((name, handle))
        return True


class RayProcess:
    """The actor of a shared process (``ag.init(workers_per_process=k)``): several RayHosts in one process.

    Each worker keeps its own core, Host, inbox, optimizer, channel server and name; they share the
    process (its imports, its memory, one event loop: they compute one at a time).
    """

    def __init__(self, namespace: str, channel_config: Optional[ChannelConfig] = None) -> None:
        worker_process_setup()
        self._namespace = namespace
        self._config = channel_config
        self._hosts: dict[str, asyncio.Future] = {}

    def _slot(self, worker: str) -> asyncio.Future:
        fut = self._hosts.get(worker)
        if fut is None:
            fut = self._hosts[worker] = asyncio.get_running_loop().create_future()
        return fut

    async def add(self, worker: str, data: bytes, epoch: int) -> str:
        """Start one worker here from its pickled spec; a failure fails every call addressed to it."""
        from ray import cloudpickle

        fut = self._slot(worker)
        if fut.done():  # the same name again, after a failed or removed one
            fut = self._hosts[worker] = asyncio.get_running_loop().create_future()
        try:
            host = RayHost(cloudpickle.loads(data), self._namespace, epoch, self._config)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: the calls that wait for this worker raise it
            raise
        fut.set_result(host)
        return worker

    async def call(self, worker: str, method: str, *args: Any) -> Any:
        """RayHost.<method>(*args) of one worker, once it has started."""
        if method not in _MEMBER_METHODS:
            raise E.ConfigError(f"no such worker method {method!r}", worker=worker)
        host = await self._slot(worker)
        return await getattr(host, method)(*args)

    async def identity(self, worker: str) -> dict:
        """Who hosts the worker (as ``_identity``), once it has started; its start-up error otherwise."""
        await self._slot(worker)
        return _identity(self)

    async def rebind(self, namespace: str, channel_config: Optional[ChannelConfig]) -> int:
        """Serve another runtime from now on (a pooled process, see [Note: process pool]); returns the pid.

        Only an empty process is handed on: its workers were removed when their runtime shut down.
        """
        live = [w for w, f in self._hosts.items() if not f.done() or f.exception() is None]
        if live:  # never handed back like this (remove came first): the caller kills it and starts another
            raise RuntimeError(f"a pooled process still hosts {live}")
        self._hosts.clear()
        self._namespace = namespace
        self._config = channel_config
        gc.collect()  # what the last runtime's workers left in reference cycles goes before the next one
        return os.getpid()

    async def remove(self, worker: str) -> int:
        """Stop one worker of this process; returns how many remain."""
        fut = self._hosts.pop(worker, None)
        busy = 0
        if fut is not None and fut.done() and fut.exception() is None:
            host = fut.result()
            await host.stop()
            # A forward or backward already on the compute thread runs on after stop(): give it a moment,
            # then count it as still here, so that its process is killed rather than pooled.
            busy = int(not await host.settle(1.0))
        return busy + sum(1 for f in self._hosts.values() if not f.done() or f.exception() is None)


class _MemberMethod:
    def __init__(self, process: Any, worker: str, method: str) -> None:
        self._process, self._worker, self._method = process, worker, method

    def remote(self, *args: Any) -> Any:
        return self._process.call.remote(self._worker, self._method, *args)


class Member:
    """A worker in a shared process, with the remote methods of a RayHost actor handle."""

    def __init__(self, process: Any, worker: str) -> None:
        self.process = process
        self.worker = worker

    @property
    def _actor_id(self) -> Any:
        return self.process._actor_id

    @property
    def __ray_call__(self) -> Any:
        return self.process.__ray_call__

    def __getattr__(self, method: str) -> _MemberMethod:
        if method.startswith("_") or method not in _MEMBER_METHODS:
            raise AttributeError(method)
        return _MemberMethod(self.process, self.worker, method)

    def __reduce__(self) -> tuple:
        return (Member, (self.process, self.worker))


def _lookup(worker: str, namespace: str) -> Any:
    """The handle of a worker: its own actor, or its place in a shared process; ValueError if neither."""
    try:
        return ray.get_actor(worker, namespace=namespace)
    except ValueError:
        from ray.experimental import internal_kv

        where = internal_kv._internal_kv_get(f"{namespace}/{worker}", namespace=_KV_NAMESPACE)
        if where is None:
            raise
        # "name", or "namespace/name" for a pooled process (it lives in the pool's namespace).
        home, _, name = where.decode().rpartition("/")
        return Member(ray.get_actor(name, namespace=home or namespace), worker)


def _identity(_host: Any) -> dict:
    """Who a worker process is (run through __ray_call__, so after its constructor finished)."""
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "worker_id": ctx.get_worker_id(), "node_id": ctx.get_node_id(),
            "ip": ray.util.get_node_ip_address()}


def _resolve(fut: cf.Future, worker: str, data: Any, owned: bool) -> None:
    """Complete a request's future with the reply's Frame, or a DecodeError naming the worker."""
    try:
        frame = codec.Frame.from_bytes(data, owned=owned)
    except E.DecodeError as err:
        fut.set_exception(E.DecodeError(f"a malformed reply: {err.message}", worker=worker))
        return
    fut.set_result(frame)


def _ray_death_text(actor_id: Optional[str], ident: dict) -> Optional[str]:
    """What Ray's control store (GCS) says about a dead worker, or None while it says nothing yet."""
    from ray._private import state as ray_state  # the GCS itself: no dashboard needed, answers in ms

    accessor = ray_state.state._connect_and_get_accessor()
    if ident.get("node_id"):
        # A lost node is the root cause: its workers' entries then say little or nothing.
        for node in ray.nodes():
            if node.get("NodeID") == ident["node_id"] and not node.get("Alive"):
                why = node.get("DeathReasonMessage") or ""
                return f"The actor died because its node has died. Node Id: {ident['node_id']}" + (
                    f"\nnode death reason: {why}" if why else "")
    if ident.get("worker_id"):
        # The worker table keeps each process's exit even after Ray restarted the actor.
        from ray.core.generated import common_pb2, gcs_pb2

        raw = accessor.get_worker_info(ray.WorkerID(bytes.fromhex(ident["worker_id"])))
        if raw is not None:
            info = gcs_pb2.WorkerTableData.FromString(raw)
            if not info.is_alive and (info.exit_detail or info.HasField("exit_type")):
                kind = common_pb2.WorkerExitType.Name(info.exit_type) if info.HasField("exit_type") else ""
                return f"{kind}: {info.exit_detail}"
    if actor_id:
        table = ray_state.actors(actor_id)
        if table and table.get("State") == "DEAD" and table.get("DeathCause") is not None:
            cause = table["DeathCause"]
            which = cause.WhichOneof("context")
            if which == "actor_died_error_context":
                ctx = cause.actor_died_error_context
                text = f"{ctx.error_message} ({type(ctx).Reason.Name(ctx.reason)})"
                if ctx.HasField("node_death_info") and ctx.node_death_info.reason_message:
                    text += f"\nnode death reason: {ctx.node_death_info.reason_message}"
                return text
            if which == "creation_task_failure_context":
                return "error raised in its creation task:\n" + cause.creation_task_failure_context.formatted_exception_string
            if which is not None:
                return f"{which}: {getattr(cause, which).error_message}"
    return None


def _node_silent(node_id: str, timeout: float = 0.5) -> Optional[str]:
    """A text for a worker's node whose raylet does not accept connections; None if it does.

    Ray declares a node dead only after its health checks fail for several seconds; a raylet that
    refuses or ignores a connection tells sooner that the node itself is gone.
    """
    import socket

    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("Alive"):
            host, port = node.get("NodeManagerAddress"), node.get("NodeManagerPort")
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                return None
            except OSError as exc:
                return f"NODE_UNREACHABLE: the raylet of node {node_id} at {host}:{port} does not answer ({exc})"
    return None


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
    # Frames cross processes: the receiver's buffer is a copy read from a socket (or Ray's bytes).
    capabilities = Capabilities(places_gpus=True, placement_groups=True, restarts_workers=True)

    def __init__(self, address: Optional[str] = None, channels: Optional[bool] = None,
                 workers_per_process: int = 1, data_plane: str = "auto", data_plane_timeout: float = 60.0,
                 **ray_kwargs: Any) -> None:
        self.started_ray = False
        check_mode(data_plane)
        if channels is None:
            channels = os.environ.get("ACTORGRAD_CHANNELS", "1") != "0"
        self.channels = channels
        if isinstance(workers_per_process, bool) or not isinstance(workers_per_process, int) or workers_per_process < 1:
            raise E.ConfigError(f"workers_per_process must be a positive integer, got {workers_per_process!r}")
        # Up to this many workers share one process (spawn order fills a process, then opens the next).
        self.workers_per_process = workers_per_process
        self._process: Optional[tuple[str, Any, list[str]]] = None  # the one being filled: name, handle, members
        self._members: dict[str, str] = {}  # worker -> the shared process that hosts it
        self._pooled: dict[str, tuple[str, Any]] = {}  # worker -> its pooled process (see [Note: process pool])
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # Workers of an embedded instance import what this script imports. Never when joining
                # a cluster (ray job submit sets RAY_ADDRESS): its runtime env is the job's to set.
                paths = [p for p in sys.path if p and os.path.isdir(p)]
                env = dict(ray_kwargs.pop("runtime_env", None) or {})
                env.setdefault("env_vars", {}).setdefault("PYTHONPATH", os.pathsep.join(paths))
                kwargs["runtime_env"] = env
            kwargs.update(ray_kwargs)
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # The embedded default always starts its own instance, even when a `ray start`
                # cluster runs on this machine (plain ray.init() would join that one).
                address = "local"
            if address == "local":
                # Our own instance only (a cluster we join is configured by whoever started it).
                kwargs["_system_config"] = {**EMBEDDED_SYSTEM_CONFIG, **(kwargs.get("_system_config") or {})}
            ray.init(address=address, **kwargs)
            self.started_ray = True
        self.namespace = f"actorgrad-{uuid.uuid4().hex[:8]}"
        # An instance we started goes with ag.shutdown(): nothing to keep processes for.
        self.reuse = os.environ.get(POOL_ENV, "0") == "1" and not self.started_ray
        if os.environ.get(POOL_ENV, "0") == "1" and self.started_ray:
            log.info("%s is set, but this runtime started Ray itself (its processes go with it): not reusing",
                     POOL_ENV)
        self._actors: dict[str, Any] = {}
        self._groups: list[Any] = []
        self._node = ray.get_runtime_context().get_node_id()
        self._tokens = itertools.count(1)
        self._waiting: dict[str, dict[int, cf.Future]] = {}
        self._chans: dict[str, Channel] = {}
        # Recovery restarts a worker from its spec: ours, kept in the object store until kill/close.
        self._spec_refs: dict[str, Any] = {}
        # Per worker: when its (re)start began, a future set once its constructor ran, and who it is
        # then (pid, Ray worker and node ids): what a death-cause lookup asks Ray about.
        self._start: dict[str, tuple[float, cf.Future]] = {}
        self._ident: dict[str, dict] = {}
        self._start_errors: dict[str, BaseException] = {}  # what a failed start raised
        self._deaths: dict[str, cf.Future] = {}  # one death-cause lookup per worker incarnation
        self._death_lock = threading.Lock()
        self._io: Optional[asyncio.AbstractEventLoop] = None
        # Frames from the caller thread, flushed by the IO thread: one wake-up per burst, not per frame.
        self._outq: list[tuple[str, int, Optional[int], codec.Frame, str]] = []
        self._outq_lock = threading.Lock()
        self._flush_scheduled = False
        self.caller = CALLER  # the sender field of our frames; changes with each recovery epoch
        # One secret per runtime: only processes that got it through Ray can use the workers' channels.
        self.channel_config: Optional[ChannelConfig] = ChannelConfig.create() if channels else None
        if self.channel_config is not None:
            self.channel_config.data_plane = data_plane
            self.channel_config.data_plane_timeout = float(data_plane_timeout)
            self.channel_config.data_plane_min_bytes = min_bytes_from_env()
        elif data_plane in ("gloo", "nccl"):
            log.warning("data_plane=%r needs channels (ACTORGRAD_CHANNELS=0 turns them off): not used", data_plane)
        if self.channels:
            self._io = asyncio.new_event_loop()
            self._io_thread = threading.Thread(target=self._io.run_forever, name="actorgrad-io", daemon=True)
            self._io_thread.start()

    def check_feasible(self, name: str, request: dict[str, float]) -> None:
        """Fail fast when no node of the cluster has, in total, what a worker asks for.

        An autoscaling cluster may add such a node later: ACTORGRAD_PLACEMENT_CHECK=0 turns this off
        (the worker then waits for Ray, within the runtime's deadline).
        """
        wanted = {k: v for k, v in request.items() if v}
        if not wanted or os.environ.get("ACTORGRAD_PLACEMENT_CHECK", "1") == "0":
            return
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if any(all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in wanted.items()) for n in nodes):
            return
        have = "; ".join(
            ", ".join(f"{k}={v:g}" for k, v in sorted(n.get("Resources", {}).items())
                      if not k.startswith(("node:", "memory", "object_store_memory")))
            for n in nodes)
        raise E.PlacementError(f"no node of the Ray cluster can hold {wanted} (nodes have: {have})", worker=name)

    def place_group(self, strategy: str, bundles: list[dict[str, float]], names: list[str], timeout: float) -> Any:
        """Reserve one bundle per worker as a placement group; PlacementError if Ray cannot in time."""
        from ray.util.placement_group import placement_group, remove_placement_group

        pg = placement_group(bundles, strategy=strategy.upper(), name=f"{self.namespace}-{names[0]}")
        try:
            ray.get(pg.ready(), timeout=timeout)
        except Exception as exc:
            remove_placement_group(pg)
            raise E.PlacementError(
                f"Ray could not reserve a {strategy.upper()} placement group for workers {names} "
                f"with bundles {bundles} within {timeout:g}s ({type(exc).__name__})", worker=names[0]) from None
        self._groups.append(pg)
        return pg

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
            # With recovery on, Ray restarts a dead worker (same name, same constructor arguments);
            # its calls in flight fail instead of being retried: the runtime replays whole steps.
            "max_restarts": int(options.get("max_restarts") or 0),
            "max_task_retries": 0,
        }
        if options.get("num_gpus"):
            opts["num_gpus"] = options["num_gpus"]
        if options.get("resources"):
            opts["resources"] = dict(options["resources"])
        if options.get("placement_group") is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=options["placement_group"], placement_group_bundle_index=options["bundle_index"])
            opts["num_cpus"] = options.get("bundle_cpus", opts["num_cpus"])
        try:
            if self._shares(options):
                actor = self._spawn_member(spec, opts)
            elif self._poolable(spec, options):
                actor = self._spawn_pooled(spec)
            else:
                actor = ray.remote(RayHost).options(**opts).remote(self._spec_arg(spec, opts), self.namespace,
                                                                   epoch_of(self.caller),
                                                                   self.channel_config)
        except (TypeError, pickle.PicklingError) as exc:
            # What ag.spawn's own check did not catch (a class Ray ships by value): the same ConfigError.
            if "serializ" not in str(exc) and "pickle" not in str(exc):
                raise
            raise pickling.error(spec, exc) from None
        self._actors[spec.name] = actor
        self._watch_start(spec.name, actor)
        if self._io is not None:
            self._waiting[spec.name] = {}
            self._open_channel(spec.name, actor)
        return actor

    def _shares(self, options: dict[str, Any]) -> bool:
        """Whether this worker goes into a shared process: when asked for, and only plain CPU workers.

        A worker that asks for CPUs, GPUs or resources, is placed in a group, may be restarted, or is
        one of several replicas keeps a process of its own.
        """
        return self.workers_per_process > 1 and not any(options.get(k) for k in _OWN_PROCESS_OPTIONS)

    def _poolable(self, spec: WorkerSpec, options: dict[str, Any]) -> bool:
        """Whether this worker runs in a pooled process (see [Note: process pool]): plain CPU workers only.

        A CUDA worker's process would keep its device memory (torch's cache) for whoever comes next.
        """
        return (self.reuse and self.workers_per_process == 1 and _device_type(spec.device) == "cpu"
                and not any(options.get(k) for k in _OWN_PROCESS_OPTIONS))

    def _spawn_pooled(self, spec: WorkerSpec) -> Member:
        """Start the worker as the only member of a process from the pool (a new one if it has none)."""
        from ray import cloudpickle
        from ray.experimental import internal_kv

        data = cloudpickle.dumps(spec)  # unpickled inside RayProcess.add: a failure there names the worker
        taken = _take_pooled(self.namespace, self.channel_config)
        if taken is None:
            name = f"actorgrad-process-{uuid.uuid4().hex[:8]}"
            handle = ray.remote(RayProcess).options(
                name=name, namespace=_POOL_NAMESPACE, num_cpus=0, max_concurrency=_MAX_CONCURRENCY,
                max_restarts=0, max_task_retries=0).remote(self.namespace, self.channel_config)
            taken = (name, handle)
        name, handle = taken
        self._pooled[spec.name] = taken  # from here on, kill() and close() own it
        internal_kv._internal_kv_put(self._kv_key(spec.name), f"{_POOL_NAMESPACE}/{name}", namespace=_KV_NAMESPACE)
        handle.add.remote(spec.name, data, epoch_of(self.caller))
        return Member(handle, spec.name)

    def _kv_key(self, worker: str) -> str:
        """Where peers look up which process hosts a worker of this runtime (a shared or pooled one)."""
        return f"{self.namespace}/{worker}"

    def _spawn_member(self, spec: WorkerSpec, opts: dict[str, Any]) -> Member:
        """Start the worker in the shared process being filled (a new one when it is full)."""
        from ray import cloudpickle
        from ray.experimental import internal_kv

        data = cloudpickle.dumps(spec)  # unpickled inside RayProcess.add: a failure there names the worker
        if self._process is None or len(self._process[2]) >= self.workers_per_process:
            name = f"actorgrad-process-{uuid.uuid4().hex[:8]}"
            handle = ray.remote(RayProcess).options(
                name=name, namespace=self.namespace, num_cpus=0, max_concurrency=_MAX_CONCURRENCY,
                max_restarts=0, max_task_retries=0).remote(self.namespace, self.channel_config)
            self._process = (name, handle, [])
        name, handle, members = self._process
        internal_kv._internal_kv_put(self._kv_key(spec.name), name, namespace=_KV_NAMESPACE)
        handle.add.remote(spec.name, data, epoch_of(self.caller))
        members.append(spec.name)
        self._members[spec.name] = name
        return Member(handle, spec.name)

    def _spec_arg(self, spec: WorkerSpec, opts: dict[str, Any]) -> Any:
        """The spec as the actor's constructor argument: in the object store when Ray may restart it."""
        if not opts.get("max_restarts"):
            return spec
        # Ray inlines a small argument into the actor's task spec, which a restart reuses; a large
        # one it keeps in the object store and frees once the actor has started, and a restart then
        # fails (ReferenceCountingAssertionError). An object we put and hold stays until kill/close;
        # its primary copy is in this process's node, so losing a worker's node does not lose it.
        state = spec.module.state_dict().values()
        tensors = sum(t.numel() * t.element_size() for t in state if hasattr(t, "numel"))
        if tensors < _INLINE_BYTES // 2:
            from ray import cloudpickle

            if len(cloudpickle.dumps(spec)) < _INLINE_BYTES // 2:
                return spec
        ref = ray.put(spec)
        self._spec_refs[spec.name] = ref
        return ref

    def _watch_start(self, name: str, actor: Any) -> None:
        """Note when the worker's constructor has run (and which process it is) without waiting for it."""
        done: cf.Future = cf.Future()
        self._start[name] = (time.monotonic(), done)
        self._start_errors.pop(name, None)
        if isinstance(actor, Member):
            ref = actor.process.identity.remote(name)
        else:
            ref = actor.__ray_call__.remote(_identity)

        def started(f: cf.Future) -> None:
            try:
                ident = f.result()
            except Exception as exc:  # it died starting: not "still starting" any more
                ident = None
                self._start_errors[name] = exc
            if self._start.get(name, (0.0, None))[1] is done:  # not a call of an older incarnation
                if ident is not None:
                    self._ident[name] = ident
                done.set_result(ident)

        ref.future().add_done_callback(started)

    def identity(self, worker: str) -> Optional[dict]:
        """Where the worker runs (pid, Ray node id, node ip) once it has started; None before (no round trip)."""
        ident = self._ident.get(worker)
        return dict(ident) if ident else None

    def starting(self, worker: str) -> Optional[float]:
        """Seconds this worker has been starting (Ray placing it, its constructor running); None once up."""
        start = self._start.get(worker)
        if start is None or start[1].done():
            return None
        return time.monotonic() - start[0]

    def start_failure(self, worker: str, timeout: float = 2.0) -> Optional[str]:
        """Why the worker failed to start (its module or constructor raised, its process died); None if it did not."""
        start = self._start.get(worker)
        if start is None or not start[1].done() or start[1].result() is not None:
            return None
        exc = self._start_errors.get(worker)
        text = getattr(exc, "error_msg", None) or (str(exc) if exc is not None else "")
        lives_on = worker in self._members or worker in self._pooled
        if lives_on and not isinstance(exc, ray.exceptions.RayActorError):  # the worker's own error, not a death
            last = [ln for ln in text.strip().splitlines() if ln.strip()]
            return f"it failed while starting: {last[-1].strip() if last else type(exc).__name__}"
        why = death.describe(text) if text else None
        if why is None:
            why = self._explain_death(worker).result(timeout + 0.5) if timeout > 0 else None
        return why or f"{death.GENERIC} while starting"

    def _death_reason(self, worker: str, timeout: float = 2.0) -> Optional[str]:
        """Ask Ray, for at most ``timeout`` seconds, why the worker's process died; None if it does not say."""
        ident = dict(self._ident.get(worker) or {})
        actor = self._actors.get(worker)
        actor_id = actor._actor_id.hex() if actor is not None else None
        start = time.monotonic()
        asked_node = False
        while True:
            try:
                text = _ray_death_text(actor_id, ident)
                if not text and not asked_node and ident.get("node_id") and time.monotonic() - start > 0.5:
                    asked_node = True  # a process death is in Ray's tables by now: is the node gone?
                    text = _node_silent(ident["node_id"])
            except Exception as exc:  # a private Ray API that changed, or the GCS unreachable
                log.debug("no death cause for %s from Ray: %r", worker, exc)
                return None
            if text:
                return death.describe(text, pid=ident.get("pid"))
            if time.monotonic() - start > timeout:
                return None
            time.sleep(0.05)  # Ray learns of a death a few ms after the channel drops

    def _explain_death(self, worker: str) -> cf.Future:
        """The (shared) lookup of why this incarnation of the worker died; its result may be None."""
        with self._death_lock:
            fut = self._deaths.get(worker)
            if fut is None:
                fut = self._deaths[worker] = cf.Future()

                def look() -> None:
                    try:
                        fut.set_result(self._death_reason(worker))
                    except BaseException:
                        fut.set_result(None)

                threading.Thread(target=look, name=f"actorgrad-death-{worker}", daemon=True).start()
        return fut

    def _open_channel(self, name: str, actor: Any) -> None:
        assert self._io is not None
        addr = actor.address.remote()

        def open_channel() -> None:
            assert self.channel_config is not None
            self._chans[name] = Channel(
                self._io, name, lambda: asyncio.wrap_future(addr.future()), self._node, self.channel_config,
                identity=CALLER, on_reply=lambda token, data: self._on_reply(name, token, data),
                on_lost=lambda why: self._on_lost(name, why))

        self._io.call_soon_threadsafe(open_channel)

    def _close_channels(self) -> None:
        """Close every caller channel (on the IO thread), waiting up to 5 s."""
        assert self._io is not None
        chans = list(self._chans.values())
        self._chans.clear()

        async def close_all() -> None:
            await asyncio.gather(*(ch.closed() for ch in chans), return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(close_all(), self._io).result(5)
        except Exception:
            log.warning("some channels did not close in time")

    def reset(self, epoch: int, timeout: float) -> None:
        """Recovery: wait until every worker is alive again (Ray restarts dead ones), reset them
        all into ``epoch``, and reconnect; requests still waiting fail with WorkerDied."""
        import time as _time

        deadline = _time.monotonic() + timeout
        names = sorted(self._actors)
        for name in names:
            while True:
                try:
                    ray.get(self._actors[name].ping.remote(), timeout=max(0.1, deadline - _time.monotonic()))
                    break
                except ray.exceptions.ActorUnavailableError:
                    pass  # restarting: Ray refuses calls until the new process is up
                except ray.exceptions.GetTimeoutError:
                    raise E.WorkerDied(f"the worker did not come back within {timeout:g}s of its death"
                                       f"{self._known_death(name)}", worker=name) from None
                except ray.exceptions.RayActorError as exc:
                    why = death.describe(getattr(exc, "error_msg", None) or str(exc))
                    if why is not None and why.startswith("it failed while starting"):
                        raise E.WorkerDied(f"the worker died{self._known_death(name)} and its restarted process "
                                           f"failed while starting: {why.split(': ', 1)[1]}", worker=name) from None
                    raise E.WorkerDied(f"the worker cannot be restarted (its restarts are used up, or its "
                                       f"node is gone){self._known_death(name)}: "
                                       f"{why or exc}", worker=name) from None
                if _time.monotonic() > deadline:
                    raise E.WorkerDied(f"the worker did not come back within {timeout:g}s of its death"
                                       f"{self._known_death(name)}", worker=name)
                _time.sleep(0.2)
        for name in names:
            # New processes: a later death is looked up afresh, about them.
            self._watch_start(name, self._actors[name])
        with self._death_lock:
            self._deaths.clear()
        refs = {n: self._actors[n].reset.remote(epoch) for n in names}
        for name, ref in refs.items():
            try:
                ray.get(ref, timeout=max(0.1, deadline - _time.monotonic()))
            except Exception as exc:
                raise E.WorkerDied(f"the worker could not be reset for recovery: {type(exc).__name__}: {exc}",
                                   worker=name) from None
        self.caller = sender_key(CALLER, epoch)
        for name in names:
            self._on_lost(name, "the runtime is recovering", explain=False)
        if self._io is not None:
            with self._outq_lock:
                self._outq = []  # frames of the old epoch
            self._close_channels()
            for name in names:
                self._open_channel(name, self._actors[name])
        log.warning("recovery: %d workers reset into epoch %d", len(names), epoch)

    def _on_reply(self, worker: str, token: int, data: bytearray) -> None:
        fut = self._waiting.get(worker, {}).pop(token, None)
        if fut is not None and not fut.done():
            _resolve(fut, worker, data, owned=True)

    def _known_death(self, worker: str) -> str:
        """' (<why it died>)' when a finished lookup knows, else ''."""
        fut = self._deaths.get(worker)
        reason = fut.result() if fut is not None and fut.done() else None
        return f" ({reason})" if reason else ""

    def _on_lost(self, worker: str, why: str, explain: bool = True) -> None:
        waiting = self._waiting.get(worker, {})
        lost = []
        for token in list(waiting):
            # Runs on the IO thread, and on the caller's during a recovery reset: a reply may
            # have taken this token in between.
            fut = waiting.pop(token, None)
            if fut is not None and not fut.done():
                lost.append(fut)
        if not lost:
            return
        if not explain:
            for fut in lost:
                fut.set_exception(E.WorkerDied(f"lost the connection to the worker ({why})", worker=worker))
            return

        def fail(lookup: cf.Future) -> None:
            reason = lookup.result() or f"{death.GENERIC} (Ray gave no cause)"
            for fut in lost:
                try:
                    fut.set_exception(E.WorkerDied(f"lost the connection to the worker ({why}): {reason}",
                                                   worker=worker))
                except cf.InvalidStateError:  # a reply won the race
                    pass

        # The channel dropped before Ray knew why: ask it (bounded) off this thread, then fail the requests.
        self._explain_death(worker).add_done_callback(fail)

    def _enqueue(self, worker: str, seq: int, token: Optional[int], frame: codec.Frame) -> None:
        # The copy now, on the caller's thread: the IO thread writes the frame out later, and the
        # caller's tensors may change once notify/request return.
        frame = frame.private()
        with self._outq_lock:
            self._outq.append((worker, seq, token, frame, self.caller))
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        assert self._io is not None
        self._io.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._outq_lock:
            frames, self._outq = self._outq, []
            self._flush_scheduled = False
        for worker, seq, token, frame, key in frames:
            self._channel_send(worker, seq, token, frame, key)

    def _channel_send(self, worker: str, seq: int, token: Optional[int], frame: codec.Frame, key: str) -> None:
        ch = self._chans.get(worker)
        if ch is None or ch.failed is not None:
            if token is not None:
                self._on_lost(worker, ch.failed if ch is not None else "no channel")
            return
        ch.send(pack_frame(MSG, key, seq, token, frame))

    def _actor(self, worker: str) -> Any:
        actor = self._actors.get(worker)
        if actor is None:
            raise E.WorkerDied("the worker is not running", worker=worker)
        return actor

    def notify(self, worker: str, seq: int, frame: Outbound) -> None:
        """Send a one-way message from the caller."""
        actor = self._actor(worker)
        if self._io is not None:
            self._enqueue(worker, seq, None, frame)
            return
        actor.deliver.remote(self.caller, seq, frame.to_bytes())

    def request(self, worker: str, seq: int, frame: Outbound) -> cf.Future:
        """Send a request; the future yields the reply's Frame or raises WorkerDied."""
        actor = self._actor(worker)
        if self._io is not None:
            token = next(self._tokens)
            fut: cf.Future = cf.Future()
            self._waiting[worker][token] = fut
            self._enqueue(worker, seq, token, frame)
            return fut
        ref = actor.request.remote(self.caller, seq, frame.to_bytes())
        out: cf.Future = cf.Future()

        def done(f: cf.Future) -> None:
            try:
                data = f.result()
            except ray.exceptions.RayActorError as exc:
                # A dead actor's error carries Ray's cause; a restarting one's does not: ask Ray.
                why = death.describe(getattr(exc, "error_msg", None) or str(exc))
                if why is not None:
                    out.set_exception(E.WorkerDied(f"the worker's process died: {why}", worker=worker))
                    return
                self._explain_death(worker).add_done_callback(lambda lookup: out.set_exception(E.WorkerDied(
                    f"the worker's process died: {lookup.result() or f'{death.GENERIC} ({exc})'}", worker=worker)))
                return
            except Exception as exc:  # Ray-level failure on the way
                out.set_exception(E.WorkerError(f"Ray could not deliver the request: {exc}", worker=worker))
                return
            _resolve(out, worker, data, owned=False)

        ref.future().add_done_callback(done)
        return out

    def probe(self, workers: list[str], timeout: float) -> dict[str, list[str]]:
        """Ask every worker at once what it still waits for; one wait bounded by ``timeout`` for all.

        A worker that did not answer in time gets one line saying so (it is never left out).
        """
        out: dict[str, list[str]] = {}
        asked: dict[Any, str] = {}
        for worker in workers:
            started = self.starting(worker)
            if started is not None:
                # Its constructor has not run yet: nothing of any step can have reached it.
                out[worker] = [f"still starting ({started:.1f}s so far): Ray is placing its process, or the "
                               "process is importing torch and unpickling the module"]
            elif worker not in self._actors:
                out[worker] = ["(not running)"]
            else:
                asked[self._actors[worker].probe.remote()] = worker
        ready: list = []
        if asked:
            try:
                ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=timeout)
            except Exception as exc:  # Ray itself failing: every worker gets the reason
                log.debug("probe wait failed: %r", exc)
        for ref in ready:
            worker = asked.pop(ref)
            try:
                out[worker] = ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as exc:
                why = death.describe(getattr(exc, "error_msg", None) or str(exc)) or death.GENERIC
                out[worker] = [f"(no answer: {why})"]
            except Exception as exc:
                out[worker] = [f"(no answer: {type(exc).__name__})"]
        for worker in asked.values():
            out[worker] = [f"(no answer within {timeout:g}s: its event loop is busy or stuck)"]
        return out

    def kill(self, worker: str) -> None:
        """Stop one worker."""
        ch = self._chans.pop(worker, None)
        if ch is not None and self._io is not None:
            asyncio.run_coroutine_threadsafe(ch.closed(), self._io)
        actor = self._actors.pop(worker, None)
        pooled = self._pooled.pop(worker, None)
        if pooled is not None or isinstance(actor, Member):
            self._forget_lookup(worker)
        if pooled is not None:
            try:
                ray.kill(pooled[1], no_restart=True)
            except Exception:  # already dead
                pass
        elif isinstance(actor, Member):
            self._kill_member(worker, actor)
        elif actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        self._spec_refs.pop(worker, None)  # never restarted again: Ray may free the spec now
        self._start.pop(worker, None)

    def _kill_member(self, worker: str, actor: Member) -> None:
        """Stop one worker of a shared process; the process goes once none of its workers is left."""
        process = self._members.pop(worker, None)
        if self._process is not None and self._process[0] == process and worker in self._process[2]:
            self._process[2].remove(worker)
        if process is not None and process not in self._members.values():
            if self._process is not None and self._process[0] == process:
                self._process = None
            try:
                ray.kill(actor.process, no_restart=True)
            except Exception:  # already dead
                pass
            return
        try:
            actor.process.remove.remote(worker)
        except Exception:  # the process is gone
            pass

    def _forget_lookup(self, worker: str) -> None:
        """Drop the worker's KV entry: a sweep of runtimes on a long-lived cluster must not pile them up."""
        from ray.experimental import internal_kv

        try:
            internal_kv._internal_kv_del(self._kv_key(worker), namespace=_KV_NAMESPACE)
        except Exception:  # Ray is going down
            pass

    def _retire_pooled(self) -> None:
        """Empty every pooled process that still answers and hand it back to the pool (the rest are killed)."""
        if not self._pooled:
            return
        refs = {}
        for worker, (name, handle) in self._pooled.items():
            try:
                refs[handle.remove.remote(worker)] = (worker, name, handle)
            except Exception:
                pass
        try:
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=_POOL_REBIND_TIMEOUT)
        except Exception:
            done = []
        for ref in done:
            worker, name, handle = refs[ref]
            try:
                left = ray.get(ref, timeout=0)
            except Exception:  # it died: kill() below makes sure
                continue
            if left == 0 and _give_back(name, handle):
                self._pooled.pop(worker, None)
                self._actors.pop(worker, None)
                self._forget_lookup(worker)

    def close(self) -> None:
        """Stop and kill every worker; shut Ray down if this transport started it."""
        try:
            ray.wait([a.stop.remote() for a in self._actors.values()], num_returns=len(self._actors), timeout=5)
        except Exception:  # dead workers cannot stop themselves
            pass
        self._retire_pooled()
        for name in list(self._actors):
            self.kill(name)
        if self._groups:
            from ray.util.placement_group import remove_placement_group

            for pg in self._groups:
                try:
                    remove_placement_group(pg)
                except Exception:
                    pass
            self._groups.clear()
        if self._io is not None:
            self._close_channels()
            self._io.call_soon_threadsafe(self._io.stop)
            self._io_thread.join(timeout=5)
        if self.started_ray:
            ray.shutdown()
