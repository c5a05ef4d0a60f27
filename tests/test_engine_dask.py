"""The Dask engine against the shipped engine checks, on a LocalCluster and on a real deployment.

    /work/main/.venv/bin/python -m pytest tests/test_engine_dask.py -q

The deployment is what deploy/dask.md describes, on loopback: a `dask scheduler` and three
`dask worker` processes started from the command line, joined through a scheduler file.
Three workers on both, so that a reduction in another order than tree_plan fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from distributed import Client  # noqa: E402

from deeptransfer.adapters import dask as dask_adapter  # noqa: E402
from deeptransfer.adapters.dask import DaskCudaExecutor, DaskExecutor  # noqa: E402
from deeptransfer.executor import tree_combine  # noqa: E402
from deeptransfer.workerenv import MALLOC_TUNABLES  # noqa: E402
from deeptransfer.diagnostics import add_values, probe  # noqa: E402
from deeptransfer.errors import EngineUnavailableError, InvalidParameterError  # noqa: E402
from deeptransfer.testing.engine_checks import EngineChecks  # noqa: E402
from deeptransfer.testing.job_checks import (EngineJobChecks,  # noqa: E402
                                             check_worker_killed_during_training)
from engine_fixtures import job_manifest, local_head, local_store  # noqa: E402,F401 - fixtures

pytestmark = pytest.mark.dask

TESTS_DIR = str(Path(__file__).parent)
DASK_CLI = str(Path(sys.executable).with_name("dask"))
# with --no-dashboard alone, both still serve HTTP (health, metrics) on 0.0.0.0
LOOPBACK_HTTP = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]


class Deployment:
    """`dask scheduler` + `dask worker` processes on 127.0.0.1, always torn down."""

    def __init__(self, tmp: Path, n_workers: int = 3, timeout: float = 600.0):  # a hang bound
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.scheduler_file = tmp / "scheduler.json"
        env = dict(os.environ)
        # workers import the steps by module name: the package (installed in this venv) and,
        # for the checks' own helpers, tests/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        # as deploy/dask.md starts workers
        env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
        env.setdefault("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False")
        self._start(tmp, "scheduler", [DASK_CLI, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                       "--scheduler-file", str(self.scheduler_file),
                                       *LOOPBACK_HTTP], env)
        deadline = time.monotonic() + timeout
        while not self.scheduler_file.exists() or not self.scheduler_file.stat().st_size:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"dask scheduler did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        import json

        for _ in range(20):  # the file may be written in two steps
            try:
                self.address = json.loads(self.scheduler_file.read_text())["address"]
                break
            except (ValueError, KeyError):
                time.sleep(0.1)
        for k in range(n_workers):
            self._start(tmp, f"worker{k}",
                        [DASK_CLI, "worker", "--nthreads", "1", "--host", "127.0.0.1",
                         *LOOPBACK_HTTP, "--scheduler-file", str(self.scheduler_file),
                         "--local-directory", str(tmp / f"worker{k}")], env)

    def _start(self, tmp: Path, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = tmp / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            # own session: the worker's nanny and its worker process go down together
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True))

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[:2]} exited with {p.returncode}:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(f"--- {log.name}\n" + log.read_text(errors="replace")[-2000:]
                         for log in self.logs if log.exists())

    def close(self) -> None:
        # workers first (so they do not try to reconnect), then the scheduler
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the group this test started
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = Deployment(tmp_path_factory.mktemp("dask-deployment"))
    try:
        yield dep
    finally:
        dep.close()


@pytest.fixture(scope="module", params=["local-cluster", "deployment"])
def executor(request):
    if request.param == "local-cluster":
        with DaskExecutor(3) as ex:
            yield ex
    else:
        dep = request.getfixturevalue("deployment")
        with DaskExecutor(address=dep.address, n_workers=3) as ex:
            yield ex


class TestDaskEngine(EngineChecks, EngineJobChecks):
    def test_worker_killed_during_training_changes_nothing(self, local_store, local_head,
                                                           tmp_path):
        # on its own cluster: its nanny may or may not restart the killed worker, and the
        # shared clusters of the other checks must not depend on which (a task pinned to the
        # killed worker is resubmitted either way: test_task_pinned_to_a_worker_that_left_...)
        with DaskExecutor(2, dashboard=False) as ex:
            check_worker_killed_during_training(ex, local_store, local_head, str(tmp_path))


# -- the engine itself --------------------------------------------------------------------------
def test_name_workers_and_loopback(executor):
    assert executor.name == "dask"
    assert executor.n_workers == 3
    addresses = [executor.client.scheduler.address, *executor.client.nthreads()]
    assert all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses


def test_task_error_is_the_workers_exception(executor):
    with pytest.raises(ValueError, match="failed on purpose"):
        dict(executor.map_unordered(probe, [{"value": 1, "fail": True}]))


def test_large_shared_is_sent_once_and_reaches_every_task(executor):
    big = np.arange(200_000, dtype=np.float32)  # 800 KB: scattered, not pickled per task
    out = dict(executor.map_unordered(_sum_shared, list(range(6)), shared=big))
    assert out == {i: float(big.sum()) + i for i in range(6)}


def test_a_worker_dying_during_the_shared_broadcast_is_retried(executor, monkeypatch):
    # CI: a worker killed mid-training failed the next job's scatter with CommClosedError
    from distributed.comm.core import CommClosedError

    client = executor.client
    real, calls = client.scatter, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise CommClosedError("in <TCP (closed) ConnectionPool.update_data>: reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "scatter", flaky)
    big = np.arange(200_000, dtype=np.float32)
    out = dict(executor.map_unordered(_sum_shared, list(range(4)), shared=big))
    assert out == {i: float(big.sum()) + i for i in range(4)} and len(calls) == 2


def test_map_reduce_tree_on_workers_equals_local_tree(executor):
    # more tasks than DRIVER_REDUCE_MAX: the pairwise tree runs as combine tasks on workers,
    # and must be the local engine's tree exactly (float32 sums are order-dependent)
    n = dask_adapter.DRIVER_REDUCE_MAX + 5
    params = np.linspace(-1, 1, 4096, dtype=np.float32)
    tasks = list(range(n))
    got = executor.map_reduce(_scaled, tasks, _add_arrays, shared=params,
                              affinity=[i % executor.n_workers for i in tasks])
    want = tree_combine([_scaled(t, params) for t in tasks], _add_arrays)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    few = executor.map_reduce(_scaled, tasks[:3], _add_arrays, shared=params)
    assert np.array_equal(few, tree_combine([_scaled(t, params) for t in tasks[:3]], _add_arrays))


def test_abandoned_iterator_leaves_the_engine_usable(executor):
    it = executor.map_unordered(probe, [{"value": i, "sleep": 0.2} for i in range(6)])
    next(it)
    it.close()
    assert dict(executor.map_unordered(probe, [3]))[0]["value"] == 3


def test_given_client_is_never_closed(executor):
    with Client(executor.client.scheduler.address, set_as_default=False) as client:
        with DaskExecutor(client=client) as ex:
            assert ex.client is client
            assert dict(ex.map_unordered(probe, [1]))[0]["value"] == 1
        ex.close()  # idempotent
        assert client.status == "running"
        assert client.submit(abs, -4).result() == 4
    # the executor's own client and cluster are untouched too
    assert dict(executor.map_unordered(probe, [2]))[0]["value"] == 2


def test_address_executor_leaves_the_deployment_running(deployment):
    from deeptransfer.engines import get_executor

    # n_workers: wait for all (an earlier check killed one; its nanny may still restart it)
    ex = get_executor("dask", {"address": deployment.address, "n_workers": 3})
    assert isinstance(ex, DaskExecutor) and ex.n_workers == 3
    # the scheduler's HTTP server (health and metrics only, with --no-dashboard), on loopback
    assert ex.dashboard_link is None or ex.dashboard_link.startswith("http://127.0.0.1:")
    ex.close()
    with Client(deployment.address, set_as_default=False) as client:
        assert len(client.nthreads()) == 3


# -- a cluster this engine starts -----------------------------------------------------------------
def test_own_cluster_worker_environment():
    driver_env = dict(os.environ)
    with DaskExecutor(1, dashboard=True, env={"DEEPTRANSFER_TEST_VAR": "x"}) as ex:
        assert ex.dashboard_link and ex.dashboard_link.startswith("http://127.0.0.1:")
        (env,) = ex.client.run(_worker_env).values()
        (profiled,) = ex.client.run(_profiles).values()
    assert profiled is False, "Dask's sampling profiler must be off in clusters we start"
    assert env["initial"].get("OMP_NUM_THREADS") == "1"
    assert env["initial"].get("DEEPTRANSFER_TEST_VAR") == "x"
    if "GLIBC_TUNABLES" not in driver_env:
        # in the environment the process started with, where glibc read it (the malloc
        # settings' effect is checked by test_workers_reuse_freed_memory); glibc edits the
        # variable in place while parsing it, so only its first setting is still readable
        first = MALLOC_TUNABLES.split(":")[0]
        assert env["initial"].get("GLIBC_TUNABLES", "").startswith(first)
        assert "MALLOC_TRIM_THRESHOLD_" not in env["initial"]
    assert dict(os.environ) == driver_env, "starting the cluster changed the driver's environment"




# asked with a builtin: a function of this module would make the worker import this module
# (and with it torch and the core), whatever the engine did
_HAS_CORE = "'torch' in __import__('sys').modules and " \
            "'deeptransfer.featurization' in __import__('sys').modules"


def test_own_cluster_workers_import_the_core_before_the_first_job():
    # as the local engine's workers do: the import overlaps the driver's planning
    with DaskExecutor(1, dashboard=False) as ex:
        deadline = time.time() + 600  # a hang bound, not a speed limit
        while time.time() < deadline and not all(ex.client.run(eval, _HAS_CORE).values()):
            time.sleep(0.1)
        assert all(ex.client.run(eval, _HAS_CORE).values())
        assert dict(ex.map_unordered(probe, [5]))[0]["value"] == 5  # releases the warm-up

def _spy_on_relays(dask_scheduler):
    """Count the scheduler's scatter/gather requests (data relayed through the scheduler)."""
    dask_scheduler.dt_relayed = []
    for op in ("scatter", "gather"):
        def wrap(orig, op=op):
            async def handler(*args, **kwargs):
                dask_scheduler.dt_relayed.append(op)
                return await orig(*args, **kwargs)
            return handler
        dask_scheduler.handlers[op] = wrap(dask_scheduler.handlers[op])


