"""Parameter-averaged head training: the algorithm, learning, resume, validation.

The engines here are in-process: a serial executor, and a shuffled one that runs tasks,
yields results and combines them in a scrambled order (a random reduction tree), which is
how a real engine may deliver them.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deeptransfer import worker_state
from deeptransfer.dataset import Manifest
from deeptransfer.errors import InvalidParameterError
from deeptransfer.executor import Executor
from deeptransfer.store import create_store, open_store
from deeptransfer.training import (HeadConfig, OptimizerConfig, ShardResult, TrainConfig, average,
                                build_head, combine, head_params, lr_at, train_head)
from deeptransfer.training import loop as loop_mod
from deeptransfer.training import checkpoint as checkpoint_mod
from deeptransfer.training import shards
from deeptransfer.training.heads import balanced_class_weights, loss_fn
from deeptransfer.training.shards import ShardTask, load_round, partition_rows, partition_sizes

# ---------------------------------------------------------------------------------------------
# fixtures: executors and synthetic stores


class SerialExecutor(Executor):
    """Runs every task in this process, in order."""

    name = "serial"

    def __init__(self, n_workers: int = 2):
        self.n_workers = n_workers
        self.reduce_calls = 0

    def map_unordered(self, fn, tasks, *, shared=None):
        for i, t in enumerate(tasks):
            yield i, fn(t, shared)

    def map_reduce(self, fn, tasks, combine, *, shared=None, affinity=None):
        assert affinity is None or len(affinity) == len(tasks)
        self.reduce_calls += 1
        out = None
        for t in tasks:
            r = fn(t, shared)
            out = r if out is None else combine(out, r)
        return out

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShuffledExecutor(SerialExecutor):
    """Runs tasks in a random order and reduces their results along a random tree."""

    name = "shuffled"

    def __init__(self, n_workers: int = 2, seed: int = 1):
        super().__init__(n_workers)
        self.rng = random.Random(seed)

    def map_unordered(self, fn, tasks, *, shared=None):
        order = list(range(len(tasks)))
        self.rng.shuffle(order)
        for i in order:
            yield i, fn(tasks[i], shared)

    def map_reduce(self, fn, tasks, combine, *, shared=None, affinity=None):
        results = [r for _, r in self.map_unordered(fn, tasks, shared=shared)]
        while len(results) > 1:
            i, j = sorted(self.rng.sample(range(len(results)), 2))
            b, a = results.pop(j), results.pop(i)
            results.append(combine(a, b) if self.rng.random() < 0.5 else combine(b, a))
        return results[0]


def make_store(path, *, n_train=192, n_val=64, n_test=64, n_classes=4, dim=16, seed=0,
               spread=1.5):
    """A complete feature store of Gaussian blobs (one per class): separable features."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    labels = rng.integers(0, n_classes, n).astype(np.int32)
    split = np.array([0] * n_train + [1] * n_val + [2] * n_test, dtype=np.int8)
    rng.shuffle(split)
    centers = rng.normal(0.0, spread, (n_classes, dim))
    x = (centers[labels] + rng.normal(0.0, 1.0, (n, dim))).astype(np.float32)
    m = Manifest(str(path), [f"c{labels[i]}/img{i}.jpg" for i in range(n)], labels, split,
                 [f"class{c}" for c in range(n_classes)])
    url = str(path)
    st = create_store(url, m, feature_dim=dim, attrs={"model": f"synthetic-{seed}"}, chunk_rows=64)
    for i in range(st.n_chunks):
        a, b = st.chunk_bounds(i)
        st.write_chunk(i, x[a:b], np.ones(b - a, bool), [""] * (b - a))
    return url


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("blobs") / "features.zarr")


@pytest.fixture(autouse=True)
def _fresh_caches():
    shards.clear_caches()
    yield


def cfg(**kw):
    base = dict(head=HeadConfig("softmax"), optimizer=OptimizerConfig("sgd", lr=0.1, momentum=0.0),
                workers=1, batch_size_per_worker=8, averaging_frequency=3, epochs=2, seed=3,
                patience=None)
    base.update(kw)
    return TrainConfig(**base)


def run(executor, url, config, out, **kw):
    kw.setdefault("plot", False)  # drawing the chart costs more than training these heads
    return train_head(executor, url, config, str(out), progress=False, **kw)


def assert_params_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# (a) one worker is plain minibatch training


