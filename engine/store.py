"""The feature store: the only code that writes Zarr.

Layout of the Zarr group (format ``deeptransfer.features/1``):

- ``features`` (N, D) float32 or float16, chunked by ``chunk_rows`` rows;
- ``labels`` (N,) int32, ``split`` (N,) int8 (index into SPLITS, -1 none);
- ``paths`` (N,) str, ``ok`` (N,) bool, ``reasons`` (N,) str (why a row was skipped);
- ``done`` (n_chunks,) bool, one Zarr chunk per element: the completion marker of a chunk;
- attrs: classes, splits, model, layer, preprocess, feature_dim, chunk_rows, seed, versions.

Featurize chunk ``i`` owns rows ``[i * chunk_rows, (i + 1) * chunk_rows)`` of every row
array, which are whole Zarr chunks, and its ``done[i]`` marker, which it writes last. So
tasks never share a Zarr chunk (no lost updates between processes), a task run twice
writes the same bytes, and a killed run resumes by recomputing exactly the chunks whose
marker is missing (the write discipline of dask's ``to_zarr``).
"""
from __future__ import annotations

import hashlib
import json
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from .dataset import SPLITS, Manifest, split_code
from .errors import InvalidParameterError, StoreError

FORMAT = "deeptransfer.features/1"
ROW_ARRAYS = ("labels", "split", "paths", "ok", "reasons")


def _zarr():
    import zarr  # imported lazily: `deeptransfer --help` stays fast

    return zarr


def manifest_digest(manifest: Manifest) -> str:
    """A hash of the rows and their classes/splits: a resumed run must match it."""
    h = hashlib.sha256()
    h.update(json.dumps(manifest.classes).encode())
    h.update("\n".join(manifest.paths).encode())
    h.update(manifest.labels.astype(np.int32).tobytes())
    h.update(manifest.split.astype(np.int8).tobytes())
    return h.hexdigest()[:32]


