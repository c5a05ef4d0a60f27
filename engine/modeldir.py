"""Which folders are ours: the rules that keep ``train`` and ``evaluate`` off a user's files.

A folder is a **model directory** (so ``train`` may write into it, and ``--no-resume`` may
remove what an earlier run wrote there) when it holds a ``config.json`` of the model format,
or a ``checkpoint.safetensors`` / ``head.safetensors`` whose header says deeptransfer wrote it
(a run killed before its first model save has only the checkpoint, and still resumes). A new
or empty folder becomes one. Anything else (a non-empty folder of other files, a file, the
feature store or a folder inside it, a folder the store is in) is refused: nothing in it is
emptied, overwritten or written. Removing a run's files removes only the names a run writes
(``RUN_FILES``) and this package's own temporary files, nothing else in the folder.

``evaluate --report DIR`` writes ``metrics.json``, ``report.txt`` and ``confusion.png``
(``REPORT_FILES``). DIR is created if missing; an existing DIR is used when none of those
three names is there, or when it holds an earlier report (its ``metrics.json`` is a metrics
record of ours): then those three are replaced and nothing else is touched. A DIR with a
file of one of those names that is not ours is refused, and so is a DIR in (or equal to) the
model directory or the store: evaluation never writes into either.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

from . import jsonutil
from .errors import InvalidParameterError, StoreError
from .files import TMP_MARK, atomic_target, atomic_write, is_temp_name

MODEL_FORMAT = "deeptransfer.model/1"
CHECKPOINT_FORMAT = "deeptransfer.checkpoint/1"
CONFIG = "config.json"
HEAD = "head.safetensors"
CHECKPOINT = "checkpoint.safetensors"
#: every file a training run writes into its model directory
RUN_FILES = (CONFIG, HEAD, CHECKPOINT, "rounds.jsonl", "val_metrics.json", "training.png")
REPORT_FILES = ("metrics.json", "report.txt", "confusion.png")
#: keys every metrics record of ``evaluation.metrics`` has (how an earlier report is known)
_METRICS_KEYS = {"n", "top1", "confusion", "classes"}
#: a safetensors header larger than this is not one of ours (ours are a few kB)
_MAX_HEADER = 64 << 20


def local_path(url: str | os.PathLike) -> Path | None:
    """The absolute local path of a path or ``file://`` URL; None for other URLs (s3://...)."""
    s = os.fspath(url)
    if "://" in s:
        if not s.startswith("file://"):
            return None
        s = s[len("file://"):]
    return Path(s).expanduser().resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file's header, read without its tensors; None
    if the file is not a readable safetensors file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _our_config(path: Path) -> bool:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == MODEL_FORMAT


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder deeptransfer wrote a model or a training run into."""
    d = Path(path)
    if not d.is_dir():
        return False
    if (d / CONFIG).is_file() and _our_config(d / CONFIG):
        return True
    ck = safetensors_metadata(d / CHECKPOINT) if (d / CHECKPOINT).is_file() else None
    if ck is not None and (ck.get("format") == CHECKPOINT_FORMAT or "state" in ck):
        return True
    head = safetensors_metadata(d / HEAD) if (d / HEAD).is_file() else None
    return head is not None and head.get("format") == MODEL_FORMAT


def _entries(d: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(d))


def check_model_dir(model_dir: str | os.PathLike, store_url: str | os.PathLike) -> None:
    """Refuse a ``train`` output folder that is not (and cannot become) a model directory.

    Allowed: a path that does not exist, an empty folder, a model directory. Refused: an
    existing file, a non-empty folder that is not a model directory, the store or a folder
    inside it, a folder the store is inside of.
    """
    d = Path(model_dir)
    if d.exists() and not d.is_dir():
        raise InvalidParameterError(
            f"MODEL_DIR {str(model_dir)!r} is an existing file, not a folder: give train a new "
            f"folder (or a model directory) for the model.")
    mine, store = local_path(d), local_path(store_url)
    if store is not None and mine is not None:
        if _within(mine, store):
            raise InvalidParameterError(
                f"MODEL_DIR {str(model_dir)!r} is inside the feature store {str(store_url)!r}: "
                f"choose a folder outside the store.")
        if _within(store, mine):
            raise InvalidParameterError(
                f"The feature store {str(store_url)!r} is inside MODEL_DIR {str(model_dir)!r}: "
                f"choose a model folder that does not hold the store.")
    if not d.is_dir() or is_model_dir(d):
        return
    entries = _entries(d)
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        hint = ""
        if CHECKPOINT in entries or CONFIG in entries:
            hint = (f" (its {CONFIG if CONFIG in entries else CHECKPOINT} is not one deeptransfer "
                    f"can read: if it is a damaged one of ours, delete it yourself)")
        raise StoreError(
            f"MODEL_DIR {str(model_dir)!r} is a folder of other files ({shown}), not a "
            f"deeptransfer model directory{hint}: train writes only into a new or empty folder "
            f"or a model directory, and never removes other files. Choose another folder.")


def remove_run_files(model_dir: str | os.PathLike, names: tuple[str, ...] = RUN_FILES) -> None:
    """Remove the files of an earlier run (only those names, and our temporary files of them)."""
    d = Path(model_dir)
    if not d.is_dir():
        return
    stems = tuple(f".{os.path.splitext(n)[0]}{TMP_MARK}" for n in names)
    for e in os.scandir(d):
        ours = e.name in names or (is_temp_name(e.name) and e.name.startswith(stems))
        if ours and (e.is_symlink() or e.is_file(follow_symlinks=False)):  # never a folder
            os.unlink(e.path)


# -- evaluation reports -----------------------------------------------------------------------

def _our_report(d: Path) -> bool:
    try:
        m = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and _METRICS_KEYS <= set(m)


def check_report_dir(report_dir: str | os.PathLike, *, model_dir: str | os.PathLike,
                     store_url: str | os.PathLike) -> None:
    """Refuse a report folder evaluate must not write into (see the module's rules)."""
    d = Path(report_dir)
    flag = f"report_dir (--report) {str(report_dir)!r}"
    if d.exists() and not d.is_dir():
        raise InvalidParameterError(f"{flag} is an existing file: give a folder for the report.")
    mine = local_path(d)
    for what, other in (("the model directory", model_dir), ("the feature store", store_url)):
        o = local_path(other)
        if mine is not None and o is not None and _within(mine, o):
            raise InvalidParameterError(
                f"{flag} is {'' if mine == o else 'inside '}{what} {str(other)!r}: evaluate never "
                f"writes there; choose a folder outside it.")
    if not d.is_dir() or _our_report(d):
        return
    taken = [n for n in REPORT_FILES if os.path.lexists(d / n)]
    if taken:
        raise InvalidParameterError(
            f"{flag} already has {', '.join(taken)}, which evaluate did not write: it would "
            f"replace them. Choose a new or empty folder (or an earlier report's).")


def write_report(report_dir: str | os.PathLike, m: Mapping[str, Any], text: str,
                 plot: Any) -> None:
    """Write a report's three files atomically; ``plot(m, path)`` draws the confusion matrix."""
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / "metrics.json", jsonutil.dumps(m, indent=1))
    atomic_write(d / "report.txt", text)
    with atomic_target(d / "confusion.png") as tmp:
        plot(m, tmp)
