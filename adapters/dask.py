"""The Dask engine: the core's steps on a ``dask.distributed`` cluster, local or remote.

    DaskExecutor(2)                                # a LocalCluster on 127.0.0.1, 2 processes
    DaskExecutor(address="tcp://10.0.0.1:8786")    # an existing deployment (deploy/dask.md)
    DaskExecutor(client=my_client)                 # your Client; left open on close()
    DaskCudaExecutor()                             # dask-cuda: one worker per GPU

Only scheduling lives here; the steps are the core's (``featurize_chunk``, ``fit_shard``),
so a Dask run writes the same store and trains the same head as a local one.

How the primitives map onto Dask, and why (measured with a 1280 x 257 float32 head, 2
workers, on a busy shared 2-core machine: a parameter-averaging round costs about 30 ms
beyond the workers' compute, the local engine's about 15 ms; see benchmarks/rounds.py, and
DRIVER_REDUCE_MAX for the reduction):

- in a cluster this engine starts, the client sends and fetches data to and from the
  workers directly (``direct_to_workers``) instead of through the scheduler, which would
  receive and resend every byte: 3.9 MB out and back per worker per round with Adam's state,
  about 10 ms a round less. For an existing deployment Dask's own setting applies
  (``distributed.client.direct-to-workers``, off by default because a client outside the
  cluster's network may not reach the workers; deploy/dask.md).

- one task per item, ``pure=False`` (a rerun must run again), ``retries`` for exceptions;
  a worker that dies is noticed by the scheduler, its nanny starts a new one, and the
  scheduler reruns the lost tasks (core steps are idempotent).
- ``shared``: a value whose pickle is small next to the task count is passed inline (it is
  then recomputable like any task argument); a large one (the head's parameters, about 1.3 MB
  a round) is scattered once per job with ``broadcast=True``, so it is neither pickled into
  the graph once per task nor fetched by every task from one worker (with 2 tasks a round
  that costs about 4 ms more than inline; it does not grow with the tasks). Scattered data
  cannot be recomputed: if every copy is lost with its workers, the job scatters it again and
  resubmits the tasks that lost it.
- a job's futures are released when the next job is submitted, not when it ends: the client
  batches its messages to the scheduler at least 10 ms apart, and a release sent at the end of
  a round can hold back the next round's graph (2 probe tasks a round: 20 ms instead of 22).
- ``affinity``: slot ``k`` is the k-th worker ordered by name (LocalCluster names workers
  0..n-1 and a restarted worker keeps its name, so only the dead slot's cache is lost), with
  ``allow_other_workers=True`` so a task whose worker is gone still runs elsewhere. Dask's
  work stealing may still move a queued pinned task to an idle worker: affinity is a cache
  hint, and no result depends on it.
- ``map_reduce``: for a few partial results the driver gathers them and combines them with
  ``tree_combine`` (fewer scheduler round trips); for many, ``tree_combine`` with a combine
  that submits a combine task builds the same tree as a graph on the workers, so the driver
  receives one result. Either way the tree is the core's ``tree_plan``, the local engine's:
  the same floating-point sums.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import dask
from distributed import Client, Future, KilledWorker, LocalCluster, Nanny, as_completed

from deeptransfer.diagnostics import warm_up
from deeptransfer.executor import Executor, tree_combine
from deeptransfer.errors import (EngineUnavailableError, InvalidParameterError, TaskError,
                                 check_int)
from deeptransfer.workerenv import (ENV_LOCK, malloc_environ, preserved_environ, restore_environ,
                                    thread_environ)

#: ``shared`` values whose pickle, times the number of tasks, stays under this many bytes go
#: inline with every task (cheapest); larger ones are scattered to the workers once per job.
INLINE_SHARED_BYTES = 256 * 1024
#: ``map_reduce`` combines on the driver up to this many partial results, on workers above.
#: Measured (1280 x 257 float32 results, 2 workers, one 2-core machine, median round):
#: driver / worker tree 28 / 43 ms for 2 tasks, 36 / 51 for 4, 73 / 87 for 8, 234 / 371 for
#: 32 -- on one machine the tree only adds scheduler hops. It pays where the driver's network
#: link is the limit: with hundreds of workers the driver would receive hundreds of results
#: a round, the tree log2(n) levels of one transfer each.
DRIVER_REDUCE_MAX = 32
#: how long to wait for workers of an existing deployment before giving up (seconds)
WAIT_FOR_WORKERS_S = 60.0
#: seconds without a finished task after which the driver checks for tasks pinned to a
#: worker that has left (see DaskExecutor._orphaned)
WATCH_S = 2.0
#: how often one task may be resubmitted because the scattered ``shared`` value was lost
_MAX_SHARED_LOSSES = 3
#: attempts at broadcasting a job's ``shared`` value: a worker that dies while receiving it
#: fails the scatter (CommClosedError, an OSError) until the scheduler has removed it
_SHARE_ATTEMPTS = 10


def _pickled_size(value: Any) -> int | None:
    """Bytes ``value`` pickles to (out-of-band buffers counted, not copied); None if unknown."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:  # lambdas, closures: cloudpickle's business; treat as large
        return None
    return len(head) + sum(memoryview(b).nbytes for b in buffers)


