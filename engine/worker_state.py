"""The one per-process cache of worker state: store handles, model runners, rows, features.

    store = worker_state.get("store", (url, storage_options, "r"), lambda: open_store(url))

Every entry is keyed by ``(kind, *parts)``, the parts taken from the task's spec
(``key``: mappings such as ``storage_options`` become sorted JSON, so equal specs give
equal keys). A kind is either unbounded (a handful of store handles or runners per job) or,
when ``get`` is given ``nbytes`` and ``cap``, an LRU capped in bytes (the training and
validation features): the least recently used entries of that kind are dropped to make
room, and a value bigger than the cap is returned but not kept. ``forget(kind)`` drops a
kind (``forget()`` everything): featurize forgets the store handles after an overwrite.

One lock guards the table; a value is built outside it, under a lock of its own key, so a
model loading for seconds blocks only the threads that want that same model.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, TypeVar

T = TypeVar("T")

__all__ = ["key", "get", "peek", "put", "pop", "forget", "stats", "Stats"]


@dataclass
class Stats:
    """What one kind holds: entries, bytes (capped kinds), hits and misses since forgotten."""

    entries: int = 0
    nbytes: int = 0
    hits: int = 0
    misses: int = 0


class _Kind:
    def __init__(self) -> None:
        self.items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self.stats = Stats()


_lock = threading.Lock()
_kinds: dict[str, _Kind] = {}
_building: dict[tuple, threading.Lock] = {}


def _part(p: Any) -> Hashable:
    if isinstance(p, Mapping):
        return json.dumps(dict(p), sort_keys=True, default=str)
    if isinstance(p, (list, tuple)):
        return tuple(_part(x) for x in p)
    return p


def key(kind: str, *parts: Any) -> tuple:
    """The cache key of ``parts`` under ``kind``: ``(kind, *parts)``, mappings as sorted JSON."""
    return (kind,) + tuple(_part(p) for p in parts)


def _section(kind: str) -> _Kind:
    k = _kinds.get(kind)
    if k is None:
        k = _kinds[kind] = _Kind()
    return k


def peek(kind: str, parts: tuple) -> Any:
    """The cached value, or None (counted as a hit or a miss; a hit becomes most recent)."""
    k = key(kind, *parts)
    with _lock:
        sec = _section(kind)
        item = sec.items.get(k)
        if item is None:
            sec.stats.misses += 1
            return None
        sec.items.move_to_end(k)
        sec.stats.hits += 1
        return item[0]


def put(kind: str, parts: tuple, value: Any, *, nbytes: int = 0, cap: int | None = None) -> None:
    """Keep ``value``; with ``cap``, drop the kind's least recent entries to stay within it
    (a value bigger than the cap is not kept)."""
    k = key(kind, *parts)
    with _lock:
        sec = _section(kind)
        if k in sec.items:
            sec.stats.nbytes -= sec.items.pop(k)[1]
        if cap is not None:
            while sec.items and sec.stats.nbytes + nbytes > cap:
                sec.stats.nbytes -= sec.items.popitem(last=False)[1][1]
            if nbytes > cap:
                sec.stats.entries = len(sec.items)
                return
        sec.items[k] = (value, nbytes)
        sec.stats.nbytes += nbytes
        sec.stats.entries = len(sec.items)


def get(kind: str, parts: tuple, build: Callable[[], T], *,
        nbytes: Callable[[T], int] | None = None, cap: int | None = None) -> T:
    """The value cached under ``(kind, *parts)``, built by ``build()`` on a miss (once: other
    threads wanting the same key wait for it). ``nbytes(value)`` and ``cap``: see ``put``."""
    hit = peek(kind, parts)
    if hit is not None:
        return hit
    k = key(kind, *parts)
    with _lock:
        once = _building.setdefault(k, threading.Lock())
    with once:
        with _lock:
            item = _section(kind).items.get(k)
        if item is not None:  # built by the thread we waited for
            return item[0]
        value = build()
        put(kind, parts, value, nbytes=nbytes(value) if nbytes else 0, cap=cap)
    with _lock:
        _building.pop(k, None)
    return value


def pop(kind: str, parts: tuple) -> None:
    """Drop one entry (a no-op when it is not there)."""
    k = key(kind, *parts)
    with _lock:
        sec = _section(kind)
        item = sec.items.pop(k, None)
        if item is not None:
            sec.stats.nbytes -= item[1]
            sec.stats.entries = len(sec.items)


def forget(kind: str | None = None) -> None:
    """Drop every entry of ``kind`` (None: of every kind), and its counters."""
    with _lock:
        for name in ([kind] if kind is not None else list(_kinds)):
            _kinds.pop(name, None)


def stats(kind: str) -> Stats:
    """A copy of one kind's counters."""
    with _lock:
        s = _section(kind).stats
        return Stats(len(_section(kind).items), s.nbytes, s.hits, s.misses)
