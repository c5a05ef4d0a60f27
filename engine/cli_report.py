"""``deeptransfer report MODEL_DIR STORE --out report.html`` (registered in cli.py)."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from . import cli
from .cli import _engine_options, _int_type

__all__ = ["cmd_report"]


def _add_report(command: Callable[..., argparse.ArgumentParser]) -> None:
    r = command("report", help="one self-contained HTML page about a trained model",
                description="Write one self-contained HTML page (inline CSS/JS and thumbnails, "
                            "no network) about MODEL_DIR on STORE: headline metrics, a sortable "
                            "per-class table, the most confused class pairs, top-loss and "
                            "low-margin galleries, suspected label errors (out-of-fold refits "
                            "on the train split), the training curve, and the search results "
                            "and learning curve when present.")
    r.add_argument("model_dir", help="model directory made by `deeptransfer train`")
    r.add_argument("store", help="feature store made with the model's settings")
    r.add_argument("--out", default="report.html", metavar="FILE.html",
                   help="the page to write (an existing file only if it is a report)")
    r.add_argument("--split", default=None, choices=["train", "val", "test"],
                   help="split to report on (default: test, else val)")
    r.add_argument("--pairs", type=_int_type(0), default=20, metavar="N",
                   help="most confused class pairs shown")
    r.add_argument("--pair-examples", type=_int_type(0), default=4, metavar="N",
                   help="thumbnails per confused pair")
    r.add_argument("--gallery", type=_int_type(0), default=36, metavar="N",
                   help="images per gallery (top losses, difficult, label errors)")
    r.add_argument("--folds", type=_int_type(0), default=5, metavar="K",
                   help="out-of-fold refits for the suspected label errors (0: skip them)")
    r.add_argument("--oof-epochs", type=_int_type(1), default=30, metavar="N",
                   help="epochs of each out-of-fold refit")
    r.add_argument("--seed", type=_int_type(0), default=0, help="seed of the folds and refits")
    r.add_argument("--search", default=None, metavar="FILE",
                   help="search results JSON (default: MODEL_DIR/search/results.json if there)")
    r.add_argument("--curve", default=None, metavar="FILE",
                   help="learning curve JSON (default: MODEL_DIR/curve/curve.json if there)")
    r.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def cmd_report(args: argparse.Namespace) -> int:
    from . import jsonutil
    from .api import report

    data = report(args.model_dir, args.store, args.out, split=args.split, engine=args.engine,
                  workers=args.workers, engine_options=_engine_options(args), pairs=args.pairs,
                  pair_examples=args.pair_examples, gallery=args.gallery, folds=args.folds,
                  oof_epochs=args.oof_epochs, seed=args.seed, search=args.search,
                  curve=args.curve)
    summary = {"out": args.out, "bytes": os.path.getsize(args.out), "split": data.split,
               "classes": len(data.classes), **{k: data.headline.get(k) for k in
                                                ("n", "top1", "mean_per_class")},
               "confused_pairs": len(data.pairs), "suspected_label_errors":
                   data.label_error_count if data.label_errors is not None else None,
               "search": data.search is not None, "curve": data.curve is not None}
    if args.json:
        print(jsonutil.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:24s} {v}")
    return 0


cli._EXTRA_COMMANDS.append(("report", _add_report))
cli.COMMANDS["report"] = cmd_report
