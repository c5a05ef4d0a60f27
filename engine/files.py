"""Writing files safely: atomically, with the user's umask, one clear line when the disk is full.

Every file the model-directory and training code writes goes through here:

- ``atomic_write(path, data)`` writes the bytes to a uniquely named temporary file beside
  ``path`` and renames it over ``path``: a reader (or a rerun after a kill) sees the old file
  or the new one, never half of one. The temporary file is created with mode ``0o666``, so
  the umask applies as it does to any file a program opens (``tempfile.mkstemp`` and the
  safetensors writer use ``0o600``, which hid the weights from every other user).
- ``atomic_target(path)`` is the same for writers that need a file name (matplotlib's
  ``savefig``): it yields the temporary name and renames it afterwards.
- ``append_line(path, line)`` appends one line; if the write fails the file is cut back to
  its previous length, so no half line is left.

A full disk (``ENOSPC``, ``EDQUOT``) becomes a ``StoreError`` naming the path; on any error
the temporary file is removed.
"""
from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from typing import Iterator

from .errors import StoreError

#: errors that mean "no room": the message says which path and what to do
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
#: infix of every temporary name made here (``.NAME.tmp-PID-TOKEN[SUFFIX]``)
TMP_MARK = ".tmp-"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of ``atomic_write``'s temporary names."""
    return name.startswith(".") and TMP_MARK in name


def disk_full_error(exc: BaseException, path: str | os.PathLike) -> StoreError | None:
    """The StoreError to raise for ``exc`` if it says the disk (or quota) is full, else None."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL and not isinstance(exc, StoreError):
        return StoreError(f"No space left to write {os.fspath(path)} ({os.strerror(exc.errno)}): "
                          f"free some space on that disk (or choose a folder on another one) "
                          f"and run the same command again.")
    return None


def _temp_name(path: str) -> str:
    head, name = os.path.split(path)
    root, ext = os.path.splitext(name)
    # unique per process and call (two threads, or two jobs, never share one), and the
    # file's own suffix last, so writers that go by it (savefig) see the right format
    return os.path.join(head, f".{root}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{ext}")


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary name beside ``path``; once the block is done, rename it to ``path``.

    The block creates the file (e.g. ``savefig(tmp)``) with the normal ``open`` modes, so
    it follows the umask. On an error the temporary file is removed and ``path`` is as it was.
    """
    path = os.fspath(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(tmp)
        full = disk_full_error(exc, path)
        if full is not None:
            raise full from exc
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` atomically; the new file's mode is ``0o666`` less the umask."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_target(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
        try:
            _write_all(fd, raw)
        finally:
            os.close(fd)


def make_dirs(path: str | os.PathLike) -> None:
    """``os.makedirs(path, exist_ok=True)``; a full disk is the StoreError naming ``path``."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        full = disk_full_error(exc, path)
        if full is not None:
            raise full from exc
        raise


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (``\\n`` added); a failed write leaves the file as it was."""
    path = os.fspath(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        except BaseException as exc:
            os.ftruncate(fd, size)  # no half line for a rerun to trip over
            full = disk_full_error(exc, path)
            if full is not None:
                raise full from exc
            raise
    finally:
        os.close(fd)
