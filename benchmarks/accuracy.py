"""Accuracy benchmark: parameter-averaged head vs scikit-learn LogisticRegression, same features.

    python benchmarks/accuracy.py ../shared/datasets/caltech101 --per-class-train 30 \
        --exclude-class BACKGROUND_Google [--store runs/bench/caltech101.zarr] [--json]

The usual frozen-feature protocol: N training images per class, the rest for testing, mean
per-class accuracy reported. A small validation split (``--per-class-val``, default 5) is
drawn from the images *not* used for training, so training still sees exactly N per class;
it drives early stopping and the choice of the reference's C, and is left out of the test.

With ``--train-from STAGE`` (e.g. ``--layer blocks.5 --train-from blocks.6 --train-views 2
--seeds 0,1,2``): a store of maps with augmented training views per seed, then on each the
head alone on the pooled maps and the fine-tuned suffix + head (``--workers`` workers), the
LogisticRegression reference on the pooled maps, mean and spread over the seeds; for the
first seed also the fine-tuning on 1 worker (seconds per epoch, time to the same validation
accuracy), the store's size and the peak RSS per worker.

Prints, from one run: top-1 and mean per-class test accuracy of the head trained with
parameter averaging on ``--workers`` workers, the same for LogisticRegression (the
reference), and the training wall time of the averaging run next to single-process
training (one worker, same options) to the same validation accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

from engines import time_to  # one definition for both benchmarks

from deeptransfer import jsonutil


def reference_logreg(store, seed: int, read=None) -> dict:
    """LogisticRegression on standardized features, C chosen on the validation split
    (``read(store, rows)``: how to read features; default ``store.read_rows``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from deeptransfer.evaluation import metrics

    read = read or (lambda st, rows: st.read_rows(rows))
    xtr, ytr = read(store, store.split_rows("train"))
    xva, yva = read(store, store.split_rows("val"))
    xte, yte = read(store, store.split_rows("test"))
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


def pooled_rows(store, rows):
    """Features of image rows as vectors (a map store's maps averaged over H x W)."""
    x, y = store.read_rows(rows)
    return (x.mean((2, 3)) if x.ndim == 4 else x), y


def finetune_main(args: argparse.Namespace) -> dict:
    """Head-only vs fine-tuned suffix on the same store of maps, over several seeds."""
    import statistics

    import deeptransfer as dt
    from deeptransfer.adapters.local import LocalExecutor
    from deeptransfer.diagnostics import start_workers
    from deeptransfer.evaluation import evaluate as eval_head
    from deeptransfer.store import open_store, store_nbytes
    from deeptransfer.training import train_head
    from engines import TreeRSS

    name = os.path.basename(os.path.normpath(args.dataset))
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed = []
    for seed in seeds:
        url = args.store or os.path.join(
            "runs", "bench", f"{name}-{args.model}-{args.layer}-maps-k{args.train_views}-"
            f"{args.views}-{args.per_class_train}-{args.per_class_val}-s{seed}.zarr")
        t0 = time.perf_counter()
        rep = dt.featurize(args.dataset, url, model=args.model, layer=args.layer, keep_maps=True,
                           train_views=args.train_views, per_class_train=args.per_class_train,
                           per_class_val=args.per_class_val, exclude_classes=args.exclude_class,
                           seed=seed, views=args.views, progress=not args.json)
        featurize_s = time.perf_counter() - t0
        store = open_store(url)
        ref = reference_logreg(store, seed, read=pooled_rows)
        base = dict(optimizer=args.optimizer, lr=args.lr, schedule=args.schedule,
                    weight_decay=args.weight_decay, epochs=args.epochs, patience=None,
                    batch_size_per_worker=32, averaging_frequency=5, seed=seed,
                    suffix_lr_scale=args.suffix_lr_scale)
        runs = {}
        plan = [("head", "head", args.workers), ("finetune", args.train_from, args.workers)]
        if seed == seeds[0]:  # speed on 1 worker: once (the same compute on every seed)
            plan.append(("finetune_1", args.train_from, 1))
        for label, train_from, workers in plan:
            cfg = dt.train_config(train_from=train_from, workers=workers, **base)
            out = tempfile.mkdtemp(prefix=f"dt-ft-{label}-")
            with LocalExecutor(workers if workers > 1 else 0) as ex:
                start_workers(ex)
                with TreeRSS(ex.worker_pids if workers > 1 else None) as rss:
                    t = time.perf_counter()
                    res = train_head(ex, url, cfg, out, progress=False, plot=False)
                    wall = time.perf_counter() - t
                test = eval_head(ex, url, res.params, res.head, "test", suffix=res.suffix)
            epochs = [h["seconds"] for h in res.history]
            runs[label] = {"result": res, "wall": wall, "test": test, "rss": rss.summary(),
                           "epoch_s": statistics.median(epochs[1:] or epochs)}
            print(f"seed {seed} {label:10s} ({workers} worker{'s' if workers > 1 else ''}): "
                  f"mean per-class {test['mean_per_class']:.4f}, top-1 {test['top1']:.4f}, "
                  f"best val top-1 {res.best['val_top1']:.4f} (epoch {res.best['epoch']}), "
                  f"{runs[label]['epoch_s']:.1f} s/epoch",
                  file=sys.stderr if args.json else sys.stdout, flush=True)
        row = {"seed": seed, "featurize_seconds": featurize_s, "images": rep.images,
               "store_bytes": store_nbytes(url), "feature_shape": list(store.feature_shape),
               "reference_mean_per_class": ref["mean_per_class"], "reference_C": ref["C"]}
        for label, r in runs.items():
            row[f"{label}_mean_per_class"] = r["test"]["mean_per_class"]
            row[f"{label}_top1"] = r["test"]["top1"]
            row[f"{label}_epoch_seconds"] = r["epoch_s"]
            row[f"{label}_best_val_top1"] = r["result"].best["val_top1"]
            row[f"{label}_worker_peak_rss_mb"] = r["rss"]["worker_peak_rss_mb"] or [
                r["rss"]["driver_peak_rss_mb"]]
        if "finetune_1" in runs:
            two, one = runs["finetune"]["result"], runs["finetune_1"]["result"]
            target = min(two.best["val_top1"], one.best["val_top1"])
            t2, t1 = time_to(two.history, target), time_to(one.history, target)
            row.update(target_val_top1=target, time_to_target_seconds=t2,
                       single_time_to_target_seconds=t1,
                       time_to_target_ratio=(t2 / t1) if t1 and t2 else None,
                       epoch_seconds_ratio=runs["finetune"]["epoch_s"] / runs["finetune_1"]["epoch_s"])
        per_seed.append(row)

    def stat(key: str) -> tuple[float, float]:
        v = [100 * r[key] for r in per_seed]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    summary = {k: stat(f"{k}_mean_per_class") for k in ("head", "finetune")}
    summary["reference"] = stat("reference_mean_per_class")
    first = per_seed[0]
    print(f"\n{args.model} {args.layer} maps, {args.train_views} augmented views per train "
          f"image, test views {args.views}; {len(seeds)} seeds; mean per-class accuracy, mean "
          f"(spread) in %:")
    print(f"  fine-tuned from {args.train_from}: {summary['finetune'][0]:.2f} "
          f"({summary['finetune'][1]:.2f})")
    print(f"  head only on the pooled maps:   {summary['head'][0]:.2f} ({summary['head'][1]:.2f})")
    print(f"  LogisticRegression reference:   {summary['reference'][0]:.2f} "
          f"({summary['reference'][1]:.2f})")
    print(f"  store: {first['store_bytes'] / 2**20:.0f} MiB for {first['images']} images "
          f"(+ views), {first['store_bytes'] / max(first['images'], 1) / 1024:.1f} KiB per image")
    if first.get("epoch_seconds_ratio") is not None:
        print(f"  seconds per epoch: {first['finetune_1_epoch_seconds']:.1f} on 1 worker, "
              f"{first['finetune_epoch_seconds']:.1f} on {args.workers} -> "
              f"{first['epoch_seconds_ratio']:.2f}x")
        if first.get("time_to_target_ratio") is not None:
            print(f"  time to val top-1 {first['target_val_top1']:.4f}: "
                  f"{first['time_to_target_seconds']:.1f} s on {args.workers} workers vs "
                  f"{first['single_time_to_target_seconds']:.1f} s on 1 -> "
                  f"{first['time_to_target_ratio']:.2f}x")
    print(f"  peak RSS per worker while fine-tuning: "
          f"{max(first['finetune_worker_peak_rss_mb']):.0f} MiB")
    out = {"dataset": args.dataset, "model": args.model, "layer": args.layer,
           "train_from": args.train_from, "train_views": args.train_views, "views": args.views,
           "seeds": seeds, "summary": summary, "per_seed": per_seed}
    if args.json:
        print(jsonutil.dumps(out))
    return out


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
    ft = ap.add_argument_group("fine-tuning (--train-from): a store of maps, several seeds")
    ft.add_argument("--train-from", default=None, help="first stage fine-tuned, e.g. blocks.6")
    ft.add_argument("--layer", default="blocks.5", help="the store's layer (maps are kept)")
    ft.add_argument("--train-views", type=int, default=2, help="augmented views per train image")
    ft.add_argument("--seeds", default="0,1,2", help="splits and trainings, comma-separated")
    # the best of the configurations measured (docs/benchmarks.md): Adam 1e-3 for suffix and
    # head alike, cosine schedule
    ft.add_argument("--optimizer", default="adam")
    ft.add_argument("--lr", type=float, default=1e-3)
    ft.add_argument("--schedule", default="cosine")
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--suffix-lr-scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    if args.train_from:
        return finetune_main(args)

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
        print(jsonutil.dumps(out))
    return out


if __name__ == "__main__":
    main()
