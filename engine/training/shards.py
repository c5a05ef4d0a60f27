"""Which training rows each worker owns, and the per-process cache of their features.

A task names its data by a small deterministic spec (``ShardTask``): store url, split, seed,
epoch, number of partitions, partition, and the offset/count of this round's rows within the
partition. The worker computes the partition's rows itself (``partition_rows``) from
``split_rows(split)`` and seeded permutations, so only the spec travels and every engine
gives every worker the same rows.

Partitions are balanced (sizes differ by at most one; ``partition_sizes``):

- ``repartition="never"``: the train rows are shuffled once (by ``seed``) and split into
  ``n_parts`` fixed partitions for the whole run; each partition is reshuffled every epoch.
- ``repartition="epoch"``: every epoch the rows get a new seeded shuffle and are split into
  balanced partitions again (DL4J's ``Repartition.Always`` with the ``Balanced`` strategy).

Features are read from Zarr by the worker on first use and kept in an LRU cache per worker
process, capped in bytes (``ShardTask.cache_bytes``; see ``load_round`` for what is kept), so
across rounds and epochs a worker reads its rows once. Engines pin a partition's tasks to one
worker (``affinity``) so the cache is hit. When nothing fits under the cap, each round reads
only its own rows.

Augmented views (a store featurized with ``--train-views K``): the partitions are made of
image rows as above; each round trains, for each of its images, on the view
``FeatureStore.view_rows`` draws for the epoch (uniform over the center and the K views, a
function of (seed, epoch, image row)), and the cache holds every view of its images
((K + 1) rows each), so that an epoch's draw is an index into it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping

import numpy as np

from .. import worker_state
from ..store import cached_store

REPARTITION = ("never", "epoch")


@dataclass(frozen=True)
class ShardTask:
    """One worker's share of one averaging round, as a small deterministic spec."""

    store_url: str
    split: str
    seed: int
    epoch: int
    n_parts: int
    part: int  # the partition, i.e. the (logical) worker index
    offset: int  # first position of this round's rows in the partition's epoch order
    count: int  # number of rows this round (at most batch_size_per_worker * averaging_frequency)
    repartition: str = "epoch"
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    store_key: str = ""  # identity of the store's contents (see store_key()), part of cache keys
    cache_bytes: int = 1 << 30  # cap of the worker process's feature cache


def store_key(attrs: Mapping[str, Any]) -> str:
    """A short digest of what the store holds (rows, model, preprocessing, dtype, shape,
    views)."""
    ident = {k: attrs.get(k) for k in ("manifest_digest", "model", "layer", "preprocess", "dtype",
                                      "feature_dim", "chunk_rows")}
    # keys of newer stores, only where they say more than an older store (whose key, in
    # checkpoints of runs on it, stays what it was)
    if attrs.get("maps"):
        ident["feature_shape"] = attrs.get("feature_shape")
    if (attrs.get("train_views") or {}).get("k"):
        ident["train_views"] = attrs.get("train_views")
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def partition_sizes(n: int, n_parts: int) -> list[int]:
    """Balanced sizes: the first ``n % n_parts`` partitions hold one row more."""
    q, r = divmod(n, n_parts)
    return [q + (1 if i < r else 0) for i in range(n_parts)]


def _bounds(n: int, n_parts: int, part: int) -> tuple[int, int]:
    sizes = partition_sizes(n, n_parts)
    start = sum(sizes[:part])
    return start, start + sizes[part]


def partition_positions(n: int, *, seed: int, epoch: int, n_parts: int, part: int,
                        repartition: str) -> np.ndarray:
    """Positions (into the split's rows) of a partition's members, in a fixed order."""
    lo, hi = _bounds(n, n_parts, part)
    if repartition == "never":
        perm = np.random.default_rng([seed, 3]).permutation(n)
    else:
        perm = np.random.default_rng([seed, 2, epoch]).permutation(n)
    return perm[lo:hi]


def partition_members(train_rows: np.ndarray, *, seed: int, epoch: int, n_parts: int, part: int,
                      repartition: str) -> np.ndarray:
    """The rows of a partition in a fixed order: its membership (epoch only matters for "epoch")."""
    pos = partition_positions(len(train_rows), seed=seed, epoch=epoch, n_parts=n_parts, part=part,
                              repartition=repartition)
    return np.asarray(train_rows)[pos]


def epoch_order(n_members: int, *, seed: int, epoch: int, part: int, repartition: str) -> np.ndarray | None:
    """Positions of a partition's members in this epoch's order (None: as they are)."""
    if repartition == "never":
        return np.random.default_rng([seed, 1, epoch, part]).permutation(n_members)
    return None  # a fresh global shuffle already ordered them


def partition_rows(train_rows: np.ndarray, *, seed: int, epoch: int, n_parts: int, part: int,
                   repartition: str) -> np.ndarray:
    """The store rows of a partition in the order its worker trains on them this epoch."""
    members = partition_members(train_rows, seed=seed, epoch=epoch, n_parts=n_parts, part=part,
                                repartition=repartition)
    order = epoch_order(len(members), seed=seed, epoch=epoch, part=part, repartition=repartition)
    return members if order is None else members[order]