class FeatureStore:
    """An open feature store (see the module docstring for its layout)."""

    def __init__(self, url: str, group: Any, storage_options: Mapping | None = None):
        self.url = url
        self.group = group
        self.storage_options = dict(storage_options or {})
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{url!r} is not a deeptransfer feature store "
                             f"(format {attrs.get('format')!r}, expected {FORMAT!r}).")
        self.attrs: dict[str, Any] = attrs

    # -- metadata ---------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def n_rows(self) -> int:
        return int(self.group["labels"].shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def __getitem__(self, name: str) -> Any:
        return self.group[name]

    # -- featurize side ---------------------------------------------------------------------
    def pending_chunks(self) -> list[int]:
        """Chunks without a completion marker, in order."""
        return [int(i) for i in np.flatnonzero(~self.group["done"][:])]

    def chunk_paths(self, chunk: int) -> list[str]:
        start, stop = self.chunk_bounds(chunk)
        return [str(p) for p in self.group["paths"][start:stop]]

    def write_chunk(self, chunk: int, features: np.ndarray, ok: np.ndarray,
                    reasons: Sequence[str]) -> None:
        """Write one chunk's rows, then its marker. Safe to repeat."""
        start, stop = self.chunk_bounds(chunk)
        n = stop - start
        if features.shape != (n, self.feature_dim) or len(ok) != n or len(reasons) != n:
            raise StoreError(f"chunk {chunk} expects {n} rows of width {self.feature_dim}; got "
                             f"{features.shape}, {len(ok)} flags, {len(reasons)} reasons")
        dtype = self.group["features"].dtype
        self.group["features"][start:stop] = features.astype(dtype, copy=False)
        self.group["ok"][start:stop] = np.asarray(ok, dtype=bool)
        self.group["reasons"][start:stop] = np.array(list(reasons), dtype=object).astype(str)
        self.group["done"][chunk] = True  # last: a chunk is complete only once its rows are

    # -- training / evaluation side -----------------------------------------------------------
    def is_complete(self) -> bool:
        return bool(self.group["done"][:].all())

    def split_rows(self, split: str) -> np.ndarray:
        """Rows of a split that were featurized successfully, in store order."""
        code = split_code(split)
        mask = (self.group["split"][:] == code) & self.group["ok"][:]
        return np.flatnonzero(mask)

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and labels (int64) of the given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros(0, np.int64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        lo, hi = int(srt[0]), int(srt[-1]) + 1
        # one contiguous read when the rows are dense (the common case), else orthogonal indexing
        if hi - lo <= 4 * len(srt):
            block = self.group["features"][lo:hi]
            x_sorted = block[srt - lo]
            y_sorted = self.group["labels"][lo:hi][srt - lo]
        else:
            x_sorted = self.group["features"].oindex[srt]
            y_sorted = self.group["labels"].oindex[srt]
        x = np.empty_like(x_sorted, dtype=np.float32)
        y = np.empty(len(rows), dtype=np.int64)
        x[order] = x_sorted
        y[order] = y_sorted
        return x, y

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every row that was skipped."""
        ok = self.group["ok"][:]
        done_rows = np.repeat(self.group["done"][:], self.chunk_rows)[: self.n_rows]
        bad = np.flatnonzero(~ok & done_rows)
        if bad.size == 0:
            return []
        paths = self.group["paths"].oindex[bad]
        reasons = self.group["reasons"].oindex[bad]
        return [(str(p), str(r)) for p, r in zip(paths, reasons)]

    def summary(self) -> dict[str, Any]:
        """What `deeptransfer info` prints."""
        ok = self.group["ok"][:]
        split = self.group["split"][:]
        done = self.group["done"][:]
        return {
            "url": self.url,
            "rows": self.n_rows,
            "featurized": int(ok.sum()),
            "skipped": len(self.skipped()),
            "chunks_done": f"{int(done.sum())}/{len(done)}",
            "classes": len(self.classes),
            "splits": {s: int(((split == i) & ok).sum()) for i, s in enumerate(SPLITS)},
            "feature_dim": self.feature_dim,
            "dtype": str(self.group["features"].dtype),
            "model": self.attrs.get("model"),
            "preprocess": self.attrs.get("preprocess"),
            "seed": self.attrs.get("seed"),
            "versions": self.attrs.get("versions"),
            "bytes": store_nbytes(self.url, self.storage_options),
        }


def store_nbytes(url: str, storage_options: Mapping | None = None) -> int:
    """Bytes the store occupies on its filesystem."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    try:
        return int(fs.du(root, total=True))
    except (FileNotFoundError, NotImplementedError):
        return 0


def _open_group(url: str, mode: str, storage_options: Mapping | None):
    zarr = _zarr()
    kw: dict[str, Any] = {"mode": mode}
    if storage_options and "://" in url:
        kw["storage_options"] = dict(storage_options)
    return zarr.open_group(url, **kw)


def create_store(url: str, manifest: Manifest, *, feature_dim: int, attrs: Mapping[str, Any],
                 dtype: str = "float32", chunk_rows: int = 256,
                 storage_options: Mapping | None = None, overwrite: bool = False) -> FeatureStore:
    """Create the store for a manifest, or reopen it to resume an unfinished run.

    An existing store is reused only when it was made from the same rows and the same
    model/preprocessing; otherwise it is an error unless ``overwrite``.
    """
    if dtype not in ("float32", "float16"):
        raise InvalidParameterError(
            f"The 'dtype' parameter must be one of 'float32', 'float16'. Got {dtype!r} instead.")
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise InvalidParameterError(
            f"The 'chunk_rows' parameter must be an int in the range [1, inf). Got {chunk_rows!r}.")
    digest = manifest_digest(manifest)
    identity = {"manifest_digest": digest, "model": attrs.get("model"),
                "preprocess": attrs.get("preprocess"), "dtype": dtype,
                "chunk_rows": chunk_rows, "feature_dim": feature_dim}
    if not overwrite:
        existing = _try_open(url, storage_options)
        if existing is not None:
            mine = {k: existing.attrs.get(k) for k in identity}
            if json.loads(json.dumps(identity)) == mine:
                return existing
            raise StoreError(
                f"{url!r} already holds features of another dataset or model "
                f"({', '.join(k for k in identity if mine.get(k) != json.loads(json.dumps(identity))[k])} "
                f"differ). Use another store path, or overwrite=True (CLI: --overwrite).")
    try:
        group = _open_group(url, "w", storage_options)
    except Exception as exc:  # permissions, bad URL, read-only filesystem
        raise StoreError(f"Cannot create the feature store at {url!r}: {exc}") from exc
    n = len(manifest)
    n_chunks = -(-n // chunk_rows)
    rc = (chunk_rows,)
    try:
        group.create_array("features", shape=(n, feature_dim), dtype=dtype,
                           chunks=(chunk_rows, feature_dim), fill_value=0)
        group.create_array("labels", shape=(n,), dtype="int32", chunks=rc)[:] = manifest.labels
        group.create_array("split", shape=(n,), dtype="int8", chunks=rc)[:] = manifest.split
        group.create_array("paths", shape=(n,), dtype=str, chunks=rc)[:] = np.array(manifest.paths)
        group.create_array("ok", shape=(n,), dtype=bool, chunks=rc, fill_value=False)
        group.create_array("reasons", shape=(n,), dtype=str, chunks=rc)
        group.create_array("done", shape=(n_chunks,), dtype=bool, chunks=(1,), fill_value=False)
        meta = {**dict(attrs), **identity, "format": FORMAT, "classes": list(manifest.classes),
                "splits": list(SPLITS), "dataset": manifest.root,
                "dataset_warnings": list(manifest.warnings)}
        # attributes last: a store without them is not yet a store, so an interrupted
        # create is redone rather than resumed
        group.attrs.update(json.loads(json.dumps(meta)))
    except Exception as exc:
        raise StoreError(f"Cannot write the feature store at {url!r}: {exc}") from exc
    return FeatureStore(url, group, storage_options)


def _try_open(url: str, storage_options: Mapping | None) -> FeatureStore | None:
    try:
        group = _open_group(url, "r+", storage_options)
    except Exception:
        return None
    if dict(group.attrs).get("format") != FORMAT:
        return None
    return FeatureStore(url, group, storage_options)


def open_store(url: str, *, storage_options: Mapping | None = None,
               mode: str = "r") -> FeatureStore:
    """Open an existing feature store (mode "r" or "r+")."""
    try:
        group = _open_group(url, mode, storage_options)
    except Exception as exc:
        raise StoreError(f"No feature store at {url!r} ({exc.__class__.__name__}: {exc}). "
                         f"Create one with `deeptransfer featurize DATASET {url}`.") from exc
    return FeatureStore(url, group, storage_options)


_cache_lock = threading.Lock()
_cache: dict[tuple[str, str, str], FeatureStore] = {}


def cached_store(url: str, storage_options: Mapping | None = None, mode: str = "r") -> FeatureStore:
    """Open a store once per worker process (tasks of a job share the handle)."""
    key = (url, json.dumps(dict(storage_options or {}), sort_keys=True), mode)
    with _cache_lock:
        st = _cache.get(key)
        if st is None:
            st = _cache[key] = open_store(url, storage_options=storage_options, mode=mode)
        return st


def forget_cached_stores() -> None:
    """Drop cached handles (after a store is recreated in this process)."""
    with _cache_lock:
        _cache.clear()