def reference_loop(url, head, make_opt, *, seed, epochs, batch, repartition, n_parts=1,
                   model=None):
    """Plain single-process training (of ``model``, default a fresh head); with n_parts > 1,
    one step per round on the union of the workers' minibatches (each worker contributing
    ``batch`` rows). ``make_opt(model)`` gives its torch optimizer."""
    st = open_store(url)
    train = st.split_rows("train")
    if model is None:
        model = build_head(head, st.feature_dim, len(st.classes), seed=seed)
    opt = make_opt(model)
    per_part = partition_sizes(len(train), n_parts)
    for epoch in range(epochs):
        parts = [partition_rows(train, seed=seed, epoch=epoch, n_parts=n_parts, part=p,
                                repartition=repartition) for p in range(n_parts)]
        data = [st.read_rows(p) for p in parts]
        for s in range(0, max(per_part), batch):
            x = np.concatenate([d[0][s:s + batch] for d in data])
            y = np.concatenate([d[1][s:s + batch] for d in data])
            loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head_params(model)


@pytest.mark.parametrize("name,make_opt,repartition", [
    ("sgd", lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "epoch"),
    ("momentum", lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), "never"),
    ("nesterov", lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,
                                           nesterov=True), "epoch"),
    ("adam", lambda m: torch.optim.Adam(m.parameters(), lr=0.01), "never"),
])
def test_one_worker_is_exactly_plain_minibatch_training(blobs, tmp_path, name, make_opt,
                                                        repartition):
    opt = {"sgd": OptimizerConfig("sgd", lr=0.1, momentum=0.0),
           "momentum": OptimizerConfig("sgd", lr=0.05, momentum=0.9),
           "nesterov": OptimizerConfig("nesterov", lr=0.05, momentum=0.9),
           "adam": OptimizerConfig("adam", lr=0.01)}[name]
    head = HeadConfig("mlp", hidden=(8,))
    c = cfg(head=head, optimizer=opt, repartition=repartition, averaging_frequency=3)
    res = run(SerialExecutor(1), blobs, c, tmp_path)
    assert res.rounds == 2 * 8  # 192 rows / (8 * 3) per round, 2 epochs
    ref = reference_loop(blobs, head, make_opt, seed=3, epochs=2, batch=8,
                         repartition=repartition)
    assert_params_equal(res.last_params, ref)


# ---------------------------------------------------------------------------------------------
# (b) N workers averaging after every plain SGD step = one process with N times the batch