# -- per-process caches (kinds of the one worker cache, ``worker_state``) ------------------

#: kind of the features of partitions and validation blocks (capped in bytes)
FEATURES = "features"
#: kind of the row lists of splits
ROWS = "rows"


def split_rows(store_url: str, split: str, storage_options: Mapping[str, Any] | None = None,
               key: str = "") -> np.ndarray:
    """``FeatureStore.split_rows`` computed once per process (and store contents)."""
    def build() -> np.ndarray:
        rows = cached_store(store_url, storage_options).split_rows(split)
        rows.setflags(write=False)
        return rows

    return worker_state.get(ROWS, (store_url, dict(storage_options or {}), split, key), build)


def clear_caches() -> None:
    """Forget cached rows and features of this process (after a store was rewritten)."""
    worker_state.forget(FEATURES)
    worker_state.forget(ROWS)


def feature_parts(what: str, task: Any, *rest: Hashable) -> tuple:
    """The key parts of cached features: what (``"train"``/``"block"``), the store (url,
    options, contents), then what identifies the rows."""
    return (what, task.store_url, dict(task.storage_options or {}), task.store_key) + rest


def read_cached(parts: tuple, store_url: str, storage_options: Mapping[str, Any] | None,
                rows: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of ``rows``, from the cache or read from the store (and cached
    while the kind's bytes stay within ``cap``)."""
    def build() -> tuple[np.ndarray, np.ndarray]:
        x, y = cached_store(store_url, storage_options).read_rows(rows)
        x.setflags(write=False)
        y.setflags(write=False)
        return x, y

    return worker_state.get(FEATURES, parts, build, nbytes=lambda xy: xy[0].nbytes + xy[1].nbytes,
                            cap=cap)


def load_round(task: ShardTask) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, (n, *feature_shape)) and labels (int64) of this round's rows, in
    training order: for each image, its view of the epoch (itself without train views).

    What the worker keeps, within ``task.cache_bytes``: with ``repartition="epoch"`` the whole
    split when it fits (partitions change every epoch, and any partition is then an index
    into it), else this epoch's partition (the previous epoch's is dropped); with "never" its
    fixed partition. Each image comes with all its views (the epoch's draw indexes them).
    When nothing fits, only the round's own rows are read.
    """
    store = cached_store(task.store_url, task.storage_options)
    train = split_rows(task.store_url, task.split, task.storage_options, task.store_key)
    positions = partition_positions(len(train), seed=task.seed, epoch=task.epoch,
                                    n_parts=task.n_parts, part=task.part,
                                    repartition=task.repartition)
    order = epoch_order(len(positions), seed=task.seed, epoch=task.epoch, part=task.part,
                        repartition=task.repartition)
    stop = task.offset + task.count
    if task.offset < 0 or task.count < 0 or stop > len(positions):
        raise ValueError(f"round rows [{task.offset}, {stop}) outside partition {task.part} "
                         f"of {len(positions)} rows")
    sel = np.arange(task.offset, stop) if order is None else order[task.offset:stop]
    per_image = store.train_views + 1  # rows cached per image: itself and its views
    row_bytes = (int(np.prod(store.feature_shape)) * 4 + 8) * per_image
    base = feature_parts("train", task, task.split)

    def view_of(images: np.ndarray) -> np.ndarray:
        """The epoch's view (0..K) of each image row."""
        return store.view_choice(images, seed=task.seed, epoch=task.epoch)

    if task.repartition == "epoch" and len(train) * row_bytes <= task.cache_bytes:
        x, y = read_cached(base + ("all",), task.store_url, task.storage_options,
                           _with_views(store, train), task.cache_bytes)
        idx = positions[sel]
        if per_image > 1:
            idx = idx * per_image + view_of(train[idx])
        return x[idx], y[idx]
    if len(positions) * row_bytes <= task.cache_bytes:
        part_key = base + (task.seed, task.n_parts, task.part, task.repartition)
        if task.repartition == "epoch":
            worker_state.pop(FEATURES, part_key + (task.epoch - 1,))  # last epoch's partition is not coming back
            part_key += (task.epoch,)
        members = train[positions]
        x, y = read_cached(part_key, task.store_url, task.storage_options,
                           _with_views(store, members), task.cache_bytes)
        idx = sel if per_image == 1 else sel * per_image + view_of(members[sel])
        return x[idx], y[idx]
    images = train[positions[sel]]
    return store.read_rows(store.view_rows(images, seed=task.seed, epoch=task.epoch))


def _with_views(store: Any, image_rows: np.ndarray) -> np.ndarray:
    """The rows of the images and of their views: image i's view v at i * (K + 1) + v (the
    image rows themselves in a store without views)."""
    if store.train_views == 0:
        return image_rows
    return store.view_table(image_rows).reshape(-1)