def test_own_cluster_moves_data_without_the_scheduler():
    # the driver and the workers of a cluster we start share a machine: the broadcast
    # parameters and the partial results go between them directly, not relayed (and copied
    # twice more) through the scheduler; the scheduler only tracks where the data is
    big = np.arange(400_000, dtype=np.float32)  # scattered, not inlined
    with DaskExecutor(1, dashboard=False) as ex:
        ex.client.run_on_scheduler(_spy_on_relays)
        got = ex.map_reduce(_scaled, [1, 2, 3], _add_arrays, shared=big)
        relayed = ex.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.dt_relayed)
        # the same calls through a client that uses the scheduler (Dask's default) do show up
        with Client(ex.client.scheduler.address, set_as_default=False) as plain:
            plain.gather(plain.scatter([big]))
        both = ex.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.dt_relayed)
    assert np.array_equal(got, tree_combine([_scaled(t, big) for t in (1, 2, 3)], _add_arrays))
    assert relayed == [], relayed
    assert both == ["scatter", "gather"], "the spy did not see a relay it should have"


def test_a_restarted_worker_leaves_the_driver_environment_as_it_was():
    # the nannies of a LocalCluster live in the driver and set the workers' variables in
    # its environment to spawn them; after a restart they must be put back, or the driver
    # (and all it starts later) keeps OMP_NUM_THREADS=1, the workers' malloc settings...
    driver_env = dict(os.environ)
    with DaskExecutor(1, dashboard=False, env={"DEEPTRANSFER_TEST_VAR": "x"}) as ex:
        (pid,) = ex.worker_pids()
        assert dict(os.environ) == driver_env
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 600  # a hang bound, not a speed limit
        while time.time() < deadline:
            try:
                pids = ex.worker_pids()
            except OSError:  # the scheduler still lists the dead worker
                pids = []
            if pids and pids[0] != pid:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the nanny did not restart the killed worker within 600 s")
        (env,) = ex.client.run(_worker_env).values()
        assert env["initial"].get("DEEPTRANSFER_TEST_VAR") == "x"  # the new worker has it
        assert dict(os.environ) == driver_env, \
            {k: os.environ.get(k) for k in set(os.environ) ^ set(driver_env)}

