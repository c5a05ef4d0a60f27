"""Checks of an engine's primitives with probe tasks (no data, no model): every engine passes them.

``EngineChecks`` collects them under pytest with an ``executor`` fixture (see the package
docstring); each ``check_*`` function is usable on its own.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np

from ..diagnostics import add_values, allocation_faults, probe
from ..executor import Executor, tree_combine, tree_plan

#: task counts the reduction checks use: odd and even levels, several levels, more tasks
#: than workers, and more than engines reduce on the driver (Dask: DRIVER_REDUCE_MAX = 32).
#: From 4 tasks on a left-to-right fold and the pairwise tree differ.
REDUCE_SIZES = (1, 2, 3, 4, 5, 7, 8, 13, 40)


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)


# -- steps sent to workers (module level: workers import them by name) -------------------------
def leaf(task: Any, shared: Any) -> Any:
    """The task itself: a leaf of the tree that ``nest`` records."""
    return task


def nest(a: Any, b: Any) -> tuple:
    """A combine that records the tree's shape: equal results mean the same combine calls."""
    return (a, b)


def float_leaf(task: int, shared: Any) -> np.ndarray:
    """float32 values spread over magnitudes, so that the order of the sums shows in the bits."""
    rng = np.random.default_rng(task)
    return (rng.standard_normal(64) * 10.0 ** rng.integers(-4, 5, 64)).astype(np.float32)


def add(a: Any, b: Any) -> Any:
    return a + b


def probe_list(task: Any, shared: Any) -> list[tuple[Any, int]]:
    r = probe(task, shared)
    return [(r["value"], r["pid"])]


# -- the checks --------------------------------------------------------------------------------
def check_is_an_executor(executor: Executor) -> None:
    """The contract's declared attributes, with the types the core relies on."""
    assert isinstance(executor, Executor)
    assert isinstance(executor.name, str) and executor.name
    assert isinstance(executor.n_workers, int) and executor.n_workers >= 1
    assert isinstance(executor.default_device, str) and executor.default_device
    assert isinstance(executor.threads_per_worker, int) and executor.threads_per_worker >= 1
    assert isinstance(executor.supports_affinity, bool)
    assert executor.dashboard_link is None or isinstance(executor.dashboard_link, str)


def check_map_unordered_runs_every_task_once_with_shared(executor: Executor) -> None:
    out = dict(executor.map_unordered(probe, list(range(7)), shared={"k": 3}))
    assert sorted(out) == list(range(7))
    assert [out[i]["value"] for i in range(7)] == list(range(7))
    assert all(r["shared"] == {"k": 3} for r in out.values())
    assert all(r["pid"] != os.getpid() for r in out.values()), "tasks must run in workers"
    # affinity is part of the primitive: taken by every engine (a hint where unsupported)
    n = executor.n_workers
    pinned = dict(executor.map_unordered(probe, list(range(5)), affinity=[i % n for i in range(5)]))
    assert sorted(r["value"] for r in pinned.values()) == list(range(5))


def check_workers_reuse_freed_memory(executor: Executor) -> None:
    # the workers' malloc settings (deeptransfer.workerenv) are in force in every worker
    # process: a freed 64 MB block is reused without faulting its 16,384 pages in again, as
    # a forward pass's activations are every batch (deploy/ says how for deployments the
    # engine does not start)
    if "GLIBC_TUNABLES" in os.environ:
        _skip("the user's own GLIBC_TUNABLES win over the engine's")
    out = dict(executor.map_unordered(allocation_faults, list(range(2 * executor.n_workers))))
    assert {r["pid"] for r in out.values()} - {os.getpid()}
    for r in out.values():
        assert r["faults"] < 1000, r


def check_map_reduce_combines_all(executor: Executor) -> None:
    total = executor.map_reduce(probe, list(range(1, 11)), add_values, shared=None)
    assert (total["value"] if isinstance(total, dict) else total) == 55
    r = executor.map_reduce(probe, [5], add_values)
    assert (r["value"] if isinstance(r, dict) else r) == 5


