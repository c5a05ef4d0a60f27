"""The environment every engine gives the worker processes it starts.

One definition, read by the local, Dask and Spark adapters and by the benchmarks, so that
the same forward pass costs the same on every engine.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

#: held while this process's environment is changed for child processes to inherit (local
#: workers, a LocalCluster's nannies, Spark's JVM), so two engines starting at once in one
#: process cannot see or restore each other's settings
ENV_LOCK = threading.Lock()


@contextmanager
def preserved_environ(keys: Iterable[str]) -> Iterator[None]:
    """Restore these environment variables (or their absence) when the block ends."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        restore_environ(saved)


def restore_environ(saved: Mapping[str, str | None]) -> None:
    """Set these environment variables back to the saved values (None: absent)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


#: glibc malloc settings for worker processes (glibc reads them at process start only).
#:
#: A CPU forward pass allocates activations of tens of MB per batch (efficientnet_lite0,
#: batch 16: up to 77 MB) and frees them again. By default glibc serves blocks over 32 MB
#: with mmap and returns freed heap tops to the OS, so every batch page-faults its
#: activations in again (~19,000 faults per batch, 15% of the forward time measured here);
#: and a task run in a non-main thread (a Dask worker's executor thread) gets its own arena,
#: capped at 64 MB heaps, which faults twice as often. So:
#:
#: - ``mmap_max=0``: large blocks come from the heap too, and are reused after warm-up;
#: - ``trim_threshold=4 GiB``: freed memory stays in the process (its peak is unchanged:
#:   a worker's footprint is its largest batch, which it needs again for the next one);
#: - ``arena_max=1``: every thread uses the main arena (workers run one task at a time).
#:
#: Measured (2 cores, one torch thread per worker, batch 16, ms per image of forward):
#: local workers 14.8 -> 12.5, Dask workers 17.4 -> 13.6 (docs/benchmarks.md).
MALLOC_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296:"
                   "glibc.malloc.arena_max=1")


def malloc_environ(env: "dict[str, str] | None" = None) -> dict[str, str]:
    """``{"GLIBC_TUNABLES": ...}`` for a worker, or ``{}`` where the user has set their own.

    A user's ``GLIBC_TUNABLES`` (in this process's environment or in ``env``, the settings
    they gave the engine) always wins.
    """
    if "GLIBC_TUNABLES" in os.environ or (env and "GLIBC_TUNABLES" in env):
        return {}
    return {"GLIBC_TUNABLES": MALLOC_TUNABLES}


def thread_environ(threads: int) -> dict[str, str]:
    """OpenMP/BLAS thread counts for a worker, set before its thread pools start."""
    t = str(threads)
    return {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t}


#: exit code of a spawned child whose re-import of the main module started a job (see
#: refuse_start_while_bootstrapping); the local engine's driver turns it into one clear message
BOOTSTRAP_EXIT = 87


def bootstrapping() -> bool:
    """True in a spawned child that is still importing the parent's main module."""
    import multiprocessing as mp

    # multiprocessing's own test for this (context.py, _check_not_importing_main)
    return bool(getattr(mp.process.current_process(), "_inheriting", False))


def refuse_start_while_bootstrapping() -> None:
    """A job started at import time runs again in every spawned worker, which would check
    and lock its store and start workers of its own: leave quietly with a code the driver
    recognises, instead of multiprocessing's RuntimeError traceback once per worker. Called
    first by every job of the API and by engines that spawn processes."""
    if bootstrapping():
        import sys

        sys.stderr.flush()
        raise SystemExit(BOOTSTRAP_EXIT)
