"""The Spark engine: the core's steps on a SparkContext (local[N], local-cluster, YARN, standalone).

    with SparkExecutor(2) as ex:                     # local[2,4]: 2 Python workers, 4 attempts
        dt.featurize("photos/", "f.zarr", engine=ex)
    SparkExecutor(master="yarn")                     # a new session for a cluster master
    SparkExecutor(session=spark)                     # an existing session, never stopped here

map_unordered is ``sc.parallelize(tasks, one slice per task)`` + ``foreachPartition``; each
task's result travels back to the driver through an accumulator, whose update Spark merges
on the driver as soon as that task succeeds (once per partition, never for a failed or
duplicate attempt), so results are yielded while the job still runs and progress bars move.

map_reduce is Deeplearning4j's ParameterAveragingTrainingMaster on Spark: ``sc.broadcast``
the parameters, ``mapPartitions`` of the step over one partition per task, a tree
aggregation with the core's ``combine`` (``tree_aggregate``: the levels of
``RDD.treeAggregate(depth=tree_depth)``), then the core divides. Where we differ from
``treeAggregate``: it merges partitions ``i % k`` together, so the order of the sums depends
on the partitioning; ``tree_aggregate`` merges runs of adjacent partitions and builds
exactly the core's pairwise tree (``tree_plan``, the local engine's ``tree_combine``), so the
float sums happen in the same order and the same seed gives the same head bit for bit on
every engine (ARCHITECTURE.md, rule 2), at the same cost.
With ``affinity``, a slot's tasks run in one partition of a persisted "anchor" RDD with one
partition per worker slot: the slot's tasks run one after another in one Python process each
round, and Spark's cache locality sends the partition back to the executor that cached it in
the previous rounds (a Python process when executors have one core, as on YARN with
``--executor-cores 1``), so the worker's shard cache is hit. Spark cannot pin a partition to
one of several Python processes inside one executor (local[N] is one executor): there a
slot's tasks share a process within a round, not across rounds.

Faults: a failed attempt (an exception, a Python worker that died, a lost executor) is run
again by Spark up to ``max_failures`` times (``local[N,F]`` in local mode, otherwise
``spark.task.maxFailures``); the core's steps are idempotent. A task that fails every
attempt raises ``TaskError`` with the Python exception of the last attempt.
"""
from __future__ import annotations

import gc
import math
import os
import queue
import re
import shutil
import sys
import uuid
from typing import Any, Callable, Iterator, Mapping, Sequence

from pyspark import SparkContext, StorageLevel
from pyspark.accumulators import AccumulatorParam, _accumulatorRegistry
from pyspark.sql import SparkSession

from deeptransfer.executor import Executor, PairwiseTree
from deeptransfer.workerenv import ENV_LOCK, malloc_environ, preserved_environ
from deeptransfer.errors import TaskError
from deeptransfer.errors import (EngineUnavailableError, InvalidParameterError, check_choice,
                                 check_int)

#: set by adapters/spark_submit.py: ``engine="spark"`` then uses the session spark-submit
#: configured (``SparkSession.builder.getOrCreate()``) instead of starting local[N]
SESSION_ENV = "DEEPTRANSFER_SPARK_SESSION"

#: ``spark.task.maxDirectResultSize`` of a session this engine starts (see ``_start``)
DIRECT_RESULT_SIZE = "64m"

STORAGE_LEVELS = ("MEMORY_ONLY", "MEMORY_ONLY_2", "MEMORY_AND_DISK", "MEMORY_AND_DISK_2",
                  "DISK_ONLY", "DISK_ONLY_2", "OFF_HEAP")

_LOCAL = re.compile(r"^local(?:\[(\*|\d+)(?:\s*,\s*(\d+))?\])?$")
_LOCAL_CLUSTER = re.compile(r"^local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]$")


