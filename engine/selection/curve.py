"""Learning curves: accuracy against the number of labelled training images.

    result = run_curve(executor, "features.zarr", "curve/", sizes=[5, 10, 20, 30], repeats=3)

For each size (images per class, ``sizes``; or a fraction of each class's training rows,
``fractions``) and each repeat, a seeded stratified subset of the train split is drawn
(subsets of one repeat are nested: the first k of one seeded permutation per class, so a
larger size only adds images), and a head with the given options is trained on it. The
repeats of a size have the same number of rows, so they train together as one stack with a
minibatch of their own each (``vectorized``: one ``baddbmm`` per layer); each size (or a
share of its repeats, to give every worker a task) is one engine task. Scored on the subset
itself (train), and on the val and test splits when the store has them: mean and standard
deviation over the repeats, in ``curve.csv`` / ``curve.json`` (every run too) and
``curve.png``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import jsonutil
from ..errors import InvalidParameterError, check_float, check_int
from ..executor import Executor
from ..files import atomic_target, atomic_write, make_dirs
from .tables import csv_text
from .vectorized import GroupTask, TrialSpec, train_group

CURVE_FORMAT = "deeptransfer.curve/1"
CURVE_CSV, CURVE_JSON, CURVE_PNG = "curve.csv", "curve.json", "curve.png"
CURVE_FILES = (CURVE_CSV, CURVE_JSON, CURVE_PNG)
SCORED = ("train", "val", "test")


@dataclass
class CurveResult:
    points: list[dict[str, Any]]  # one per size: rows, mean and std of each score
    runs: list[dict[str, Any]]  # one per (size, repeat)
    seconds: float
    out_dir: str


def check_curve_out(out_dir: str, store_url: str) -> None:
    """OUT must be new, empty, or an earlier curve's folder (its curve.json is ours); never
    the store or a folder in it."""
    from ..modeldir import _within, local_path

    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise InvalidParameterError(f"OUT {out_dir!r} is an existing file: give curve a folder.")
    mine, store = local_path(d), local_path(store_url)
    if mine is not None and store is not None and (_within(mine, store) or _within(store, mine)):
        raise InvalidParameterError(f"OUT {out_dir!r} and the feature store {store_url!r} "
                                    f"overlap: choose a folder outside the store.")
    if not d.is_dir() or not any(d.iterdir()):
        return
    try:
        ours = json.loads((d / CURVE_JSON).read_text(encoding="utf-8")).get("format") == CURVE_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise InvalidParameterError(
            f"OUT {out_dir!r} is a folder of other files, not an earlier learning curve: give "
            f"curve a new or empty folder (nothing there was touched).")


def _check_sizes(sizes: Sequence[int] | None, fractions: Sequence[float] | None) -> None:
    if (sizes is None) == (fractions is None):
        raise InvalidParameterError("Give the training-set sizes as sizes (images per class, "
                                    "CLI: --sizes 5,10,20) or as fractions (--fractions "
                                    "0.1,0.5,1), one of the two.", param="sizes")
    vals = list(sizes if sizes is not None else fractions)  # type: ignore[arg-type]
    if not vals:
        raise InvalidParameterError("The list of sizes is empty.", param="sizes")
    for v in vals:
        if sizes is not None:
            check_int("sizes", v, low=1, where="curve")
        else:
            check_float("fractions", v, low=0.0, high=1.0, low_open=True, where="curve")
    if len(set(vals)) != len(vals):
        raise InvalidParameterError(f"The sizes repeat a value: {vals}.", param="sizes")


def subsets(labels: np.ndarray, n_classes: int, *, sizes: Sequence[int] | None,
            fractions: Sequence[float] | None, repeats: int, seed: int
            ) -> list[tuple[int, list[int], list[np.ndarray]]]:
    """Per size: (its index, rows per class, one array of train-split positions per repeat).

    Repeat r's subset of a size takes, in each class, the first k of the class's positions in
    the seeded permutation (seed, r, class): nested across sizes, stratified, and a class with
    fewer than k images gives all it has."""
    by_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    perms = [[cls[np.random.default_rng([seed, 18, r, c]).permutation(len(cls))]
              for c, cls in enumerate(by_class)] for r in range(repeats)]
    out = []
    vals = list(sizes) if sizes is not None else list(fractions)  # type: ignore[arg-type]
    for i, v in enumerate(vals):
        if sizes is not None:
            ks = [min(int(v), len(cls)) for cls in by_class]
        else:
            ks = [min(len(cls), max(1, int(round(float(v) * len(cls))))) if len(cls) else 0
                  for cls in by_class]
        subs = [np.sort(np.concatenate([p[c][:ks[c]] for c in range(n_classes)]))
                for p in perms]
        out.append((i, ks, subs))
    return out


def run_curve(executor: Executor, store_url: str, out_dir: str, *,
              sizes: Sequence[int] | None = None, fractions: Sequence[float] | None = None,
              repeats: int = 3, seed: int = 0, base: Any = None,
              storage_options: Mapping | None = None, progress: bool = True,
              plot: bool = True) -> CurveResult:
    """The learning curve of a head with ``base``'s options (see the module docstring)."""
    from ..store import open_store
    from ..training import TrainConfig, check_trainable
    from ..training.shards import store_key
    from ..training.trainable import SuffixSpec

    _check_sizes(sizes, fractions)
    check_int("repeats", repeats, low=1, where="curve")
    check_int("seed", seed, low=0, where="curve")
    base = TrainConfig() if base is None else TrainConfig.from_dict(base)
    check_curve_out(out_dir, store_url)
    store = open_store(store_url, storage_options=storage_options)
    train = check_trainable(store, base)
    sfx = SuffixSpec.from_store(store.attrs, base.train_from)
    if sfx is not None and sfx.train_from:
        raise InvalidParameterError(
            "curve trains heads on the stored features: on a store of maps give "
            "--train-from head (fine-tuning backbone stages per subset is not supported).",
            param="train_from")
    labels = np.asarray(store["labels"][:])[train].astype(np.int64)
    n_classes = len(store.classes)
    plan = subsets(labels, n_classes, sizes=sizes, fractions=fractions, repeats=repeats,
                   seed=seed)
    splits = tuple(s for s in ("val", "test") if len(store.split_rows(s)))
    key, opts = store_key(store.attrs), dict(storage_options or {})
    # every worker gets a task: the repeats of a size are split when sizes are fewer
    n_workers = max(1, int(executor.n_workers))
    chunks = max(1, min(repeats, -(-n_workers // len(plan))))
    tasks, meta = [], []
    for i, ks, subs in plan:
        for part in np.array_split(np.arange(repeats), chunks):
            if not len(part):
                continue
            trials = tuple(TrialSpec(trial=i * repeats + int(r), head=base.head,
                                     optimizer=base.optimizer,
                                     label_smoothing=base.label_smoothing, seed=base.seed + int(r),
                                     epochs=base.epochs, start_epoch=0, stop_epoch=base.epochs)
                           for r in part)
            tasks.append(GroupTask(store_url, opts, key, trials,
                                   batch_size=base.batch_size_per_worker,
                                   subsets=tuple(subs[int(r)] for r in part), eval_splits=splits,
                                   eval_train=True, return_state=False,
                                   cache_bytes=base.cache_bytes))
            meta.append((i, ks, [int(r) for r in part]))
    t0 = time.perf_counter()
    vals = list(sizes) if sizes is not None else list(fractions)  # type: ignore[arg-type]
    runs: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="curve", unit="task", dynamic_ncols=True)
    try:
        for ti, res in executor.map_unordered(train_group, tasks):
            i, ks, reps = meta[ti]
            for j, r in enumerate(reps):
                sc = res.scores[j]
                run = {"size": vals[i], "per_class": int(max(ks)), "n_train": int(sum(ks)),
                       "repeat": r, "seed": base.seed + r, "diverged": bool(res.diverged[j]),
                       "fit_seconds": res.seconds / len(reps)}
                for s in SCORED:
                    got = sc.get(s) or {}
                    run[f"{s}_top1"] = got.get("top1")
                    run[f"{s}_mean_per_class"] = got.get("mean_per_class")
                runs.append(run)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    runs.sort(key=lambda r: (vals.index(r["size"]), r["repeat"]))
    points = [_point(v, [r for r in runs if r["size"] == v]) for v in vals]
    kind = "per_class" if sizes is not None else "fraction"
    summary = {"format": CURVE_FORMAT, "store": store_url, "sizes_are": kind,
               "sizes": vals, "repeats": repeats, "seed": seed, "splits": list(splits),
               "train_config": base.to_dict(), "seconds": seconds, "points": points, "runs": runs}
    make_dirs(out_dir)
    atomic_write(os.path.join(out_dir, CURVE_CSV), csv_text(points))
    atomic_write(os.path.join(out_dir, CURVE_JSON), jsonutil.dumps(summary, indent=1) + "\n")
    if plot:
        plot_curve(points, os.path.join(out_dir, CURVE_PNG), splits=("train",) + splits,
                   xlabel="training images per class" if kind == "per_class" else
                   "training images (fraction of each class)")
    if progress:
        for p in points:
            parts = ", ".join(f"{s} {p[f'{s}_top1_mean']:.3f} ± {p[f'{s}_top1_std']:.3f}"
                              for s in ("train",) + splits if p.get(f"{s}_top1_mean") is not None)
            print(f"curve: {p['n_train']} rows ({kind} {p['size']}): {parts}", file=sys.stderr)
    return CurveResult(points=points, runs=runs, seconds=seconds, out_dir=out_dir)


def _point(size: Any, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    p: dict[str, Any] = {"size": size, "per_class": runs[0]["per_class"],
                         "n_train": runs[0]["n_train"], "repeats": len(runs),
                         "diverged": sum(r["diverged"] for r in runs)}
    for s in SCORED:
        for m in ("top1", "mean_per_class"):
            v = [r[f"{s}_{m}"] for r in runs if r[f"{s}_{m}"] is not None]
            p[f"{s}_{m}_mean"] = float(np.mean(v)) if v else None
            # the spread over repeats (population std: 0 for one repeat)
            p[f"{s}_{m}_std"] = float(np.std(v)) if v else None
    return p


def plot_curve(points: Sequence[Mapping[str, Any]], path: str, *,
               splits: Sequence[str] = SCORED, xlabel: str = "training images per class") -> str:
    """Accuracy (mean, and a band of one standard deviation over the repeats) against the
    training-set size; matplotlib's Agg canvas without pyplot, as ``training.plot`` draws."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.array([float(p["size"]) for p in points])
    colors = {"train": "tab:gray", "val": "tab:orange", "test": "tab:blue"}
    for s in splits:
        m = [p.get(f"{s}_top1_mean") for p in points]
        if all(v is None for v in m):
            continue
        mean = np.array([np.nan if v is None else v for v in m], dtype=float)
        sd = np.array([np.nan if p.get(f"{s}_top1_std") is None else p[f"{s}_top1_std"]
                       for p in points], dtype=float)
        ax.plot(x, mean, "o-", color=colors.get(s), label=f"{s} accuracy")
        ax.fill_between(x, mean - sd, mean + sd, color=colors.get(s), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (mean ± std over repeats)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title(f"learning curve ({points[0]['repeats']} repeats)")
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


def read_curve(out_dir: str) -> dict[str, Any]:
    """curve.json of a learning curve (for reports)."""
    with open(os.path.join(out_dir, CURVE_JSON), encoding="utf-8") as f:
        return json.load(f)


__all__ = ["run_curve", "CurveResult", "subsets", "plot_curve", "read_curve", "check_curve_out",
           "CURVE_FILES"]
