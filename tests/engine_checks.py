"""The engine conformance suite: every adapter must pass the same checks.

An adapter's test module only provides an ``executor`` fixture (started once per module)
and collects these with ``from engine_checks import *``; the checks that need data
(featurize row for row, train the same head) are in ``engine_job_checks.py``.
"""
from __future__ import annotations

import os

import pytest

from deeptransfer.diagnostics import add_values, allocation_faults, probe
from deeptransfer.executor import Executor


def test_is_an_executor(executor):
    assert isinstance(executor, Executor)
    assert executor.n_workers >= 1
    assert isinstance(executor.name, str) and executor.name


def test_map_unordered_runs_every_task_once_with_shared(executor):
    out = dict(executor.map_unordered(probe, list(range(7)), shared={"k": 3}))
    assert sorted(out) == list(range(7))
    assert [out[i]["value"] for i in range(7)] == list(range(7))
    assert all(r["shared"] == {"k": 3} for r in out.values())
    assert all(r["pid"] != os.getpid() for r in out.values()), "tasks must run in workers"


@pytest.mark.skipif("GLIBC_TUNABLES" in os.environ,
                    reason="the user's own GLIBC_TUNABLES win over the engine's")
def test_workers_reuse_freed_memory(executor):
    # the workers' malloc settings (deeptransfer.workerenv) are in force in every worker
    # process: a freed 64 MB block is reused without faulting its 16,384 pages in again, as
    # a forward pass's activations are every batch (deploy/ says how for deployments the
    # engine does not start)
    out = dict(executor.map_unordered(allocation_faults, list(range(2 * executor.n_workers))))
    assert {r["pid"] for r in out.values()} - {os.getpid()}
    for r in out.values():
        assert r["faults"] < 1000, r


def test_map_reduce_combines_all(executor):
    total = executor.map_reduce(probe, list(range(1, 11)), add_values, shared=None)
    assert (total["value"] if isinstance(total, dict) else total) == 55


def test_map_reduce_single_task(executor):
    r = executor.map_reduce(probe, [5], add_values)
    assert (r["value"] if isinstance(r, dict) else r) == 5


def test_affinity_pins_tasks_to_workers(executor):
    n = executor.n_workers
    tasks = list(range(2 * n))
    affinity = [i % n for i in tasks]
    first = dict(executor.map_unordered(probe, tasks))  # warm every worker

    def pids_of_slots():
        pids: dict[int, set] = {}

        def combine(a, b):
            return a + b

        res = executor.map_reduce(_probe_list, tasks, combine, affinity=affinity)
        for value, pid in res:
            pids.setdefault(affinity[value], set()).add(pid)
        return pids

    a, b = pids_of_slots(), pids_of_slots()
    assert first
    for slot in a:
        assert len(a[slot]) == 1, f"slot {slot} ran in several processes: {a[slot]}"
        assert a[slot] == b[slot], "a slot's tasks moved to another process between rounds"


def _probe_list(task, shared):
    r = probe(task, shared)
    return [(r["value"], r["pid"])]


def test_task_error_surfaces(executor):
    with pytest.raises(Exception, match="failed on purpose"):
        list(executor.map_unordered(probe, [{"value": 1}, {"value": 2, "fail": True}]))
    # the engine stays usable after a failed job
    assert dict(executor.map_unordered(probe, [1]))[0]["value"] == 1


def test_dead_worker_task_is_rerun(executor, tmp_path):
    marker = str(tmp_path / "died")
    tasks = [{"value": i} for i in range(4)] + [{"value": 4, "die_once": marker}]
    out = dict(executor.map_unordered(probe, tasks))
    assert os.path.exists(marker), "the probe never killed its worker"
    assert sorted(r["value"] for r in out.values()) == [0, 1, 2, 3, 4]
    assert dict(executor.map_unordered(probe, [9]))[0]["value"] == 9


def test_worker_killed_between_jobs(executor):
    """A worker that died while idle must not break the next job."""
    import signal
    import time

    dict(executor.map_unordered(probe, list(range(executor.n_workers))))  # workers are up
    pids = executor.worker_pids()
    assert pids
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    out = dict(executor.map_unordered(probe, list(range(6))))
    assert sorted(r["value"] for r in out.values()) == list(range(6))
