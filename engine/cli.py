"""The command line: ``deeptransfer featurize|train|evaluate|predict|info|models|demo``.

Every user error (bad path, unknown model, bad option, missing engine) is one line on
stderr and exit code 2; a crash is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from .errors import DeeptransferError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if getattr(args, "scheduler", None):
        opts["address"] = args.scheduler
    if getattr(args, "master", None):
        opts["master"] = args.master
    return opts


#: the commands that run on an engine (and take --engine, --workers, --scheduler, --master)
ENGINE_COMMANDS = ("featurize", "train", "evaluate", "demo")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="local",
                   help="local (default, no cluster), dask, dask-cuda or spark")
    g.add_argument("--workers", type=int, default=None,
                   help="worker processes (local / new Dask cluster / Spark local[N])")
    g.add_argument("--scheduler", default=None,
                   help="Dask scheduler address, e.g. tcp://10.0.0.1:8786 (default: a local cluster)")
    g.add_argument("--master", default=None,
                   help="Spark master URL, e.g. yarn or spark://host:7077 (default: local[N])")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(
        prog="deeptransfer",
        description="Distributed transfer learning on images: featurize with a frozen "
                    "pretrained CNN, train a head with parameter averaging.")
    ap.add_argument("--version", action="version", version=f"deeptransfer {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("featurize", help="images -> Zarr store of pretrained-CNN features")
    f.add_argument("dataset", help="folder (or fsspec URL) with one sub-folder per class")
    f.add_argument("store", help="Zarr store to write (path or fsspec URL)")
    f.add_argument("--model", default="efficientnet_lite0", help="see `deeptransfer models`")
    f.add_argument("--layer", default=None, help="layer to cut the network at (default: the model's)")
    f.add_argument("--weights", default=None, help="state-dict file for the model (default: bundled/hub)")
    sp = f.add_mutually_exclusive_group()
    sp.add_argument("--split", default=None, help="fractions, e.g. train=0.7,val=0.1,test=0.2")
    sp.add_argument("--per-class-train", type=int, default=None, metavar="N",
                    help="N training images per class, the rest test")
    f.add_argument("--per-class-val", type=int, default=0, metavar="N")
    f.add_argument("--exclude-class", action="append", default=[], metavar="CLASS")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--chunk-rows", type=int, default=256, help="images per task / Zarr chunk")
    f.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    f.add_argument("--compile", action="store_true", help="torch.compile the network")
    f.add_argument("--views", default="center", choices=["center", "center+flip"],
                   help="center+flip: average the features of each image and its mirror (2x compute)")
    f.add_argument("--device", default=None, help="cpu or cuda (default: the engine's)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing store")
    f.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    i = sub.add_parser("info", help="describe a feature store")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")

    m = sub.add_parser("models", help="list the model zoo and its layers")
    m.add_argument("pattern", nargs="?", default=None)

    for name, fn in _EXTRA_COMMANDS:
        fn(sub)
    return ap


_EXTRA_COMMANDS: list[tuple[str, Any]] = []


def _print_featurize(rep: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rep.to_dict()))
        return
    print(f"store        {rep.store}")
    print(f"model        {rep.model['name']} @ {rep.model['layer']} ({rep.feature_dim}-d), engine {rep.engine}")
    print(f"images       {rep.images}: {rep.featurized} featurized, {len(rep.skipped)} skipped")
    print(f"this run     {rep.computed_now} images in {rep.seconds:.1f} s "
          f"({rep.images_per_second:.1f} images/s)")
    print(f"store size   {_human_bytes(rep.store_bytes)}")
    for w in rep.warnings:
        print(f"warning      {w}")
    if rep.skipped:
        print("skipped:")
        for path, reason in rep.skipped[:50]:
            print(f"  {path}: {reason}")
        if len(rep.skipped) > 50:
            print(f"  ... and {len(rep.skipped) - 50} more (`deeptransfer info {rep.store}`)")


def cmd_featurize(args: argparse.Namespace) -> int:
    from .api import featurize

    rep = featurize(args.dataset, args.store, model=args.model, layer=args.layer,
                    weights=args.weights, engine=args.engine, workers=args.workers,
                    engine_options=_engine_options(args), split=args.split,
                    per_class_train=args.per_class_train, per_class_val=args.per_class_val,
                    exclude_classes=args.exclude_class, seed=args.seed,
                    batch_size=args.batch_size, dtype=args.dtype, chunk_rows=args.chunk_rows,
                    compile=args.compile, device=args.device, views=args.views,
                    overwrite=args.overwrite,
                    progress=not args.json)
    _print_featurize(rep, args.json)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .api import info

    s = info(args.store)
    if args.json:
        print(json.dumps(s))
        return 0
    for k in ("url", "rows", "featurized", "skipped", "chunks_done", "classes", "splits",
              "feature_dim", "dtype", "model", "preprocess", "seed"):
        print(f"{k:12s} {s[k]}")
    print(f"{'bytes':12s} {_human_bytes(s['bytes'])}")
    from .store import open_store

    for path, reason in open_store(args.store).skipped()[:50]:
        print(f"skipped      {path}: {reason}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import get_model_info, list_models

    for name in list_models(args.pattern):
        mi = get_model_info(name)
        layers = ", ".join(f"{k}:{v}" for k, v in mi.layers.items())
        print(f"{name:22s} default {mi.default_layer} | {layers}")
    return 0


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train a classifier head with parameter averaging")
    t.add_argument("store", help="feature store made by `deeptransfer featurize`")
    t.add_argument("model_dir", help="folder for the trained model, its checkpoint and statistics")
    t.add_argument("--batch-size-per-worker", type=int, default=None)
    t.add_argument("--averaging-frequency", type=int, default=None,
                   help="minibatches each worker runs between averagings")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--optimizer", default=None, choices=["sgd", "nesterov", "adam"])
    t.add_argument("--momentum", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None, help="L2 coefficient")
    t.add_argument("--schedule", default=None, choices=["constant", "step", "cosine", "exponential"])
    t.add_argument("--head", default=None, choices=["softmax", "mlp"])
    t.add_argument("--hidden", default=None, help="mlp hidden sizes, e.g. 512,256")
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--input-dropout", type=float, default=None)
    t.add_argument("--batch-norm", action="store_true", default=None)
    t.add_argument("--label-smoothing", type=float, default=None)
    t.add_argument("--class-weights", default=None, choices=["balanced"])
    t.add_argument("--save-updater", dest="save_updater", action="store_true", default=None,
                   help="average the optimizer state too (default)")
    t.add_argument("--no-save-updater", dest="save_updater", action="store_false")
    t.add_argument("--repartition", default=None, choices=["epoch", "never"])
    t.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    t.add_argument("--json", action="store_true")

    e = sub.add_parser("evaluate", help="metrics of a trained model on a split of a store")
    e.add_argument("model_dir")
    e.add_argument("store")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--report", default=None, metavar="DIR",
                   help="write metrics.json, report.txt and confusion.png there")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("predict", help="classify image files with a trained model")
    p.add_argument("model_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    x = sub.add_parser("export", help="export backbone + head for serving")
    x.add_argument("model_dir")
    x.add_argument("output")
    x.add_argument("--format", default="torchscript", choices=["torchscript", "onnx"])

    d = sub.add_parser("demo", help="the whole recipe on scikit-learn's digits (no network)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=30)

    sub.add_parser("spark-entry", help="print the script path to give spark-submit")
    for name in ENGINE_COMMANDS:
        _add_engine_args(sub.choices[name])


_EXTRA_COMMANDS.append(("train", _add_train))

_TRAIN_FLAGS = {
    "batch_size_per_worker": "batch_size_per_worker", "averaging_frequency": "averaging_frequency",
    "epochs": "epochs", "lr": "lr", "optimizer": "optimizer", "momentum": "momentum",
    "weight_decay": "weight_decay", "schedule": "schedule", "head": "head",
    "dropout": "dropout", "input_dropout": "input_dropout", "batch_norm": "batch_norm",
    "label_smoothing": "label_smoothing", "class_weights": "class_weights",
    "save_updater": "save_updater", "repartition": "repartition", "patience": "patience",
    "seed": "seed",
}


def cmd_train(args: argparse.Namespace) -> int:
    from .api import train

    opts = {v: getattr(args, k) for k, v in _TRAIN_FLAGS.items() if getattr(args, k) is not None}
    if args.hidden:
        from .errors import InvalidParameterError

        try:
            opts["hidden"] = tuple(int(h) for h in args.hidden.split(","))
        except ValueError:
            raise InvalidParameterError(
                f"--hidden takes layer widths like 512,256. Got {args.hidden!r}.") from None
    res = train(args.store, args.model_dir, engine=args.engine, workers=args.workers,
                engine_options=_engine_options(args), resume=not args.no_resume,
                progress=not args.json, **opts)
    best = res.best or {}
    summary = {"model_dir": args.model_dir, "rounds": res.rounds, "epochs": len(res.history),
               "stopped_early": res.stopped_early, "best_epoch": best.get("epoch"),
               "val_top1": best.get("val_top1"), "val_mean_per_class": best.get("val_mean_per_class")}
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:20s} {v}")
        print(f"{'statistics':20s} {os.path.join(args.model_dir, 'rounds.jsonl')}, "
              f"{os.path.join(args.model_dir, 'training.png')}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import evaluate
    from .evaluation import format_report

    m = evaluate(args.model_dir, args.store, split=args.split, engine=args.engine,
                 workers=args.workers, engine_options=_engine_options(args), report_dir=args.report)
    if args.json:
        print(json.dumps(m))
    else:
        print(format_report(m, title=f"{args.model_dir} on {args.store} [{args.split}]",
                            max_classes=30))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .artifact import load

    preds = load(args.model_dir).predict(args.images, top_k=args.top_k)
    failed = 0
    for p in preds:
        if args.json:
            print(json.dumps(p.to_dict()))
        elif p.error:
            print(f"{p.path}: error: {p.error}")
        else:
            tops = ", ".join(f"{c} {s:.3f}" for c, s in p.top_k)
            print(f"{p.path}: {p.label} ({p.score:.3f})  [{tops}]")
        failed += p.error is not None
    return 1 if failed == len(preds) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .artifact import load

    path = load(args.model_dir).export(args.output, format=args.format)
    print(f"exported {args.format} pipeline to {path} (preprocessing and classes in {path}.json)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, engine=args.engine, workers=args.workers or 2, epochs=args.epochs)
    return 0


def cmd_spark_entry(args: argparse.Namespace) -> int:
    # a path, found without importing the Spark adapter (pyspark may not be on this machine)
    import importlib.util

    spec = importlib.util.find_spec("deeptransfer.adapters.spark_submit")
    if spec is None or spec.origin is None:  # pragma: no cover - part of the package
        print("deeptransfer spark-entry: the Spark entry script is missing", file=sys.stderr)
        return 2
    print(spec.origin)
    return 0


COMMANDS = {"featurize": cmd_featurize, "info": cmd_info, "models": cmd_models,
            "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "export": cmd_export, "demo": cmd_demo, "spark-entry": cmd_spark_entry}


def main(argv: Sequence[str] | None = None) -> int:
    # Spark workers must start this interpreter (it has torch), and servers bind to loopback
    # unless the user said otherwise.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DeeptransferError as exc:
        print(f"deeptransfer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
