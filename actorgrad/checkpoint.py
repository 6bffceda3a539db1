"""Checkpoints: versioned directories behind one atomically replaced pointer.

Layout of ``path/``:

- ``LATEST``: one line, the name of the current version directory. It is
  replaced with write-temp + fsync + ``os.replace`` + fsync(``path``), so
  replacing a checkpoint is one atomic step: a crash at any point leaves
  either the old or the new version as the checkpoint at ``path``;
- ``v-<counter>-<random>/``: one version, holding
  ``meta.msgpack`` (format tag and version, the actorgrad version that wrote
  it, the step counter, and per worker its name, module class, options, file
  name and the SHA-256 of that file),
  ``<index>.pt`` (the worker's module state, optimizer state and weight
  version, written by ``torch.save`` and read back with
  ``torch.load(weights_only=True)``: tensors and plain values only, nothing
  arbitrary is unpickled) and, when a signing key is used, ``meta.hmac``
  (HMAC-SHA256 of ``meta.msgpack``);
- ``.lock``: ``flock``-ed by a saver, so that concurrent savers to one path
  are serialized.

A saver writes and fsyncs a new version directory, moves the pointer, and only
then removes the previous version (and whatever an earlier crash left). A
reader follows the pointer and opens every file of that version before it reads
any; if a saver removed the version in between, the reader follows the new
pointer. Old checkpoints (``meta.msgpack`` directly in ``path``) still load,
and saving over one converts it in place: the pointer appears before the old
files go. Files are created ``0o600`` and directories ``0o700`` whatever the
umask; symbolic links inside a checkpoint are refused.

The SHA-256s give integrity (a torn, truncated or corrupted file is detected),
not authenticity: whoever can write the directory can recompute them. With a
signing key (``key=`` or the ``ACTORGRAD_CHECKPOINT_KEY`` environment variable)
``meta.msgpack`` is authenticated with HMAC-SHA256, and through its SHA-256s
every file.

Compatibility is the format version's business: a reader refuses a checkpoint of
another ``FORMAT_VERSION`` and reads any of its own, whichever actorgrad version
wrote it (it logs a warning naming both versions when they differ).

This module is the on-disk format only (``write_checkpoint``,
``open_checkpoint``, ``read_checkpoint``, ``verify``, ``read_meta``) and knows
no runtime; ``recovery.py`` gathers and restores the workers' states through it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import time
from typing import Any, Callable, Iterable, Optional, Union

import msgpack
import torch

from . import errors as E
from ._version import __version__


log = logging.getLogger("actorgrad.checkpoint")

FORMAT = "actorgrad-checkpoint"
# Bump only for a change that this version's reader could misread: a new optional key is not one.
FORMAT_VERSION = 1
META = "meta.msgpack"
POINTER = "LATEST"
LOCK = ".lock"
SIGNATURE = "meta.hmac"
KEY_ENV = "ACTORGRAD_CHECKPOINT_KEY"
# Options that change what the saved state means; the others (placement, threads) may differ.
MUST_MATCH = ("update", "max_staleness", "optimizer")

_VERSION_RE = re.compile(r"v-(\d{8,})-([0-9a-f]{8})\Z")
_POINTER_TMP = ".LATEST.tmp-"
_CHUNK = 1 << 20
_MAX_META = 64 << 20  # a meta file larger than this is not ours; do not read it into memory
_READ_ATTEMPTS = 50  # a reader follows a moving pointer this many times before it gives up
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang us

Key = Union[str, bytes, None]
# (worker name, module class, options, state)
Entry = tuple[str, str, dict[str, Any], Any]

_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "I/O error",
    errno.EMFILE: "too many open files",
    errno.ENAMETOOLONG: "file name too long",
}


# --- errors ----------------------------------------------------------------------


def _cause(exc: OSError) -> str:
    """A short English cause for an OSError."""
    if exc.errno in _CAUSES:
        return _CAUSES[exc.errno]
    return exc.strerror or str(exc) or type(exc).__name__


def _os_error(exc: OSError, doing: str, worker: Optional[str] = None) -> E.CheckpointError:
    """Turn an OSError into a CheckpointError that names the cause first, then what was being done."""
    return E.CheckpointError(f"{_cause(exc)} while {doing}", worker=worker, cause=f"{type(exc).__name__}: {exc}")


class _Vanished(Exception):
    """A file the pointer led to is gone: a saver may have moved the pointer meanwhile."""


# --- writing -----------------------------------------------------------------------


def _key_bytes(key: Key) -> Optional[bytes]:
    """The signing key: the argument, else the environment variable, else None."""
    if key is None:
        key = os.environ.get(KEY_ENV) or None
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes) or not key:
        raise E.CheckpointError("a checkpoint signing key must be a non-empty str or bytes")
    return key


def _fsync_dir(path: str) -> None:
    """Make a directory's entries durable (new, renamed or removed files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_private(path: str) -> None:
    """Create a directory readable by the owner only, whatever the umask."""
    os.mkdir(path, _DIR_MODE)
    os.chmod(path, _DIR_MODE)