def check_java() -> None:
    """Raise EngineUnavailableError unless a ``java`` that spark-submit will use exists."""
    home = os.environ.get("JAVA_HOME")
    if home:
        if not os.path.exists(os.path.join(home, "bin", "java")):
            raise EngineUnavailableError(
                f"The Spark engine needs Java, but JAVA_HOME={home} has no bin/java: point "
                "JAVA_HOME at a Java 17 or 21 runtime, or unset it to use the `java` on PATH.")
        return
    if shutil.which("java") is None:
        raise EngineUnavailableError(
            "The Spark engine needs a Java 17 or 21 runtime and found none: install one "
            "(e.g. `apt install openjdk-17-jre-headless`) and put `java` on PATH or set JAVA_HOME.")


class _Results(AccumulatorParam):
    """An accumulator that carries task results to the driver, one update per task.

    On a worker it is a list; on the driver ``addInPlace`` is called (by pyspark's
    accumulator server, as Spark merges each successful task) and hands the task's results
    to ``sink`` instead of keeping them.
    """

    def __init__(self, sink: "Callable[[list], None] | None" = None):
        self.sink = sink

    def __getstate__(self) -> dict:
        return {"sink": None}  # the driver's queue stays on the driver

    def zero(self, value: list) -> list:
        return []

    def addInPlace(self, value1: list, value2: list) -> list:
        if self.sink is not None:
            self.sink(value2)
            return value1
        return value1 + value2


