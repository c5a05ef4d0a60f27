"""The scheduling primitives an engine implements; everything else is written once on top.

featurize, the parameter-averaging loop and evaluation call only these methods, so the
local, Dask and Spark engines run the same core steps and cannot drift apart (the way
fsspec derives everything from a few abstract primitives). An adapter is one small file.

Functions passed to an executor are module-level functions of the core with picklable
arguments: tasks carry small specs (paths, row ranges, parameters), never models or images;
workers load those themselves and cache them per process.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar, runtime_checkable

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class Executor(Protocol):
    """An engine: where and how the core's pure steps run."""

    #: engine name as given to ``engine=...`` ("local", "dask", "spark", ...)
    name: str
    #: number of parallel workers (processes) the engine schedules onto
    n_workers: int

    def map_unordered(self, fn: Callable[..., R], tasks: Sequence[T], *,
                      shared: Any = None) -> Iterator[tuple[int, R]]:
        """Run ``fn(task, shared)`` for every task; yield ``(task_index, result)`` as each finishes.

        Tasks are independent and idempotent: an engine may retry a failed task or run one
        twice (speculation, a dead worker); the core's steps are written so that is harmless.
        ``shared`` is sent to each worker once (a broadcast), not once per task.
        """
        ...

    def map_reduce(self, fn: Callable[..., R], tasks: Sequence[T], combine: Callable[[R, R], R], *,
                   shared: Any = None, affinity: Sequence[int] | None = None) -> R:
        """``combine`` over ``fn(task, shared)`` for all tasks, as a tree where the engine can.

        ``combine`` is associative and commutative. ``affinity[i]`` asks that task ``i`` runs
        on worker slot ``affinity[i] % n_workers`` every time it is given, so that data the
        task caches in its worker process (a training shard) is found there again; engines
        that cannot pin tasks ignore it.
        """
        ...

    def close(self) -> None:
        """Release what the engine started (processes, clusters). Idempotent."""
        ...

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc: object) -> None: ...


def tree_combine(results: list[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Pairwise reduction in task order: the same tree on every run and every engine.

    Engines that combine on the driver call it; Spark's treeAggregate and Dask's combine
    tasks reproduce this tree, so the same seed gives the same head on every engine.
    """
    level = list(results)
    while len(level) > 1:
        nxt = [combine(level[k], level[k + 1]) for k in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class BaseExecutor:
    """What every adapter shares: the context manager and map_reduce's argument checks."""

    name: str = "base"
    n_workers: int = 0
    #: where featurize runs the network unless told otherwise ("cuda" on GPU engines)
    default_device: str = "cpu"

    def close(self) -> None:  # pragma: no cover - every adapter overrides it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def check_map_reduce(tasks: Sequence[Any], affinity: Sequence[int] | None) -> list[Any]:
        """The tasks as a list; one affinity slot per task when affinity is given."""
        from .errors import InvalidParameterError

        tasks = list(tasks)
        if not tasks:
            raise InvalidParameterError("map_reduce needs at least one task.")
        if affinity is not None and len(affinity) != len(tasks):
            raise InvalidParameterError("affinity must give one worker slot per task.")
        return tasks
