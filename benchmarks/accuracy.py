"""Accuracy benchmark: parameter-averaged head vs scikit-learn LogisticRegression, same features.

    python benchmarks/accuracy.py ../shared/datasets/caltech101 --per-class-train 30 \
        --exclude-class BACKGROUND_Google [--store runs/bench/caltech101.zarr] [--json]

The usual frozen-feature protocol: N training images per class, the rest for testing, mean
per-class accuracy reported. A small validation split (``--per-class-val``, default 5) is
drawn from the images *not* used for training, so training still sees exactly N per class;
it drives early stopping and the choice of the reference's C, and is left out of the test.

Prints, from one run: top-1 and mean per-class test accuracy of the head trained with
parameter averaging on ``--workers`` workers, the same for LogisticRegression (the
reference), and the training wall time of the averaging run next to single-process
training (one worker, same options) to the same validation accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

from engines import time_to  # one definition for both benchmarks


def reference_logreg(store, seed: int) -> dict:
    """LogisticRegression on standardized features, C chosen on the validation split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from deeptransfer.evaluation import metrics

    xtr, ytr = store.read_rows(store.split_rows("train"))
    xva, yva = store.read_rows(store.split_rows("val"))
    xte, yte = store.read_rows(store.split_rows("test"))
    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)
    t0 = time.perf_counter()
    best = None
    for c in (0.01, 0.03, 0.1, 0.3, 1.0):
        clf = LogisticRegression(C=c, max_iter=300, random_state=seed).fit(xtr, ytr)
        acc = clf.score(xva, yva) if len(yva) else 0.0
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    _, c, clf = best
    m = metrics(yte, clf.predict_proba(xte), store.classes)
    return {"top1": m["top1"], "mean_per_class": m["mean_per_class"], "C": c,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--store", default=None, help="feature store to create or reuse")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--per-class-train", type=int, default=30)
    ap.add_argument("--per-class-val", type=int, default=5)
    ap.add_argument("--exclude-class", action="append", default=[])
    ap.add_argument("--views", default="center", choices=["center", "center+flip"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import deeptransfer as dt
    from deeptransfer.adapters.local import LocalExecutor
    from deeptransfer.diagnostics import start_workers
    from deeptransfer.evaluation import evaluate as eval_head
    from deeptransfer.store import open_store
    from deeptransfer.training import train_head

    name = os.path.basename(os.path.normpath(args.dataset))
    store_url = args.store or os.path.join(
        "runs", "bench",
        f"{name}-{args.model}-{args.views}-{args.per_class_train}-{args.per_class_val}-s{args.seed}.zarr")
    t0 = time.perf_counter()
    rep = dt.featurize(args.dataset, store_url, model=args.model,
                       per_class_train=args.per_class_train, per_class_val=args.per_class_val,
                       exclude_classes=args.exclude_class, seed=args.seed, views=args.views,
                       progress=not args.json)
    featurize_s = time.perf_counter() - t0
    store = open_store(store_url)
    ref = reference_logreg(store, args.seed)

    # fixed before looking at test scores: Adam with a cosine schedule, light L2 and feature
    # dropout; early stopping on the validation split
    cfg = dt.train_config(optimizer="adam", lr=1e-3, weight_decay=1e-4, epochs=args.epochs,
                          batch_size_per_worker=32, averaging_frequency=5, patience=15,
                          schedule="cosine", input_dropout=0.2, seed=args.seed)
    runs = {}
    for label, workers, ex_workers in (("averaging", args.workers, args.workers), ("single", 1, 0)):
        out = tempfile.mkdtemp(prefix=f"dt-acc-{label}-")
        with LocalExecutor(ex_workers) as ex:
            startup = start_workers(ex)  # engine start-up, reported on its own
            t = time.perf_counter()
            res = train_head(ex, store_url, replace(cfg, workers=workers), out, progress=False,
                             plot=False)
            wall = time.perf_counter() - t
            test = eval_head(ex, store_url, res.params, res.head, "test")
        runs[label] = {"result": res, "wall": wall, "test": test, "startup": startup}

    avg, single = runs["averaging"], runs["single"]
    target = min(avg["result"].best["val_top1"], single["result"].best["val_top1"])
    t_avg = time_to(avg["result"].history, target)
    t_single = time_to(single["result"].history, target)
    # the strict target (the lower best) is reached by chance late or early on a small
    # validation split; 99% of it measures the same thing with less noise. Both are printed.
    t99_avg = time_to(avg["result"].history, 0.99 * target)
    t99_single = time_to(single["result"].history, 0.99 * target)
    out = {
        "dataset": args.dataset, "model": args.model, "views": args.views, "images": rep.images,
        "classes": len(store.classes), "train": len(store.split_rows("train")),
        "val": len(store.split_rows("val")), "test": len(store.split_rows("test")),
        "featurize_seconds": featurize_s,
        "top1": avg["test"]["top1"], "top5": avg["test"]["top5"],
        "mean_per_class": avg["test"]["mean_per_class"],
        "single_top1": single["test"]["top1"], "single_mean_per_class": single["test"]["mean_per_class"],
        "reference_top1": ref["top1"], "reference_mean_per_class": ref["mean_per_class"],
        "reference_C": ref["C"],
        "workers": args.workers, "rounds": avg["result"].rounds,
        "train_seconds": avg["wall"], "single_process_train_seconds": single["wall"],
        "engine_startup_seconds": avg["startup"],
        "target_val_top1": target,
        "time_to_target_seconds": t_avg, "single_time_to_target_seconds": t_single,
        "time_to_target_ratio": (t_avg / t_single) if t_avg and t_single else None,
        "time_to_99pct_target_seconds": t99_avg, "single_time_to_99pct_target_seconds": t99_single,
        "time_to_99pct_target_ratio": (t99_avg / t99_single) if t99_avg and t99_single else None,
    }
    print(f"{out['classes']} classes: {out['train']} train / {out['val']} val / {out['test']} test "
          f"images, {args.model} features")
    print(f"parameter averaging ({args.workers} workers): top-1 {out['top1']:.4f}, "
          f"mean per-class {out['mean_per_class']:.4f} ({out['rounds']} rounds, {out['train_seconds']:.1f} s)")
    print(f"single process:                  top-1 {out['single_top1']:.4f}, "
          f"mean per-class {out['single_mean_per_class']:.4f} ({out['single_process_train_seconds']:.1f} s)")
    print(f"engine start-up ({args.workers} worker processes, not in the times above): "
          f"{avg['startup']:.1f} s")
    print(f"LogisticRegression (C={ref['C']}):     top-1 {ref['top1']:.4f}, "
          f"mean per-class {ref['mean_per_class']:.4f}")
    print(f"gap to reference (mean per-class): {100 * (out['mean_per_class'] - ref['mean_per_class']):+.2f} points")
    if out["time_to_target_ratio"] is not None:
        print(f"time to val top-1 {target:.4f}: {t_avg:.1f} s averaging vs {t_single:.1f} s single "
              f"process -> {out['time_to_target_ratio']:.2f}x")
    if out["time_to_99pct_target_ratio"] is not None:
        print(f"time to 99% of that ({0.99 * target:.4f}): {t99_avg:.1f} s averaging vs "
              f"{t99_single:.1f} s single process -> {out['time_to_99pct_target_ratio']:.2f}x")
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