def _name_key(name: Any) -> tuple[int, Any]:
    # LocalCluster names workers 0, 1, ...; `dask worker` by its address unless --name is given
    return (0, name) if isinstance(name, int) and not isinstance(name, bool) else (1, str(name))


def _worker_environ(threads: int, env: Mapping[str, Any] | None) -> dict[str, Any]:
    """Environment for worker processes this engine starts (applied before they exec)."""
    # No NUMBA_NUM_THREADS: a LocalCluster's nannies live in the driver and write these into
    # its environment while they (re)start a worker (``_Nanny`` restores it afterwards), and
    # numba refuses a thread count that changes after its pool started. Workers need none:
    # featurize runs the serial kernel, and each task sets torch's thread count itself.
    out: dict[str, Any] = dict(thread_environ(threads))
    tunables = malloc_environ(env)
    if tunables:
        out.update(tunables)
        # Dask's default MALLOC_TRIM_THRESHOLD_=65536 would fight the tunable's trim threshold
        out["MALLOC_TRIM_THRESHOLD_"] = None
    out.update({k: str(v) for k, v in (env or {}).items()})
    return out


def _http_options(dashboard: bool) -> dict[str, Any]:
    # The scheduler serves HTTP (health, metrics) even without a dashboard, by default on
    # port 8787; keep it on a random loopback port either way.
    return {"dashboard_address": "127.0.0.1:0", "scheduler_kwargs": {"dashboard": dashboard}}


class _Nanny(Nanny):
    """A Nanny that gives the driver its environment back after it spawns a worker.

    ``Nanny.instantiate`` writes the pre-spawn variables (thread counts, GLIBC_TUNABLES) into
    its own process's environment before spawning; a LocalCluster's nannies live in the
    driver, so each restart of a dead worker would leave them in the driver's environment for
    the rest of its life, and in everything it starts later (a Spark JVM with the workers'
    malloc settings, subprocesses limited to one thread). Nannies run on the cluster's event
    loop, possibly several at once: the first to start spawning saves the variables, the last
    to finish puts them back.
    """

    _lock = threading.Lock()
    _active = 0
    _saved: dict[str, str | None] = {}

    async def instantiate(self) -> Any:
        cls = _Nanny
        with cls._lock:
            if cls._active == 0:
                cls._saved = {}
            # and the marker Dask sets for its children's process titles
            for k in [*self.pre_spawn_env, "__DASK_PARENT_PID"]:
                cls._saved.setdefault(k, os.environ.get(k))
            cls._active += 1
        try:
            return await super().instantiate()
        finally:
            with cls._lock:
                cls._active -= 1
                if cls._active == 0:
                    restore_environ(cls._saved)


def _start_cluster(factory: Callable[..., Any], worker_env: Mapping[str, Any],
                   profile: bool, **kwargs: Any) -> Any:
    """Start a (CUDA) LocalCluster whose nannies spawn workers with ``worker_env``.

    glibc reads GLIBC_TUNABLES when a process starts, so the variables must be in the
    environment the nanny spawns with: ``distributed.nanny.pre-spawn-environ``. The nanny
    sets those in its own process's environment first (here: the driver); that is undone
    once the workers are up, so the driver keeps its thread counts, and ``_Nanny`` undoes it
    again after each restart of a dead worker.

    ``profile``: Dask's statistical profiler in the workers. It samples every thread's stack
    every 10 ms under the GIL, which took 4% of each worker's CPU from the forward pass here
    (0.6 ms per image of 13), so it is off unless asked for; the dashboard's other pages work
    without it.
    """
    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **worker_env}
    touched = [k for k in pre_spawn] + ["PYTHONHASHSEED"]
    with ENV_LOCK, preserved_environ(touched), \
            dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn,
                             "distributed.worker.profile.enabled": profile}):
        return factory(**kwargs)


