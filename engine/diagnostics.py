"""Probe steps for checking an engine: the shipped engine checks (deeptransfer.testing) use them.

They live in the package (not in tests/) because an engine's worker processes, a
``dask worker`` or a Spark executor, import steps by module name.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping


def probe(task: Any, shared: Any) -> dict[str, Any]:
    """Echo a task with the worker's pid; ``task`` may ask to sleep, fail or die.

    ``task`` is an int or a mapping with keys ``value``, ``sleep`` (seconds), ``wait_for`` (a
    path: wait until that file exists, so a test can order events without timing), ``fail``
    (raise ValueError), ``die`` (every attempt kills its worker process), ``die_once`` (a
    marker-file path: the first attempt kills its worker process without cleanup, later
    attempts succeed).
    """
    t: Mapping[str, Any] = task if isinstance(task, Mapping) else {"value": task}
    if t.get("sleep"):
        time.sleep(float(t["sleep"]))
    if t.get("wait_for"):
        while not os.path.exists(t["wait_for"]):
            time.sleep(0.01)
    if t.get("die"):
        os._exit(17)  # every attempt: the engine must give up with a TaskError
    marker = t.get("die_once")
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(17)  # a crash, not an exception: the engine must notice and rerun the task
    if t.get("fail"):
        raise ValueError(f"probe task {t.get('value')!r} failed on purpose")
    return {"value": t.get("value"), "shared": shared, "pid": os.getpid()}


def allocation_faults(task: Any, shared: Any) -> dict[str, Any]:
    """Page faults of allocating, filling and freeing 64 MB a second time in this worker.

    A forward pass does this with its activations every batch. With the workers' malloc
    settings (``deeptransfer.workerenv``) the second allocation reuses the heap memory the
    first one left: almost no faults. With glibc's defaults it is a fresh mmap that faults
    in all 16,384 pages again. (The settings themselves cannot be read back: glibc edits
    GLIBC_TUNABLES in place while parsing it.)
    """
    import ctypes
    import ctypes.util
    import resource

    # malloc itself (numpy would madvise huge pages, which hides the difference)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 2 ** 20

    def once() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    once()
    return {"pid": os.getpid(), "faults": once()}


def add_values(a: Any, b: Any) -> Any:
    """The associative combine of probe results used by map_reduce checks."""
    va = a["value"] if isinstance(a, dict) else a
    vb = b["value"] if isinstance(b, dict) else b
    return va + vb


def warm_up(task: Any, shared: Any) -> int:
    """Import the core's steps in a worker (torch, numba kernels, the training step).

    Run once per worker before a timed job so that start-up is measured on its own, the
    way a cluster's start-up is reported apart from its jobs.
    """
    import torch  # noqa: F401

    from . import evaluation, featurization, kernels  # noqa: F401
    from .training import averaging  # noqa: F401

    return os.getpid()


def start_workers(executor: Any) -> float:
    """Start every worker of ``executor`` and import the core there; returns the seconds taken."""
    t0 = time.perf_counter()
    n = max(1, executor.n_workers)
    executor.map_reduce(warm_up, list(range(n)), lambda a, b: a, affinity=list(range(n)))
    return time.perf_counter() - t0
