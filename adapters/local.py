"""The local engine: the embedded default, no cluster, one process per core.

Worker processes are started with the ``spawn`` method (fork after torch has started
threads is unsafe) and live as long as the executor, so what a step caches per process
(the model, a store handle, a training shard) is built once. Each worker has its own
queue, which is what lets ``affinity`` send a training shard back to the process that
already holds it. A worker that dies is restarted and its task run again: core steps are
idempotent, so nothing is lost or counted twice.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator, Sequence

from deeptransfer.executor import Executor
from deeptransfer.adapters.local_transport import Packed, Sender, unlink, unpack
from deeptransfer.errors import EngineStartError, TaskError, check_int
from deeptransfer.workerenv import (BOOTSTRAP_EXIT, ENV_LOCK, malloc_environ, preserved_environ,
                                    refuse_start_while_bootstrapping, thread_environ)


IMPORT_TIME_JOB = (
    "the local engine's worker processes could not start: your script starts a job at import "
    "time; put it under `if __name__ == \"__main__\":` (Python's multiprocessing spawn "
    "re-imports the main module)")


def _worker_main(conn: Connection, threads: int) -> None:
    # the hand-shake: this process got through multiprocessing's bootstrapping phase (the
    # re-import of the main module); a worker that dies before it never started
    conn.send(("ready",))
    # Thread counts must be set before torch/numba start their pools (OpenMP's and BLAS's
    # came with the environment the worker was spawned with: workerenv.thread_environ)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
        # import the heavy parts of the core now, while the driver is still scanning the
        # dataset, instead of during the first task
        import deeptransfer.kernels  # noqa: F401
        import deeptransfer.models  # noqa: F401
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    shared_by_job: dict[int, Any] = {}
    sender = Sender()  # this worker's results, through shared memory when large
    try:
        _serve(conn, shared_by_job, sender)
    finally:
        sender.close()


def _serve(conn: Connection, shared_by_job: dict[int, Any], sender: Sender) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        _, job, fn, index, task, has_shared, shared = msg
        if has_shared:
            shared_by_job.clear()  # one job at a time: drop the previous job's broadcast
            shared_by_job[job] = unpack(shared)
        try:
            result = fn(task, shared_by_job.get(job))
            conn.send(("ok", index, sender.pack(result)))
        except BaseException as exc:  # noqa: BLE001 - reported to the driver, not swallowed
            tb = traceback.format_exc()
            try:
                conn.send(("err", index, (exc, tb)))
            except Exception:  # the exception itself does not pickle
                conn.send(("err", index, (None, tb)))


class _Worker:
    def __init__(self, ctx: Any, slot: int, threads: int, env: dict[str, str]):
        self.slot = slot
        parent, child = ctx.Pipe()
        with ENV_LOCK, preserved_environ(env):  # a spawned child copies os.environ at start
            os.environ.update(env)
            self.proc = ctx.Process(target=_worker_main, args=(child, threads),
                                    name=f"deeptransfer-worker-{slot}", daemon=True)
            self.proc.start()
        child.close()
        self.conn = parent
        self.job_with_shared: int | None = None
        self.busy: int | None = None  # task index in flight
        self.ready = False  # its hand-shake arrived
        self.segment: str | None = None  # its shared-memory segment for results, once used

    def recv(self) -> Any:
        """The next message that is not the hand-shake; None when only that was waiting."""
        msg = self.conn.recv()
        if msg[0] == "ready":
            self.ready = True
            return self.conn.recv() if self.conn.poll() else None
        return msg

    def check_started(self) -> None:
        """After the worker died: raise if it died before its hand-shake with an error of its
        own (killed by a signal is a death like any other, retried)."""
        if self.ready:
            return
        try:  # the hand-shake may be waiting in the pipe behind the death
            while self.conn.poll():
                if self.conn.recv()[0] == "ready":
                    self.ready = True
                    return
        except (EOFError, OSError):
            pass
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        if code == BOOTSTRAP_EXIT:
            raise EngineStartError(IMPORT_TIME_JOB) from None
        if code is not None and code > 0:
            raise EngineStartError(
                f"the local engine's worker process exited with code {code} while starting, "
                f"before it could run a task (its error is printed above)") from None

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except Exception:
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()
        if self.segment is not None:  # a worker that exited cleanly removed it already
            unlink(self.segment)


class LocalExecutor(Executor):
    """Run the core's steps in ``n_workers`` local processes (``n_workers=0``: in this process).

    ``threads_per_worker`` defaults to the cores divided among the workers. ``max_retries``
    bounds how often one task is re-run after its worker died.
    """

    name = "local"
    supports_affinity = True  # one queue per worker process (see the module docstring)

    def __init__(self, n_workers: int | None = None, *, threads_per_worker: int | None = None,
                 max_retries: int = 2, malloc_tunables: bool = True):
        refuse_start_while_bootstrapping()
        cores = os.cpu_count() or 1
        self.n_workers = cores if n_workers is None else check_int(
            "workers", n_workers, low=0, where="the local engine")
        self.threads_per_worker = threads_per_worker or max(1, cores // max(1, self.n_workers))
        check_int("threads_per_worker", self.threads_per_worker, low=1, where="the local engine")
        self.max_retries = check_int("max_retries", max_retries, low=0)
        # thread counts and glibc's malloc settings (deeptransfer.workerenv) for the workers
        self._env: dict[str, str] = {**thread_environ(self.threads_per_worker),
                                     **(malloc_environ() if malloc_tunables else {})}
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._job = 0
        self._closed = False
        self._sender = Sender()  # each job's shared value, through shared memory when large
        # started now, like a LocalCluster: the workers import torch while the caller plans
        try:
            self._ensure_started()
        except BaseException:  # workers started before the failure must not linger
            self.close()
            raise

    # -- lifecycle ----------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._closed:
            raise RuntimeError("This LocalExecutor is closed.")
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker(self._ctx, len(self._workers), self.threads_per_worker,
                                         self._env))

    def _restart(self, w: _Worker) -> _Worker:
        try:
            w.stop()
        except Exception:
            pass
        nw = _Worker(self._ctx, w.slot, self.threads_per_worker, self._env)
        self._workers[w.slot] = nw
        return nw

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []
        self._sender.close()
        self._closed = True

    def __repr__(self) -> str:
        return f"LocalExecutor(n_workers={self.n_workers}, threads_per_worker={self.threads_per_worker})"

    def worker_pids(self) -> list[int]:
        """Process ids of the workers (restarted first if any died); tests kill them."""
        self._ensure_started()
        return [w.proc.pid for w in self._workers]

    # -- the primitives -----------------------------------------------------------------------
    def map_unordered(self, fn: Callable[..., Any], tasks: Sequence[Any], *,
                      shared: Any = None,
                      affinity: Sequence[int] | None = None) -> Iterator[tuple[int, Any]]:
        return self._run(fn, self.check_affinity(tasks, affinity), shared, affinity)

    def _run(self, fn: Callable[..., Any], tasks: list[Any], shared: Any,
             affinity: Sequence[int] | None) -> Iterator[tuple[int, Any]]:
        if self.n_workers == 0:
            for i, t in enumerate(tasks):
                yield i, fn(t, shared)
            return
        self._ensure_started()
        self._job += 1
        job = self._job
        n = len(self._workers)
        # per-slot queues when pinned, one shared queue otherwise
        queues: list[deque[int]] = [deque() for _ in range(n)]
        common: deque[int] = deque()
        for i in range(len(tasks)):
            (queues[affinity[i] % n] if affinity is not None else common).append(i)
        retries = [0] * len(tasks)
        remaining = len(tasks)
        # pickled (and, when large, put in shared memory) once for all the workers
        shared = self._sender.pack(shared)
        self._sender.busy = True

        def feed(w: _Worker) -> None:
            q = queues[w.slot] if queues[w.slot] else common
            if w.busy is not None or not q:
                return
            i = q.popleft()
            for attempt in range(2):
                send_shared = w.job_with_shared != job
                try:
                    w.conn.send(("run", job, fn, i, tasks[i], send_shared,
                                 shared if send_shared else None))
                    break
                except (BrokenPipeError, ConnectionError, OSError):
                    w.check_started()
                    if attempt:
                        raise
                    w = self._restart(w)  # it died while idle: a fresh one takes the task
            w.job_with_shared = job
            w.busy = i

        for w in list(self._workers):  # replace workers that died between jobs
            if not w.proc.is_alive():
                w.check_started()
                self._restart(w)
        try:
            for w in list(self._workers):
                feed(w)
            while remaining:
                conns = {w.conn: w for w in self._workers if w.busy is not None}
                if not conns:  # pragma: no cover - defensive: nothing in flight but work left
                    raise RuntimeError("local engine: tasks left but no worker is running one")
                for conn in wait(list(conns), timeout=1.0) or []:
                    w = conns[conn]
                    try:
                        msg = w.recv()
                    except (EOFError, OSError, ConnectionError):
                        # the worker died mid-task: restart it and run the task again
                        w.check_started()
                        i = w.busy
                        assert i is not None
                        retries[i] += 1
                        if retries[i] > self.max_retries:
                            raise TaskError(f"task {i} lost its worker {retries[i]} times "
                                            f"(killed or out of memory?)")
                        w = self._restart(w)
                        (queues[w.slot] if affinity is not None else common).appendleft(i)
                        feed(w)
                        continue
                    if msg is None:  # only the hand-shake
                        continue
                    kind, i, payload = msg
                    w.busy = None
                    if isinstance(payload, Packed):
                        w.segment = payload.name  # to remove if the worker dies
                        payload = unpack(payload)
                    if kind == "err":
                        exc, tb = payload
                        self._drain()
                        if isinstance(exc, Exception) and not isinstance(exc, (TaskError,)):
                            raise exc from TaskError(tb)
                        raise TaskError(tb)
                    remaining -= 1
                    feed(w)
                    yield i, payload
                for w in list(self._workers):  # a worker that died while idle in wait()
                    if w.busy is not None and not w.proc.is_alive() and not w.conn.poll():
                        w.check_started()
                        i = w.busy
                        retries[i] += 1
                        if retries[i] > self.max_retries:
                            raise TaskError(f"task {i} lost its worker {retries[i]} times")
                        w = self._restart(w)
                        (queues[w.slot] if affinity is not None else common).appendleft(i)
                        feed(w)
        finally:
            if remaining:
                self._drain()
            self._sender.busy = False

    def _drain(self) -> None:
        """Wait out tasks still in flight after an error or an abandoned iterator."""
        for w in list(self._workers):
            if w.busy is None:
                continue
            try:
                while w.conn.poll(60):
                    if w.recv() is not None:  # its result (not only the hand-shake)
                        w.busy = None
                        break
                if w.busy is None:
                    continue
            except (EOFError, OSError):
                pass
            self._restart(w)
