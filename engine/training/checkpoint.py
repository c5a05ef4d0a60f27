"""The files of a training run, on a local folder or any fsspec URL, and its checkpoints.

``RunDir`` is the one writer of a model directory: the checkpoint, ``rounds.jsonl``,
``val_metrics.json``, ``training.png`` and the saved model (``config.json`` +
``head.safetensors``). On a local path every write goes through ``engine/files.py``
(atomic rename, umask modes, a full disk as one StoreError); on another URL (``s3://``,
``memory://``) through fsspec, where one ``pipe`` of the whole file is the atomic unit
(object stores have no rename), and a line appended to ``rounds.jsonl`` rewrites the file.

The checkpoint is one safetensors file (arrays + JSON metadata, no pickle); the
``CheckpointWriter`` writes it on a background thread while the next round runs.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .. import jsonutil
from ..errors import StoreError
from ..files import append_line, atomic_target, atomic_write, make_dirs
from ..modeldir import CHECKPOINT_FORMAT, RUN_FILES, remove_run_files

#: what every checkpoint's state holds
STATE_KEYS = ("identity", "epoch", "round", "global_round", "iteration", "epoch_loss_sum",
              "epoch_examples", "epoch_correct", "history", "best", "bad_epochs", "done",
              "stopped_early")


class RunDir:
    """A model directory, local or on an fsspec URL: every file a run writes goes through it."""

    def __init__(self, url: str | os.PathLike, storage_options: Mapping | None = None):
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        self.local = "://" not in self.url or self.url.startswith("file://")
        self._fs: Any = None
        self._root = self.url
        if self.local:
            self._root = self.url[len("file://"):] if self.url.startswith("file://") else self.url
        else:
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(self.url, **self.storage_options)

    def path(self, name: str) -> str:
        """The file's path (local) or URL, as messages show it."""
        if self.local:
            return os.path.join(self._root, name)
        return self.url.rstrip("/") + "/" + name

    def _key(self, name: str) -> str:
        return self._root.rstrip("/") + "/" + name

    def exists(self, name: str) -> bool:
        if self.local:
            return os.path.exists(self.path(name))
        return bool(self._fs.exists(self._key(name)))

    def make(self) -> None:
        if self.local:
            make_dirs(self._root)
        else:
            self._fs.makedirs(self._root, exist_ok=True)

    def read_bytes(self, name: str) -> bytes:
        if self.local:
            with open(self.path(name), "rb") as f:
                return f.read()
        return bytes(self._fs.cat_file(self._key(name)))

    def write(self, name: str, data: bytes | str) -> None:
        """Replace the file atomically (local: temporary file + rename, umask mode)."""
        if self.local:
            atomic_write(self.path(name), data)
        else:
            raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            self._fs.pipe_file(self._key(name), raw)

    def append_line(self, name: str, line: str) -> None:
        """Append one line; a failed write leaves the file as it was."""
        if self.local:
            append_line(self.path(name), line)
            return
        old = self.read_bytes(name) if self.exists(name) else b""
        self.write(name, old + (line.rstrip("\n") + "\n").encode("utf-8"))

    @contextmanager
    def target(self, name: str) -> Iterator[str]:
        """A local file name for a writer that needs one (matplotlib); it becomes ``name``."""
        if self.local:
            with atomic_target(self.path(name)) as tmp:
                yield tmp
            return
        with tempfile.TemporaryDirectory() as d:
            tmp = os.path.join(d, name)
            yield tmp
            with open(tmp, "rb") as f:
                self.write(name, f.read())

    @contextmanager
    def local_copy(self, name: str) -> Iterator[str]:
        """A local path to read the file at (the file itself when local)."""
        if self.local:
            yield self.path(name)
            return
        with tempfile.TemporaryDirectory() as d:
            tmp = os.path.join(d, name)
            if self.exists(name):  # else a path with nothing there, as locally
                with open(tmp, "wb") as f:
                    f.write(self.read_bytes(name))
            yield tmp

    def remove_run_files(self) -> None:
        """Remove an earlier run's files: only the names a run writes, never other files."""
        if self.local:
            remove_run_files(self._root, RUN_FILES)
            return
        for n in RUN_FILES:
            if self._fs.exists(self._key(n)):
                self._fs.rm_file(self._key(n))


# -- checkpoints ------------------------------------------------------------------------------

