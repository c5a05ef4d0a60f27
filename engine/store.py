"""The feature store: the only code that writes Zarr.

Layout of the Zarr group (format ``deeptransfer.features/1``):

- ``features`` (R, *feature_shape) float32 or float16, chunked by ``chunk_rows`` rows:
  (R, D) pooled vectors, or (R, C, H, W) maps of the cut (``--keep-maps``; attrs
  ``maps: true``, ``feature_shape: [C, H, W]``, ``feature_dim: C``);
- ``labels`` (R,) int32, ``split`` (R,) int8 (index into SPLITS, -1 none);
- ``paths`` (R,) str, ``ok`` (R,) bool, ``reasons`` (R,) str (why a row was skipped);
- ``done`` (n_chunks,) bool, one Zarr chunk per element: the completion marker of a chunk;
- attrs: classes, splits, model, layer, preprocess, feature_dim, feature_shape, maps,
  chunk_rows, seed, versions, train_views.

Rows: the N images of the manifest first (rows 0..N-1, their center view). With
``--train-views K`` (attrs ``train_views: {k, scale, ratio, flip}``) K augmented views of
every training image follow: row ``N + j*K + (v-1)`` is view ``v`` (1..K) of the j-th
training image, with row arrays ``image`` (R,) int32 (the image's row) and ``view`` (R,)
int8 (0 for the image rows). A view row has its image's label, split and path. Stores
without those arrays (K = 0, older stores) have image rows only; stores without
``feature_shape``/``maps`` hold pooled vectors.

Featurize chunk ``i`` owns rows ``[i * chunk_rows, (i + 1) * chunk_rows)`` of every row
array, which are whole Zarr chunks, and its ``done[i]`` marker, which it writes last. So
tasks never share a Zarr chunk (no lost updates between processes), a task run twice
writes the same bytes, and a killed run resumes by recomputing exactly the chunks whose
marker is missing (the write discipline of dask's ``to_zarr``).

A store knows it is whole: every chunk file is written, even one equal to the fill value
(attribute ``chunk_files: "all"``), so the done markers say which files must exist, and
every chunk ends with a CRC32C checksum (zarr's ``crc32c`` codec, after compression). A
reader lists the chunk keys (cheap: no data is read) and refuses a store with one missing;
a chunk that fails its checksum when read is one StoreError line; featurize run again
verifies every checksum and recomputes (or rewrites from the manifest) exactly the damaged
chunks. Stores written before this (no ``chunk_files``) are checked for what their files
can say: zarr skipped chunks equal to the fill value there.
"""
from __future__ import annotations

import functools
import hashlib
import json
import uuid
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from .dataset import SPLITS, Manifest, split_code
from . import jsonutil
from .errors import DeeptransferError, InvalidParameterError, StoreError
from .storesafety import (FORMAT, PENDING_ATTR, check_store_target, holder_message,
                          is_temp_key, live_holder, os_error, place, remove_store, write_errors)

#: a new random id per created store: worker caches tell a recreated store from the old one
STORE_ID = "store_id"
#: row arrays written from the manifest when the store is created
MANIFEST_ARRAYS = ("labels", "split", "paths")
#: row arrays that tie a view row to its image (stores with train views only)
VIEW_ARRAYS = ("image", "view")
#: arrays featurize_chunk writes, before the chunk's done marker
RESULT_ARRAYS = ("features", "ok", "reasons")
#: zarr's default skips writing a chunk equal to the fill value (an all-skipped chunk, a
#: chunk of class 0): then a deleted file cannot be told from a skipped one
WRITE_ALL = {"write_empty_chunks": True}

F = TypeVar("F", bound=Callable[..., Any])


def _zarr():
    import zarr  # imported lazily: `deeptransfer --help` stays fast

    return zarr


def _codecs() -> dict[str, Any]:
    from zarr.codecs import Crc32cCodec, ZstdCodec

    # zarr's default compressor, then a checksum of the compressed bytes
    return {"compressors": [ZstdCodec(), Crc32cCodec()], "config": WRITE_ALL}


