"""Metrics, the distributed prediction step, a text report and a confusion-matrix plot.

``predict_rows`` is the executor step of both the per-epoch validation pass of training and
``evaluate``: each task names a block of a split's rows; the worker reads those rows from
the store itself and returns the head's logits, so only parameters and small specs travel.

``metrics`` follows scikit-learn's definitions (the tests check it against them): top-1,
top-k (k = 5, or the number of classes when fewer; the key says its k: ``top5``, ``top3``),
mean per-class accuracy (the mean recall over the classes present, i.e.
``balanced_accuracy_score``), per-class precision / recall / F1 / support (0 where
undefined), and the confusion matrix (rows: true class, columns: predicted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InvalidParameterError, check_int
from .executor import Executor


# -- metrics --------------------------------------------------------------------------------

def metrics(y_true: np.ndarray, scores: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Classification metrics of scores (logits or probabilities, shape (n, n_classes))."""
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(scores)
    c = len(classes)
    if s.ndim != 2 or s.shape != (len(y), c):
        raise InvalidParameterError(
            f"scores must have shape (n, n_classes) = ({len(y)}, {c}); got {s.shape}.")
    if len(y) and (y.min() < 0 or y.max() >= c):
        raise InvalidParameterError(f"labels must lie in [0, {c}); got [{y.min()}, {y.max()}].")
    n = len(y)
    pred = s.argmax(axis=1) if n else np.zeros(0, np.int64)
    k = min(5, c)
    if n:
        # a row is right at top-k when fewer than k classes score strictly higher than the truth
        # (scikit-learn's top_k_accuracy_score without ties; a tie counts in the truth's favour)
        true_score = s[np.arange(n), y]
        higher = (s > true_score[:, None]).sum(axis=1)
        topk = float(np.mean(higher < k))
        top1 = float(np.mean(pred == y))
    else:
        topk = top1 = float("nan")
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(c), where=denom > 0)
    present = support > 0
    mean_per_class = float(recall[present].mean()) if present.any() else float("nan")
    per_class = [{"class": str(classes[i]), "precision": float(precision[i]),
                  "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
                 for i in range(c)]
    return {
        "n": int(n),
        "top1": top1,
        f"top{k}": topk,
        "top_k": k,
        "mean_per_class": mean_per_class,
        "macro_precision": float(precision.mean()) if c else float("nan"),
        "macro_recall": float(recall.mean()) if c else float("nan"),
        "macro_f1": float(f1.mean()) if c else float("nan"),
        "per_class": per_class,
        "confusion": cm.tolist(),
        "classes": [str(x) for x in classes],
    }


def topk_key(m: Mapping[str, Any]) -> str:
    """The key of the top-k accuracy in ``metrics(...)``: ``top5``, or ``top{k}`` for fewer classes."""
    return f"top{m.get('top_k', 5)}"


def headline(m: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of ``metrics(...)``: n, top1, top{k} with its k, mean per-class."""
    key = topk_key(m)
    return {k: m[k] for k in ("n", "top1", key, "top_k", "mean_per_class") if k in m}


def split_counts(store: Any) -> dict[str, int]:
    """Featurized rows per split of a feature store."""
    from .dataset import SPLITS

    return {s: len(store.split_rows(s)) for s in SPLITS}


def check_split_has_rows(store: Any, split: str, store_url: str) -> None:
    """An empty split is an error naming the splits that have rows (an empty evaluation has
    no metrics: it would report NaN)."""
    counts = split_counts(store)
    if counts.get(split, 0) == 0:
        have = ", ".join(f"{s} ({n} rows)" for s, n in counts.items() if n) or "none"
        raise InvalidParameterError(
            f"The {split!r} split of {store_url!r} has no featurized rows; the splits with rows "
            f"are: {have}. Choose one of those (CLI: --split), or featurize with a split that "
            f"has a {split} part.", param="split")


def cross_entropy(y_true: np.ndarray, logits: np.ndarray) -> float:
    """Mean cross entropy of logits (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64)
    if len(z) == 0:
        return float("nan")
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(z)), np.asarray(y_true, dtype=np.int64)]))


# -- the prediction step --------------------------------------------------------------------

@dataclass(frozen=True)
class PredictTask:
    """A block of a split's rows: positions ``[start, stop)`` of ``split_rows(split)``."""

    store_url: str
    split: str
    start: int
    stop: int
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    store_key: str = ""
    cache_bytes: int = 0  # > 0: keep the block's features in the worker (validation each epoch)


@dataclass(frozen=True)
class PredictState:
    """Broadcast once per pass: the trainable module's spec and its parameters."""

    head: Any  # HeadConfig (or its dict)
    in_dim: int
    n_classes: int
    params: Mapping[str, np.ndarray]
    suffix: Any = None  # training.trainable.SuffixSpec (or its dict); None: the head alone


@dataclass
class Predictions:
    rows: np.ndarray  # store rows
    logits: np.ndarray  # float32 (n, n_classes)
    labels: np.ndarray  # int64 (n,)