def test_lost_shared_value_is_scattered_again(tmp_path):
    # one worker: the only copy of the scattered value dies with it
    big = np.ones(100_000, dtype=np.float32)
    marker = str(tmp_path / "died")
    with DaskExecutor(1, dashboard=False) as ex:
        tasks = [{"value": 0, "die_once": marker}, {"value": 1}]
        out = dict(ex.map_unordered(_probe_with_sum, tasks, shared=big))
    assert os.path.exists(marker)
    assert {i: r["value"] for i, r in out.items()} == {0: 0, 1: 1}
    assert all(r["shared_sum"] == 100_000 for r in out.values())


def test_task_pinned_to_a_worker_that_left_is_resubmitted(monkeypatch):
    # A pin no worker can serve: the task waits in the scheduler forever, as a training task
    # pinned to a killed worker once did. The driver notices the pinned worker is not in the
    # cluster and resubmits the task without its pin.
    monkeypatch.setattr(dask_adapter, "WATCH_S", 0.5)
    with DaskExecutor(1, dashboard=False) as ex:
        real = ex._slots()
        monkeypatch.setattr(DaskExecutor, "_loose_pins", False)
        monkeypatch.setattr(ex, "_slots", lambda: ["tcp://127.0.0.1:9"] + real)
        t0 = time.monotonic()
        total = ex.map_reduce(probe, [1, 2, 3, 4], add_values, affinity=[0, 1, 0, 1])
        assert time.monotonic() - t0 < 30
    assert (total["value"] if isinstance(total, dict) else total) == 10


