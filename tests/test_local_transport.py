"""The local engine moves large values (a round's parameters and optimizer state, a worker's
result) through shared memory: the values arrive intact and owned by the receiver, a reused
segment never changes a result already returned, and no segment outlives its executor."""
from __future__ import annotations

import glob
import os
import signal
import time

import numpy as np
import pytest

from deeptransfer.adapters import local_transport
from deeptransfer.adapters.local import LocalExecutor


def scaled(task: int, shared: dict) -> dict:
    """A result as large as a fine-tuning round's, different for every task."""
    return {k: v * (task + 1) for k, v in shared.items()} | {"task": np.array(task)}


def slow_pid(task: int, shared: dict) -> int:
    time.sleep(0.5)
    return os.getpid()


def _segments() -> set[str]:
    return set(glob.glob("/dev/shm/psm_*"))


@pytest.fixture
def shared() -> dict:
    rng = np.random.default_rng(0)
    return {f"w{i}": rng.standard_normal(300_000).astype(np.float32) for i in range(6)}  # 7 MB


def test_large_values_arrive_intact_and_results_never_alias(shared):
    before = _segments()
    with LocalExecutor(2, threads_per_worker=1) as ex:
        for job in range(3):  # the segments are reused from job to job
            got = dict(ex.map_unordered(scaled, list(range(6)), shared=shared))
            for t in range(6):  # results kept from earlier tasks were not overwritten
                assert int(got[t]["task"]) == t
                for k, v in shared.items():
                    np.testing.assert_array_equal(got[t][k], v * (t + 1))
                assert got[t]["w0"].flags.writeable
        assert len(_segments() - before) >= 1  # shared memory was used, not the pipe
    assert _segments() - before == set()


def test_a_killed_workers_segment_is_removed(shared):
    before = _segments()
    with LocalExecutor(1, threads_per_worker=1) as ex:
        dict(ex.map_unordered(scaled, [0, 1], shared=shared))  # the worker has a segment
        pid = ex.worker_pids()[0]
        it = ex.map_unordered(slow_pid, [0, 1, 2], shared=shared)
        assert next(it)[1] == pid
        os.kill(pid, signal.SIGKILL)  # while it runs the second task
        rest = dict(it)
        assert len(rest) == 2
        got = dict(ex.map_unordered(scaled, [3], shared=shared))  # a fresh worker answers
        np.testing.assert_array_equal(got[0]["w1"], shared["w1"] * 4)
    assert _segments() - before == set()


def test_small_values_use_the_pipe(monkeypatch):
    sender = local_transport.Sender()
    assert sender.pack({"x": np.zeros(10)})["x"].shape == (10,)  # returned as it is
    big = {"x": np.arange(local_transport.SHM_MIN_BYTES // 8, dtype=np.float64)}
    packed = sender.pack(big)
    assert isinstance(packed, local_transport.Packed)
    sender.busy = True  # a segment a reader may still need is not overwritten
    assert sender.pack(big) is big
    np.testing.assert_array_equal(local_transport.unpack(packed)["x"], big["x"])
    sender.close()