def checkpoint_bytes(state: Mapping[str, Any], params: Mapping[str, np.ndarray],
                     opt_state: Mapping[str, np.ndarray] | None,
                     best_params: Mapping[str, np.ndarray] | None) -> bytes:
    """The training state as one safetensors file (arrays + JSON metadata)."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for prefix, d in (("params/", params), ("opt/", opt_state or {}), ("best/", best_params or {})):
        for k, v in d.items():
            tensors[prefix + k] = np.require(v, requirements="C")  # keeps 0-d arrays 0-d
    meta = dict(state)
    meta["param_order"] = list(params)
    meta["opt_order"] = list(opt_state) if opt_state is not None else None
    meta["has_best"] = best_params is not None
    return save(tensors, metadata={"format": CHECKPOINT_FORMAT, "state": jsonutil.dumps(meta)})


def save_checkpoint(path: "str | tuple[RunDir, str]", state: Mapping[str, Any],
                    params: Mapping[str, np.ndarray], opt_state: Mapping[str, np.ndarray] | None,
                    best_params: Mapping[str, np.ndarray] | None) -> None:
    """Atomically write the training state to a local path or ``(run_dir, name)``."""
    # bytes through our writer: safetensors' save_file makes the file 0600, not umask
    data = checkpoint_bytes(state, params, opt_state, best_params)
    if isinstance(path, tuple):
        path[0].write(path[1], data)
    else:
        atomic_write(path, data)


def load_checkpoint(path: str) -> tuple[dict[str, Any], "OrderedDict[str, np.ndarray]",
                                        "OrderedDict[str, np.ndarray] | None",
                                        "OrderedDict[str, np.ndarray] | None"]:
    """(state, params, optimizer state or None, best params or None) of a local checkpoint."""
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        meta = json.loads(f.metadata()["state"])
        params = OrderedDict((k, f.get_tensor("params/" + k)) for k in meta["param_order"])
        opt = None
        if meta["opt_order"] is not None:
            opt = OrderedDict((k, f.get_tensor("opt/" + k)) for k in meta["opt_order"])
        best = None
        if meta["has_best"]:
            best = OrderedDict((k, f.get_tensor("best/" + k)) for k in meta["param_order"])
    return meta, params, opt, best


def resume_checkpoint(path: str, shown: str | None = None
                      ) -> tuple[dict[str, Any], "OrderedDict[str, np.ndarray]",
                                 "OrderedDict[str, np.ndarray] | None",
                                 "OrderedDict[str, np.ndarray] | None"]:
    """``load_checkpoint`` for a resume: a damaged file is one StoreError saying what to do
    (``shown``: the name to give, when ``path`` is a local copy)."""
    try:
        out = load_checkpoint(path)
        missing = [k for k in STATE_KEYS if k not in out[0]]
        if missing or not isinstance(out[0]["identity"], dict):
            raise KeyError(f"no {', '.join(missing) or 'identity'} in its state")
        return out
    except Exception as exc:  # noqa: BLE001 - SafetensorError, JSON and key errors alike
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StoreError(
            f"The checkpoint {shown or path} is damaged ({type(exc).__name__}: {first}), so the "
            f"run cannot be resumed: use --no-resume (resume=False) to start over in that folder."
        ) from None


def read_checkpoint(run_dir: RunDir, name: str):
    """``resume_checkpoint`` of a run directory's checkpoint, local or remote."""
    with run_dir.local_copy(name) as p:
        return resume_checkpoint(p, shown=run_dir.path(name))


def _parses(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("global_round"), int) else None


def truncate_rounds(run_dir: RunDir, name: str, keep_below: int) -> None:
    """Keep the records of rounds the checkpoint holds (a kill may have left one more, and a
    full disk half of one)."""
    if not run_dir.exists(name):
        return
    text = io.StringIO(run_dir.read_bytes(name).decode("utf-8", errors="replace"), newline=None)
    lines = [ln if ln.endswith("\n") else ln + "\n" for ln in text if ln.strip()]
    kept = [ln for ln in lines if (rec := _parses(ln)) is not None
            and rec["global_round"] < keep_below]
    if len(kept) != len(lines):
        run_dir.write(name, "".join(kept))


class CheckpointWriter:
    """Writes checkpoints on one background thread, in order, one at a time.

    A round's checkpoint (about 5 MB for a 1280 x 257 head with Adam's state, ~5-7 ms) is
    written while the next round runs instead of between rounds. ``save`` first waits for
    the previous write (raising its error, if any) and then runs that write's ``then``
    (the round's callback), so callbacks still come in round order, each after its round's
    checkpoint is on disk; ``flush`` waits for the last write. The arrays handed over must
    not be changed afterwards (the loop makes new ones every round); the state dict is
    copied.
    """

    def __init__(self, path: "str | tuple[RunDir, str]"):
        from concurrent.futures import ThreadPoolExecutor

        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="deeptransfer-checkpoint")
        self._pending: tuple[Any, Callable[[float, float], None] | None] | None = None

    def _write(self, state: dict[str, Any], params: Mapping[str, np.ndarray],
               opt_state: Mapping[str, np.ndarray] | None,
               best_params: Mapping[str, np.ndarray] | None) -> float:
        from . import checkpoint as me  # looked up at call time: tests replace it

        t0 = time.perf_counter()
        me.save_checkpoint(self.path, state, params, opt_state, best_params)
        return time.perf_counter() - t0

    def save(self, state: Mapping[str, Any], params: Mapping[str, np.ndarray],
             opt_state: Mapping[str, np.ndarray] | None,
             best_params: Mapping[str, np.ndarray] | None, *,
             then: Callable[[float, float], None] | None = None) -> None:
        """Start writing this checkpoint once the previous one is written.

        ``then(write_seconds, wait_seconds)`` runs on the caller's thread once this write is
        done (at the next ``save`` or ``flush``): how long the write took, and how long the
        caller was blocked waiting for it.
        """
        self.flush()
        snapshot = json.loads(jsonutil.dumps(state))  # the loop goes on changing ``state``
        fut = self._pool.submit(self._write, snapshot, params, opt_state, best_params)
        self._pending = (fut, then)

    def flush(self) -> None:
        """Wait for the write in flight, raise its error, run its ``then``."""
        if self._pending is None:
            return
        fut, then = self._pending
        self._pending = None
        t0 = time.perf_counter()
        write_s = fut.result()
        if then is not None:
            then(write_s, time.perf_counter() - t0)

    def close(self) -> None:
        """Wait for the write in flight without running its ``then`` (used on errors: a
        checkpoint half-way through is finished, not abandoned); errors are not raised."""
        if self._pending is not None:
            fut, _ = self._pending
            self._pending = None
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - the error being handled is the one to raise
                pass
        self._pool.shutdown(wait=True)
