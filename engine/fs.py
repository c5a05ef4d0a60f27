"""Filesystem access shared by the scan, the workers and the store.

- ``url_to_fs``: fsspec's, with a missing backend (``s3://`` without s3fs) or an unknown
  protocol turned into one line that says what to install;
- ``read_file``: the bytes of one *regular* file, local or fsspec, refused with a reason
  (``FileRefusedError``) when it is a named pipe, a device, a folder or larger than a cap,
  and never read past the cap, so a FIFO cannot block a worker and an endless file (a link
  to ``/dev/zero``) cannot exhaust its memory;
- ``escape_path`` / ``unescape_path``: a local name that is not valid UTF-8 (Python holds
  its odd bytes as lone surrogates, which Zarr, JSON and ``print`` refuse) as UTF-8 text,
  reversibly, so the file is still featurized and the user sees a readable name.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Any, BinaryIO, Mapping

#: the largest image file read, in bytes (a decompression-bomb style limit on the file, next
#: to the decoder's limit on pixels): 64 MiB is far above any photo; a larger file is
#: skipped with the reason "file too large". Pass ``max_bytes`` to raise it.
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024

#: the deeptransfer extra that installs each fsspec backend package (see pyproject.toml)
EXTRAS = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure"}


class FileRefusedError(OSError):
    """A file that is not read on purpose; ``reason`` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -- fsspec filesystems ----------------------------------------------------------------------
def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs(url, **storage_options)``; a backend that is not installed is
    an EngineUnavailableError naming the package (and the deeptransfer extra) to install,
    an unknown protocol an InvalidParameterError."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        raise backend_missing(url, exc) from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        from .errors import InvalidParameterError

        raise InvalidParameterError(
            f"{url!r}: unknown protocol {_protocol(url)!r}; give a local path or an fsspec URL "
            f"(s3://, gs://, az://, memory://, ...).") from None


def _protocol(url: str) -> str:
    # the innermost filesystem of a chained URL (simplecache::s3://...) is the one to install
    return url.rsplit("::", 1)[-1].split("://", 1)[0]


def backend_missing(url: str, exc: ImportError) -> Exception:
    """The one-line error for ``url`` whose fsspec backend failed to import with ``exc``."""
    from fsspec.registry import known_implementations

    from .errors import EngineUnavailableError

    protocol = _protocol(url)
    cls = known_implementations.get(protocol, {}).get("class", "")
    package = cls.split(".", 1)[0] if cls else ""
    if package == "fsspec":  # a built-in filesystem that needs a dependency (sftp: paramiko)
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        package = getattr(cause, "name", None) or ""
    extra = EXTRAS.get(package)
    if extra:
        how = f"pip install 'deeptransfer[{extra}]' (or pip install {package})"
    elif package:
        how = f"pip install {package}"
    else:
        return EngineUnavailableError(f"{protocol}:// cannot be used here: {exc}")
    return EngineUnavailableError(f"{protocol}:// needs the {package} package, which is not "
                                  f"installed: {how}")


# -- names that are not valid UTF-8 ----------------------------------------------------------
_ESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|\\|")')


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escape_path(path: str) -> str:
    """``path`` unchanged when it is valid UTF-8 text; else in double quotes, its
    undecodable bytes as ``\\xHH`` (and ``\\``, ``"`` escaped), e.g. ``"/data/caf\\xe9.jpg"``
    (the way ``git`` shows such names). ``unescape_path`` reverses it."""
    if _is_text(path):
        return path
    out = []
    for ch in path:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, as os.fsdecode's surrogateescape holds it
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:  # a lone surrogate (Windows names are UTF-16)
            out.append(f"\\u{o:04x}")
        elif ch in '\\"':
            out.append("\\" + ch)
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def unescape_path(text: str) -> str:
    """The path ``escape_path`` made ``text`` from (any other text is returned as it is).

    Only a quoted text with at least one ``\\x``/``\\u`` escape and nothing unescaped inside is
    an escaped path, so a real file named ``"quoted".jpg`` keeps its name."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    inner = text[1:-1]
    if not re.search(r"\\[xu]", inner) or re.search(r'["\\]', _ESCAPE.sub("", inner)):
        return text

    def one(m: re.Match) -> str:
        e = m.group(1)
        if e[0] == "x":
            return chr(0xDC00 + int(e[1:], 16))
        if e[0] == "u":
            return chr(int(e[1:], 16))
        return e

    return _ESCAPE.sub(one, inner)


def show_name(name: str) -> str:
    """A file or folder name for a message: ``repr`` of it, or its escaped form."""
    return repr(name) if _is_text(name) else escape_path(name)


# -- bounded reads of regular files ----------------------------------------------------------
_KINDS = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def _check_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise FileRefusedError("is a directory")
    kind = next((k for test, k in _KINDS if test(mode)), "special file")
    raise FileRefusedError(f"not a regular file ({kind})")


def _too_large(size: int | None, max_bytes: int) -> FileRefusedError:
    limit = f"{max_bytes} bytes ({max_bytes / 2**20:g} MiB)"
    if size is None:
        return FileRefusedError(f"file too large: more than the limit of {limit}")
    return FileRefusedError(f"file too large: {size} bytes > limit {limit}")


def _read_bounded(f: BinaryIO, size: int | None, max_bytes: int) -> bytes:
    """At most ``max_bytes`` bytes of ``f``, whose size was reported as ``size``; more is an
    error. Never reads more than ``max_bytes + 1`` bytes, whatever the file does."""
    want = max_bytes + 1 if size is None else min(size, max_bytes) + 1
    data = f.read(want)
    if len(data) == want and want <= max_bytes:  # it grew since it was measured
        data += f.read(max_bytes + 1 - want)
    if len(data) > max_bytes:
        raise _too_large(None, max_bytes)
    return data


def read_local(path: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the local regular file ``path`` (an escaped name is unescaped).

    Checked with ``stat`` before it is opened (a FIFO or a device is never opened), opened
    non-blocking, and checked again with ``fstat`` on the open descriptor, so a file
    swapped for a FIFO in between cannot block the read either."""
    path = unescape_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileRefusedError("file not found (a broken symbolic link)") from None
        raise
    _check_regular(st.st_mode)
    if st.st_size > max_bytes:
        raise _too_large(st.st_size, max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | \
        getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:  # owns fd from here on
        st = os.fstat(fd)
        _check_regular(st.st_mode)
        if st.st_size > max_bytes:
            raise _too_large(st.st_size, max_bytes)
        return _read_bounded(f, st.st_size, max_bytes)


def read_url(url: str, storage_options: Mapping[str, Any] | None = None,
             max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of one file at an fsspec URL: only a file (by the filesystem's own
    ``info``), no larger than ``max_bytes`` by its reported size, read at most
    ``max_bytes + 1`` bytes far."""
    fs, path = url_to_fs(url, storage_options)
    info = fs.info(path)
    kind = info.get("type")
    if kind == "directory":
        raise FileRefusedError("is a directory")
    if kind not in (None, "file"):
        raise FileRefusedError(f"not a regular file ({kind})")
    size = info.get("size")
    size = int(size) if isinstance(size, (int, float)) else None
    if size is not None and size > max_bytes:
        raise _too_large(size, max_bytes)
    with fs.open(path, "rb") as f:
        return _read_bounded(f, size, max_bytes)