def predict_rows(task: PredictTask, shared: PredictState) -> Predictions:
    """Executor step: the head's logits on one block of rows, read by the worker itself."""
    import torch

    from .training.averaging import one_torch_thread
    from .training.heads import HeadConfig, load_params
    from .training.shards import feature_parts, read_cached, split_rows
    from .training.trainable import SuffixSpec, worker_module

    rows = split_rows(task.store_url, task.split, task.storage_options, task.store_key)
    rows = rows[task.start:task.stop]
    if task.cache_bytes > 0:
        parts = feature_parts("block", task, task.split, task.start, task.stop)
        x, y = read_cached(parts, task.store_url, task.storage_options, rows, task.cache_bytes)
    else:
        from .store import cached_store

        x, y = cached_store(task.store_url, task.storage_options).read_rows(rows)
    with one_torch_thread(), torch.no_grad():
        # the worker's module, built once (a suffix is a network); this pass's parameters
        head = worker_module(SuffixSpec.from_dict(shared.suffix),
                             HeadConfig.from_dict(shared.head), shared.in_dim, shared.n_classes)
        load_params(head, shared.params)
        head.eval()
        # a copy: cached blocks are read-only, which torch.from_numpy warns about
        logits = head(torch.from_numpy(np.array(x, dtype=np.float32, order="C"))).numpy()
    return Predictions(rows=np.asarray(rows), logits=logits.astype(np.float32, copy=False),
                       labels=np.asarray(y))


def predict_split(executor: Executor, store_url: str, params: Mapping[str, np.ndarray],
                  head_config: Any, split: str = "test", *, storage_options: Mapping | None = None,
                  block_rows: int = 4096, cache_bytes: int = 0, suffix: Any = None) -> Predictions:
    """Logits of the trained module (``suffix``, then the head) on every featurized row of a
    split, in store order."""
    from .store import cached_store
    from .training.shards import store_key

    check_int("block_rows", block_rows, low=1, where="evaluate")
    store = cached_store(store_url, storage_options)
    rows = store.split_rows(split)
    n, c = len(rows), len(store.classes)
    key = store_key(store.attrs)
    tasks = [PredictTask(store_url, split, s, min(s + block_rows, n), dict(storage_options or {}),
                         key, cache_bytes) for s in range(0, n, block_rows)]
    state = PredictState(head_config, store.feature_dim, c, params, suffix)
    logits = np.zeros((n, c), np.float32)
    labels = np.zeros(n, np.int64)
    for i, p in executor.map_unordered(predict_rows, tasks, shared=state):
        t = tasks[i]
        logits[t.start:t.stop] = p.logits
        labels[t.start:t.stop] = p.labels
    return Predictions(rows=rows, logits=logits, labels=labels)


def evaluate(executor: Executor, store_url: str, params: Mapping[str, np.ndarray], head_config: Any,
             split: str = "test", *, storage_options: Mapping | None = None,
             block_rows: int = 4096, suffix: Any = None) -> dict[str, Any]:
    """Metrics (see ``metrics``) of a trained head (on a ``suffix``) on a split of the
    store, plus its loss."""
    from .store import cached_store

    store = cached_store(store_url, storage_options)
    check_split_has_rows(store, split, store_url)
    p = predict_split(executor, store_url, params, head_config, split,
                      storage_options=storage_options, block_rows=block_rows, suffix=suffix)
    m = metrics(p.labels, p.logits, store.classes)
    m["loss"] = cross_entropy(p.labels, p.logits)
    m["split"] = split
    return m


# -- report and plot ------------------------------------------------------------------------

def format_report(m: Mapping[str, Any], *, title: str | None = None, digits: int = 3,
                  max_classes: int | None = None) -> str:
    """A plain-text report: headline numbers, then a per-class table (like scikit-learn's)."""
    lines = []
    if title:
        lines += [title, "=" * len(title)]
    key = topk_key(m)
    head = f"n={m['n']}  top1={m['top1']:.{digits}f}  {key}={m[key]:.{digits}f}  " \
           f"mean per-class={m['mean_per_class']:.{digits}f}"
    if "loss" in m:
        head += f"  loss={m['loss']:.{digits + 1}f}"
    lines.append(head)
    rows = list(m.get("per_class", []))
    if rows:
        width = max(12, max(len(r["class"]) for r in rows))
        lines.append("")
        lines.append(f"{'class':>{width}}  precision     recall         f1    support")
        shown = rows if max_classes is None else rows[:max_classes]
        for r in shown:
            lines.append(f"{r['class']:>{width}}  {r['precision']:>9.{digits}f}  {r['recall']:>9.{digits}f}"
                         f"  {r['f1']:>9.{digits}f}  {r['support']:>9d}")
        if len(shown) < len(rows):
            lines.append(f"{'...':>{width}}  ({len(rows) - len(shown)} more classes)")
        lines.append("")
        lines.append(f"{'macro avg':>{width}}  {m['macro_precision']:>9.{digits}f}  "
                     f"{m['macro_recall']:>9.{digits}f}  {m['macro_f1']:>9.{digits}f}  {m['n']:>9d}")
    return "\n".join(lines)


def plot_confusion(m: Mapping[str, Any], path: str, *, normalize: bool = True,
                   title: str | None = None) -> str:
    """Save the confusion matrix of ``metrics(...)`` as a PNG (rows normalized by default)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(m["confusion"], dtype=np.float64)
    classes = list(m.get("classes") or [str(i) for i in range(len(cm))])
    if normalize:
        sums = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)
    c = len(classes)
    size = min(4 + 0.3 * c, 20)
    fig = Figure(figsize=(size, size * 0.9))  # no pyplot: no global state, whatever the backend
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else None,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if c <= 40:  # beyond that, names would overlap: the axes are class indices
        ax.set_xticks(range(c))
        ax.set_yticks(range(c))
        ax.set_xticklabels(classes, rotation=90, fontsize=8)
        ax.set_yticklabels(classes, fontsize=8)
    if c <= 15:
        for i in range(c):
            for j in range(c):
                v = cm[i, j]
                ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center",
                        fontsize=7, color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top1 = m.get("top1", float("nan"))
    ax.set_title(title or ("confusion matrix" if math.isnan(top1)
                           else f"confusion matrix (top1 {top1:.3f})"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