def manifest_digest(manifest: Manifest) -> str:
    """A hash of the rows and their classes/splits: a resumed run must match it."""
    h = hashlib.sha256()
    h.update(json.dumps(manifest.classes).encode())
    h.update("\n".join(manifest.paths).encode())
    h.update(manifest.labels.astype(np.int32).tobytes())
    h.update(manifest.split.astype(np.int8).tobytes())
    return h.hexdigest()[:32]


def row_table(manifest: Manifest, train_views: int = 0) -> dict[str, np.ndarray]:
    """The row arrays a store is created with: the manifest's images, then ``train_views``
    views of each training image (``image``/``view`` only when there are views)."""
    n = len(manifest)
    labels = np.asarray(manifest.labels, dtype=np.int32)
    split = np.asarray(manifest.split, dtype=np.int8)
    paths = np.array(manifest.paths)
    if not train_views:
        return {"labels": labels, "split": split, "paths": paths}
    k = int(train_views)
    train = np.flatnonzero(split == split_code("train"))
    image = np.concatenate([np.arange(n), np.repeat(train, k)]).astype(np.int32)
    view = np.concatenate([np.zeros(n, np.int8), np.tile(np.arange(1, k + 1, dtype=np.int8),
                                                         len(train))])
    return {"labels": labels[image], "split": split[image], "paths": paths[image],
            "image": image, "view": view}


