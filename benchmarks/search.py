"""Search benchmark: 64 stacked trials of the 1280 x 101 head vs training one head, one run.

    deeptransfer featurize ../shared/datasets/caltech101 /tmp/caltech101_30.zarr \
        --per-class-train 30 --per-class-val 5 --exclude-class BACKGROUND_Google
    python benchmarks/search.py /tmp/caltech101_30.zarr [--trials 64] [--epochs 10] \
        [--workers 2] [--json]

On one engine (local, ``--workers`` processes, started once and timed apart), in this order:

1. one head trained the normal way, ``train_head`` with parameter averaging and the default
   options (softmax, Nesterov 0.01, 32 per worker, averaging every 5) for ``--epochs``
   epochs exactly (no early stopping): its wall time and test mean per-class accuracy;
2. the same head as a one-trial search task (the trainer the trials use), for the cost of
   one head in the stacked trainer;
3. ``run_search`` over ``--trials`` linear heads (the 1280 x 101 head: batch norm, feature
   dropout, optimizer, lr, weight decay, label smoothing drawn from the default space),
   budget ``--epochs`` epochs, successive halving with eta 3 on validation ``--metric``: its
   wall time (without the retraining), the ratio to (1), and the selected trial's test mean
   per-class accuracy after it is retrained with parameter averaging into a model directory
   (as (1): ``--epochs`` epochs exactly, the last epoch's head). Trial 0 is the default head
   of (1) and reaches the last rung (its epochs count in the search's time); ``--selection
   one-se`` (default) keeps it unless the best finalist beats it by more than one standard
   error of the paired difference on validation.

4. the head of (1) trained again, after the search: the machine's load drifts, so the
   ratio is to the mean of (1) and (4) (the ratio to (1) alone is in the JSON too).

Prints the wall times and the ratio (target <= 3x), and the two test accuracies (target:
the selected trial's >= the default head's). The machine's cores may be shared with other work:
the figures are wall times of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="feature store (featurize with --per-class-train 30 "
                                  "--per-class-val 5)")
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metric", default="mean_per_class", choices=["top1", "mean_per_class"],
                    help="validation score that ranks the trials (the target is mean per-class)")
    ap.add_argument("--max-rungs", type=int, default=4, help="successive halving's rungs, at most")
    ap.add_argument("--selection", default="one-se", choices=["one-se", "best"],
                    help="how the winner is chosen among the last rung's trials")
    ap.add_argument("--promote-by", default="score", choices=["score", "loss"],
                    help="what promotes trials between rungs")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from deeptransfer.adapters.local import LocalExecutor
    from deeptransfer.evaluation import evaluate
    from deeptransfer.selection.search import run_search
    from deeptransfer.selection.vectorized import GroupTask, TrialSpec, train_group
    from deeptransfer.store import open_store
    from deeptransfer.training import TrainConfig, train_head
    from deeptransfer.training.shards import store_key

    out = args.out or tempfile.mkdtemp(prefix="search-bench-")
    store = open_store(args.store)
    key = store_key(store.attrs)
    res: dict = {"store": args.store, "trials": args.trials, "epochs": args.epochs,
                 "workers": args.workers, "n_train": len(store.split_rows("train")),
                 "n_val": len(store.split_rows("val")), "n_test": len(store.split_rows("test")),
                 "classes": len(store.classes), "feature_dim": store.feature_dim}
    res["load_average_before"] = list(os.getloadavg())
    t0 = time.perf_counter()
    with LocalExecutor(args.workers) as ex:
        from deeptransfer.diagnostics import start_workers

        start_workers(ex)
        res["engine_start_s"] = time.perf_counter() - t0

        # 1. one head, the normal way
        cfg = TrainConfig(epochs=args.epochs, patience=None, seed=args.seed)
        t = time.perf_counter()
        one = train_head(ex, args.store, cfg, os.path.join(out, "one_head"), progress=False,
                         plot=False)
        res["one_head_s"] = time.perf_counter() - t
        m = evaluate(ex, args.store, one.params, one.head, "test")
        res["one_head_test"] = {"top1": m["top1"], "mean_per_class": m["mean_per_class"]}

        # 2. the same head as a one-trial task of the stacked trainer
        spec = TrialSpec(0, cfg.head, cfg.optimizer, 0.0, seed=args.seed, epochs=args.epochs,
                         start_epoch=0, stop_epoch=args.epochs)
        task = GroupTask(args.store, {}, key, (spec,), batch_size=cfg.batch_size_per_worker,
                         return_state=False)
        t = time.perf_counter()
        list(ex.map_unordered(train_group, [task]))
        res["one_trial_task_s"] = time.perf_counter() - t

        # 3. the search
        space = {"head": ["linear"], "epochs": args.epochs}
        t = time.perf_counter()
        s = run_search(ex, args.store, os.path.join(out, "search"), trials=args.trials,
                       space=space, seed=args.seed, metric=args.metric,
                       max_rungs=args.max_rungs, selection=args.selection,
                       promote_by=args.promote_by,
                       base=TrainConfig(seed=args.seed, patience=None), progress=False)
        res["search_and_retrain_s"] = time.perf_counter() - t
        res["search_s"] = s.seconds
        res["rungs"] = s.rungs
        res["rung_log"] = s.summary["rungs"]
        res["trial_epochs"] = sum(r["epochs_trained"] for r in s.results)
        res["best"] = {"trial": s.best["trial"], "params": s.best["params"],
                       "val_score": s.best["val_score"], "reason": s.best["reason"]}
        sel = s.summary["selection"]
        res["selection"] = {"rule": sel["rule"], "leader": sel["leader"],
                            "winner": sel["winner"],
                            "finalists": [{k: f[k] for k in ("trial", "val_score",
                                                             "diff_vs_incumbent", "diff_se")}
                                          for f in sel["finalists"]]}
        tr = s.train_result
        m = evaluate(ex, args.store, tr.params, tr.head, "test")
        res["best_test"] = {"top1": m["top1"], "mean_per_class": m["mean_per_class"]}

        # 4. the one head again (the machine's load drifts: the ratio uses both timings)
        t = time.perf_counter()
        train_head(ex, args.store, cfg, os.path.join(out, "one_head_again"), progress=False,
                   plot=False)
        res["one_head_again_s"] = time.perf_counter() - t
    res["load_average_after"] = list(os.getloadavg())
    res["one_head_mean_s"] = (res["one_head_s"] + res["one_head_again_s"]) / 2
    res["ratio_search_vs_one_head"] = res["search_s"] / res["one_head_mean_s"]
    res["ratio_search_vs_first_one_head"] = res["search_s"] / res["one_head_s"]
    res["ratio_search_vs_one_trial_task"] = res["search_s"] / res["one_trial_task_s"]
    res["best_minus_default_mean_per_class"] = (res["best_test"]["mean_per_class"]
                                                - res["one_head_test"]["mean_per_class"])
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"store: {res['n_train']} train / {res['n_val']} val / {res['n_test']} test rows, "
          f"{res['classes']} classes, {res['feature_dim']}-d; local engine, {args.workers} "
          f"workers (started in {res['engine_start_s']:.1f} s)")
    print(f"one head, train_head, {args.epochs} epochs:   {res['one_head_s']:.2f} s before the "
          f"search, {res['one_head_again_s']:.2f} s after; test mean per-class "
          f"{res['one_head_test']['mean_per_class']:.4f}")
    print(f"one head as a one-trial task:        {res['one_trial_task_s']:.2f} s")
    print(f"search, {args.trials} trials, {res['rungs']} rungs "
          f"({res['trial_epochs']} trial-epochs): {res['search_s']:.2f} s "
          f"= {res['ratio_search_vs_one_head']:.2f}x one head (mean of both; target <= 3x)")
    print(f"selected trial {res['best']['trial']} {json.dumps(res['best']['params'])}")
    print(f"  why: {res['best']['reason']}")
    print(f"load average before / after: {res['load_average_before'][0]:.1f} / "
          f"{res['load_average_after'][0]:.1f}")
    print(f"selected trial retrained: test mean per-class {res['best_test']['mean_per_class']:.4f} "
          f"({res['best_minus_default_mean_per_class']:+.4f} vs the default head)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