class DaskExecutor(Executor):
    """Run the core's steps on a Dask cluster: a new LocalCluster, or an existing one.

    With neither ``address`` nor ``client``: a ``LocalCluster`` on 127.0.0.1 with
    ``n_workers`` single-threaded worker processes (default: one per core), a dashboard on a
    random loopback port (``dashboard=False``: none), the workers' malloc settings
    (``deeptransfer.workerenv``), ``threads_per_worker`` OpenMP/torch threads per worker and
    Dask's statistical profiler off (``profile=True``: on); ``env`` adds environment
    variables for those processes. Its workers import torch and the core right away, while
    the caller plans its first job. It is closed by ``close()``.

    With ``address`` ("tcp://host:8786") or a ``Client``: use that deployment as it is; if
    ``n_workers`` is given, wait until that many workers have joined. A Client you pass is
    never closed here, and a cluster this engine did not start is never shut down.

    ``retries``: how often a task that raised is run again before its error is raised here.
    """

    name = "dask"
    supports_affinity = True  # workers pinned by name; see the module docstring
    #: pinned tasks may run elsewhere when their worker is busy or gone (tests turn this off
    #: to make a pin that can never be served, the way a lost worker's pin once hung)
    _loose_pins = True

    def __init__(self, n_workers: int | None = None, *, address: str | None = None,
                 client: Client | None = None, threads_per_worker: int = 1,
                 dashboard: bool = True, retries: int = 2,
                 env: Mapping[str, Any] | None = None, profile: bool = False):
        where = f"the {self.name} engine"
        if n_workers is not None:
            check_int("n_workers", n_workers, low=1, where=where)
        check_int("threads_per_worker", threads_per_worker, low=1, where=where)
        self.retries = check_int("retries", retries, low=0, where=where)
        for opt, val in (("dashboard", dashboard), ("profile", profile)):
            if not isinstance(val, bool):
                raise InvalidParameterError(
                    f"The {opt!r} parameter of {where} must be a bool. Got {val!r} instead.")
        if address is not None and client is not None:
            raise InvalidParameterError(f"Give {where} an 'address' or a 'client', not both.")
        if address is not None and not isinstance(address, str):
            raise InvalidParameterError(
                f"The 'address' parameter of {where} must be a scheduler address like "
                f"'tcp://10.0.0.1:8786'. Got {address!r} instead.")
        if client is not None and not isinstance(client, Client):
            raise InvalidParameterError(
                f"The 'client' parameter of {where} must be a distributed.Client. "
                f"Got {type(client).__name__} instead.")
        if env is not None and not isinstance(env, Mapping):
            raise InvalidParameterError(
                f"The 'env' parameter of {where} must be a mapping of environment variables. "
                f"Got {env!r} instead.")
        external = address is not None or client is not None
        if external and (env or threads_per_worker != 1 or profile):
            raise InvalidParameterError(
                f"'env', 'threads_per_worker' and 'profile' of {where} apply only to a cluster "
                f"it starts; for an existing deployment set them where the workers start "
                f"(`dask worker --nthreads N`, the worker's environment and Dask config).")

        self.threads_per_worker = threads_per_worker
        self.profile = profile
        self._cluster: Any = None  # a cluster this executor started (closed by close())
        self._own_client = client is None
        self._closed = False
        self._slot_workers: list[str] = []
        self._slot_key: frozenset[str] = frozenset()
        self._n_workers = 0
        self._held: list[Any] = []  # the last job's futures (see _run)
        if client is not None:
            self._client = client
        elif address is not None:
            self._client = self._connect(address)
        else:
            self._cluster, self._n_workers = self._start(n_workers, threads_per_worker,
                                                         dashboard, env)
            try:
                # the workers are on this machine: fetch results from them and scatter to
                # them directly rather than through the scheduler (see the module docstring)
                self._client = Client(self._cluster, set_as_default=False,
                                      direct_to_workers=True)
            except BaseException:
                self._cluster.close()
                raise
        if external:
            self._wait_for_workers(n_workers or 1)
            # fixed from here on, as for a cluster started here: the core plans with it (one
            # training shard per worker), and a worker that is restarting must not change that
            self._n_workers = n_workers or len(self._client.nthreads())
        self.dashboard_link = self._dashboard_link() if dashboard else None
        if self._cluster is not None:
            # like the local engine's workers: import torch and the core now, while the
            # caller plans its first job (scans the dataset, opens the store). Held like a
            # job's futures; the first job releases them (a warm-up still queued is dropped).
            self._held = [self._client.submit(warm_up, k, None, pure=False, workers=[w])
                          for k, w in enumerate(self._slots())]

    # -- lifecycle ----------------------------------------------------------------------------
    def _start(self, n_workers: int | None, threads: int, dashboard: bool,
               env: Mapping[str, Any] | None) -> tuple[Any, int]:
        """Start this engine's own cluster; return it and its number of workers."""
        n = n_workers if n_workers is not None else max(1, (os.cpu_count() or 1) // threads)
        worker_env = _worker_environ(threads, env)
        cluster = _start_cluster(
            LocalCluster, worker_env, self.profile, n_workers=n, threads_per_worker=threads,
            processes=True, worker_class=_Nanny,
            host="127.0.0.1", silence_logs=logging.ERROR, **_http_options(dashboard),
            # also set after start-up, so an explicit env= wins over the driver's environment
            env={k: v for k, v in worker_env.items() if v is not None and k in (env or {})})
        return cluster, n

    def _connect(self, address: str) -> Client:
        try:
            return Client(address, set_as_default=False)
        except OSError as exc:
            raise EngineUnavailableError(
                f"Cannot reach the Dask scheduler at {address} ({exc}). Is `dask scheduler` "
                f"running there, and is its port open from this machine?") from exc

    def _wait_for_workers(self, n: int) -> None:
        try:
            self._client.wait_for_workers(n, timeout=WAIT_FOR_WORKERS_S)
        except TimeoutError as exc:
            have = len(self._client.nthreads())
            addr = self._client.scheduler.address
            if self._own_client:
                self._client.close()
            raise EngineUnavailableError(
                f"Only {have} Dask worker(s) joined the scheduler {addr} within "
                f"{WAIT_FOR_WORKERS_S:.0f} s; {n} needed. Start them with `dask worker {addr}` "
                f"(see deploy/dask.md).") from exc

    def _dashboard_link(self) -> str | None:
        try:
            link = self._client.dashboard_link
        except (KeyError, AttributeError):  # the scheduler serves no dashboard
            return None
        return link or None

    @property
    def client(self) -> Client:
        """The ``distributed.Client`` this executor submits through."""
        return self._client

    @property
    def n_workers(self) -> int:
        """Workers of a cluster started here; for an existing one, ``n_workers`` if given,
        else those connected when this executor was created."""
        return self._n_workers

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._held = []
        if self._own_client:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


    def __repr__(self) -> str:
        where = "local cluster" if self._cluster is not None else self._client.scheduler.address
        return f"{type(self).__name__}({where}, n_workers={self.n_workers})"

    def worker_pids(self) -> list[int]:
        """Process ids of the workers, in slot order (tests kill them)."""
        pids = self._client.run(os.getpid)
        return [pids[a] for a in self._slots() if a in pids]

    # -- the primitives -----------------------------------------------------------------------
    def map_unordered(self, fn: Callable[..., Any], tasks: Sequence[Any], *,
                      shared: Any = None,
                      affinity: Sequence[int] | None = None) -> Iterator[tuple[int, Any]]:
        return self._run(fn, self.check_affinity(tasks, affinity), shared, affinity, fetch=True)

    def map_reduce(self, fn: Callable[..., Any], tasks: Sequence[Any],
                   combine: Callable[[Any, Any], Any], *, shared: Any = None,
                   affinity: Sequence[int] | None = None) -> Any:
        tasks = self.check_map_reduce(tasks, affinity)
        if len(tasks) <= DRIVER_REDUCE_MAX:
            # few partial results: gather each as it finishes, combine here (one round trip
            # fewer per tree level than combine tasks; see DRIVER_REDUCE_MAX)
            return super().map_reduce(fn, tasks, combine, shared=shared, affinity=affinity)
        # many: wait for the map tasks without fetching them, then the core's tree as combine
        # tasks on the workers (tree_combine with a combine that submits one); only the
        # total comes to the driver
        futures: list[Any] = [None] * len(tasks)
        for i, fut in self._run(fn, tasks, shared, affinity, fetch=False):
            futures[i] = fut

        def submit_combine(a: Future, b: Future) -> Future:
            f = self._client.submit(combine, a, b, pure=False, retries=self.retries)
            self._held.append(f)
            return f

        return tree_combine(futures, submit_combine).result()

    # -- the job loop -------------------------------------------------------------------------
    def _slots(self) -> list[str]:
        """Worker addresses in slot order (by worker name); refreshed when workers change."""
        addrs = frozenset(self._client.nthreads())
        if addrs != self._slot_key:
            info = self._client.scheduler_info(n_workers=-1)["workers"]
            self._slot_workers = sorted(
                (a for a in info if a in addrs),
                key=lambda a: (_name_key(info[a].get("name")), a))
            self._slot_key = addrs
        return self._slot_workers

    def _orphaned(self, pinned: list[str | None], candidates: set[int]) -> list[int]:
        """Tasks among ``candidates`` pinned to a worker that has left the cluster.

        A pinned task may go to other workers (``allow_other_workers``), and the scheduler
        moves it when its worker dies. That did not always happen here: after a worker was
        killed mid-training, its nanny sometimes did not restart it and the task pinned to
        it waited forever. So the driver resubmits such a task without a pin; the task is
        pure, and whichever copy finishes first is used.
        """
        gone = {w for w in (pinned[i] for i in candidates) if w is not None}
        if not gone:
            return []
        present = set(self._client.scheduler_info(n_workers=-1)["workers"])
        gone -= present
        return sorted(i for i in candidates if pinned[i] in gone)

    def _share(self, shared: Any, n_tasks: int) -> Any:
        """``shared`` itself (inline) or a Future of it broadcast to every worker."""
        if shared is None:
            return None
        size = _pickled_size(shared)
        if size is not None and size * n_tasks <= INLINE_SHARED_BYTES:
            return shared
        failures = 0
        while True:
            try:
                return self._client.scatter([shared], broadcast=True, hash=False)[0]
            except OSError:  # a worker died while receiving it: again to the live workers
                failures += 1
                if failures == _SHARE_ATTEMPTS:
                    raise
                time.sleep(0.1 * failures)  # for the scheduler to notice the dead worker

    def _run(self, fn: Callable[..., Any], tasks: list[Any], shared: Any,
             affinity: Sequence[int] | None, *, fetch: bool) -> Iterator[tuple[int, Any]]:
        """Submit every task; yield ``(index, result)`` (or ``(index, future)``) as they finish."""
        if self._closed:
            raise RuntimeError(f"This {type(self).__name__} is closed.")
        if not tasks:
            return
        client = self._client
        ref = self._share(shared, len(tasks))
        pinned: list[str | None] = [None] * len(tasks)
        if affinity is not None:
            slots = self._slots()
            if slots:
                pinned = [slots[a % len(slots)] for a in affinity]

        def submit(indices: list[int], where: str | None) -> list[Future]:
            opts: dict[str, Any] = {"pure": False, "retries": self.retries}
            if where is not None:
                opts.update(workers=[where], allow_other_workers=self._loose_pins)
            return client.map(fn, [tasks[i] for i in indices], [ref] * len(indices), **opts)

        live: dict[str, tuple[int, Future]] = {}  # submitted, not yet yielded: key -> (i, f)
        used_ref: dict[int, Any] = {}
        groups: dict[str | None, list[int]] = {}
        for i, w in enumerate(pinned):
            groups.setdefault(w, []).append(i)
        ac = as_completed(loop=client.loop, with_results=fetch, raise_errors=False)
        held: list[Any] = [ref]
        for where, indices in groups.items():
            for i, f in zip(indices, submit(indices, where)):
                live[f.key] = (i, f)
                used_ref[i] = ref
                ac.add(f)
                held.append(f)
        # Release the previous job's keys only now: the client sends messages to the
        # scheduler in batches at least 10 ms apart, and a release sent at the end of a round
        # would hold back the next round's graph until that interval has passed.
        self._held, previous = held, self._held
        del previous
        losses = [0] * len(tasks)
        pending = set(range(len(tasks)))
        moved: set[int] = set()  # pinned tasks resubmitted without their pin (_orphaned)
        try:
            while pending:
                item = _next_within(ac, WATCH_S)
                if item is None:  # nothing finished for a while: are pinned tasks orphaned?
                    for i in self._orphaned(pinned, pending - moved):
                        moved.add(i)
                        (nf,) = submit([i], None)
                        live[nf.key] = (i, nf)
                        used_ref[i] = ref
                        ac.add(nf)
                        held.append(nf)
                    continue
                fut, payload = item if fetch else (item, None)
                i, _ = live.pop(fut.key)
                if i not in pending:  # a resubmitted copy of a task that already finished
                    continue
                if fut.status == "error":
                    if not fetch:
                        try:
                            fut.result()  # raises the worker's exception with its traceback
                        except KilledWorker as exc:
                            raise _lost(i, exc) from exc
                    typ, exc, tb = payload
                    if isinstance(exc, KilledWorker):
                        raise _lost(i, exc) from exc
                    raise exc.with_traceback(tb)
                if fut.status == "cancelled":
                    if not isinstance(ref, Future) or losses[i] >= _MAX_SHARED_LOSSES:
                        fut.result()  # raises the CancelledError with the scheduler's reason
                    # every copy of the scattered ``shared`` went with its workers: scatter
                    # it again (once per loss) and rerun the tasks that depended on it
                    losses[i] += 1
                    if used_ref[i] is ref and ref.status != "finished":
                        ref = self._share(shared, len(tasks))
                    (nf,) = submit([i], pinned[i])
                    live[nf.key] = (i, nf)
                    used_ref[i] = ref
                    ac.add(nf)
                    held += [ref, nf]
                    continue
                pending.discard(i)
                yield i, (payload if fetch else fut)
        finally:
            if live:  # an error, or the caller stopped iterating: drop what is still queued
                ac.clear()
                client.cancel([f for _, f in live.values()])


def _lost(i: int, exc: BaseException) -> TaskError:
    """The engines' one error for a task whose workers kept dying (the local engine's too)."""
    return TaskError(f"task {i} lost its worker too many times (killed or out of memory?): "
                     f"{exc}")


def _next_within(ac: as_completed, timeout: float) -> Any:
    """The next item of ``ac``, or None if none arrives within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    cond = getattr(ac, "thread_condition", None)  # what as_completed's own __next__ waits on
    while not ac.has_ready():
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if cond is not None:
            with cond:  # checked under the lock the producer notifies with: no lost wake-up
                if not ac.has_ready():
                    cond.wait(min(left, 0.1))
        else:  # pragma: no cover - older distributed
            time.sleep(min(left, 0.005))
    return next(ac)


def _import_dask_cuda() -> Any:
    """``dask_cuda``, or EngineUnavailableError with the install line (tests patch this)."""
    try:
        import dask_cuda
    except ImportError as exc:
        raise EngineUnavailableError(
            f"The 'dask-cuda' engine needs dask-cuda, which cannot be imported here ({exc}). "
            f"Install it with: pip install 'deeptransfer[cuda]' (on a machine with an NVIDIA "
            f"GPU and its driver).") from exc
    return dask_cuda


def _has_nvidia_gpu() -> bool:
    """True if torch sees a CUDA device or an NVIDIA driver is installed (tests patch this)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    return shutil.which("nvidia-smi") is not None


class DaskCudaExecutor(DaskExecutor):
    """The Dask engine on GPUs: a ``dask_cuda.LocalCUDACluster`` (one worker per GPU, on
    127.0.0.1), or an existing deployment of ``dask cuda worker`` processes at ``address``.

    ``n_workers``: how many GPUs to use (default: all visible). Steps run with
    ``device="cuda"`` by default (``default_device``). Connecting to an existing deployment
    needs neither dask-cuda nor a GPU on this machine.
    """

    name = "dask-cuda"
    default_device = "cuda"

    def _start(self, n_workers: int | None, threads: int, dashboard: bool,
               env: Mapping[str, Any] | None) -> tuple[Any, int]:
        dask_cuda = _import_dask_cuda()
        if not _has_nvidia_gpu():
            raise EngineUnavailableError(
                "The 'dask-cuda' engine needs an NVIDIA GPU, and none was found here "
                "(torch.cuda.is_available() is False and there is no nvidia-smi). Use "
                "engine='dask' on CPUs, or give the address of a cluster of `dask cuda worker` "
                "processes.")
        # LocalCUDACluster sets each worker's environment itself (CUDA_VISIBLE_DEVICES), so
        # ours goes only through the nanny's pre-spawn environment; n_workers=None: every GPU
        cluster = _start_cluster(
            dask_cuda.LocalCUDACluster, _worker_environ(threads, env), self.profile,
            n_workers=n_workers,
            threads_per_worker=threads, host="127.0.0.1", silence_logs=logging.ERROR,
            **_http_options(dashboard))
        return cluster, len(cluster.workers)
