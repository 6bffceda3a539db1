"""Checkpoints: one directory, one file per worker, metadata in msgpack.

Layout of ``path/``:

- ``meta.msgpack``: format tag, the step counter, and per worker its name,
  module class, options, file name and the SHA-256 of that file;
- ``<index>.pt``: the worker's module state, optimizer state and weight
  version, written by ``torch.save`` and read back with
  ``torch.load(weights_only=True)``: tensors and plain values only, nothing
  arbitrary is unpickled.

A checkpoint is written into a sibling temporary directory and renamed into
place, so a torn write never replaces a good checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from typing import TYPE_CHECKING, Any, Optional

import msgpack
import torch

from . import errors as E

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("actorgrad.checkpoint")

FORMAT = "actorgrad-checkpoint"
FORMAT_VERSION = 1
META = "meta.msgpack"
# Options that change what the saved state means; the others (placement, threads) may differ.
_MUST_MATCH = ("update", "max_staleness", "optimizer")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is None or isinstance(v, (bool, int, float, str, dict))}


def save_checkpoint(rt: "Runtime", path: str, timeout: Optional[float] = None) -> None:
    """Write a consistent checkpoint of every worker, between steps, atomically."""
    with rt._lock:
        rt._check_open()
        for earlier in list(rt._closing):
            rt.wait_step(earlier, timeout)
        if rt.step.participants():
            raise E.CheckpointError(
                f"step {rt.step.id} has calls in flight; call ag.step() before ag.save()", step=rt.step.id)
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            entries = []
            for i, (name, info) in enumerate(sorted(rt.workers.items())):
                state = rt.get_state(name, "full", timeout)
                fname = f"{i}.pt"
                fpath = os.path.join(tmp, fname)
                torch.save(state, fpath)
                entries.append({
                    "name": name,
                    "class": info.module_class,
                    "options": _plain_options(info.options),
                    "file": fname,
                    "sha256": _sha256(fpath),
                })
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": rt.step.id - 1, "workers": entries}
            with open(os.path.join(tmp, META), "wb") as f:
                f.write(msgpack.packb(meta, use_bin_type=True))
                f.flush()
                os.fsync(f.fileno())
            old = None
            if os.path.exists(path):
                old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
                os.rename(path, old)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved checkpoint of %d workers at step %d to %s", len(entries), meta["step"], path)


def read_meta(path: str) -> dict[str, Any]:
    """Read and check a checkpoint's metadata."""
    mpath = os.path.join(path, META)
    if not os.path.isfile(mpath):
        raise E.CheckpointError(f"no checkpoint at {path!r} (missing {META})")
    try:
        with open(mpath, "rb") as f:
            meta = msgpack.unpackb(f.read(), raw=False)
    except Exception as exc:
        raise E.CheckpointError(f"{mpath!r} is corrupt or truncated: {exc}") from None
    ok = (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT
        and isinstance(meta.get("step"), int)
        and isinstance(meta.get("workers"), list)
        and all(isinstance(w, dict) and isinstance(w.get("name"), str) and isinstance(w.get("file"), str)
                and isinstance(w.get("sha256"), str) for w in meta["workers"])
    )
    if not ok:
        raise E.CheckpointError(f"{mpath!r} is not an actorgrad checkpoint of a known format")
    if meta.get("version") != FORMAT_VERSION:
        raise E.CheckpointError(f"checkpoint format version {meta.get('version')!r} is not supported")
    return meta


def load_checkpoint(rt: "Runtime", path: str, timeout: Optional[float] = None) -> None:
    """Restore every worker (matched by name) and the step counter from a checkpoint."""
    with rt._lock:
        rt._check_open()
        path = os.path.abspath(path)
        meta = read_meta(path)
        entries = {w["name"]: w for w in meta["workers"]}
        missing = sorted(set(rt.workers) - set(entries))
        extra = sorted(set(entries) - set(rt.workers))
        if missing:
            raise E.CheckpointError(f"the checkpoint has no entry for worker(s) {missing}", worker=missing[0])
        if extra:
            raise E.CheckpointError(f"the checkpoint holds worker(s) {extra} that this runtime has not spawned",
                                    worker=extra[0])
        states = {}
        for name, entry in sorted(entries.items()):
            info = rt.workers[name]
            if entry.get("class") != info.module_class:
                raise E.CheckpointError(
                    f"the checkpoint holds a {entry.get('class')} for this worker, but it runs a {info.module_class}",
                    worker=name)
            saved_opts = entry.get("options") if isinstance(entry.get("options"), dict) else {}
            for key in _MUST_MATCH:
                if key in saved_opts and key in info.options and saved_opts[key] != info.options[key]:
                    raise E.CheckpointError(
                        f"the checkpoint was taken with {key}={saved_opts[key]!r} for this worker, but it runs "
                        f"with {key}={info.options[key]!r}", worker=name)
            fpath = os.path.join(path, os.path.basename(entry["file"]))
            if not os.path.isfile(fpath):
                raise E.CheckpointError(f"missing file {entry['file']!r}", worker=name)
            if _sha256(fpath) != entry["sha256"]:
                raise E.CheckpointError(f"file {entry['file']!r} does not match its checksum (truncated or "
                                        "tampered with)", worker=name)
            try:
                states[name] = torch.load(fpath, weights_only=True, map_location="cpu")
            except Exception as exc:
                raise E.CheckpointError(f"cannot read {entry['file']!r} safely: {exc}", worker=name) from None
        for name, state in states.items():
            try:
                rt.set_state(name, "full", state, timeout)
            except (E.ShapeError, E.ConfigError) as err:
                raise E.CheckpointError(f"the checkpoint does not fit the worker: {err.message}", worker=name) from err
        if not rt.step.participants():
            rt._steps.pop(rt.step.id, None)
            rt.step.id = meta["step"] + 1
            rt._steps[rt.step.id] = rt.step
        log.info("loaded checkpoint of %d workers at step %d from %s", len(states), meta["step"], path)