class SparkExecutor(Executor):
    """Run the core's steps as Spark jobs.

    ``n_workers``: local[N] with no master (default: the cores here); with a YARN or
    Kubernetes master, ``spark.executor.instances``; with ``session=``, the worker slots
    affinity spreads over (default: ``sc.defaultParallelism``). ``master``: a Spark master
    URL (``yarn``, ``spark://host:7077``, ``local-cluster[2,1,1024]``, ...) for a new session.
    ``session``: an existing SparkSession (or ``"active"``: the one spark-submit configured),
    used as is and never stopped here. ``tree_depth``: depth of map_reduce's tree aggregation.
    ``max_failures``: attempts per task (local[N,F] and ``spark.task.maxFailures``).
    ``storage_level``: how the persisted anchor RDD of pinned map_reduce rounds is kept.
    ``conf``: extra Spark settings for a new session (they win over this class's defaults).
    """

    name = "spark"
    #: a slot's tasks share one Python process within a map_reduce round, and stay in it
    #: across rounds only on one-core executors (see the module docstring): not a pin
    supports_affinity = False

    def __init__(self, n_workers: int | None = None, *, master: str | None = None,
                 session: "SparkSession | str | None" = None, ui: bool = False,
                 tree_depth: int = 2, max_failures: int = 4, storage_level: str = "MEMORY_ONLY",
                 conf: Mapping[str, Any] | None = None):
        where = "the spark engine"
        if n_workers is not None:
            check_int("workers", n_workers, low=1, where=where)
        self.tree_depth = check_int("tree_depth", tree_depth, low=1, where=where)
        self.max_failures = check_int("max_failures", max_failures, low=1, where=where)
        self.storage_level = check_choice("storage_level", storage_level, STORAGE_LEVELS,
                                          where=where)
        if not isinstance(ui, bool):
            raise InvalidParameterError(
                f"The 'ui' parameter of {where} must be a bool. Got {ui!r} instead.")
        if conf is not None and not isinstance(conf, Mapping):
            raise InvalidParameterError(
                f"The 'conf' parameter of {where} must be a mapping of Spark settings. "
                f"Got {conf!r} instead.")
        if master is not None and not (isinstance(master, str) and master):
            raise InvalidParameterError(
                f"The 'master' parameter of {where} must be a Spark master URL such as 'yarn' "
                f"or 'spark://host:7077'. Got {master!r} instead.")
        if master is not None and n_workers is not None and _slots_of(master) is not None:
            raise InvalidParameterError(
                f"The master {master!r} already says how many workers run: leave out "
                "n_workers (--workers), or give no master and n_workers alone.")
        if session is None and master is None and os.environ.get(SESSION_ENV) == "active":
            session = "active"
        if session is not None and (master is not None or conf):
            raise InvalidParameterError(
                "Give either session= (an existing SparkSession) or master=/conf= (to start "
                "a new one), not both.")
        self._closed = False
        self._anchor: Any = None
        self._anchor_slots = 0
        self._owns_gateway = False
        if session is not None:
            if isinstance(session, str):
                if session != "active":
                    raise InvalidParameterError(
                        f"The 'session' parameter of {where} must be a SparkSession or "
                        f"'active'. Got {session!r} instead.")
                session = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
            elif not isinstance(session, SparkSession):
                raise InvalidParameterError(
                    f"The 'session' parameter of {where} must be a SparkSession or 'active'. "
                    f"Got {type(session).__name__} instead.")
            self.session = session
            self._owns_session = False
            sc = session.sparkContext
            self.master = sc.master
            self.n_workers = n_workers or _slots_of(sc.master) or sc.defaultParallelism
            return
        self.session, self.master, self.n_workers = self._start(n_workers, master, ui,
                                                                dict(conf or {}))
        self._owns_session = True

    # -- lifecycle ----------------------------------------------------------------------------
    def _start(self, n_workers: int | None, master: str | None, ui: bool,
               conf: dict[str, Any]) -> tuple[SparkSession, str, int]:
        if SparkContext._active_spark_context is not None:
            running = SparkContext._active_spark_context.master
            raise InvalidParameterError(
                f"A SparkContext ({running}) is already running in this process, and Spark "
                "allows one: pass it as SparkExecutor(session=spark), or stop it first.")
        if master is None:
            n = n_workers or os.cpu_count() or 1
            master = f"local[{n},{self.max_failures}]"
        local = master.startswith("local")
        settings: dict[str, Any] = {
            "spark.app.name": "deeptransfer",
            "spark.ui.enabled": "true" if ui else "false",
            "spark.ui.showConsoleProgress": "false",  # it would fight our progress bars
            "spark.python.worker.reuse": "true",  # per-process model/shard caches survive
            "spark.task.maxFailures": str(self.max_failures),
            # a training round's result (a worker's parameters and optimizer state, 13.7 MB
            # for a fine-tuned suffix) goes back to the driver in the task's own message
            # rather than through the block manager, one fetch fewer per result (default
            # 1 MB; capped by spark.rpc.message.maxSize, 128 MB): beyond compute 356 vs
            # 520-654 ms per suffix round here (benchmarks/rounds.py --suffix, loaded machine)
            "spark.task.maxDirectResultSize": DIRECT_RESULT_SIZE,
        }
        settings.update(worker_malloc_conf(conf.__contains__))
        if local:
            settings["spark.driver.host"] = "127.0.0.1"
            settings["spark.driver.bindAddress"] = "127.0.0.1"
        if master.startswith("local-cluster"):
            # the first job waits until every executor has registered (standalone default: 0)
            settings["spark.scheduler.minRegisteredResourcesRatio"] = "1.0"
        if n_workers is not None and not local:
            settings["spark.executor.instances"] = str(n_workers)
        settings.update(quiet_log_conf(conf.__contains__))
        settings.update({k: str(v) for k, v in conf.items()})
        if SparkContext._gateway is None:
            check_java()
            self._owns_gateway = True
        builder = SparkSession.builder.master(master)
        for k, v in settings.items():
            builder = builder.config(k, v)
        # Read when the JVM and the context start (the JVM's address, the workers'
        # interpreter), then restored: a later engine in this process, e.g. one for a YARN
        # master, must not inherit the loopback address.
        keys = ["SPARK_LOCAL_IP", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"]
        with ENV_LOCK, preserved_environ(keys):
            if local:
                os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
            session = builder.getOrCreate()
        session.sparkContext.setLogLevel("ERROR")
        sc = session.sparkContext
        return session, master, n_workers or _slots_of(master) or sc.defaultParallelism

    def close(self) -> None:
        """Stop the session (and the JVMs) this executor started; a passed session stays."""
        if self._closed:
            return
        self._closed = True
        if self._anchor is not None:
            try:
                self._anchor.unpersist()
            except Exception:
                pass
            self._anchor = None
        if not self._owns_session:
            return
        self.session.stop()
        if self._owns_gateway:
            _stop_gateway()


    def __repr__(self) -> str:
        return f"SparkExecutor(master={self.master!r}, n_workers={self.n_workers})"

    @property
    def sc(self) -> SparkContext:
        if self._closed:
            raise RuntimeError("This SparkExecutor is closed.")
        return self.session.sparkContext

    def worker_pids(self) -> list[int]:
        """Process ids of the Python workers on this machine (local masters; tests kill them).

        Workers start with the first job and are reused after it; on a cluster they run on
        other machines and this list is empty.
        """
        proc = getattr(SparkContext._gateway, "proc", None)
        if proc is None or not os.path.isdir("/proc"):
            return []
        return _python_workers(proc.pid)

    # -- the primitives -----------------------------------------------------------------------
    def map_unordered(self, fn: Callable[..., Any], tasks: Sequence[Any], *,
                      shared: Any = None,
                      affinity: Sequence[int] | None = None) -> Iterator[tuple[int, Any]]:
        """One Spark task per task; results are yielded as each task succeeds.

        Results reach the driver the way ``collect`` results do (inside the task's result,
        under ``spark.driver.maxResultSize``): return summaries, not bulk data. ``affinity``
        is ignored here (Spark places each task itself); map_reduce honours it per round.
        """
        return self._stream(fn, list(tasks), shared)

    def _stream(self, fn: Callable[..., Any], tasks: list[Any],
                shared: Any) -> Iterator[tuple[int, Any]]:
        if not tasks:
            return
        sc = self.sc
        arrived: "queue.Queue[Any]" = queue.Queue()
        done = object()
        sink = _Results(arrived.put)
        acc = sc.accumulator([], sink)
        bshared = sc.broadcast(shared) if shared is not None else None
        rdd = sc.parallelize(list(enumerate(tasks)), numSlices=len(tasks))

        def run_partition(items: Iterator[tuple[int, Any]]) -> None:
            value = bshared.value if bshared is not None else None
            acc.add([(i, _run_task(fn, task, value)) for i, task in items])

        group = f"deeptransfer-{uuid.uuid4().hex[:12]}"
        failure: list[BaseException] = []

        def job() -> None:
            try:
                sc.setJobGroup(group, f"deeptransfer {_name(fn)}: {len(tasks)} tasks",
                               interruptOnCancel=True)
                rdd.foreachPartition(run_partition)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
            finally:
                arrived.put(done)

        from pyspark import InheritableThread

        thread = InheritableThread(target=job, daemon=True, session=self.session)
        thread.start()
        seen: set[int] = set()
        finished = False
        try:
            while True:
                batch = arrived.get()
                if batch is done:
                    finished = True
                    break
                for i, result in batch:
                    if i not in seen:  # Spark merges a partition once; this is a second guard
                        seen.add(i)
                        yield i, result
            if failure:
                raise _task_error(failure[0], self.max_failures) from None
        finally:
            if not finished:  # the caller stopped iterating, or an error: stop the job
                sc.cancelJobGroup(group)
                thread.join()
            sink.sink = None  # a late update (there should be none) is dropped
            # pyspark keeps every accumulator in a module-level registry for the driver's
            # lifetime; a training run makes one per round. Updates for an id no longer
            # there are skipped by pyspark's accumulator server.
            _accumulatorRegistry.pop(acc.aid, None)
            if bshared is not None:
                _destroy(bshared)

    def map_reduce(self, fn: Callable[..., Any], tasks: Sequence[Any],
                   combine: Callable[[Any, Any], Any], *, shared: Any = None,
                   affinity: Sequence[int] | None = None) -> Any:
        tasks = self.check_map_reduce(tasks, affinity)
        sc = self.sc
        bshared = sc.broadcast(shared) if shared is not None else None
        if affinity is None:
            def run_partition(items: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
                value = bshared.value if bshared is not None else None
                for i, task in items:
                    yield i, _run_task(fn, task, value)

            mapped = sc.parallelize(list(enumerate(tasks)), numSlices=len(tasks)) \
                .mapPartitions(run_partition)
        else:
            n = self.n_workers
            by_slot: list[list[tuple[int, Any]]] = [[] for _ in range(n)]
            for i, task in enumerate(tasks):
                by_slot[int(affinity[i]) % n].append((i, task))

            def run_slot(slot: int, anchor: Iterator[Any]) -> Iterator[tuple[int, Any]]:
                for _ in anchor:  # read the input to its end, or the worker is not reused
                    pass
                value = bshared.value if bshared is not None else None
                for i, task in by_slot[slot]:
                    yield i, _run_task(fn, task, value)

            mapped = self._anchor_rdd(n).mapPartitionsWithIndex(run_slot)
        sc.setJobDescription(f"deeptransfer {_name(fn)}: {len(tasks)} tasks")  # the UI's name
        try:
            return tree_aggregate(mapped, len(tasks), combine, depth=self.tree_depth)
        except Exception as exc:
            raise _task_error(exc, self.max_failures) from None
        finally:
            sc.setJobDescription(None)  # type: ignore[arg-type]
            if bshared is not None:
                _destroy(bshared)

    def _anchor_rdd(self, slots: int) -> Any:
        """The persisted RDD with one partition per worker slot that pinned rounds run on."""
        if self._anchor is None or self._anchor_slots != slots:
            if self._anchor is not None:
                self._anchor.unpersist()
            rdd = self.sc.parallelize(range(slots), numSlices=slots)
            rdd.persist(getattr(StorageLevel, self.storage_level))
            rdd.count()  # cache it now, spread over the executors, before the first round
            self._anchor, self._anchor_slots = rdd, slots
        return self._anchor


#: the driver's Log4j 2 settings: errors only (no start-up INFO lines, no native-hadoop warning)
LOG4J2_PROPERTIES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "spark-log4j2.properties")



def quiet_log_conf(is_set: Callable[[str], bool]) -> dict[str, str]:
    """Settings that keep Spark's own log lines below ERROR off the user's terminal.

    Read when spark-submit launches the driver JVM, i.e. before Log4j starts (setLogLevel
    comes too late for the start-up lines). Left out when the user configures the driver's
    Java options or has a log4j2.properties in SPARK_CONF_DIR.
    """
    conf_dir = os.environ.get("SPARK_CONF_DIR")
    if is_set("spark.driver.extraJavaOptions") or (
            conf_dir and os.path.exists(os.path.join(conf_dir, "log4j2.properties"))):
        return {}
    return {"spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{LOG4J2_PROPERTIES}"}


def worker_malloc_conf(is_set: Callable[[str], bool]) -> dict[str, str]:
    """``spark.executorEnv.*`` settings that give the Python workers glibc's malloc settings
    (``deeptransfer.workerenv``; Spark passes executorEnv to them, in local mode too), except
    where ``is_set(key)`` says the user's configuration already has that key."""
    out = {}
    for k, v in malloc_environ().items():
        key = f"spark.executorEnv.{k}"
        if not is_set(key):
            out[key] = v
    return out


#: the steps whose first run in this Python worker has been followed by a gc.freeze()
_settled: set[str] = set()


def _run_task(fn: Callable[..., Any], task: Any, value: Any) -> Any:
    """Run one task in a Spark Python worker; settle the heap after a step's first run.

    A reused PySpark worker runs ``gc.collect()`` after every task, and a full collection
    walks every object the process holds: torch, numba, zarr and pyspark's modules, the
    cached model. That took ~95 ms per task here (a training round is ~10 ms of compute).
    The first time a process runs a step, what it built (imports, the model, the store
    handle, the training shard) lives as long as the process, so it is collected once and
    then frozen out of later collections (``gc.freeze``, as pre-forking servers do). Only
    the first run per step is frozen, so garbage that later tasks leave is still collected.
    """
    result = fn(task, value)
    name = f"{getattr(fn, '__module__', '')}.{_name(fn)}"
    if name not in _settled:
        _settled.add(name)
        gc.collect()
        gc.freeze()
    return result


def _identity(key: int) -> int:
    return key


def tree_aggregate(pairs: Any, n: int, combine: Callable[[Any, Any], Any], *,
                   depth: int = 2) -> Any:
    """Spark's treeAggregate over an RDD of ``(task index, result)``, along the core's tree_plan.

    The levels are those of ``RDD.treeAggregate(depth=...)``, but a level merges runs of
    ``scale`` adjacent partitions (a power of two) where Spark's merges partitions ``i``
    and ``i + k * n_parts`` (``i % n_parts``), so that each run is a whole subtree of the
    plan and its combines happen on the executors; the driver merges the last few partial
    aggregates. The order of the combines comes from the core's ``PairwiseTree`` (any
    grouping gives tree_combine's calls); the runs only decide where they happen.
    """
    tree = PairwiseTree(n, combine)
    parts = pairs.mapPartitions(tree.fold)
    n_parts = parts.getNumPartitions()
    scale = 2 ** max(1, math.ceil(math.log2(max(n_parts, 2)) / depth))
    while n_parts > scale + n_parts / scale:
        n_parts = -(-n_parts // scale)

        def to_run(i: int, it: Iterator[dict], scale: int = scale) -> Iterator[tuple[int, dict]]:
            for nodes in it:
                yield i // scale, nodes

        parts = parts.mapPartitionsWithIndex(to_run) \
            .reduceByKey(tree.merge, numPartitions=n_parts, partitionFunc=_identity).values()
    return tree.root(parts.reduce(tree.merge))


def _python_workers(root_pid: int) -> list[int]:
    """Spark's Python worker processes below ``root_pid`` on this machine (Linux /proc)."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            todo.append(c)
            is_daemon_child = "pyspark.daemon" in cmd.get(pid, "")
            if is_daemon_child or ("pyspark.worker" in cmd.get(c, "")
                                   and "pyspark.daemon" not in cmd.get(c, "")):
                out.append(c)
    return sorted(out)


def _slots_of(master: str) -> int | None:
    """Worker slots a local master URL gives (None: ask the running context)."""
    m = _LOCAL.match(master)
    if m:
        n = m.group(1)
        return (os.cpu_count() or 1) if n in (None, "*") else int(n)
    m = _LOCAL_CLUSTER.match(master)
    if m:
        return int(m.group(1)) * int(m.group(2))
    return None


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _destroy(b: Any) -> None:
    try:
        b.destroy()
    except Exception:  # the context may be gone already (a cancelled job, a stopped session)
        pass


def _task_error(exc: BaseException, attempts: int) -> BaseException:
    """A TaskError naming the Python error of the last failed attempt; ``exc`` if none is found.

    Spark reports a failed job as a JVM exception whose text holds the Python traceback of
    the last attempt (or the news that its Python worker died) amid JVM stack frames.
    """
    text = str(exc)
    m = re.search(r"failed (\d+) times", text)
    tries = m.group(1) if m else str(attempts)
    start = text.find("Traceback (most recent call last)")
    if start >= 0:
        # the Python part ends where the JVM stack trace resumes
        tb = re.split(r"\n\s+at [\w$.]+\(", text[start:], maxsplit=1)[0].rstrip()
        lines = [ln.strip() for ln in tb.splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if not ln.startswith("SQLSTATE")), "")
        return TaskError(f"A Spark task failed {tries} times; last error: {last}\n{tb}")
    m = re.search(r"Python worker exited unexpectedly[^\n.]*", text)
    if m:
        return TaskError(f"A Spark task failed {tries} times; last error: {m.group(0)} "
                         "(killed, out of memory, or a crash in native code?)")
    return exc


def _stop_gateway() -> None:
    """End the driver JVM pyspark launched, so the next session starts a fresh one."""
    gw = SparkContext._gateway
    if gw is None:
        return
    proc = getattr(gw, "proc", None)
    try:
        gw.shutdown()
    except Exception:
        pass
    if proc is not None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the JVM exits when its stdin closes
            proc.wait(timeout=15)
        except Exception:
            proc.kill()
            proc.wait(timeout=5)
    SparkContext._gateway = None
    SparkContext._jvm = None
