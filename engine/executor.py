"""The executor contract: the scheduling primitives an engine implements, and what it declares.

featurize, the parameter-averaging loop and evaluation call only these methods, so the
local, Dask and Spark engines run the same core steps and cannot drift apart (the way
fsspec derives everything from a few abstract primitives). An adapter is one small file:
a subclass of :class:`Executor` that implements ``map_unordered`` and ``close`` and declares
its capabilities as attributes (the way zarr's ``Store`` declares ``supports_writes``); the
core reads those attributes, it never probes an engine with ``getattr``.

The reduction order is defined here once (:func:`tree_plan`): ``map_reduce`` combines the
results of its tasks along that tree, whichever engine runs it and wherever the combining
happens (on the driver: :func:`tree_combine`; as worker tasks: ``tree_combine`` with a
combine that submits one; as partial aggregates merged in any grouping:
:class:`PairwiseTree`). Float sums depend on their order, so this is what gives the same
head bit for bit on every engine. ``deeptransfer.testing`` checks it with 3+ workers.

Functions passed to an executor are module-level functions of the core with picklable
arguments: tasks carry small specs (paths, row ranges, parameters), never models or images;
workers load those themselves and cache them per process.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: one node of a tree level: ``(a, b)`` combines nodes ``a`` and ``b`` of the level below
#: (``combine(below[a], below[b])``); ``(a, None)`` carries node ``a`` up unchanged
Node = tuple[int, "int | None"]


def tree_plan(n: int) -> list[list[Node]]:
    """The reduction tree over ``n`` results in task order, level by level, leaves excluded.

    Pairwise in task order: level ``k + 1`` combines nodes ``(2j, 2j + 1)`` of level ``k``,
    and the last node of an odd-sized level is carried up unchanged. The one definition of
    the order every engine reduces in; ``n == 1`` has no levels.
    """
    if n < 1:
        raise ValueError("a reduction needs at least one result")
    plan: list[list[Node]] = []
    size = n
    while size > 1:
        level: list[Node] = [(k, k + 1) for k in range(0, size - 1, 2)]
        if size % 2:
            level.append((size - 1, None))
        plan.append(level)
        size = len(level)
    return plan


def tree_combine(results: Sequence[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """``combine`` over ``results`` (in task order) along :func:`tree_plan`.

    ``combine`` may also be deferred, e.g. submit a combine task and return its future:
    Dask's worker-side reduction is this function with such a combine.
    """
    level = list(results)
    for nodes in tree_plan(len(level)):
        level = [level[a] if b is None else combine(level[a], level[b]) for a, b in nodes]
    return level[0]


class PairwiseTree:
    """:func:`tree_plan` evaluated from partial aggregates that meet in any grouping and order.

    For engines whose reduction merges partitions as the framework schedules them (Spark's
    ``reduce``/``reduceByKey``). Node ``(level, j)`` is node ``j`` of the plan's level
    (level 0: the task results). A partial aggregate is a dict of the nodes finished so
    far; whenever both children of a node are present they are combined (left, right), so
    every ``combine`` call is one that ``tree_combine`` makes: the same floating-point sums
    in the same order, whichever partitions meet first.
    """

    def __init__(self, n: int, combine: Callable[[Any, Any], Any]):
        self.combine = combine
        plan = tree_plan(n)
        self.depth = len(plan)
        # up[level][j] = (parent index, sibling index or None, whether j is the left child)
        self.up: list[dict[int, tuple[int, int | None, bool]]] = []
        for nodes in plan:
            parents: dict[int, tuple[int, int | None, bool]] = {}
            for k, (a, b) in enumerate(nodes):
                parents[a] = (k, b, True)
                if b is not None:
                    parents[b] = (k, a, False)
            self.up.append(parents)

    def fold(self, pairs: Iterable[tuple[int, Any]]) -> Iterator[dict]:
        """A partition's ``(task index, result)`` pairs -> one partial aggregate."""
        nodes: dict = {}
        for i, value in pairs:
            self._add(nodes, 0, i, value)
        yield nodes

    def merge(self, a: dict, b: dict) -> dict:
        nodes = dict(a)
        for (level, j), value in b.items():
            self._add(nodes, level, j, value)
        return nodes

    def root(self, nodes: dict) -> Any:
        return nodes[(self.depth, 0)]

    def _add(self, nodes: dict, level: int, j: int, value: Any) -> None:
        while level < self.depth:
            parent, sibling, left = self.up[level][j]
            if sibling is not None:
                other = nodes.pop((level, sibling), None)
                if other is None:
                    break
                value = self.combine(value, other) if left else self.combine(other, value)
            level, j = level + 1, parent
        nodes[(level, j)] = value