def _ensure_root(path: str) -> None:
    """Create ``path`` (0o700) and any missing parents, fsyncing each new directory entry."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            if d == path:
                _mkdir_private(d)
            else:
                os.mkdir(d)  # parents are not the checkpoint's: usual permissions
        except FileExistsError:
            pass  # another saver created it meanwhile
        _fsync_dir(os.path.dirname(d))
    if not os.path.isdir(path):
        raise E.CheckpointError(f"cannot save a checkpoint to {path!r}: it exists and is not a directory")


class _Sink:
    """A buffered writer over a raw file descriptor that hashes what it writes.

    torch.save writes sequentially (no seek), so the SHA-256 comes for free and no copy of the
    state is kept; the first OSError is kept because torch.save replaces it with a RuntimeError.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sha = hashlib.sha256()
        self.buf = bytearray()
        self.size = 0
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        """Append bytes; the count written is always all of them."""
        mv = memoryview(data).cast("B")
        self.sha.update(mv)
        self.size += mv.nbytes
        if len(self.buf) + mv.nbytes < _CHUNK:
            self.buf += mv
        else:
            self.flush()
            if mv.nbytes >= _CHUNK:
                self._write_all(mv)  # large tensors go straight to the file, no extra copy
            else:
                self.buf += mv
        return mv.nbytes

    def flush(self) -> None:
        """Write out the buffer."""
        if self.buf:
            self._write_all(memoryview(self.buf))
            self.buf = bytearray()

    def _write_all(self, mv: memoryview) -> None:
        try:
            while mv.nbytes:
                n = os.write(self.fd, mv)
                if n <= 0:
                    raise OSError(errno.EIO, "write returned 0")
                mv = mv[n:]
        except OSError as exc:
            self.error = self.error or exc
            raise


def _write_file(fpath: str, fill: Callable[[_Sink], None], what: str, worker: Optional[str] = None) -> str:
    """Create ``fpath`` (0o600, never following or replacing anything), fill it, fsync it; its SHA-256."""
    doing = f"writing {what} to {fpath!r}"
    try:
        fd = os.open(fpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE)
    except OSError as exc:
        raise _os_error(exc, doing, worker) from None
    closed = False
    try:
        os.fchmod(fd, _FILE_MODE)
        sink = _Sink(fd)
        try:
            fill(sink)
            sink.flush()
        except OSError:
            raise
        except Exception as exc:
            if sink.error is not None:  # torch.save turned our ENOSPC into "unexpected pos ..."
                raise sink.error from exc
            raise E.CheckpointError(f"cannot serialize {what}: {type(exc).__name__}: {exc}", worker=worker) from None
        os.fsync(fd)
        closed = True
        os.close(fd)  # close can report a delayed write error (NFS): not in a finally that ignores it
        return sink.sha.hexdigest()
    except OSError as exc:
        raise _os_error(exc, doing, worker) from None
    finally:
        if not closed:
            try:
                os.close(fd)
            except OSError:
                pass


def _write_bytes(fpath: str, data: bytes, what: str) -> str:
    """Write a small file durably; its SHA-256."""
    return _write_file(fpath, lambda sink: sink.write(data), what)


