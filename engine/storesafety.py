"""What keeps featurize from destroying files: where a store is, what is there, who writes it.

- ``check_store_target`` refuses, before any engine starts, a store path that is a file, a
  non-empty folder that is not a feature store (``--overwrite`` replaces a *store*, never
  anything else), a path equal to or inside the dataset (or a dataset inside it), and a
  store another job is writing.
- ``remove_store`` deletes only the keys a feature store consists of, never follows or
  deletes a symbolic link, and leaves any other file in the folder alone.
- ``StoreLock`` is the one-writer claim on a store: a lock file created atomically in the
  store folder, naming the pid, host and start time of its job; a lock left by a killed job
  on this host is taken over.
- ``write_errors`` turns a full disk (or quota) into one line naming the path.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from .errors import StoreError
from .files import DISK_FULL

FORMAT = "deeptransfer.features/1"
#: attribute a store's group gets the moment it is created: an interrupted create is ours
PENDING_ATTR = "format_pending"
LOCK_NAME = ".deeptransfer.lock"
ARRAYS = ("features", "labels", "split", "paths", "ok", "reasons", "done")
# the keys a feature store consists of (zarr v3, "/" chunk keys), and zarr's LocalStore temp
# files (``<key>.<32 hex>.partial``) that a write killed mid-way can leave behind
_KEY = re.compile(r"zarr\.json|zarr\.[0-9a-f]{32}\.partial|(%s)/(zarr\.json|zarr\.[0-9a-f]{32}"
                  r"\.partial|c(/\d+)+|c(/\d+)*/\d+\.[0-9a-f]{32}\.partial)" % "|".join(ARRAYS))
#: the store-owned folder of the backend's prepared network (deeptransfer.backends.prepared)
# and the files it holds: removed with the store (--overwrite), nothing else in it
BACKEND_FOLDER = "_backend"
_BACKEND_KEY = re.compile(r"_backend/prefix\.(xml|bin|onnx)")


@dataclass(frozen=True)
class Place:
    """A store or dataset location: its filesystem, protocol and normalized path."""

    url: str
    fs: Any
    protocol: str
    path: str

    @property
    def local(self) -> bool:
        return self.protocol in ("file", "local")

    def join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"


def place(url: str, storage_options: Mapping | None = None) -> Place:
    """Where ``url`` is: local paths resolved (relative parts, symlinks, trailing slashes,
    ``file://``; not ``~``, which zarr does not expand either), remote ones as protocol +
    path."""
    import fsspec

    if "://" not in url or url.startswith("file://"):
        path = os.path.realpath(url.removeprefix("file://"))
        return Place(url, fsspec.filesystem("file"), "file", path)
    from .fs import url_to_fs

    fs, path = url_to_fs(url, storage_options)  # a missing backend: one line naming its extra
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return Place(url, fs, "file" if proto == "local" else proto, path.rstrip("/") or "/")


def _inside(a: Place, b: Place) -> bool:
    """``a`` is ``b`` or lies inside it."""
    if a.protocol != b.protocol:
        return False
    return a.path == b.path or a.path.startswith(b.path.rstrip("/") + "/")


def check_overlap(store: str, dataset: str, storage_options: Mapping | None = None) -> None:
    """Refuse a store path equal to or inside the dataset folder, or containing it."""
    s, d = place(store, storage_options), place(dataset, storage_options)
    if _inside(s, d):
        raise StoreError(
            f"The store path {store!r} is {'the' if s.path == d.path else 'inside the'} dataset "
            f"folder {dataset!r}: featurize would write among the images it reads. Give a store "
            f"path outside the dataset, e.g. {os.path.basename(d.path.rstrip('/')) or 'data'}.zarr "
            f"beside it.")
    if _inside(d, s):
        raise StoreError(
            f"The dataset {dataset!r} is inside the store path {store!r}: writing the store "
            f"could replace the images. Give a store path that does not contain the dataset.")


def _root_attrs(p: Place) -> dict | None:
    """The attributes of the Zarr group at ``p`` (None: no readable group metadata)."""
    try:
        meta = json.loads(p.fs.cat_file(p.join("zarr.json")))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
        return None
    return meta.get("attributes") or {} if isinstance(meta, dict) else None


def target_kind(p: Place) -> str:
    """What is at a store location: "missing", "file", "empty" (nothing but our lock),
    "store", "partial" (a create of ours that did not finish) or "foreign"."""
    if not p.fs.exists(p.path):
        return "missing"
    if not p.fs.isdir(p.path):
        return "file"
    attrs = _root_attrs(p)
    if attrs is not None and attrs.get("format") == FORMAT:
        return "store"
    if attrs is not None and attrs.get(PENDING_ATTR) == FORMAT:
        return "partial"
    if not foreign_entries(p):
        return "empty"
    return "foreign"


def foreign_entries(p: Place) -> list[str]:
    """Names in the folder other than our lock file."""
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in p.fs.ls(p.path, detail=False)]
    return sorted(n for n in names if n != LOCK_NAME and not n.startswith(LOCK_NAME + "."))


def check_store_target(store: str, *, dataset: str | None = None, overwrite: bool = False,
                       storage_options: Mapping | None = None) -> str:
    """Everything featurize refuses about its store path, checked before any engine starts;
    returns the kind of target (see ``target_kind``)."""
    if dataset is not None:
        check_overlap(store, dataset, storage_options)
    try:
        p = place(store, storage_options)
        kind = target_kind(p)
    except (ImportError, ValueError, PermissionError):
        return "missing"  # create_store reports it with its own message
    if kind == "file":
        raise StoreError(f"The store path {store!r} is a file, not a folder: give the path of "
                         f"a new folder (e.g. features.zarr) for the feature store.")
    if kind == "foreign":
        shown = foreign_entries(p)
        more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
        raise StoreError(
            f"{store!r} is a folder that is not a deeptransfer feature store (it holds "
            f"{', '.join(shown[:3])}{more}): featurize writes only into a new or empty folder, "
            f"and --overwrite replaces only a feature store, never other files. Give another "
            f"store path.")
    holder = live_holder(p)
    if holder is not None:
        raise StoreError(holder_message(store, p, holder))
    return kind


# -- removing a store ------------------------------------------------------------------------
def remove_store(p: Place) -> None:
    """Delete what the feature store at ``p`` consists of (its Zarr keys), nothing else.

    Files of other names in the folder stay. A symbolic link anywhere inside is refused, not
    followed: removing through it could delete files outside the store."""
    if p.local:
        keys = _local_keys(p.path)
    else:
        base = p.path.rstrip("/") + "/"
        keys = [k[len(base):] for k in p.fs.find(p.path) if k.startswith(base)]
    ours = [k for k in keys if _KEY.fullmatch(k) or _BACKEND_KEY.fullmatch(k)]
    with write_errors(p.url):
        if p.local:
            for k in ours:
                os.unlink(os.path.join(p.path, k))
            for name in (*ARRAYS, BACKEND_FOLDER):  # folders we made, now empty, deepest first
                top = os.path.join(p.path, name)
                for d, _, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
                    try:
                        os.rmdir(d)
                    except OSError:
                        pass  # not empty: something that is not ours is in it
        elif ours:
            p.fs.rm([p.join(k) for k in ours])


def is_temp_key(key: str) -> bool:
    """A temp file zarr's LocalStore left when its process was killed mid-write."""
    return key.endswith(".partial") and _KEY.fullmatch(key) is not None


def _local_keys(root: str) -> list[str]:
    out: list[str] = []
    for d, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            full = os.path.join(d, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                raise StoreError(
                    f"The store {root!r} contains a symbolic link ({rel} -> "
                    f"{os.readlink(full)}): deeptransfer does not delete or write through "
                    f"links. Remove the store yourself, or give another store path.")
            if name in files:
                out.append(rel.replace(os.sep, "/"))
    return out


# -- errors of writes ------------------------------------------------------------------------
def os_error(url: str, exc: OSError, what: str = "write") -> StoreError:
    """One StoreError line for an OS error of a store write: which path, and what to do;
    a full disk (or quota) says so."""
    where = exc.filename or url
    if exc.errno in DISK_FULL:  # the same errors as every other writer's (deeptransfer.files)
        return StoreError(
            f"Cannot {what} the feature store {url!r}: {os.strerror(exc.errno)} at {where!s}. "
            f"Free space there (or give another store path) and run featurize again: it "
            f"resumes with the chunks that were not finished.")
    return StoreError(f"Cannot {what} the feature store {url!r} ({where!s}): "
                      f"{exc.strerror or exc}")


@contextmanager
def write_errors(url: str, what: str = "write") -> Iterator[None]:
    """Raise OS errors of store writes as ``os_error``'s StoreError."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        raise os_error(url, exc, what) from exc


# -- the writer's lock -----------------------------------------------------------------------
_held: dict[str, str] = {}  # lock path -> token, for the locks this process holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _read_lock(p: Place) -> tuple[dict | None, bytes | None]:
    try:
        raw = p.fs.cat_file(p.join(LOCK_NAME))
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    try:
        info = json.loads(raw)
        return (info if isinstance(info, dict) else {}), raw
    except ValueError:  # written half-way by a job that was killed at that instant
        return {}, raw


#: a lock file that does not parse is being written (for microseconds) or was cut short by
#: a job killed (or a disk filled) at that instant: after this many seconds, the latter
UNREADABLE_LOCK_STALE_S = 60.0


def _is_stale(info: dict, p: Place | None = None) -> bool:
    """A lock whose job is known to be gone: on this host and its pid not running (or it is
    this process, which holds no such lock)."""
    if not info:
        try:
            age = time.time() - float(p.fs.modified(p.join(LOCK_NAME)).timestamp()) if p else 0.0
        except (OSError, NotImplementedError, AttributeError):
            age = UNREADABLE_LOCK_STALE_S
        return age >= UNREADABLE_LOCK_STALE_S
    if info.get("host") != socket.gethostname():
        return False  # another host: we cannot tell; the message says how to clear it
    pid = info.get("pid")
    if not isinstance(pid, int):
        return True
    if pid == os.getpid():
        return info.get("token") not in _held.values()
    return not _pid_alive(pid)


def live_holder(p: Place) -> dict | None:
    """The lock of another job writing the store at ``p`` (None: no live one)."""
    info, _ = _read_lock(p)
    if info is None or _is_stale(info, p) or info.get("token") in _held.values():
        return None
    return info


def holder_message(url: str, p: Place, info: dict) -> str:
    return (f"The store {url!r} is being written by another job (pid {info.get('pid', '?')} on "
            f"host {info.get('host', '?')} since {info.get('started', '?')}): wait for it to "
            f"finish, or remove {p.join(LOCK_NAME)} if that job is dead.")


class StoreLock:
    """One writer per store: ``with StoreLock(url): ...`` (released on any exit)."""

    def __init__(self, url: str, storage_options: Mapping | None = None):
        self.url = url
        self.place = place(url, storage_options)
        self.path = self.place.join(LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.created_folder = False

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        p = self.place
        with write_errors(self.url, "create"):
            if p.local and not os.path.isdir(p.path):
                os.makedirs(p.path, exist_ok=True)
                self.created_folder = True
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "token": self.token, "command": " ".join(sys.argv)[:300]}).encode()
        for _ in range(3):
            if self._create(body):
                _held[self.path] = self.token
                return
            info, raw = _read_lock(p)
            if info is None:
                continue  # released in between: try again
            if not _is_stale(info, p):
                raise StoreError(holder_message(self.url, p, info))
            self._take_over(raw)
        info, _ = _read_lock(p)
        raise StoreError(holder_message(self.url, p, info or {}))

    def _create(self, body: bytes) -> bool:
        """Create the lock file atomically; False if one exists."""
        with write_errors(self.url, "lock"):
            if self.place.local:
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                except FileExistsError:
                    return False
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(body)
                except BaseException:  # a full disk: leave no empty lock behind
                    os.unlink(self.path)
                    raise
                return True
            fs = self.place.fs
            try:
                # exclusive create where the filesystem offers it (memory, local, s3fs and
                # gcsfs with conditional writes)
                with fs.open(self.path, "xb") as f:
                    f.write(body)
                return True
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError, TypeError):
                # no exclusive create on this filesystem: check-then-write is the best it
                # allows, so two jobs starting within the same instant can both pass
                if fs.exists(self.path):
                    return False
                fs.pipe_file(self.path, body)
                return True

    def _take_over(self, stale: bytes | None) -> None:
        """Remove a stale lock, unless another job replaced it since it was read."""
        if self.place.local:
            aside = f"{self.path}.stale.{os.getpid()}.{self.token[:8]}"
            try:
                os.rename(self.path, aside)  # atomic: only one job moves a given file
            except FileNotFoundError:
                return
            with open(aside, "rb") as f:
                moved = f.read()
            if moved != stale:  # a live job's fresh lock: put it back (link never replaces)
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
            os.unlink(aside)
            return
        _, raw = _read_lock(self.place)
        if raw == stale:
            self.place.fs.rm_file(self.path)

    def release(self) -> None:
        """Remove the lock if it is still ours (and the folder, if this run made it and
        nothing else was put in it)."""
        if _held.get(self.path) != self.token:
            return
        del _held[self.path]
        info, _ = _read_lock(self.place)
        try:
            if info is not None and info.get("token") == self.token:
                self.place.fs.rm_file(self.path)
            if self.created_folder:
                os.rmdir(self.place.path)  # only if empty: a failed first step leaves nothing
        except OSError:
            pass
