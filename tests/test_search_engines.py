"""The search's group tasks on real engines: local worker processes, Dask and Spark give the
results the in-process executor gives (a task's result is a function of its inputs)."""
from __future__ import annotations

import os
import shutil

import pytest

from deeptransfer.selection.curve import run_curve
from deeptransfer.selection.search import run_search
from deeptransfer.training import OptimizerConfig, TrainConfig
from test_train import SerialExecutor, make_store

SPACE = {"head": ["linear", "mlp"], "hidden": [8], "epochs": 3, "batch_norm": [False, True],
         "optimizer": ["adam"], "lr": {"log_uniform": [1e-3, 0.05]}}
KW = dict(trials=8, space=SPACE, seed=3, base=TrainConfig(batch_size_per_worker=8),
          progress=False, retrain=False)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("engine_blobs") / "features.zarr", n_train=96)


@pytest.fixture(scope="module")
def reference(blobs, tmp_path_factory):
    res = run_search(SerialExecutor(2), blobs, str(tmp_path_factory.mktemp("ref")), **KW)
    curve = run_curve(SerialExecutor(2), blobs, str(tmp_path_factory.mktemp("refc")),
                      sizes=[3, 10], repeats=2, progress=False, plot=False,
                      base=TrainConfig(epochs=2, batch_size_per_worker=8,
                                       optimizer=OptimizerConfig("adam", lr=0.01)))
    return res, curve


def _same(reference, ex, blobs, tmp_path):
    res = run_search(ex, blobs, str(tmp_path / "s"), **KW)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731
    assert strip(res.results) == strip(reference[0].results)
    curve = run_curve(ex, blobs, str(tmp_path / "c"), sizes=[3, 10], repeats=2, progress=False,
                      plot=False, base=TrainConfig(epochs=2, batch_size_per_worker=8,
                                                   optimizer=OptimizerConfig("adam", lr=0.01)))
    strip_c = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731
    assert strip_c(curve.runs) == strip_c(reference[1].runs)


def test_local_worker_processes(reference, blobs, tmp_path):
    from deeptransfer.adapters.local import LocalExecutor

    with LocalExecutor(2) as ex:
        _same(reference, ex, blobs, tmp_path)


@pytest.mark.dask
def test_dask(reference, blobs, tmp_path):
    pytest.importorskip("distributed")
    from deeptransfer.adapters.dask import DaskExecutor

    with DaskExecutor(2) as ex:
        _same(reference, ex, blobs, tmp_path)


@pytest.mark.spark
def test_spark(reference, blobs, tmp_path):
    pytest.importorskip("pyspark")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("the Spark engine needs Java")
    from deeptransfer.adapters.spark import SparkExecutor

    with SparkExecutor(2) as ex:
        _same(reference, ex, blobs, tmp_path)


class _KillAfterFirstResult:
    """The engine, with one of its worker processes killed once the first task of the search
    has come back (other tasks are running or queued then)."""

    def __init__(self, ex):
        self.ex, self.killed = ex, False
        self.n_workers = ex.n_workers

    def map_unordered(self, fn, tasks, **kw):
        for item in self.ex.map_unordered(fn, tasks, **kw):
            if not self.killed:
                import signal

                self.killed = True
                os.kill(self.ex.worker_pids()[-1], signal.SIGKILL)
            yield item


def test_a_worker_killed_during_the_search_changes_nothing(reference, blobs, tmp_path):
    from deeptransfer.adapters.local import LocalExecutor

    with LocalExecutor(2) as ex:
        killing = _KillAfterFirstResult(ex)
        res = run_search(killing, blobs, str(tmp_path / "s"), **KW)
        assert killing.killed
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731
    assert strip(res.results) == strip(reference[0].results)