def _remove_tree(path: str) -> None:
    """Remove a file or a directory tree without following symbolic links."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        for entry in os.scandir(path):
            _remove_tree(entry.path)
        os.rmdir(path)
    else:
        os.unlink(path)


class _Scan:
    """What a checkpoint directory holds, as a saver sees it under the lock."""

    def __init__(self, path: str) -> None:
        self.pointer: Optional[str] = None
        self.versions: list[str] = []
        self.leftovers: list[str] = []  # pointer temp files of crashed savers
        self.legacy = False
        self.foreign: list[str] = []
        for entry in os.scandir(path):
            name = entry.name
            if name == POINTER:
                self.pointer = _pointer_text(_read_small(path, name), path)
            elif _VERSION_RE.match(name):
                self.versions.append(name)
            elif name.startswith(_POINTER_TMP):
                self.leftovers.append(name)
            elif name == META:
                self.legacy = True
            elif name != LOCK:
                self.foreign.append(name)

    def next_counter(self) -> int:
        names = self.versions + ([self.pointer] if self.pointer else [])
        return 1 + max((int(_VERSION_RE.match(n).group(1)) for n in names), default=0)


def _scan_checked(path: str) -> _Scan:
    """Scan a checkpoint directory, refusing one that holds files that are not a checkpoint's."""
    try:
        scan = _Scan(path)
    except OSError as exc:
        raise _os_error(exc, f"listing {path!r}") from None
    except _Vanished as gone:  # only a process that ignores the lock can remove files under it
        raise E.CheckpointError(f"{str(gone)!r} vanished while {path!r} was being scanned") from None
    if scan.pointer is None and not scan.legacy and scan.foreign:
        raise E.CheckpointError(
            f"cannot save a checkpoint to {path!r}: it holds files that are not a checkpoint "
            f"({', '.join(sorted(scan.foreign)[:3])}); refusing to write into it")
    return scan


def _read_small(path: str, name: str) -> bytes:
    """Read a small file of the checkpoint directory, refusing a symbolic link."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_member(dfd, name, path)
        try:
            return _read_all(fd, _MAX_META, os.path.join(path, name))
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


class _Lock:
    """An exclusive flock on ``path/.lock``: savers to one path run one at a time."""

    def __init__(self, path: str, timeout: Optional[float]) -> None:
        self.path = path
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> "_Lock":
        lpath = os.path.join(self.path, LOCK)
        try:
            # No fsync of the directory: the lock file holds no data and may be lost in a crash.
            self.fd = os.open(lpath, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise E.CheckpointError(f"{lpath!r} is a symbolic link; refusing to use it") from None
            raise _os_error(exc, f"creating the lock file {lpath!r}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_IMODE(st.st_mode) != _FILE_MODE and st.st_uid == os.geteuid():
                os.fchmod(self.fd, _FILE_MODE)
            if self.timeout is None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + self.timeout
                while True:
                    try:
                        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise E.CheckpointError(
                                f"another saver holds {lpath!r}: gave up waiting after {self.timeout:g}s") from None
                        time.sleep(0.02)
        except BaseException as exc:
            os.close(self.fd)
            if isinstance(exc, OSError):
                raise _os_error(exc, f"locking {lpath!r}") from None
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            os.close(self.fd)  # closing releases the flock
        except OSError as err:  # the lock file holds no data: nothing of the checkpoint depends on it
            log.warning("could not close the lock file of %s: %s", self.path, err)


def write_checkpoint(path: str, step: int, entries: Iterable[Entry], *, key: Key = None,
                     lock_timeout: Optional[float] = None) -> str:
    """Write a new version of the checkpoint at ``path`` and make it current atomically; its name.

    ``entries`` is consumed one at a time (a generator keeps one state in memory). A failure
    before the pointer moved leaves the old checkpoint current and removes the new files.
    """
    path = os.path.abspath(path)
    sign = _key_bytes(key)
    if os.path.isdir(path):
        _scan_checked(path)  # before the lock file is created: leave a directory that is not ours untouched
    try:
        _ensure_root(path)
    except OSError as exc:
        raise _os_error(exc, f"creating the checkpoint directory {path!r}") from None
    with _Lock(path, lock_timeout):
        scan = _scan_checked(path)
        vname = f"v-{scan.next_counter():08d}-{secrets.token_hex(4)}"
        vdir = os.path.join(path, vname)
        published = False
        try:
            try:
                _mkdir_private(vdir)
                _fsync_dir(path)
            except OSError as exc:
                raise _os_error(exc, f"creating {vdir!r}") from None
            workers = []
            for i, (name, module_class, options, state) in enumerate(entries):
                fname = f"{i}.pt"
                digest = _write_file(os.path.join(vdir, fname), lambda sink, s=state: torch.save(s, sink),
                                     f"the state of worker {name!r}", worker=name)
                workers.append({"name": name, "class": module_class, "options": options, "file": fname,
                                "sha256": digest})
                del state  # do not hold the last state while the next one is gathered
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "actorgrad_version": __version__, "step": step,
                    "workers": workers}
            try:
                blob = msgpack.packb(meta, use_bin_type=True)
            except Exception as exc:
                raise E.CheckpointError(f"cannot encode the checkpoint's metadata: {exc}") from None
            _write_bytes(os.path.join(vdir, META), blob, "the metadata")
            if sign is not None:
                mac = hmac.new(sign, blob, hashlib.sha256).hexdigest().encode()
                _write_bytes(os.path.join(vdir, SIGNATURE), mac, "the signature")
            try:
                _fsync_dir(vdir)
            except OSError as exc:
                raise _os_error(exc, f"syncing {vdir!r}") from None
            tmp = os.path.join(path, _POINTER_TMP + secrets.token_hex(4))
            try:
                _write_bytes(tmp, (vname + "\n").encode(), "the pointer")
                try:
                    os.replace(tmp, os.path.join(path, POINTER))  # the one step that switches versions
                except OSError as exc:
                    raise _os_error(exc, f"replacing {os.path.join(path, POINTER)!r}") from None
            except BaseException:
                _discard(tmp)
                raise
            published = True
            try:
                _fsync_dir(path)
            except OSError as exc:
                # The new version is current (and complete); only its durability across power loss is unknown.
                raise _os_error(exc, f"syncing {path!r} after moving the pointer") from None
        except BaseException:
            if not published:
                _discard(vdir)
            raise
        _collect(path, vname, scan)
    log.debug("checkpoint %s now points at %s", path, vname)
    return vname


def _discard(path: str) -> None:
    """Best-effort removal of a failed save's files, so that no temporary garbage stays."""
    try:
        _remove_tree(path)
    except FileNotFoundError:
        pass
    except Exception as exc:  # a crashed or read-only disk: the next saver removes it
        log.warning("could not remove %s after a failed save: %s", path, exc)


