"""The Spark engine against the shipped engine checks, on local[3] and on a real cluster.

    .venv/bin/python -m pytest tests/test_engine_spark.py -q

The conformance suite (deeptransfer.testing: the probe checks, and the job checks: the local
engine's store row for row, the same head bit for bit, killed workers) runs twice: on
``local[3,4]`` (one JVM, three Python workers) and on ``local-cluster[2,1,1024]`` (a
standalone master and worker in the driver JVM, two executor JVMs with one core each; a
third, with its own Python worker loading the model, took this file from 294 s to 419 s on
a busy 2-core machine. The tree checks run with 3 workers on local[3], up to 40 tasks on both. One
session per master for the whole module; the fixture's teardown stops the session and the
driver JVM, and with it the cluster's JVMs, and checks that none is left. Last, the real
``spark-submit`` runs the CLI's featurize through adapters/spark_submit.py.
"""
from __future__ import annotations

import operator
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyspark")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("the Spark engine needs Java", allow_module_level=True)

from pyspark import cloudpickle  # noqa: E402

from deeptransfer.adapters.spark import SparkExecutor  # noqa: E402
from deeptransfer.diagnostics import add_values, probe  # noqa: E402
from deeptransfer.errors import EngineUnavailableError, InvalidParameterError  # noqa: E402
from deeptransfer.testing import engine_checks  # noqa: E402
from deeptransfer.testing.engine_checks import EngineChecks  # noqa: E402
from deeptransfer.testing.job_checks import EngineJobChecks  # noqa: E402
from engine_fixtures import job_manifest, local_head, local_store  # noqa: E402,F401 - fixtures

pytestmark = [pytest.mark.spark, pytest.mark.filterwarnings(
    "ignore:PySpark does not yet fully support pandas:FutureWarning")]

# Steps defined in test modules (which the workers cannot import) travel by value; the core's
# steps (deeptransfer.testing's included) travel by reference, as in production.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MASTERS = ["local", "local-cluster[2,1,1024]"]


@pytest.fixture(scope="module", params=MASTERS)
def executor(request):
    ex = SparkExecutor(3) if request.param == "local" else SparkExecutor(master=request.param)
    try:
        yield ex
    finally:
        jvms = _jvms_started_here()
        assert len(jvms) == (1 if request.param == "local" else 3), jvms  # driver (+ executors)
        ex.close()
        _assert_gone(jvms)


class TestSparkEngine(EngineChecks, EngineJobChecks):
    pass  # the shipped affinity check skips (supports_affinity is False): see below


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _jvms_started_here() -> list[int]:
    """The JVMs below this process: the driver, and a local-cluster's executors under it."""
    jvms = []
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "java":
                    jvms.append(pid)
        except OSError:
            pass
    return jvms


def _assert_gone(pids: list[int], timeout: float = 300.0) -> None:  # a hang bound
    import time

    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        time.sleep(0.2)
    assert not alive, f"JVMs outlived the session: {alive}"


# Spark cannot pin a task to one Python process: an executor hands each task to any of its
# idle Python workers, and local[N] is one executor with N of them. What this engine does
# guarantee: all tasks of one affinity slot run in one Spark task, so in one Python process,
# in a given round; and on executors with one core (the local-cluster case here, YARN with
# --executor-cores 1), the persisted anchor partition of a slot is scheduled back to the
# executor that cached it, so the slot stays in the same process from round to round.
def test_affinity_pins_tasks_to_workers(executor):
    n = executor.n_workers
    tasks = list(range(3 * n))
    affinity = [i % n for i in tasks]

    def pids_of_slots() -> dict[int, set]:
        res = executor.map_reduce(engine_checks.probe_list, tasks, operator.add,
                                  affinity=affinity)
        assert sorted(v for v, _ in res) == tasks
        pids: dict[int, set] = {}
        for value, pid in res:
            pids.setdefault(affinity[value], set()).add(pid)
        return pids

    rounds = [pids_of_slots() for _ in range(3)]
    for pids in rounds:
        assert sorted(pids) == list(range(n))
        for slot, procs in pids.items():
            assert len(procs) == 1, f"slot {slot} ran in several processes in one round: {procs}"
            assert os.getpid() not in procs
    if executor.master.startswith("local-cluster"):
        assert rounds[1] == rounds[2] == rounds[0], "a slot moved to another executor"


def test_map_unordered_yields_while_the_job_runs(executor, tmp_path):
    """The first result arrives before the slowest task has finished (progress bars): the
    second task waits until the test has seen the first result, so a job that yields only at
    its end never finishes (pytest-timeout) -- an order of events, not a race against a clock."""
    go = tmp_path / "go"
    it = executor.map_unordered(probe, [{"value": 0}, {"value": 1, "wait_for": str(go)}])
    i, first = next(it)
    assert first["value"] == 0
    go.write_text("")
    rest = list(it)
    assert [r["value"] for _, r in rest] == [1]


def test_abandoned_iterator_cancels_the_job(executor):
    it = executor.map_unordered(probe, [{"value": 0}] + [{"value": i, "sleep": 30} for i in (1, 2)])
    assert next(it)[1]["value"] == 0
    it.close()  # must not wait 30 s for the sleeping tasks
    assert dict(executor.map_unordered(probe, [7]))[0]["value"] == 7