def _reads(method: F) -> F:
    """A read that fails on a damaged chunk (checksum, undecodable bytes) says so in one
    StoreError line naming the chunk and the fix, not a zarr traceback."""
    @functools.wraps(method)
    def wrapper(self: "FeatureStore", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except DeeptransferError:
            raise
        except (ValueError, RuntimeError, OSError) as exc:
            raise self.read_error(exc) from exc

    return wrapper  # type: ignore[return-value]


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
        #: True when create_store reopened it to resume (or reuse) instead of creating it
        self.reused = False
        self._writable: dict[str, Any] = {}
        self._key_cache: dict[str, list[str]] = {}
        self._view_cache: dict[str, np.ndarray] = {}
        #: the row arrays made at creation (the image/view arrays too in a store with views)
        self.manifest_arrays = MANIFEST_ARRAYS + (VIEW_ARRAYS if "view" in group else ())

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
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one row's features: (D,), or (C, H, W) for a store of maps."""
        shape = self.attrs.get("feature_shape")
        return tuple(int(d) for d in shape) if shape else (self.feature_dim,)

    @property
    def maps(self) -> bool:
        return bool(self.attrs.get("maps", False))

    @property
    def train_views(self) -> int:
        """K, the augmented views stored per training image (0: none)."""
        return int((self.attrs.get("train_views") or {}).get("k", 0))

    @property
    def n_images(self) -> int:
        """Rows of images (the manifest's); the view rows follow them."""
        if "view" not in self.group:
            return self.n_rows
        return int(np.count_nonzero(self._views()["view"] == 0))

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

    def _w(self, name: str) -> Any:
        """Array ``name`` for writing: every chunk is stored, even one equal to the fill."""
        arr = self._writable.get(name)
        if arr is None:
            arr = self._writable[name] = self.group[name].with_config(WRITE_ALL)
        return arr

    # -- featurize side ---------------------------------------------------------------------
    @_reads
    def pending_chunks(self) -> list[int]:
        """Chunks without a completion marker, in order."""
        return [int(i) for i in np.flatnonzero(~self.group["done"][:])]

    @_reads
    def chunk_paths(self, chunk: int) -> list[str]:
        start, stop = self.chunk_bounds(chunk)
        return [str(p) for p in self.group["paths"][start:stop]]

    @_reads
    def chunk_views(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(image row, view index) of each row of a chunk (a row of an image: itself, 0)."""
        start, stop = self.chunk_bounds(chunk)
        if "view" not in self.group:
            return np.arange(start, stop), np.zeros(stop - start, np.int64)
        return (self.group["image"][start:stop].astype(np.int64),
                self.group["view"][start:stop].astype(np.int64))

    def write_chunk(self, chunk: int, features: np.ndarray, ok: np.ndarray,
                    reasons: Sequence[str]) -> None:
        """Write one chunk's rows, then its marker. Safe to repeat.

        Each chunk file is replaced atomically (zarr's LocalStore writes a temp file and
        renames it; object stores put whole objects), and the marker is written only once
        the three data writes returned, so a failed write (a full disk) leaves the chunk
        pending. A chunk torn by a power cut despite that fails its checksum, which
        featurize verifies before it trusts a marker."""
        start, stop = self.chunk_bounds(chunk)
        n = stop - start
        if features.shape != (n, *self.feature_shape) or len(ok) != n or len(reasons) != n:
            raise StoreError(f"chunk {chunk} expects {n} rows of shape {self.feature_shape}; "
                             f"got {features.shape}, {len(ok)} flags, {len(reasons)} reasons")
        with write_errors(self.url):
            dtype = self.group["features"].dtype
            self._w("features")[start:stop] = features.astype(dtype, copy=False)
            self._w("ok")[start:stop] = np.asarray(ok, dtype=bool)
            self._w("reasons")[start:stop] = np.array(list(reasons), dtype=object).astype(str)
            self._w("done")[chunk] = True  # last: a chunk is complete only once its rows are

    # -- integrity ----------------------------------------------------------------------------
    def _keys(self, name: str) -> list[str]:
        """The chunk key of each chunk of array ``name``, in chunk order."""
        keys = self._key_cache.get(name)
        if keys is None:
            arr = self.group[name]
            enc = arr.metadata.encode_chunk_key
            keys = [f"{name}/{enc((c,) + (0,) * (arr.ndim - 1))}" for c in range(self.n_chunks)]
            self._key_cache[name] = keys
        return keys

    def _stored_keys(self) -> set[str]:
        """Keys of the chunk files that exist: one listing, no data read."""
        p = place(self.url, self.storage_options)
        base = p.path.rstrip("/") + "/"
        return {k[len(base):] for k in p.fs.find(p.path) if k.startswith(base)}

    def _missing(self, done: np.ndarray, stored: set[str]) -> dict[int, set[str]]:
        """Chunk -> arrays whose chunk file must exist but does not."""
        out: dict[int, set[str]] = {}
        every = self.attrs.get("chunk_files") == "all"
        ok_legacy = None if every else self.group["ok"][:]
        for c in range(self.n_chunks):
            need = list(self.manifest_arrays) if every else ["paths"]  # a path is never ""
            if done[c]:
                if every:
                    need += RESULT_ARRAYS
                elif self._keys("ok")[c] not in stored:
                    need.append("reasons")  # all rows skipped: each has a reason
                else:  # older store: only what its values say must have been written
                    a, b = self.chunk_bounds(c)
                    need += ["features"] if ok_legacy[a:b].any() else []
                    need += ["reasons"] if not ok_legacy[a:b].all() else []
            gone = {n for n in need if self._keys(n)[c] not in stored}
            if gone:
                out[c] = gone
        return out

    def _corrupt(self, stored: set[str]) -> dict[int, set[str]]:
        """Chunk -> arrays whose stored chunk fails its checksum (or, in a store without
        checksums, does not decode). Reads every chunk file: for featurize and errors."""
        import google_crc32c  # zarr's own crc32c dependency
        from zarr.codecs import Crc32cCodec

        p = place(self.url, self.storage_options)
        out: dict[int, set[str]] = {}
        for name in RESULT_ARRAYS + self.manifest_arrays + ("done",):
            arr = self.group[name]
            keys = {k: c for c, k in enumerate(self._keys(name)) if k in stored}
            if isinstance(arr.metadata.codecs[-1], Crc32cCodec):
                for k, c in keys.items():
                    b = p.fs.cat_file(p.join(k))
                    if len(b) < 4 or google_crc32c.value(b[:-4]) != int.from_bytes(b[-4:], "little"):
                        out.setdefault(c, set()).add(name)
            else:
                for c in keys.values():
                    try:
                        arr.blocks[c]
                    except Exception:  # noqa: BLE001 - any decode failure is damage
                        out.setdefault(c, set()).add(name)
        return out

    def _describe(self, damage: Mapping[int, set[str]]) -> str:
        parts = []
        for c in sorted(damage)[:5]:
            a, b = self.chunk_bounds(c)
            parts.append(f"rows {a}-{b - 1} ({', '.join(sorted(damage[c]))})")
        more = f" and {len(damage) - 5} more chunks" if len(damage) > 5 else ""
        return (f"The feature store {self.url!r} is damaged: chunk files are missing or corrupt "
                f"for {'; '.join(parts)}{more}. Run featurize again with the same arguments: "
                f"it recomputes only those chunks.")

    def check_whole(self) -> None:
        """Refuse a store with a chunk file missing that its done markers say must exist
        (a listing of the keys: no data is read). StoreError names the rows and the fix."""
        try:
            done = self.group["done"][:]
        except (ValueError, RuntimeError, OSError) as exc:
            raise self.read_error(exc) from exc
        missing = self._missing(done, self._stored_keys())
        if missing:
            raise StoreError(self._describe(missing))

    def read_error(self, exc: BaseException) -> StoreError:
        """The StoreError for a failed read: the damaged chunks when a check finds them."""
        try:
            damage = self._corrupt(self._stored_keys())
        except Exception:  # noqa: BLE001 - the original error is what is left to report
            damage = {}
        if damage:
            return StoreError(self._describe(damage))
        return StoreError(f"Cannot read the feature store {self.url!r}: "
                          f"{exc.__class__.__name__}: {exc}")

    def repair(self, manifest: Manifest) -> list[int]:
        """Before featurize resumes: verify every chunk, rewrite damaged row arrays from the
        manifest (their source) and clear the done marker of chunks whose features, flags or
        reasons are damaged, so they are computed again. Returns the chunks that were damaged."""
        table = row_table(manifest, self.train_views)
        stored = self._stored_keys()
        damage = self._corrupt(stored)
        with write_errors(self.url):
            p = place(self.url, self.storage_options)
            for key in filter(is_temp_key, stored):  # no task of this job has started yet
                p.fs.rm_file(p.join(key))
            for c, names in damage.items():
                if names & {*RESULT_ARRAYS, "done"}:
                    self._w("done")[c] = False  # rewrites a torn marker too
            done = self.group["done"][:]
            for c, names in self._missing(done, stored).items():
                damage.setdefault(c, set()).update(names)
            for c, names in sorted(damage.items()):
                a, b = self.chunk_bounds(c)
                for name in self.manifest_arrays:
                    if name in names:
                        self._w(name)[a:b] = table[name][a:b]
                if names & set(RESULT_ARRAYS) and done[c]:
                    self._w("done")[c] = False
        return sorted(damage)

    # -- training / evaluation side -----------------------------------------------------------
    @_reads
    def is_complete(self) -> bool:
        return bool(self.group["done"][:].all())

    def require_complete(self, before: str) -> None:
        """StoreError unless every chunk is featurized (``before``: "training", ...)."""
        if not self.is_complete():
            raise StoreError(f"The feature store {self.url!r} is not complete "
                             f"({len(self.pending_chunks())} chunks missing): run featurize "
                             f"again to finish it before {before}.")

    def _done_rows(self) -> np.ndarray:
        return np.repeat(self.group["done"][:], self.chunk_rows)[: self.n_rows]

    @_reads
    def split_rows(self, split: str) -> np.ndarray:
        """Rows of a split that were featurized successfully, in store order (rows of a
        chunk without its done marker are not featurized, whatever its flags say)."""
        code = split_code(split)
        mask = (self.group["split"][:] == code) & self.group["ok"][:] & self._done_rows()
        return np.flatnonzero(mask & self._is_image())

    def _is_image(self) -> np.ndarray | bool:
        """Mask of the image rows (True: a store without view rows)."""
        return self._views()["view"] == 0 if "view" in self.group else True

    def _views(self) -> dict[str, np.ndarray]:
        """The image/view arrays and the ok flags, read once per handle (training only reads
        a complete store, which does not change under it)."""
        if not self._view_cache:
            self._view_cache = {"image": self.group["image"][:].astype(np.int64),
                                "view": self.group["view"][:].astype(np.int64),
                                "ok": self.group["ok"][:]}
        return self._view_cache

    @_reads
    def view_table(self, image_rows: np.ndarray) -> np.ndarray:
        """(n, K + 1) rows: column 0 the image rows themselves, column v the row of view v
        of each (the image row again where it has no views: not a training image)."""
        rows = np.asarray(image_rows, dtype=np.int64)
        k = self.train_views
        if k == 0:
            return rows[:, None]
        v = self._views()
        first = np.full(self.n_rows, -1, np.int64)  # image row -> row of its view 1
        ones = np.flatnonzero(v["view"] == 1)
        first[v["image"][ones]] = ones
        f = first[rows]
        table = np.repeat(rows[:, None], k + 1, axis=1)
        has = f >= 0
        table[has, 1:] = f[has, None] + np.arange(k)
        return table

    @_reads
    def view_choice(self, image_rows: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
        """The view index (0..K) each image row trains on in ``epoch``: uniform, drawn by
        (seed, epoch, image row) only, so any partition of the rows draws the same. A view
        that was not featurized (its image was skipped) falls back to view 0."""
        rows = np.asarray(image_rows, dtype=np.int64)
        k = self.train_views
        if k == 0:
            return np.zeros(len(rows), np.int64)
        draw = np.random.default_rng([int(seed), 13, int(epoch)]).integers(0, k + 1, self.n_rows)
        choice = draw[rows]
        picked = self.view_table(rows)[np.arange(len(rows)), choice]
        choice[~self._views()["ok"][picked]] = 0
        return choice

    def view_rows(self, image_rows: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
        """The row of the view each image row trains on in ``epoch`` (see ``view_choice``);
        the rows themselves in a store without views."""
        rows = np.asarray(image_rows, dtype=np.int64)
        if self.train_views == 0:
            return rows
        choice = self.view_choice(rows, seed=seed, epoch=epoch)
        return self.view_table(rows)[np.arange(len(rows)), choice]

    @_reads
    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features (float32) and labels (int64) of the given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, *self.feature_shape), np.float32), np.zeros(0, np.int64)
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

    @_reads
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every row that was skipped."""
        ok = self.group["ok"][:]
        bad = np.flatnonzero(~ok & self._done_rows() & self._is_image())  # views: as their image
        if bad.size == 0:
            return []
        paths = self.group["paths"].oindex[bad]
        reasons = self.group["reasons"].oindex[bad]
        return [(str(p), str(r)) for p, r in zip(paths, reasons)]

    def writer(self) -> dict | None:
        """The lock of another job writing this store now (None: none)."""
        try:
            return live_holder(place(self.url, self.storage_options))
        except (ImportError, ValueError, OSError):
            return None

    def verify(self) -> None:
        """``check_whole``, and every chunk's checksum (reads the whole store)."""
        self.check_whole()
        corrupt = self._corrupt(self._stored_keys())
        if corrupt:
            raise StoreError(self._describe(corrupt))

    @_reads
    def summary(self, verify: bool = False) -> dict[str, Any]:
        """What `deeptransfer info` prints. A damaged store is a StoreError (a chunk file
        missing; with ``verify``, also a checksum that fails, features included); a store
        another job is writing is described as far as it is written, ``writer`` saying who."""
        writer = self.writer()
        if writer is None:
            self.verify() if verify else self.check_whole()
        ok = self.group["ok"][:] & self._done_rows()
        split = self.group["split"][:]
        done = self.group["done"][:]
        image = self._is_image()
        feats = self.group["features"]
        out = {
            "url": self.url,
            "rows": self.n_images,
            "featurized": int((ok & image).sum()),
            "skipped": len(self.skipped()),
            # rows the source refused while listing (no uri, a null label): not store rows
            "skipped_at_listing": int((self.attrs.get("listing_skipped") or {}).get("count", 0)),
            "chunks_done": f"{int(done.sum())}/{len(done)}",
            "classes": len(self.classes),
            "splits": {s: int(((split == i) & ok & image).sum()) for i, s in enumerate(SPLITS)},
            "feature_dim": self.feature_dim,
            "feature_shape": list(self.feature_shape),
            "maps": self.maps,
            "dtype": str(feats.dtype),
            "bytes_per_row": int(np.prod(self.feature_shape)) * feats.dtype.itemsize,
            "train_views": self.attrs.get("train_views") or {"k": 0},
            "view_rows": self.n_rows - self.n_images,
            "model": self.attrs.get("model"),
            "preprocess": self.attrs.get("preprocess"),
            "backend": self.attrs.get("backend") or "torch",
            "quantization": self.attrs.get("quantization"),
            "seed": self.attrs.get("seed"),
            "versions": self.attrs.get("versions"),
            "bytes": store_nbytes(self.url, self.storage_options),
        }
        if writer is not None:
            out["writer"] = (f"being written by pid {writer.get('pid')} on host "
                             f"{writer.get('host')} since {writer.get('started')}")
        return out


def store_nbytes(url: str, storage_options: Mapping | None = None) -> int:
    """Bytes the store occupies on its filesystem."""
    from .fs import url_to_fs

    fs, root = url_to_fs(url, storage_options)
    try:
        return int(fs.du(root, total=True))
    except (FileNotFoundError, NotImplementedError):
        return 0


def _open_group(url: str, mode: str, storage_options: Mapping | None, **kw: Any):
    zarr = _zarr()
    kw["mode"] = mode
    if storage_options and "://" in url:
        kw["storage_options"] = dict(storage_options)
    try:
        return zarr.open_group(url, **kw)
    except ImportError as exc:  # s3:// without s3fs: one line naming the extra to install
        from .fs import backend_missing

        raise backend_missing(url, exc) from None


def create_store(url: str, manifest: Manifest, *, feature_dim: int, attrs: Mapping[str, Any],
                 dtype: str = "float32", chunk_rows: int = 256,
                 feature_shape: Sequence[int] | None = None,
                 train_views: Mapping[str, Any] | None = None,
                 storage_options: Mapping | None = None, overwrite: bool = False) -> FeatureStore:
    """Create the store for a manifest, or reopen it to resume an unfinished run.

    ``feature_shape``: one row's features, (feature_dim,) (the default) or a map's
    (C, H, W). ``train_views``: the attrs of the augmented views (``{"k": K, ...}``, see
    deeptransfer.augment), whose K rows per training image follow the images.

    An existing store is reused only when it was made from the same rows and the same
    model/preprocessing/shape/views; otherwise it is an error unless ``overwrite``, which
    replaces a feature store (its Zarr keys only) and nothing else: a path holding other
    files is always refused.
    """
    if dtype not in ("float32", "float16"):
        raise InvalidParameterError(
            f"The 'dtype' parameter must be one of 'float32', 'float16'. Got {dtype!r} instead.")
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise InvalidParameterError(
            f"The 'chunk_rows' parameter must be an int in the range [1, inf). Got {chunk_rows!r}.")
    shape = [int(d) for d in (feature_shape or (feature_dim,))]
    views = dict(train_views) if train_views and int(train_views.get("k", 0)) > 0 else None
    digest = manifest_digest(manifest)
    identity = {"manifest_digest": digest, "model": attrs.get("model"),
                "preprocess": attrs.get("preprocess"), "dtype": dtype,
                "chunk_rows": chunk_rows, "feature_dim": feature_dim,
                "maps": len(shape) > 1, "feature_shape": shape, "train_views": views,
                # the prefix's inference backend and int8 calibration (deeptransfer.backends)
                "backend": attrs.get("backend", "torch"),
                "quantization": attrs.get("quantization")}
    source = source_identity(manifest)
    if source:  # a folder's is empty: its stores keep the identity they had before sources
        identity["source"] = source
    kind = check_store_target(url, overwrite=overwrite, storage_options=storage_options)
    if kind == "store" and not overwrite:
        existing = _try_open(url, storage_options)
        if existing is not None:
            # older stores lack the shape keys: they hold pooled vectors, no views
            mine = {k: existing.attrs.get(k) for k in identity}
            mine["maps"] = existing.maps
            mine["feature_shape"] = list(existing.feature_shape)
            mine["backend"] = existing.attrs.get("backend") or "torch"  # older stores: torch
            want = json.loads(json.dumps(identity))
            if want == mine:
                existing.reused = True
                return existing
            if (mine["backend"], mine["quantization"]) != (want["backend"], want["quantization"]):
                raise StoreError(_backend_mismatch(url, mine, want))
            raise StoreError(
                f"{url!r} already holds features of another dataset or model "
                f"({', '.join(k for k in identity if mine.get(k) != want[k])} differ). Use "
                f"another store path, or overwrite=True (CLI: --overwrite) to replace it.")
    if kind in ("store", "partial"):  # replaced (or an interrupted create of ours redone)
        remove_store(place(url, storage_options))
    try:
        # the group carries its "being created" mark from its first write: an interrupted
        # create is recognised as ours (and redone) rather than refused as a foreign folder
        group = _open_group(url, "a", storage_options, attributes={PENDING_ATTR: FORMAT})
    except OSError as exc:  # permissions, read-only filesystem, a full disk
        raise os_error(url, exc, "create") from exc
    except DeeptransferError:  # a missing fsspec backend, said in its own words
        raise
    except Exception as exc:  # a bad URL
        raise StoreError(f"Cannot create the feature store at {url!r}: {exc}") from exc
    table = row_table(manifest, views["k"] if views else 0)
    n = len(table["labels"])
    n_chunks = -(-n // chunk_rows)
    rc = (chunk_rows,)
    kw = _codecs()
    try:
        with write_errors(url):
            # a chunk is chunk_rows whole rows (a map's C x H x W too): one task per chunk
            group.create_array("features", shape=(n, *shape), dtype=dtype,
                               chunks=(chunk_rows, *shape), fill_value=0, **kw)
            group.create_array("labels", shape=(n,), dtype="int32", chunks=rc,
                               **kw)[:] = table["labels"]
            group.create_array("split", shape=(n,), dtype="int8", chunks=rc,
                               **kw)[:] = table["split"]
            group.create_array("paths", shape=(n,), dtype=str, chunks=rc,
                               **kw)[:] = table["paths"]
            if views:
                group.create_array("image", shape=(n,), dtype="int32", chunks=rc,
                                   **kw)[:] = table["image"]
                group.create_array("view", shape=(n,), dtype="int8", chunks=rc,
                                   **kw)[:] = table["view"]
            group.create_array("ok", shape=(n,), dtype=bool, chunks=rc, fill_value=False, **kw)
            group.create_array("reasons", shape=(n,), dtype=str, chunks=rc, **kw)
            group.create_array("done", shape=(n_chunks,), dtype=bool, chunks=(1,),
                               fill_value=False, **kw)
            meta = {**dict(attrs), **identity, STORE_ID: uuid.uuid4().hex,
                    "format": FORMAT, "classes": list(manifest.classes),
                    "splits": list(SPLITS), "dataset": manifest.root, "chunk_files": "all",
                    "dataset_warnings": list(manifest.warnings),
                    "listing_skipped": _listing_skipped(manifest)}
            # attributes last: a store without them is not yet a store, so an interrupted
            # create is redone rather than resumed
            group.attrs.put(json.loads(jsonutil.dumps(meta)))
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"Cannot write the feature store at {url!r}: {exc}") from exc
    return FeatureStore(url, group, storage_options)


def source_identity(manifest: Manifest) -> dict[str, Any]:
    """The source's description (kind, url, columns) for the store's identity; empty for a
    folder tree and for manifests made without a source."""
    src = getattr(manifest, "source", None)
    return dict(src.describe()) if src is not None else {}


#: rows left out while listing that a store's attrs name (the count is always there)
LISTING_SKIPPED_SHOWN = 1000


def _listing_skipped(manifest: Manifest) -> dict[str, Any]:
    rows = list(getattr(manifest, "skipped", []) or [])
    return {"count": len(rows), "rows": [list(r) for r in rows[:LISTING_SKIPPED_SHOWN]]}


def _backend_mismatch(url: str, mine: Mapping[str, Any], want: Mapping[str, Any]) -> str:
    def name(d: Mapping[str, Any]) -> str:
        q = d.get("quantization")
        return d["backend"] + (f" int8 ({q.get('images')} calibration images, seed "
                               f"{q.get('seed')})" if q else "")
    flag = f"--backend {mine['backend']}" + (" --precision int8" if mine["quantization"] else "")
    return (f"{url!r} was featurized with backend {name(mine)}, this run asks for "
            f"{name(want)}: resume it with {flag} (or no --backend), use another store path, "
            f"or --overwrite to replace it.")


def stored_backend(url: str, storage_options: Mapping | None = None) -> str | None:
    """The backend an existing store was made with (torch for older stores), None if there
    is no store at ``url``: a resume without --backend keeps the store's."""
    try:
        store = _try_open(url, storage_options)
    except DeeptransferError:
        return None
    return None if store is None else (store.attrs.get("backend") or "torch")


def _try_open(url: str, storage_options: Mapping | None) -> FeatureStore | None:
    try:
        group = _open_group(url, "r+", storage_options)
    except DeeptransferError:
        raise
    except Exception:
        return None
    if dict(group.attrs).get("format") != FORMAT:
        return None
    return FeatureStore(url, group, storage_options)


def open_store(url: str, *, storage_options: Mapping | None = None, mode: str = "r",
               check: bool | None = None) -> FeatureStore:
    """Open an existing feature store (mode "r" or "r+").

    ``check`` (default: for mode "r") refuses, in one StoreError line, a store another job
    is writing and a damaged one (a chunk file missing; see ``FeatureStore.check_whole``)."""
    try:
        group = _open_group(url, mode, storage_options)
    except DeeptransferError:  # a missing fsspec backend, said in its own words
        raise
    except Exception as exc:
        raise StoreError(f"No feature store at {url!r} ({exc.__class__.__name__}: {exc}). "
                         f"Create one with `deeptransfer featurize DATASET {url}`.") from exc
    st = FeatureStore(url, group, storage_options)
    if check if check is not None else mode == "r":
        writer = st.writer()
        if writer is not None:
            raise StoreError(holder_message(url, place(url, storage_options), writer))
        st.check_whole()
    return st


def cached_store(url: str, storage_options: Mapping | None = None, mode: str = "r") -> FeatureStore:
    """Open a store once per worker process (tasks of a job share the handle; the one
    worker cache, ``worker_state``, kind ``"store"``). Not checked again: the driver checked
    it (``open_store``) before it sent any task.

    A cached handle is used only while the store at ``url`` is the one it opened (its
    ``store_id``, one small read): the driver may have recreated the store (``overwrite``)
    since, and only the driver's caches are dropped then, never the workers'."""
    from . import worker_state

    parts = (url, dict(storage_options or {}), mode)
    st = worker_state.peek("store", parts)
    if st is not None and st.attrs.get(STORE_ID) != _stored_id(url, storage_options):
        worker_state.pop("store", parts)
    return worker_state.get("store", parts,
                            lambda: open_store(url, storage_options=storage_options, mode=mode,
                                               check=False))


def _stored_id(url: str, storage_options: Mapping | None) -> str | None:
    """The ``store_id`` attribute of the store at ``url`` now (None if unreadable or absent)."""
    try:
        p = place(url, storage_options)
        meta = json.loads(p.fs.cat_file(p.join("zarr.json")))
        return meta.get("attributes", {}).get(STORE_ID)
    except Exception:  # noqa: BLE001 - unreadable now: the open that follows says why
        return None


def forget_cached_stores() -> None:
    """Drop cached handles (after a store is recreated in this process)."""
    from . import worker_state

    worker_state.forget("store")