@pytest.mark.parametrize("workers", [2, 4])
def test_averaging_every_step_equals_n_times_the_batch(blobs, tmp_path, workers):
    head = HeadConfig("mlp", hidden=(8,))
    c = cfg(head=head, workers=workers, averaging_frequency=1, batch_size_per_worker=8)
    res = run(SerialExecutor(workers), blobs, c, tmp_path)
    assert res.rounds == 2 * 192 // (8 * workers)
    ref = reference_loop(blobs, head, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                         seed=3, epochs=2,
                         batch=8, repartition="epoch", n_parts=workers)
    for k in ref:
        np.testing.assert_allclose(res.last_params[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
        scale = np.abs(ref[k]).max()
        assert np.abs(res.last_params[k] - ref[k]).max() <= 1e-6 * max(scale, 1.0), k
    # and the parameters really moved: the comparison is not between two initial heads
    init = head_params(build_head(head, 16, 4, seed=3))
    assert np.abs(res.last_params["out.weight"] - init["out.weight"]).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# (c) determinism and (d) order independence

STOCHASTIC = dict(head=HeadConfig("mlp", hidden=(12,), dropout=0.3, batch_norm=True,
                                  input_dropout=0.1),
                  optimizer=OptimizerConfig("adam", lr=0.01), workers=4,
                  batch_size_per_worker=5, averaging_frequency=2, epochs=2)


def test_same_seed_same_head_bitwise(blobs, tmp_path):
    a = run(SerialExecutor(4), blobs, cfg(**STOCHASTIC), tmp_path / "a")
    b = run(SerialExecutor(4), blobs, cfg(**STOCHASTIC), tmp_path / "b")
    assert_params_equal(a.last_params, b.last_params)
    other = run(SerialExecutor(4), blobs, cfg(**{**STOCHASTIC, "seed": 4}), tmp_path / "c")
    assert not np.array_equal(a.last_params["out.weight"], other.last_params["out.weight"])


def test_dropout_masks_depend_on_the_seed_not_the_global_rng(blobs, tmp_path):
    torch.manual_seed(123)
    a = run(SerialExecutor(4), blobs, cfg(**{**STOCHASTIC, "epochs": 1}), tmp_path / "a")
    torch.manual_seed(999)
    b = run(SerialExecutor(4), blobs, cfg(**{**STOCHASTIC, "epochs": 1}), tmp_path / "b")
    assert_params_equal(a.last_params, b.last_params)


def test_result_does_not_depend_on_the_order_results_arrive(blobs, tmp_path):
    c = cfg(**{**STOCHASTIC, "optimizer": OptimizerConfig("nesterov", lr=0.05)})
    a = run(SerialExecutor(4), blobs, c, tmp_path / "serial")
    b = run(ShuffledExecutor(4, seed=7), blobs, c, tmp_path / "shuffled")
    assert_params_equal(a.last_params, b.last_params)
    assert_params_equal(a.params, b.params)
    assert [h["val_top1"] for h in a.history] == [h["val_top1"] for h in b.history]


def _fake_result(rng, n_workers=1):
    return ShardResult(
        params={"w": rng.normal(size=(3, 4)).astype(np.float32).astype(np.float64),
                "n": np.array(float(rng.integers(0, 9)))},
        opt_state={"w.momentum_buffer": rng.normal(size=(3, 4))},
        dtypes={"w": "float32", "n": "int64"}, n_workers=n_workers,
        examples=int(rng.integers(1, 50)), loss_sum=float(rng.random()), correct=3, steps=2,
        compute_s=float(rng.random()), compute_s_sum=1.0, workers=(int(rng.integers(0, 9)),))


def test_combine_is_associative_and_commutative_and_average_divides_equally():
    rng = np.random.default_rng(0)
    a, b, c = (_fake_result(rng) for _ in range(3))
    left, right = combine(combine(a, b), c), combine(a, combine(c, b))
    pl, sl = average(left)
    pr, sr = average(right)
    assert_params_equal(pl, pr)
    assert_params_equal(sl, sr)
    assert left.n_workers == 3 and left.examples == a.examples + b.examples + c.examples
    assert left.compute_s == max(a.compute_s, b.compute_s, c.compute_s)
    # every worker weighs the same, whatever its number of examples (DL4J)
    np.testing.assert_array_equal(
        pl["w"], ((a.params["w"] + b.params["w"] + c.params["w"]) / 3).astype(np.float32))
    assert pl["w"].dtype == np.float32 and pl["n"].dtype == np.int64
    assert sl["w.momentum_buffer"].dtype == np.float32
    # combine leaves its inputs alone (an engine may retry a reduction)
    before = a.params["w"].copy()
    combine(a, b)
    np.testing.assert_array_equal(a.params["w"], before)


# ---------------------------------------------------------------------------------------------
# (e) save_updater: averaged optimizer state vs a fresh state every round, by hand


def _grads(w, b, x, y):
    """Gradients of the mean softmax cross entropy of a linear layer (numpy, float64)."""
    z = x @ w.T + b
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return p.T @ x, p.sum(axis=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 2 workers x 8 rows, batch 4, averaging every step: 2 rounds in the one epoch
    return make_store(tmp_path_factory.mktemp("tiny") / "f.zarr", n_train=16, n_val=8, n_test=0,
                      n_classes=3, dim=5, seed=2)


def _tiny_run(url, out, opt, save_updater):
    c = cfg(optimizer=opt, workers=2, batch_size_per_worker=4, averaging_frequency=1, epochs=1,
            save_updater=save_updater, seed=5)
    res = run(SerialExecutor(2), url, c, out)
    assert res.rounds == 2
    return res.last_params


def _tiny_data(url):
    st = open_store(url)
    train = st.split_rows("train")
    data = []
    for part in range(2):
        rows = partition_rows(train, seed=5, epoch=0, n_parts=2, part=part, repartition="epoch")
        x, y = st.read_rows(rows)
        data.append((x.astype(np.float64), y))
    init = head_params(build_head(HeadConfig(), st.feature_dim, len(st.classes), seed=5))
    return data, init["fc.weight"].astype(np.float64), init["fc.bias"].astype(np.float64)


def test_save_updater_momentum_matches_hand_computation(tiny, tmp_path):
    lr, mu = 0.5, 0.9
    data, w0, b0 = _tiny_data(tiny)

    def mean_grad(w, b, r):
        gs = [_grads(w, b, x[4 * r:4 * r + 4], y[4 * r:4 * r + 4]) for x, y in data]
        return sum(g[0] for g in gs) / 2, sum(g[1] for g in gs) / 2

    gw0, gb0 = mean_grad(w0, b0, 0)
    w1, b1 = w0 - lr * gw0, b0 - lr * gb0  # first round: buffers start at the gradient
    gw1, gb1 = mean_grad(w1, b1, 1)
    kept = (w1 - lr * (mu * gw0 + gw1), b1 - lr * (mu * gb0 + gb1))  # averaged buffer carried
    reset = (w1 - lr * gw1, b1 - lr * gb1)  # fresh buffer: a plain SGD step
    opt = OptimizerConfig("sgd", lr=lr, momentum=mu)
    got_kept = _tiny_run(tiny, tmp_path / "kept", opt, True)
    got_reset = _tiny_run(tiny, tmp_path / "reset", opt, False)
    np.testing.assert_allclose(got_kept["fc.weight"], kept[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_kept["fc.bias"], kept[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_reset["fc.weight"], reset[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_reset["fc.bias"], reset[1], rtol=1e-5, atol=1e-6)
    assert np.abs(got_kept["fc.weight"] - got_reset["fc.weight"]).max() > 1e-3


def test_save_updater_adam_matches_hand_computation(tiny, tmp_path):
    lr, b1_, b2_, eps = 0.05, 0.9, 0.999, 1e-8
    data, w0, b0 = _tiny_data(tiny)
    p0 = (w0, b0)

    def adam_round(p, r, m_prev, v_prev, t):
        """Each worker's step from the same p and state, then the averages."""
        ps, ms, vs = [], [], []
        for x, y in data:
            g = _grads(p[0], p[1], x[4 * r:4 * r + 4], y[4 * r:4 * r + 4])
            new_p, new_m, new_v = [], [], []
            for pi, gi, mi, vi in zip(p, g, m_prev, v_prev):
                m = b1_ * mi + (1 - b1_) * gi
                v = b2_ * vi + (1 - b2_) * gi ** 2
                step = lr / (1 - b1_ ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2_ ** t) + eps)
                new_p.append(pi - step)
                new_m.append(m)
                new_v.append(v)
            ps.append(new_p)
            ms.append(new_m)
            vs.append(new_v)
        avg = lambda lists: [(a + b) / 2 for a, b in zip(*lists)]  # noqa: E731
        return avg(ps), avg(ms), avg(vs)

    zeros = [np.zeros_like(w0), np.zeros_like(b0)]
    p1, m1, v1 = adam_round(p0, 0, zeros, zeros, 1)
    kept, _, _ = adam_round(p1, 1, m1, v1, 2)  # averaged moments, step 2
    reset, _, _ = adam_round(p1, 1, zeros, zeros, 1)  # fresh state again
    opt = OptimizerConfig("adam", lr=lr, betas=(b1_, b2_), eps=eps)
    got_kept = _tiny_run(tiny, tmp_path / "kept", opt, True)
    got_reset = _tiny_run(tiny, tmp_path / "reset", opt, False)
    for got, want in ((got_kept, kept), (got_reset, reset)):
        np.testing.assert_allclose(got["fc.weight"], want[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["fc.bias"], want[1], rtol=1e-5, atol=1e-6)
    assert np.abs(got_kept["fc.weight"] - got_reset["fc.weight"]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# partitions and the worker cache


def test_partitions_are_balanced_disjoint_and_cover_the_split():
    train = np.arange(100, 203)  # 103 rows
    for rep in ("epoch", "never"):
        parts = [partition_rows(train, seed=1, epoch=0, n_parts=4, part=p, repartition=rep)
                 for p in range(4)]
        assert [len(p) for p in parts] == [26, 26, 26, 25] == partition_sizes(103, 4)
        assert sorted(np.concatenate(parts).tolist()) == train.tolist()
    e0 = partition_rows(train, seed=1, epoch=0, n_parts=4, part=1, repartition="never")
    e1 = partition_rows(train, seed=1, epoch=1, n_parts=4, part=1, repartition="never")
    assert set(e0) == set(e1) and not np.array_equal(e0, e1)  # same members, reshuffled
    r0 = partition_rows(train, seed=1, epoch=0, n_parts=4, part=1, repartition="epoch")
    r1 = partition_rows(train, seed=1, epoch=1, n_parts=4, part=1, repartition="epoch")
    assert set(r0) != set(r1)  # a new balanced repartition every epoch
    again = partition_rows(train, seed=1, epoch=1, n_parts=4, part=1, repartition="epoch")
    np.testing.assert_array_equal(r1, again)


@pytest.mark.parametrize("repartition", ["epoch", "never"])
@pytest.mark.parametrize("cache", ["split", "partition", "none"])
def test_worker_reads_its_rows_whatever_it_can_cache(blobs, repartition, cache):
    st = open_store(blobs)
    train = st.split_rows("train")  # 192 rows of 16 float32 + an int64 label: 72 bytes a row
    cap = {"split": 192 * 72, "partition": 96 * 72, "none": 95 * 72}[cache]

    def task(epoch, offset, count):
        return ShardTask(blobs, "train", seed=1, epoch=epoch, n_parts=2, part=1, offset=offset,
                         count=count, repartition=repartition, cache_bytes=cap)

    for epoch, offset, count in [(0, 10, 7), (0, 90, 6), (1, 0, 24), (2, 17, 5)]:
        rows = partition_rows(train, seed=1, epoch=epoch, n_parts=2, part=1,
                              repartition=repartition)
        x, y = load_round(task(epoch, offset, count))
        xr, yr = st.read_rows(rows[offset:offset + count])
        np.testing.assert_array_equal(x, xr)
        np.testing.assert_array_equal(y, yr)
        assert worker_state.stats(shards.FEATURES).nbytes <= cap
    kept = worker_state.stats(shards.FEATURES).entries
    if cache == "none" or (cache == "partition" and repartition == "epoch"):
        # nothing, or only this epoch's partition (the last epoch's is dropped)
        assert kept == (0 if cache == "none" else 1)
    else:
        # read once, then hit every round
        assert kept == 1 and worker_state.stats(shards.FEATURES).hits == 3
    with pytest.raises(ValueError, match="outside partition"):
        load_round(task(0, 90, 7))


def test_byte_capped_kind_evicts_least_recent():
    worker_state.forget("t")
    worker_state.put("t", ("a",), 1, nbytes=40, cap=100)
    worker_state.put("t", ("b",), 2, nbytes=40, cap=100)
    assert worker_state.peek("t", ("a",)) == 1
    worker_state.put("t", ("c",), 3, nbytes=40, cap=100)  # evicts b, the least recently used
    assert worker_state.peek("t", ("b",)) is None and worker_state.peek("t", ("a",)) == 1
    assert worker_state.peek("t", ("c",)) == 3
    worker_state.put("t", ("huge",), 4, nbytes=101, cap=100)
    assert worker_state.peek("t", ("huge",)) is None and worker_state.stats("t").nbytes <= 100
    worker_state.forget("t")


# ---------------------------------------------------------------------------------------------
# training learns; early stopping; the best head is kept


@pytest.mark.parametrize("head", [
    HeadConfig("softmax"),
    HeadConfig("mlp", hidden=(32,), dropout=0.2),
    HeadConfig("softmax", input_dropout=0.2, batch_norm=True),  # the Caltech-256 head
])
def test_training_learns_separable_features(blobs, tmp_path, head):
    from deeptransfer.evaluation import evaluate

    c = TrainConfig(head=head, optimizer=OptimizerConfig("nesterov", lr=0.05), workers=2,
                    batch_size_per_worker=16, averaging_frequency=2, epochs=6, patience=3, seed=0)
    ex = SerialExecutor(2)
    res = run(ex, blobs, c, tmp_path)
    assert res.best["val_top1"] > 0.95
    test = evaluate(ex, blobs, res.params, res.head, split="test")
    assert test["top1"] > 0.95 and test["n"] == 64
    assert res.history[0]["train_loss"] > res.history[-1]["train_loss"]


def test_batch_norm_head_trains_on_a_last_minibatch_of_one(tmp_path):
    url = make_store(tmp_path / "f.zarr", n_train=2 * 17, n_val=8, n_test=0, seed=3)
    c = cfg(head=HeadConfig("softmax", batch_norm=True), workers=2, batch_size_per_worker=8,
            averaging_frequency=3, epochs=1)
    res = run(SerialExecutor(2), url, c, tmp_path / "out")
    assert res.rounds == 1 and all(np.isfinite(v).all() for v in res.last_params.values())


def test_early_stopping_stops_and_keeps_the_best_head(blobs, tmp_path):
    from deeptransfer.evaluation import cross_entropy, predict_split

    c = TrainConfig(optimizer=OptimizerConfig("adam", lr=0.05), workers=2,
                    batch_size_per_worker=16, averaging_frequency=2, epochs=40, patience=2)
    ex = SerialExecutor(2)
    res = run(ex, blobs, c, tmp_path)
    assert res.stopped_early and len(res.history) < 40
    best_epoch = res.best["epoch"]
    assert len(res.history) == best_epoch + 1 + 2  # stopped after `patience` epochs without gain
    assert res.best["val_top1"] == max(h["val_top1"] for h in res.history)
    assert res.history[best_epoch]["best"] and not any(h["best"] for h in res.history[best_epoch + 1:])
    # the returned head is the one of the best epoch, not the last one
    assert not np.array_equal(res.params["fc.weight"], res.last_params["fc.weight"])
    pred = predict_split(ex, blobs, res.params, res.head, "val")
    assert cross_entropy(pred.labels, pred.logits) == pytest.approx(res.best["val_loss"], rel=1e-6)
    assert res.best_metrics["top1"] == res.best["val_top1"]


def test_class_weights_and_label_smoothing(blobs, tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(balanced_class_weights(y, 4)[:3],
                               compute_class_weight("balanced", classes=np.arange(3), y=y) * 3 / 4)
    logits = torch.randn(6, 3)
    t = torch.from_numpy(y)
    w = (1.0, 2.0, 0.5)
    torch.testing.assert_close(loss_fn(logits, t, label_smoothing=0.1, class_weights=w),
                               F.cross_entropy(logits, t, weight=torch.tensor(w), label_smoothing=0.1))
    res = run(SerialExecutor(2), blobs, cfg(class_weights="balanced", label_smoothing=0.1,
                                            workers=2, epochs=1), tmp_path)
    assert res.rounds > 0
    with pytest.raises(InvalidParameterError, match="one weight per class"):
        run(SerialExecutor(2), blobs, cfg(class_weights=[1.0, 2.0]), tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# checkpoints and resume


class Killed(Exception):
    pass


def kill_after(global_round):
    def hook(record):
        if record["global_round"] == global_round:
            raise Killed(f"killed after round {global_round}")
    return hook


RESUMABLE = dict(head=HeadConfig("mlp", hidden=(8,), dropout=0.2, batch_norm=True),
                 optimizer=OptimizerConfig("adam", lr=0.01, schedule="cosine", warmup_rounds=3),
                 workers=2, batch_size_per_worker=16, averaging_frequency=2, epochs=3, patience=5)


def _without_times(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _rounds(out):
    with open(os.path.join(out, "rounds.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_killed_run_resumes_to_the_same_head(blobs, tmp_path):
    c = cfg(**RESUMABLE)
    whole = run(SerialExecutor(2), blobs, c, tmp_path / "whole", plot=True)
    rpe = whole.rounds_per_epoch
    assert rpe == 3 and whole.rounds == 9
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(SerialExecutor(2), blobs, c, out, callback=kill_after(4))  # mid-epoch 1
    with pytest.raises(Killed):  # the last round of epoch 1, before its validation
        run(SerialExecutor(2), blobs, c, out, callback=kill_after(2 * rpe - 1))
    ex = SerialExecutor(2)
    resumed = run(ex, blobs, c, out, plot=True)
    assert ex.reduce_calls == rpe  # only the last epoch's rounds were run again
    assert_params_equal(resumed.last_params, whole.last_params)
    assert_params_equal(resumed.params, whole.params)
    assert _without_times(resumed.history) == _without_times(whole.history)
    assert resumed.best == whole.best and resumed.rounds == whole.rounds
    recs = _rounds(out)
    assert [r["global_round"] for r in recs] == list(range(whole.rounds))
    assert [(r["epoch"], r["round"]) for r in recs] == [(e, r) for e in range(3) for r in range(rpe)]
    for key in ("loss", "train_accuracy", "lr", "examples", "iteration"):
        assert [r[key] for r in recs] == [r[key] for r in _rounds(tmp_path / "whole")], key
    for r in recs:
        assert r["overhead_seconds"] == pytest.approx(max(r["round_seconds"] - r["compute_seconds"], 0))
    with open(out / "training.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # a finished run resumed is a no-op that returns the same result
    ex2 = SerialExecutor(2)
    again = run(ex2, blobs, c, out)
    assert ex2.reduce_calls == 0
    assert_params_equal(again.params, whole.params)


def test_kill_between_log_line_and_checkpoint_leaves_one_line_per_round(blobs, tmp_path,
                                                                        monkeypatch):
    c = cfg(**RESUMABLE)
    real = checkpoint_mod.save_checkpoint
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # the initial checkpoint, then rounds 0 and 1: dies saving round 2
            raise Killed("killed while checkpointing")
        return real(*a, **kw)

    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", flaky)
    with pytest.raises(Killed):
        run(SerialExecutor(2), blobs, c, tmp_path)
    assert len(_rounds(tmp_path)) == 3  # round 2 was logged but not checkpointed
    monkeypatch.setattr(checkpoint_mod, "save_checkpoint", real)
    res = run(SerialExecutor(2), blobs, c, tmp_path)
    assert [r["global_round"] for r in _rounds(tmp_path)] == list(range(res.rounds))


def test_each_callback_comes_after_its_rounds_checkpoint_in_round_order(blobs, tmp_path):
    # checkpoints are written while the next round runs; a callback must still see its own
    # round on disk (a kill raised from it resumes after that round, not before)
    from deeptransfer.training import load_checkpoint

    c = cfg(**RESUMABLE)
    seen = []

    def check(record):
        meta, *_ = load_checkpoint(str(tmp_path / "checkpoint.safetensors"))
        seen.append((record["global_round"], meta["global_round"]))
        assert record["checkpoint_seconds"] > 0 and record["checkpoint_wait_seconds"] >= 0

    res = run(SerialExecutor(2), blobs, c, tmp_path, callback=check)
    assert [g for g, _ in seen] == list(range(res.rounds))
    # on disk: the state after this round (the next round's write starts after the call)
    assert all(on_disk == g + 1 for g, on_disk in seen)
    starts = [r["start_time"] for r in _rounds(tmp_path)]
    assert starts == sorted(starts)


def test_resume_refuses_other_settings_and_resume_false_starts_over(blobs, tmp_path):
    c = cfg(epochs=1)
    first = run(SerialExecutor(1), blobs, c, tmp_path)
    with pytest.raises(InvalidParameterError, match="cannot be resumed.*resume=False"):
        run(SerialExecutor(1), blobs, cfg(epochs=1, seed=9), tmp_path)
    fresh = run(SerialExecutor(1), blobs, cfg(epochs=1, seed=9), tmp_path, resume=False)
    assert not np.array_equal(fresh.params["fc.weight"], first.params["fc.weight"])
    assert len(_rounds(tmp_path)) == fresh.rounds


def test_checkpoint_round_trips_without_pickle(tmp_path):
    from deeptransfer.training import load_checkpoint

    p = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64)}
    s = {"x.step": np.array(2.0, np.float32)}
    path = str(tmp_path / "ck.safetensors")
    loop_mod.save_checkpoint(path, {"epoch": 2, "history": [{"v": 0.5}]}, p, s, None)
    meta, params, opt, best = load_checkpoint(path)
    assert meta["epoch"] == 2 and meta["history"] == [{"v": 0.5}] and best is None
    assert_params_equal(params, p)
    assert_params_equal(opt, s)
    with open(path, "rb") as f:
        assert b"pickle" not in f.read() and not os.path.exists(path + f".tmp-{os.getpid()}")


# ---------------------------------------------------------------------------------------------
# schedules, configs, validation


def test_lr_schedules():
    o = OptimizerConfig("sgd", lr=1.0, schedule="step", gamma=0.5, step_epochs=2)
    assert [lr_at(o, e, 0, 4, 10) for e in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    o = OptimizerConfig("sgd", lr=1.0, schedule="exponential", gamma=0.5)
    assert lr_at(o, 1, 2, 4, 10) == pytest.approx(0.5 ** 1.5)
    o = OptimizerConfig("sgd", lr=1.0, schedule="cosine", min_lr=0.1)
    assert lr_at(o, 0, 0, 4, 10) == 1.0
    assert lr_at(o, 5, 0, 4, 10) == pytest.approx(0.55)
    assert lr_at(o, 10, 0, 4, 10) == pytest.approx(0.1)
    o = OptimizerConfig("sgd", lr=1.0, warmup_rounds=3)
    assert [lr_at(o, 0, r, 4, 10) for r in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_weight_decay_is_l2_on_weights_only():
    from deeptransfer.training.optim import make_optimizer

    head = build_head(HeadConfig("softmax", batch_norm=True), 4, 3, seed=0)
    before = head_params(head)
    opt = make_optimizer(OptimizerConfig("sgd", lr=0.1, momentum=0.0, weight_decay=0.5), head, 0.1)
    (0.0 * sum(p.sum() for p in head.parameters())).backward()  # zero gradients
    opt.step()
    after = head_params(head)
    np.testing.assert_allclose(after["fc.weight"], before["fc.weight"] * (1 - 0.1 * 0.5), rtol=1e-6)
    for k in ("fc.bias", "bn.weight", "bn.bias"):
        np.testing.assert_array_equal(after[k], before[k])


def test_progress_bar_runs(tiny, tmp_path, capsys):
    train_head(SerialExecutor(2), tiny, cfg(workers=2, epochs=1), str(tmp_path), progress=True,
               plot=False)
    assert "round" in capsys.readouterr().err


def test_configs_round_trip_through_json():
    c = TrainConfig(head=HeadConfig("mlp", hidden=(64, 32), dropout=0.5, batch_norm=True),
                    optimizer=OptimizerConfig("adam", lr=1e-3, betas=(0.8, 0.99),
                                              schedule="cosine"),
                    workers=3, class_weights=[1, 2, 3], repartition="never", patience=None)
    d = json.loads(json.dumps(c.to_dict()))
    assert TrainConfig.from_dict(d) == c
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    # nested dicts are accepted directly
    assert TrainConfig(head={"kind": "softmax"}, optimizer={"name": "sgd"}).optimizer.name == "sgd"


@pytest.mark.parametrize("make,match", [
    (lambda: OptimizerConfig("sgdd"), r"'name' parameter of OptimizerConfig must be one of "
                                      r"'sgd', 'nesterov', 'adam'. Got 'sgdd'"),
    (lambda: TrainConfig(batch_size_per_worker=0),
     r"'batch_size_per_worker' parameter of TrainConfig must be an int in the range \[1, inf\]. "
     r"Got 0 instead"),
    (lambda: TrainConfig(averaging_frequency=2.5), r"'averaging_frequency'.*Got 2.5"),
    (lambda: TrainConfig(workers=0), r"'workers'"),
    (lambda: TrainConfig(repartition="always"), r"'repartition'.*'never', 'epoch'"),
    (lambda: TrainConfig(save_updater="yes"), r"'save_updater'.*bool"),
    (lambda: TrainConfig(class_weights="auto"), r"'class_weights'.*'balanced'"),
    (lambda: TrainConfig(monitor="acc"), r"'monitor'"),
    (lambda: OptimizerConfig(lr=0), r"'lr'.*finite.*\(0.0, inf\)"),
    (lambda: OptimizerConfig(schedule="linear"), r"'schedule'"),
    (lambda: OptimizerConfig("nesterov", momentum=0.0), r"name='sgd' for plain SGD"),
    (lambda: HeadConfig("mlp"), r"at least one hidden layer"),
    (lambda: HeadConfig("softmax", hidden=(8,)), r"kind='mlp'"),
    (lambda: HeadConfig("softmax", dropout=0.5), r"input_dropout"),
    (lambda: HeadConfig("mlp", hidden=(0,)), r"'hidden'"),
    (lambda: HeadConfig("cnn"), r"'kind'.*'softmax', 'mlp'"),
    (lambda: TrainConfig.from_dict({"batchsize": 3}), r"Unknown TrainConfig option.*batchsize"),
    (lambda: TrainConfig(optimizer={"name": "adam", "learning_rate": 1}),
     r"Unknown OptimizerConfig option.*learning_rate"),
])
def test_invalid_options_say_what_is_wrong(make, match):
    with pytest.raises(InvalidParameterError, match=match) as e:
        make()
    assert isinstance(e.value, ValueError)  # existing `except ValueError` clauses still catch it


def test_train_head_checks_the_store(tmp_path):
    from deeptransfer.errors import StoreError

    url = make_store(tmp_path / "f.zarr", n_train=0, n_val=8, n_test=8)
    with pytest.raises(StoreError, match="no training rows"):
        run(SerialExecutor(1), url, cfg(), tmp_path / "out")