def _collect(path: str, keep: str, scan: _Scan) -> None:
    """Remove every version but ``keep``, crash leftovers and old-format files, after the pointer moved."""
    try:
        for name in scan.versions + scan.leftovers:
            if name != keep:
                _remove_tree(os.path.join(path, name))
        if scan.legacy:
            _remove_legacy(path)
        _fsync_dir(path)
    except Exception as exc:  # the save itself succeeded; the next saver retries the clean-up
        log.warning("could not remove old checkpoint files in %s: %s", path, exc)


def _remove_legacy(path: str) -> None:
    """Remove an old-format checkpoint's files; ``meta.msgpack`` last, so a crash leaves it findable."""
    try:
        meta = _decode_meta(_read_small(path, META), os.path.join(path, META))
        files = [w["file"] for w in meta["workers"]]
    except (E.CheckpointError, OSError) as exc:
        log.warning("old-format metadata in %s is unreadable (%s); removing only it", path, exc)
        files = []
    for fname in files:
        try:
            os.unlink(os.path.join(path, fname))
        except FileNotFoundError:
            pass
    os.unlink(os.path.join(path, META))


# --- reading -----------------------------------------------------------------------


def _open_member(dir_fd: int, name: str, where: str, directory: bool = False) -> int:
    """Open one entry of a checkpoint directory, refusing symbolic links and special files."""
    full = os.path.join(where, name)
    flags = _READ_FLAGS | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise _Vanished(full) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                is_link = stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
            except OSError:
                is_link = False
            if is_link:
                raise E.CheckpointError(f"{full!r} is a symbolic link; checkpoints never contain one") from None
            if exc.errno == errno.ENOTDIR:
                raise E.CheckpointError(f"{full!r} is not a directory") from None
        raise _os_error(exc, f"opening {full!r}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
        os.close(fd)
        raise E.CheckpointError(f"{full!r} is not a regular {'directory' if directory else 'file'}")
    return fd


def _read_all(fd: int, limit: int, where: str) -> bytes:
    """Read a whole small file."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise E.CheckpointError(f"{where!r} is {size} bytes, more than a checkpoint's metadata can be")
    chunks = []
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _pointer_text(data: bytes, path: str) -> str:
    """The version name a pointer file names, checked so that it cannot lead outside ``path``."""
    text = data.decode("ascii", "replace").strip()
    if not _VERSION_RE.match(text):
        raise E.CheckpointError(f"{os.path.join(path, POINTER)!r} is corrupt: {text[:80]!r} is not a version name")
    return text


def _decode_meta(blob: bytes, mpath: str) -> dict[str, Any]:
    """Decode and check a checkpoint's metadata."""
    try:
        meta = msgpack.unpackb(blob, raw=False)
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
        raise E.CheckpointError(
            f"{mpath!r} is in checkpoint format version {meta.get('version')!r} (written by "
            f"{_writer(meta)}); actorgrad {__version__} reads format version {FORMAT_VERSION} only")
    for w in meta["workers"]:
        f = w["file"]
        if os.path.basename(f) != f or f in ("", ".", "..", META, SIGNATURE, POINTER, LOCK):
            raise E.CheckpointError(f"{mpath!r} names an invalid file {f!r}", worker=w["name"])
    names = [w["name"] for w in meta["workers"]]
    if len(set(names)) != len(names):
        raise E.CheckpointError(f"{mpath!r} lists a worker twice")
    return meta


def _writer(meta: dict[str, Any]) -> str:
    """Which actorgrad wrote a checkpoint, in words."""
    written_by = meta.get("actorgrad_version")
    return f"actorgrad {written_by}" if isinstance(written_by, str) else "an actorgrad that did not record its version"


def _note_version(meta: dict[str, Any], path: str) -> None:
    """Log a warning when the checkpoint at ``path`` was written by another actorgrad version."""
    written_by = meta.get("actorgrad_version")
    if written_by == __version__:
        return
    if written_by is None:  # written before checkpoints recorded it; same format, so nothing to warn about
        log.info("the checkpoint at %s does not record the actorgrad version that wrote it", path)
        return
    log.warning("the checkpoint at %s was written by actorgrad %s, and this is actorgrad %s; its format "
                "(version %d) is the same, so it is read as usual", path, written_by, __version__, FORMAT_VERSION)


class Snapshot:
    """One version of a checkpoint, opened for reading: its metadata and every file already open.

    ``meta["workers"][i]["file"]`` is relative to the checkpoint's path. Use as a context manager.
    """

    def __init__(self, path: str, version: Optional[str], meta: dict[str, Any], fds: dict[str, int]) -> None:
        self.path = path
        self.version = version  # None for an old-format checkpoint
        self.meta = meta
        self._fds = fds
        self._entries = {w["name"]: w for w in meta["workers"]}

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the open files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def check(self, name: str) -> None:
        """Check one worker's file against its SHA-256 (integrity)."""
        entry, fd = self._entries[name], self._fds[name]
        h = hashlib.sha256()
        offset = 0
        try:
            while True:
                chunk = os.pread(fd, _CHUNK, offset)
                if not chunk:
                    break
                h.update(chunk)
                offset += len(chunk)
        except OSError as exc:
            raise _os_error(exc, f"reading {entry['file']!r} in {self.path!r}", name) from None
        if not hmac.compare_digest(h.hexdigest(), entry["sha256"]):
            raise E.CheckpointError(f"file {entry['file']!r} in {self.path!r} does not match its checksum "
                                    "(truncated or corrupted)", worker=name)

    def state(self, name: str) -> Any:
        """One worker's saved state, checked against its SHA-256 and read with weights_only=True."""
        self.check(name)
        entry = self._entries[name]
        try:
            os.lseek(self._fds[name], 0, os.SEEK_SET)
            with open(self._fds[name], "rb", closefd=False) as f:
                return torch.load(f, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise E.CheckpointError(f"cannot read {entry['file']!r} in {self.path!r} safely: {exc}",
                                    worker=name) from None


def _open_version(path: str, pfd: int, pointer: Optional[str], sign: Optional[bytes]) -> Snapshot:
    """Open the version ``pointer`` names (or the old-format files in ``path``); _Vanished if gone."""
    if pointer is None:
        vfd, where = os.dup(pfd), path
    else:
        vfd, where = _open_member(pfd, pointer, path, directory=True), os.path.join(path, pointer)
    fds: dict[str, int] = {}
    try:
        mfd = _open_member(vfd, META, where)
        try:
            blob = _read_all(mfd, _MAX_META, os.path.join(where, META))
        finally:
            os.close(mfd)
        meta = _decode_meta(blob, os.path.join(where, META))
        if sign is not None:
            if pointer is None:
                raise E.CheckpointError(f"the checkpoint at {path!r} is in the old format and not signed, "
                                        "but a signing key was given")
            try:
                sfd = _open_member(vfd, SIGNATURE, where)
            except _Vanished:
                raise E.CheckpointError(f"the checkpoint at {path!r} is not signed, but a signing key was "
                                        "given") from None
            try:
                mac = _read_all(sfd, 1024, os.path.join(where, SIGNATURE)).strip()
            finally:
                os.close(sfd)
            if not hmac.compare_digest(mac, hmac.new(sign, blob, hashlib.sha256).hexdigest().encode()):
                raise E.CheckpointError(f"the checkpoint at {path!r} does not match its signature (wrong key, "
                                        "or modified)")
        _note_version(meta, path)  # after the signature: a forged version must not be reported as fact
        for w in meta["workers"]:
            fds[w["name"]] = _open_member(vfd, w["file"], where)
            if pointer is not None:
                w["file"] = f"{pointer}/{w['file']}"
        return Snapshot(path, pointer, meta, fds)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        os.close(vfd)


def open_checkpoint(path: str, key: Key = None) -> Snapshot:
    """Open the current version of the checkpoint at ``path`` (or an old-format one) for reading."""
    path = os.path.abspath(path)
    sign = _key_bytes(key)
    for _ in range(_READ_ATTEMPTS):
        try:
            pfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise E.CheckpointError(f"no checkpoint at {path!r}") from None
        except OSError as exc:
            raise _os_error(exc, f"opening {path!r}") from None
        try:
            pointer = _read_pointer(pfd, path)
            try:
                return _open_version(path, pfd, pointer, sign)
            except _Vanished as gone:
                now = _read_pointer(pfd, path)
                if now != pointer:  # a saver moved the pointer (and removed what we followed): follow it
                    log.debug("checkpoint %s moved from %s to %s while being opened", path, pointer, now)
                    continue
                if pointer is None and str(gone) == os.path.join(path, META):
                    raise E.CheckpointError(f"no checkpoint at {path!r} (missing {POINTER} and {META})") from None
                raise E.CheckpointError(f"the checkpoint at {path!r} is incomplete: {str(gone)!r} is missing") \
                    from None
        finally:
            os.close(pfd)
    raise E.CheckpointError(f"the checkpoint at {path!r} changed {_READ_ATTEMPTS} times while being opened")


def _read_pointer(pfd: int, path: str) -> Optional[str]:
    """The version ``LATEST`` names, or None when there is no pointer (old format or no checkpoint)."""
    try:
        fd = _open_member(pfd, POINTER, path)
    except _Vanished:
        return None
    try:
        return _pointer_text(_read_all(fd, 1024, os.path.join(path, POINTER)), path)
    except OSError as exc:
        raise _os_error(exc, f"reading {os.path.join(path, POINTER)!r}") from None
    finally:
        os.close(fd)


def read_checkpoint(path: str, key: Key = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metadata and every worker's state (by name) of the checkpoint at ``path``."""
    with open_checkpoint(path, key) as snap:
        return snap.meta, {w["name"]: snap.state(w["name"]) for w in snap.meta["workers"]}


def verify(path: str, key: Key = None) -> dict[str, Any]:
    """Check every file of the checkpoint at ``path`` against its SHA-256 (and signature); the metadata."""
    with open_checkpoint(path, key) as snap:
        for w in snap.meta["workers"]:
            snap.check(w["name"])
        return snap.meta


def read_meta(path: str, key: Key = None) -> dict[str, Any]:
    """Read and check a checkpoint's metadata; each worker's ``file`` is relative to ``path``."""
    with open_checkpoint(path, key) as snap:
        return snap.meta