def test_a_task_that_always_kills_its_worker_is_a_task_error():
    # the local engine's error for the same case, not distributed's KilledWorker
    from deeptransfer.errors import TaskError

    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with DaskExecutor(1, dashboard=False) as ex:
            with pytest.raises(TaskError, match="lost its worker"):
                list(ex.map_unordered(probe, [{"value": 0, "die": True}]))


@pytest.mark.parametrize("opts, match", [
    ({"n_workers": 0}, "n_workers"),
    ({"address": "tcp://127.0.0.1:1", "client": object()}, "not both"),
    ({"address": "tcp://127.0.0.1:1", "env": {"A": "1"}}, "apply only to a cluster it starts"),
    ({"retries": -1}, "retries"),
    ({"dashboard": "yes"}, "dashboard"),
    ({"profile": 1}, "profile"),
    ({"address": "tcp://127.0.0.1:1", "profile": True}, "apply only to a cluster it starts"),
])
def test_bad_options(opts, match):
    with pytest.raises(InvalidParameterError, match=match):
        DaskExecutor(**opts)


def test_unreachable_scheduler():
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(EngineUnavailableError, match="Cannot reach the Dask scheduler"):
            DaskExecutor(address="tcp://127.0.0.1:9")


# -- dask-cuda ------------------------------------------------------------------------------------
def test_dask_cuda_without_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dask_cuda(name, *args, **kwargs):
        if name == "dask_cuda" or name.startswith("dask_cuda."):
            raise ModuleNotFoundError("No module named 'dask_cuda'", name="dask_cuda")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "dask_cuda", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_dask_cuda)
    with pytest.raises(EngineUnavailableError, match=r"pip install 'deeptransfer\[cuda\]'"):
        DaskCudaExecutor()


def test_dask_cuda_without_a_gpu(monkeypatch):
    import types

    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kw: pytest.fail("must not start a cluster without a GPU")
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setattr(dask_adapter, "_has_nvidia_gpu", lambda: False)
    with pytest.raises(EngineUnavailableError, match="needs an NVIDIA GPU"):
        DaskCudaExecutor()


def test_dask_cuda_class():
    assert DaskCudaExecutor.name == "dask-cuda" and DaskCudaExecutor.default_device == "cuda"
    assert DaskExecutor.default_device == "cpu"


# -- steps used above (module level: workers import them by name) ---------------------------------
def _sum_shared(task, shared):
    return float(shared.sum()) + task


def _scaled(task, shared):
    return (shared * np.float32(1.0 + 0.1 * task)).astype(np.float32)


def _add_arrays(a, b):
    return a + b


def _probe_with_sum(task, shared):
    r = probe(task, None)
    r["shared_sum"] = float(shared.sum())
    return r


def _profiles(dask_worker=None) -> bool:
    return "profile" in dask_worker.periodic_callbacks


def _worker_env():
    with open("/proc/self/environ", "rb") as f:
        initial = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return {"initial": {k.decode(): v.decode(errors="replace") for k, v in initial.items()}}


_NUMBA_THREADS_AT_IMPORT = os.environ.get("NUMBA_NUM_THREADS")


def test_zz_driver_numba_threads_untouched_after_worker_restarts():
    """Runs last in this module: nannies that restarted killed workers must not have changed
    the driver's NUMBA_NUM_THREADS (numba refuses a change once its pool is up)."""
    assert os.environ.get("NUMBA_NUM_THREADS") == _NUMBA_THREADS_AT_IMPORT