def check_map_reduce_follows_tree_plan(executor: Executor, sizes: tuple[int, ...] = REDUCE_SIZES
                                       ) -> None:
    """``map_reduce`` makes exactly ``tree_combine``'s combine calls, pinned or not.

    ``nest`` records the tree (a left-to-right fold, a tree in completion order or one per
    worker all give other nestings from 4 tasks on); the float32 sums show that the bits
    follow, the property the same-head-on-every-engine guarantee rests on.
    """
    n_workers = max(1, executor.n_workers)  # 0: an engine that runs tasks in-process
    for n in sizes:
        tasks = list(range(n))
        want = tree_combine(tasks, nest)
        assert len(tree_plan(n)) == (n - 1).bit_length()
        got = executor.map_reduce(leaf, tasks, nest)
        assert got == want, f"{n} tasks: reduced as {got}, not along tree_plan: {want}"
        scattered = [(7 * i) % n_workers for i in tasks]  # slots holding scattered tasks
        got = executor.map_reduce(leaf, tasks, nest, affinity=scattered)
        assert got == want, f"{n} tasks with affinity: reduced as {got}, not as {want}"
    n = max(sizes)
    want_f = tree_combine([float_leaf(t, None) for t in range(n)], add)
    got_f = executor.map_reduce(float_leaf, list(range(n)), add)
    assert got_f.dtype == np.float32 and np.array_equal(got_f, want_f), \
        "float32 sums differ from tree_combine's"


def check_affinity_pins_tasks_to_workers(executor: Executor) -> None:
    """With ``supports_affinity``: a slot's tasks run in one process, the same every round."""
    if not executor.supports_affinity:
        _skip(f"the {executor.name} engine does not pin tasks (supports_affinity is False)")
    n = executor.n_workers
    tasks = list(range(2 * n))
    affinity = [i % n for i in tasks]
    dict(executor.map_unordered(probe, tasks))  # warm every worker

    def pids_of_slots() -> dict[int, set]:
        pids: dict[int, set] = {}
        res = executor.map_reduce(probe_list, tasks, add, affinity=affinity)
        assert sorted(v for v, _ in res) == tasks
        for value, pid in res:
            pids.setdefault(affinity[value], set()).add(pid)
        return pids

    a, b = pids_of_slots(), pids_of_slots()
    for slot in a:
        assert len(a[slot]) == 1, f"slot {slot} ran in several processes: {a[slot]}"
        assert a[slot] == b[slot], "a slot's tasks moved to another process between rounds"


def check_task_error_surfaces(executor: Executor) -> None:
    try:
        list(executor.map_unordered(probe, [{"value": 1}, {"value": 2, "fail": True}]))
    except Exception as exc:  # noqa: BLE001 - the engine's choice of type; its text must say
        assert "failed on purpose" in str(exc), exc
    else:
        raise AssertionError("a task that raised did not raise in the driver")
    # the engine stays usable after a failed job
    assert dict(executor.map_unordered(probe, [1]))[0]["value"] == 1


def check_dead_worker_task_is_rerun(executor: Executor, tmp_dir: str) -> None:
    marker = os.path.join(tmp_dir, "died")
    tasks = [{"value": i} for i in range(4)] + [{"value": 4, "die_once": marker}]
    out = dict(executor.map_unordered(probe, tasks))
    assert os.path.exists(marker), "the probe never killed its worker"
    assert sorted(r["value"] for r in out.values()) == [0, 1, 2, 3, 4]
    assert dict(executor.map_unordered(probe, [9]))[0]["value"] == 9


def worker_pids_or_skip(executor: Executor) -> list[int]:
    """``executor.worker_pids()``, or a skip for an engine that does not list them."""
    try:
        pids = executor.worker_pids()
    except NotImplementedError as exc:
        _skip(str(exc))
        raise  # pragma: no cover - skip raises
    assert pids, "no worker process listed"
    return pids


def check_worker_killed_between_jobs(executor: Executor) -> None:
    """A worker that died while idle must not break the next job."""
    dict(executor.map_unordered(probe, list(range(executor.n_workers))))  # workers are up
    pids = worker_pids_or_skip(executor)
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    out = dict(executor.map_unordered(probe, list(range(6))))
    assert sorted(r["value"] for r in out.values()) == list(range(6))


class EngineChecks:
    """The checks above as pytest tests; subclass it beside an ``executor`` fixture."""

    def test_is_an_executor(self, executor):
        check_is_an_executor(executor)

    def test_map_unordered_runs_every_task_once_with_shared(self, executor):
        check_map_unordered_runs_every_task_once_with_shared(executor)

    def test_workers_reuse_freed_memory(self, executor):
        check_workers_reuse_freed_memory(executor)

    def test_map_reduce_combines_all(self, executor):
        check_map_reduce_combines_all(executor)

    def test_map_reduce_follows_tree_plan(self, executor):
        check_map_reduce_follows_tree_plan(executor)

    def test_affinity_pins_tasks_to_workers(self, executor):
        check_affinity_pins_tasks_to_workers(executor)

    def test_task_error_surfaces(self, executor):
        check_task_error_surfaces(executor)

    def test_dead_worker_task_is_rerun(self, executor, tmp_path):
        check_dead_worker_task_is_rerun(executor, str(tmp_path))

    def test_worker_killed_between_jobs(self, executor):
        check_worker_killed_between_jobs(executor)