def test_jobs_leave_no_accumulators_registered(executor):
    # results come back through one accumulator per job; a training run has one job per
    # round, so each must leave pyspark's driver-wide registry when its job is done
    from pyspark.accumulators import _accumulatorRegistry

    before = len(_accumulatorRegistry)
    for k in range(5):
        assert dict(executor.map_unordered(probe, [{"value": k}, {"value": k + 1}]))[1]["value"] == k + 1
    it = executor.map_unordered(probe, [{"value": 0}] + [{"value": 1, "sleep": 30}])
    next(it)
    it.close()  # an abandoned job too
    assert len(_accumulatorRegistry) == before

def test_map_reduce_tree_of_many_partitions(executor):
    """More partitions than depth**2: treeAggregate adds a shuffle level, same total."""
    tasks = list(range(1, 41))
    assert executor.map_reduce(probe, tasks, add_values, shared={"w": 1}) == sum(tasks)


def test_empty_task_list(executor):
    assert list(executor.map_unordered(probe, [])) == []
    with pytest.raises(InvalidParameterError):
        executor.map_reduce(probe, [], add_values)


def test_map_reduce_error_surfaces(executor):
    with pytest.raises(Exception, match="failed on purpose"):
        executor.map_reduce(probe, [{"value": 1}, {"value": 2, "fail": True}], add_values)
    assert executor.map_reduce(probe, [1, 2], add_values) == 3


# -- without a session ---------------------------------------------------------------------------
def test_no_java_is_one_clear_error(monkeypatch, tmp_path):
    from pyspark import SparkContext

    monkeypatch.setattr(SparkContext, "_gateway", None)  # as if no JVM had started yet
    monkeypatch.setattr(SparkContext, "_active_spark_context", None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineUnavailableError, match="Java 17 or 21 runtime"):
        SparkExecutor(1)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    with pytest.raises(EngineUnavailableError, match="has no bin/java"):
        SparkExecutor(1)


@pytest.mark.parametrize("kwargs", [
    {"n_workers": 0}, {"tree_depth": 0}, {"max_failures": 0}, {"storage_level": "RAM"},
    {"master": ""}, {"session": "mine"}, {"session": "active", "master": "yarn"},
    {"n_workers": 2, "master": "local[2]"}, {"ui": "yes"}, {"conf": ["a"]},
])
def test_bad_options(kwargs):
    with pytest.raises(InvalidParameterError):
        SparkExecutor(**kwargs)


def test_engine_selector_builds_the_spark_engine():
    from deeptransfer.engines import get_executor

    # a bad option is reported before any JVM starts
    with pytest.raises(InvalidParameterError, match="tree_depth"):
        get_executor("spark", {"n_workers": 2, "tree_depth": 0})
    with pytest.raises(InvalidParameterError, match="Bad option"):
        get_executor("spark", {"workers": 2})


def test_spark_submit_entry_script_is_standalone():
    """spark-submit runs the file by path: it must not need the package layout to start."""
    from deeptransfer.adapters import spark_submit

    src = open(spark_submit.__file__).read()
    assert "from deeptransfer" in src and "__main__" in src
    out = subprocess.run([sys.executable, spark_submit.__file__, "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "spark-submit" in out.stdout


@pytest.mark.slow
def test_spark_submit_runs_featurize_on_its_session(tmp_path):
    """`spark-submit $(python -m deeptransfer spark-entry) featurize ...`, as deploy/spark.md says."""
    import json

    from PIL import Image
    from pyspark.find_spark_home import _find_spark_home

    entry = subprocess.run([sys.executable, "-m", "deeptransfer", "spark-entry"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.isfile(entry) and entry.endswith("spark_submit.py")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / cls / f"{k}.jpg")
    store = tmp_path / "features.zarr"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               SPARK_LOCAL_IP="127.0.0.1")
    cmd = [os.path.join(_find_spark_home(), "bin", "spark-submit"), "--master", "local[1]",
           "--conf", "spark.ui.enabled=false", entry,
           "featurize", str(tmp_path / "photos"), str(store), "--chunk-rows", "2", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["engine"] == "spark" and report["featurized"] == 4


def test_spark_submit_adds_the_spark_engine_only_where_a_command_takes_one():
    from deeptransfer.adapters.spark_submit import with_spark_engine
    from deeptransfer.cli import ENGINE_COMMANDS, _parser

    assert with_spark_engine(["featurize", "in", "out"]) == ["featurize", "in", "out",
                                                            "--engine", "spark"]
    assert with_spark_engine(["train", "f.zarr", "m", "--engine=dask"])[-1] == "--engine=dask"
    assert with_spark_engine(["info", "f.zarr"]) == ["info", "f.zarr"]
    # the list is the CLI's own: every engine command parses --engine, the others refuse it
    positional = {"featurize": ["d", "s"], "train": ["s", "m"], "evaluate": ["m", "s"],
                  "demo": [], "report": ["m", "s"], "search": ["s", "o"],
                  "curve": ["s", "o", "--sizes", "5"]}
    assert set(ENGINE_COMMANDS) == set(positional)
    for cmd, args in positional.items():
        assert _parser().parse_args([cmd, *args, "--engine", "spark"]).engine == "spark"
    with pytest.raises(SystemExit):
        _parser().parse_args(["info", "f.zarr", "--engine", "spark"])
