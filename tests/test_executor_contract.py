"""The executor contract (deeptransfer.executor): the one reduction order, the ABC, and the
declared capabilities the core reads. In-process executors only: fast."""
from __future__ import annotations

import functools
import random

import pytest

from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.executor import Executor, PairwiseTree, tree_combine, tree_plan
from deeptransfer.testing.engine_checks import check_map_reduce_follows_tree_plan, nest


def _paren(a, b):
    return f"({a}+{b})"


def test_tree_plan_is_pairwise_in_task_order():
    assert tree_plan(1) == []
    assert tree_plan(2) == [[(0, 1)]]
    assert tree_plan(5) == [[(0, 1), (2, 3), (4, None)], [(0, 1), (2, None)], [(0, 1)]]
    assert tree_combine(list("abcde"), _paren) == "(((a+b)+(c+d))+e)"


def test_pairwise_tree_matches_tree_combine_in_any_grouping():
    # partial aggregates merged in any grouping and order (Spark's reduce) make
    # tree_combine's combine calls exactly
    rng = random.Random(0)
    for n in [1, 2, 3, 5, 8, 13, 31, 64, 100]:
        want = tree_combine([str(i) for i in range(n)], _paren)
        for _ in range(20):
            tree = PairwiseTree(n, _paren)
            order = rng.sample(range(n), n)
            cuts = sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) if n > 1 else []
            parts = [next(tree.fold((i, str(i)) for i in order[a:b]))
                     for a, b in zip([0] + cuts, cuts + [n])]
            while len(parts) > 1:
                a = parts.pop(rng.randrange(len(parts)))
                b = parts.pop(rng.randrange(len(parts)))
                parts.append(tree.merge(a, b))
            assert tree.root(parts[0]) == want


class _LeftFold(LocalExecutor):
    """A wrong adapter: reduces left to right, the obvious loop."""

    def map_reduce(self, fn, tasks, combine, *, shared=None, affinity=None):
        results = dict(self.map_unordered(fn, tasks, shared=shared))
        return functools.reduce(combine, [results[i] for i in range(len(tasks))])


class _CompletionOrder(LocalExecutor):
    """A wrong adapter: the pairwise tree, but over results in the order they finished."""

    def map_reduce(self, fn, tasks, combine, *, shared=None, affinity=None):
        done = [r for _, r in reversed(list(self.map_unordered(fn, tasks, shared=shared)))]
        return tree_combine(done, combine)


@pytest.mark.parametrize("wrong", [_LeftFold, _CompletionOrder])
def test_the_shipped_reduction_check_fails_a_wrong_tree(wrong):
    with wrong(0) as ex:
        with pytest.raises(AssertionError, match="not along tree_plan"):
            check_map_reduce_follows_tree_plan(ex)
        # with 2 or 3 tasks a left fold is indistinguishable: why the check goes to 40
        if wrong is _LeftFold:
            check_map_reduce_follows_tree_plan(ex, sizes=(1, 2, 3))
    with LocalExecutor(0) as ex:
        check_map_reduce_follows_tree_plan(ex)  # the derived map_reduce passes


def test_an_executor_without_its_primitives_cannot_be_made():
    class NoClose(Executor):
        def map_unordered(self, fn, tasks, *, shared=None, affinity=None):
            return iter(())

    class NoMap(Executor):
        def close(self):
            pass

    for cls in (NoClose, NoMap):
        with pytest.raises(TypeError, match="abstract"):
            cls()


class _Inline(Executor):
    """The smallest engine: the primitives, everything else derived or declared by default."""

    name = "inline"
    n_workers = 1

    def map_unordered(self, fn, tasks, *, shared=None, affinity=None):
        for i, t in enumerate(tasks):
            yield i, fn(t, shared)

    def close(self):
        pass


def test_a_minimal_executor_gets_the_documented_defaults():
    ex = _Inline()
    assert (ex.default_device, ex.threads_per_worker, ex.supports_affinity,
            ex.dashboard_link) == ("cpu", 1, False, None)
    assert ex.map_reduce(lambda t, s: t, list(range(5)), nest) == tree_combine(range(5), nest)
    with pytest.raises(NotImplementedError, match="inline engine does not list its worker"):
        ex.worker_pids()
    with ex as same:
        assert same is ex


class _Stop(Exception):
    pass


class _Recording(_Inline):
    """Declares capabilities other than the defaults; records the featurize spec it is given."""

    default_device = "cuda:7"
    threads_per_worker = 3
    dashboard_link = "http://127.0.0.1:1/status"

    def __init__(self):
        self.n_workers = 0
        self.closed = False
        self.shared = None

    def map_unordered(self, fn, tasks, *, shared=None, affinity=None):
        self.shared = shared
        raise _Stop  # the spec is what is checked; no network runs

    def close(self):
        self.closed = True


def test_the_core_reads_the_declared_capabilities(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from deeptransfer import api
    from deeptransfer.dataset import load_dataset
    from deeptransfer.featurization import run_featurize

    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / cls / "x.png")
    manifest = load_dataset(str(tmp_path / "d"), split="train=1", seed=0)
    ex = _Recording()
    with pytest.raises(_Stop):
        run_featurize(ex, manifest, str(tmp_path / "s.zarr"), model="efficientnet_lite0",
                      progress=False)
    assert ex.shared.device == "cuda:7" and ex.shared.threads == 3
    # an engine the API starts: its dashboard is printed, and it is closed afterwards
    monkeypatch.setattr(api, "get_executor", lambda engine, opts=None: ex)
    with api.engine_scope("recording", None, None) as got:
        assert got is ex
    assert "inline dashboard: http://127.0.0.1:1/status" in capsys.readouterr().err
    assert ex.closed


def test_an_object_that_is_not_an_executor_is_refused():
    from deeptransfer.engines import get_executor
    from deeptransfer.errors import InvalidParameterError

    class Lookalike:  # the primitives, but not the contract
        name, n_workers = "x", 1

        def map_unordered(self, fn, tasks, *, shared=None, affinity=None):
            return iter(())

        def close(self):
            pass

    with pytest.raises(InvalidParameterError, match="subclass of deeptransfer.executor.Executor"):
        get_executor(Lookalike())
    assert get_executor(_Inline()).name == "inline"
