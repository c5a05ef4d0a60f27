"""The ``search`` and ``curve`` commands (registered into ``cli`` through ``_EXTRA_COMMANDS``).

    deeptransfer search features.zarr search/ --trials 64
    deeptransfer curve features.zarr curve/ --sizes 5,10,20,30 --repeats 3
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from . import jsonutil
from .cli import (COMMANDS, _EXTRA_COMMANDS, _engine_options, _float_type,
                  _int_type, _looks_like, _option, add_head_options,
                  add_optimizer_options)
from .errors import InvalidParameterError


def _numbers(text: str, flag: str, kind: type, example: str) -> list:
    """A comma-separated list of ``kind`` values given to ``flag`` (one line when it is not)."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise InvalidParameterError(f"{flag} takes {what} separated by commas, e.g. "
                                    f"{example}. Got {text!r}.") from None


def _check_order(command: str, store: str, out: str) -> None:
    """STORE first, then OUT: swapped arguments are said before anything is opened."""
    if _looks_like(out) == "store":
        raise InvalidParameterError(
            f"OUT {out!r} is a feature store: the order is `deeptransfer {command} STORE OUT`.")
    if _looks_like(store) == "model":
        raise InvalidParameterError(
            f"STORE {store!r} is a model directory, not a feature store: the order is "
            f"`deeptransfer {command} STORE OUT`.")


def _add_search(command: Callable[..., argparse.ArgumentParser]) -> None:
    s = command("search", help="search heads and hyper-parameters; retrain the best",
                description="Sample --trials head configurations from a search space, train "
                            "them many at once (stacked heads, one engine task per group), "
                            "halve them on validation accuracy rung by rung, and retrain the "
                            "best with parameter averaging into OUT (a model directory), with "
                            "search_results.csv/.json and best_config.json beside it.")
    s.add_argument("store", help="feature store made by `deeptransfer featurize` (with a val split)")
    s.add_argument("out", help="folder for the best model and the search results (new, empty, "
                               "or a model directory)")
    s.add_argument("--trials", type=_int_type(1), default=None, metavar="N",
                   help="trials to sample (default: 64; grid: a seeded N of the grid, default "
                        "all of it)")
    s.add_argument("--space", default=None, metavar="FILE",
                   help="JSON (or YAML) file of option -> value, list of choices or "
                        "{\"log_uniform\": [lo, hi]}; overrides the default space option by "
                        "option (default: head linear/mlp, hidden 256/512/1024, dropout, batch "
                        "norm, nesterov/adam, lr log-uniform 1e-4..0.1, weight decay, label "
                        "smoothing, 10 epochs)")
    s.add_argument("--sampler", default="random", choices=["random", "grid"],
                   help="random draws (seeded) or the grid of the choices")
    s.add_argument("--epochs", type=_int_type(1), default=None, metavar="N",
                   help="every trial's budget in epochs (default: the space's 'epochs', 10)")
    s.add_argument("--no-baseline", action="store_true",
                   help="random sampling: do not make trial 0 the head `train` would train "
                        "with these options (by default it is, to measure the search against)")
    s.add_argument("--no-halving", action="store_true",
                   help="train every trial its whole budget (no successive halving)")
    s.add_argument("--eta", type=_int_type(2), default=3,
                   help="successive halving: keep the best 1/eta trials after each rung")
    s.add_argument("--max-rungs", type=_int_type(1), default=4, metavar="K",
                   help="successive halving: at most K rungs (1 + log_eta(trials) otherwise); "
                        "fewer rungs make the first one longer")
    s.add_argument("--metric", default="top1", choices=["top1", "mean_per_class"],
                   help="validation score that ranks the trials")
    s.add_argument("--selection", default="one-se", choices=["one-se", "best"],
                   help="one-se: the best trial of the last rung replaces trial 0 "
                        "(the head `train` would train) only if it beats it on the validation "
                        "images by more than --selection-threshold standard errors of the "
                        "paired difference (seeded bootstrap); best: the best validation score "
                        "(default: %(default)s)")
    s.add_argument("--selection-threshold", type=float, default=1.0, metavar="K",
                   help="one-se: standard errors the best trial must beat trial 0 by "
                        "(default: %(default)s)")
    s.add_argument("--promote-by", default="score", choices=["score", "loss"],
                   help="what promotes trials between rungs: the validation --metric (score) "
                        "or the validation cross entropy (loss)")
    s.add_argument("--max-group", type=_int_type(1), default=64, metavar="N",
                   help="most trials trained together in one task")
    s.add_argument("--seed", type=_int_type(0), default=0,
                   help="seed of the sampling, and of every trial's initialization and data order")
    _option(s, "--batch-size-per-worker", type=_int_type(1), metavar="N",
            help="minibatch size of the trials and of the retraining's workers")
    _option(s, "--averaging-frequency", type=_int_type(1), metavar="N",
            help="retraining: minibatches each worker runs between averagings")
    _option(s, "--patience", type=_int_type(1), metavar="EPOCHS",
            help="retraining: stop after this many epochs without validation improvement")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def cmd_search(args: argparse.Namespace) -> int:
    from .api import search
    from .selection.search import BEST_CONFIG, RESULTS_CSV, RESULTS_JSON
    from .selection.space import SearchSpace

    _check_order("search", args.store, args.out)
    engine_options = _engine_options(args)
    space: Any = SearchSpace.from_file(args.space) if args.space else SearchSpace.from_dict(None)
    if args.epochs is not None:
        space = SearchSpace.from_dict({**space.options, "epochs": args.epochs})
    opts = {k: getattr(args, k) for k in ("batch_size_per_worker", "averaging_frequency",
                                          "patience") if getattr(args, k) is not None}
    trials = args.trials if args.trials is not None or args.sampler == "grid" else 64
    res = search(args.store, args.out, trials=trials, space=space, sampler=args.sampler,
                 halving=not args.no_halving, eta=args.eta, metric=args.metric, seed=args.seed,
                 max_group=args.max_group, engine=args.engine, workers=args.workers,
                 engine_options=engine_options, progress=not args.json,
                 baseline=not args.no_baseline, max_rungs=args.max_rungs,
                 selection=args.selection, selection_threshold=args.selection_threshold,
                 promote_by=args.promote_by, **opts)
    best = res.best
    summary = {"out": args.out, "trials": len(res.results), "rungs": res.rungs,
               "search_seconds": res.seconds, "best_trial": best["trial"],
               f"best_val_{best['metric']}": best["val_score"], "best_params": best["params"],
               "selection_reason": best.get("reason"),
               "retrained": res.summary.get("retrained"),
               "files": [os.path.join(args.out, f) for f in (RESULTS_CSV, RESULTS_JSON,
                                                             BEST_CONFIG)]}
    if args.json:
        print(jsonutil.dumps(summary))
        return 0
    print(f"{'trials':16s} {summary['trials']} in {res.rungs} rung(s), {res.seconds:.1f} s")
    print(f"{'best trial':16s} {best['trial']} (val {best['metric']} {best['val_score']:.4f})")
    print(f"{'why':16s} {best.get('reason')}")
    shown = {k: v for k, v in best["params"].items() if v is not None}
    print(f"{'best options':16s} {jsonutil.dumps(shown)}")
    r = summary["retrained"] or {}
    if r:
        print(f"{'retrained':16s} {args.out} (val top1 {r.get('val_top1')}, best epoch "
              f"{r.get('best_epoch')}, {r.get('rounds')} averaging rounds)")
    print(f"{'results':16s} {', '.join(summary['files'])}")
    return 0


