"""Metrics against scikit-learn; the distributed prediction step; report and plot."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, log_loss,
                             precision_recall_fscore_support, top_k_accuracy_score)

from deeptransfer.dataset import Manifest
from deeptransfer.errors import InvalidParameterError
from deeptransfer.executor import Executor
from deeptransfer.evaluation import (cross_entropy, evaluate, format_report, metrics, plot_confusion,
                                   predict_split)
from deeptransfer.store import create_store, open_store
from deeptransfer.training import HeadConfig, build_head, head_params


class SerialExecutor(Executor):
    name = "serial"
    n_workers = 2

    def map_unordered(self, fn, tasks, *, shared=None):
        for i, t in enumerate(tasks):
            yield i, fn(t, shared)

    def map_reduce(self, fn, tasks, combine, *, shared=None, affinity=None):
        out = None
        for t in tasks:
            r = fn(t, shared)
            out = r if out is None else combine(out, r)
        return out

    def close(self):
        pass


class ShuffledExecutor(SerialExecutor):
    """Yields results in a scrambled order, as a real engine may."""

    def map_unordered(self, fn, tasks, *, shared=None):
        order = list(range(len(tasks)))
        random.Random(3).shuffle(order)
        for i in order:
            yield i, fn(tasks[i], shared)


def _check_against_sklearn(y, scores, c):
    classes = [f"k{i}" for i in range(c)]
    m = metrics(y, scores, classes)
    pred = scores.argmax(1)
    labels = list(range(c))
    assert m["n"] == len(y)
    assert m["top1"] == pytest.approx(accuracy_score(y, pred))
    if c > 5:
        assert m["top5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=labels))
    else:
        # fewer than 5 classes: the key says its k (top3), and there is no top5
        assert m[f"top{c}"] == 1.0 and m["top_k"] == c and "top5" not in m
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore")
        bal = balanced_accuracy_score(y, pred)
    assert m["mean_per_class"] == pytest.approx(bal)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    np.testing.assert_allclose([x["precision"] for x in m["per_class"]], p)
    np.testing.assert_allclose([x["recall"] for x in m["per_class"]], r)
    np.testing.assert_allclose([x["f1"] for x in m["per_class"]], f)
    assert [x["support"] for x in m["per_class"]] == s.tolist()
    assert [x["class"] for x in m["per_class"]] == classes
    assert m["confusion"] == confusion_matrix(y, pred, labels=labels).tolist()
    assert m["macro_f1"] == pytest.approx(f.mean())
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    c, n = 9, 400
    y = rng.integers(0, c, n)
    scores = rng.normal(size=(n, c))
    scores[np.arange(n), y] += rng.normal(1.0, 1.0, n)  # better than chance, not perfect
    m = _check_against_sklearn(y, scores, c)
    assert 0.2 < m["top1"] < 0.9 and m["top5"] > m["top1"]


def test_metrics_with_absent_and_never_predicted_classes():
    rng = np.random.default_rng(5)
    c, n = 8, 120
    y = rng.choice([0, 1, 2, 4, 5], n)  # classes 3, 6, 7 have no examples
    scores = rng.normal(size=(n, c))
    scores[:, 6] -= 10  # class 6 is never predicted
    m = _check_against_sklearn(y, scores, c)
    # the mean per-class accuracy is over the classes that have examples
    recalls = [x["recall"] for x in m["per_class"]]
    assert m["mean_per_class"] == pytest.approx(np.mean([recalls[i] for i in (0, 1, 2, 4, 5)]))


def test_metrics_few_classes_and_perfect_scores():
    y = np.array([0, 1, 2, 2, 1])
    m = _check_against_sklearn(y, np.eye(3)[y] * 5.0, 3)
    assert m["top1"] == m["mean_per_class"] == m["macro_f1"] == 1.0


def test_metrics_reject_bad_input():
    with pytest.raises(InvalidParameterError, match="shape"):
        metrics(np.array([0, 1]), np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(InvalidParameterError, match="labels"):
        metrics(np.array([0, 5]), np.zeros((2, 2)), ["a", "b"])


def test_cross_entropy_matches_log_loss():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 50)
    z = rng.normal(size=(50, 4)) * 3
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert cross_entropy(y, z) == pytest.approx(log_loss(y, p, labels=range(4)), rel=1e-9)


# -- through an executor ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, c, d = 150, 6, 10
    labels = rng.integers(0, c, n).astype(np.int32)
    split = rng.choice([0, 1, 2], n).astype(np.int8)
    m = Manifest("x", [f"{i}.jpg" for i in range(n)], labels, split, [f"class{i}" for i in range(c)])
    url = str(tmp_path_factory.mktemp("ev") / "f.zarr")
    st = create_store(url, m, feature_dim=d, attrs={"model": "synthetic"}, chunk_rows=32)
    x = (rng.normal(size=(n, d)) + labels[:, None] * 0.3).astype(np.float32)
    ok = np.ones(n, bool)
    ok[[3, 40, 41]] = False  # skipped images are not evaluated
    for i in range(st.n_chunks):
        a, b = st.chunk_bounds(i)
        st.write_chunk(i, x[a:b], ok[a:b], [""] * (b - a))
    return url


@pytest.mark.parametrize("executor", [SerialExecutor(), ShuffledExecutor()])
def test_evaluate_matches_direct_computation(store_url, executor):
    st = open_store(store_url)
    head_cfg = HeadConfig("mlp", hidden=(7,), dropout=0.5, batch_norm=True)
    head = build_head(head_cfg, st.feature_dim, len(st.classes), seed=4)
    params = head_params(head)
    rows = st.split_rows("test")
    x, y = st.read_rows(rows)
    with torch.no_grad():
        want = head.eval()(torch.from_numpy(x)).numpy()
    m = evaluate(executor, store_url, params, head_cfg, split="test", block_rows=7)
    expected = metrics(y, want, st.classes)
    for k in ("n", "top1", "top5", "mean_per_class", "confusion", "per_class"):
        assert m[k] == expected[k], k
    assert m["split"] == "test" and m["n"] == len(rows)
    assert m["loss"] == pytest.approx(cross_entropy(y, want), rel=1e-6)
    pred = predict_split(executor, store_url, params, head_cfg, "test", block_rows=7)
    np.testing.assert_array_equal(pred.rows, rows)
    np.testing.assert_allclose(pred.logits, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pred.labels, y)


def test_evaluate_validates_block_rows(store_url):
    with pytest.raises(InvalidParameterError, match="'block_rows'"):
        evaluate(SerialExecutor(), store_url, {}, HeadConfig(), block_rows=0)


def test_report_and_confusion_plot(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 60)
    scores = rng.normal(size=(60, 4)) + np.eye(4)[y] * 2
    m = metrics(y, scores, ["cat", "dog", "owl", "yak"])
    m["loss"] = cross_entropy(y, scores)
    text = format_report(m, title="test split")
    assert "test split" in text and "yak" in text and f"{m['top1']:.3f}" in text
    assert "macro avg" in text and "mean per-class" in text
    short = format_report(m, max_classes=2)
    assert "owl" not in short and "2 more classes" in short
    path = plot_confusion(m, str(tmp_path / "cm.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    many = metrics(rng.integers(0, 60, 300), rng.normal(size=(300, 60)), [str(i) for i in range(60)])
    plot_confusion(many, str(tmp_path / "cm60.png"), normalize=False)
    assert (tmp_path / "cm60.png").stat().st_size > 0