class Executor(ABC):
    """An engine: where and how the core's pure steps run.

    Implement ``map_unordered`` and ``close``; set ``name`` (class) and ``n_workers``;
    override the capability attributes below where the engine differs from their defaults.
    ``map_reduce`` is derived: it runs the tasks with ``map_unordered`` and combines on the
    driver with :func:`tree_combine`. An engine that reduces elsewhere (worker tasks, a
    framework's tree aggregation) overrides it and must combine along :func:`tree_plan`
    (``deeptransfer.testing.check_map_reduce_follows_tree_plan`` fails any other order).
    """

    #: engine name as given to ``engine=...`` ("local", "dask", "spark", ...)
    name: str = "executor"
    #: number of parallel workers (processes) the engine schedules onto; the core plans with
    #: it (one training shard per worker)
    n_workers: int = 0

    # -- capabilities: declared, with these defaults --------------------------------------
    #: where featurize runs the network unless told otherwise ("cuda" on GPU engines)
    default_device: str = "cpu"
    #: torch/OpenMP threads each worker process runs a step with
    threads_per_worker: int = 1
    #: True: a task given ``affinity`` slot ``k`` runs in the worker process that ran slot
    #: ``k``'s tasks before (round after round), so what it cached there is found again.
    #: False: affinity is at most a grouping hint (see the engine's docs)
    supports_affinity: bool = False
    #: the URL of the engine's dashboard, printed when an engine the API starts has one
    dashboard_link: str | None = None

    # -- the primitives -------------------------------------------------------------------
    @abstractmethod
    def map_unordered(self, fn: Callable[..., R], tasks: Sequence[T], *, shared: Any = None,
                      affinity: Sequence[int] | None = None) -> Iterator[tuple[int, R]]:
        """Run ``fn(task, shared)`` for every task; yield ``(task_index, result)`` as each finishes.

        Tasks are independent and idempotent: an engine may retry a failed task or run one
        twice (speculation, a dead worker); the core's steps are written so that is harmless.
        ``shared`` is sent to each worker once (a broadcast), not once per task.
        ``affinity[i]`` asks that task ``i`` runs on worker slot ``affinity[i] % n_workers``
        every time it is given (``supports_affinity``); engines that cannot pin ignore it.
        """

    @abstractmethod
    def close(self) -> None:
        """Release what the engine started (processes, clusters). Idempotent."""

    # -- derived --------------------------------------------------------------------------
    def map_reduce(self, fn: Callable[..., R], tasks: Sequence[T], combine: Callable[[R, R], R], *,
                   shared: Any = None, affinity: Sequence[int] | None = None) -> R:
        """``combine`` over ``fn(task, shared)`` for all tasks, along :func:`tree_plan`.

        ``combine`` is associative and commutative up to floating-point rounding, which is
        why the order is fixed. ``affinity`` as for ``map_unordered``.
        """
        tasks = self.check_map_reduce(tasks, affinity)
        results: list[Any] = [None] * len(tasks)
        for i, r in self.map_unordered(fn, tasks, shared=shared, affinity=affinity):
            results[i] = r
        return tree_combine(results, combine)

    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes on this machine, in slot order.

        Optional: tests and benchmarks use it to kill a worker or to measure its memory.
        """
        raise NotImplementedError(
            f"The {self.name} engine does not list its worker processes (worker_pids).")

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def check_map_reduce(tasks: Sequence[Any], affinity: Sequence[int] | None) -> list[Any]:
        """The tasks as a list (at least one); one affinity slot per task when given."""
        from .errors import InvalidParameterError

        tasks = Executor.check_affinity(tasks, affinity)
        if not tasks:
            raise InvalidParameterError("map_reduce needs at least one task.")
        return tasks

    @staticmethod
    def check_affinity(tasks: Sequence[Any], affinity: Sequence[int] | None) -> list[Any]:
        """The tasks as a list; one affinity slot per task when affinity is given."""
        from .errors import InvalidParameterError

        tasks = list(tasks)
        if affinity is not None and len(affinity) != len(tasks):
            raise InvalidParameterError("affinity must give one worker slot per task.")
        return tasks