def _add_curve(command: Callable[..., argparse.ArgumentParser]) -> None:
    c = command("curve", help="learning curve: accuracy vs training images per class",
                description="Train a head on --repeats seeded, stratified subsets of STORE's "
                            "train split for each size, and score it on the subset and on the "
                            "val/test splits: curve.csv, curve.json and curve.png in OUT.")
    c.add_argument("store", help="feature store made by `deeptransfer featurize`")
    c.add_argument("out", help="folder for curve.csv, curve.json and curve.png (new, empty, or "
                               "an earlier curve's)")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--sizes", default=None, metavar="N,N,...",
                   help="training images per class, e.g. 5,10,20,30 (default: none; give "
                        "--sizes or --fractions)")
    g.add_argument("--fractions", default=None, metavar="F,F,...",
                   help="fractions of each class's training images, e.g. 0.1,0.5,1 "
                        "(default: none)")
    c.add_argument("--repeats", type=_int_type(1), default=3, metavar="R",
                   help="seeded subsets per size (the spread is over these)")
    c.add_argument("--subset-seed", type=_int_type(0), default=0, metavar="SEED",
                   help="seed of the subsets (repeat r's head is seeded --seed + r)")
    _option(c, "--epochs", type=_int_type(1), metavar="N", help="passes over each subset")
    _option(c, "--batch-size-per-worker", type=_int_type(1), metavar="N", help="minibatch size")
    add_optimizer_options(c)
    add_head_options(c)
    _option(c, "--seed", type=_int_type(0), help="seed of the heads' initialization and order")
    c.add_argument("--json", action="store_true", help="print the points as one JSON object")


_CURVE_FLAGS = ("epochs", "batch_size_per_worker", "lr", "optimizer", "momentum",
                "weight_decay", "head", "dropout", "input_dropout", "batch_norm",
                "label_smoothing", "seed")


def cmd_curve(args: argparse.Namespace) -> int:
    from .api import curve
    from .selection.curve import CURVE_FILES

    _check_order("curve", args.store, args.out)
    engine_options = _engine_options(args)
    opts = {k: getattr(args, k) for k in _CURVE_FLAGS if getattr(args, k) is not None}
    if args.hidden:
        opts["hidden"] = tuple(_numbers(args.hidden, "--hidden", int, "512,256"))
    sizes = _numbers(args.sizes, "--sizes", int, "5,10,20,30") if args.sizes is not None else None
    fractions = _numbers(args.fractions, "--fractions", float, "0.1,0.5,1") if args.fractions is not None else None
    res = curve(args.store, args.out, sizes=sizes, fractions=fractions, repeats=args.repeats,
                seed=args.subset_seed, engine=args.engine, workers=args.workers,
                engine_options=engine_options, progress=not args.json, **opts)
    if args.json:
        print(jsonutil.dumps({"out": args.out, "seconds": res.seconds, "points": res.points}))
        return 0
    splits = [s for s in ("train", "val", "test") if res.points[0].get(f"{s}_top1_mean") is not None]
    print(f"{'size':>8s} {'rows':>7s} " + " ".join(f"{s + ' top1':>17s}" for s in splits))
    for p in res.points:
        cells = " ".join(f"{p[f'{s}_top1_mean']:>9.4f} ± {p[f'{s}_top1_std']:.3f}" for s in splits)
        print(f"{p['size']!s:>8s} {p['n_train']:>7d} {cells}")
    print(f"files: {', '.join(os.path.join(args.out, f) for f in CURVE_FILES)}")
    return 0


_EXTRA_COMMANDS.append(("search", _add_search))
_EXTRA_COMMANDS.append(("curve", _add_curve))
COMMANDS["search"] = cmd_search
COMMANDS["curve"] = cmd_curve
