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
    f.add_argument("--device", default="cpu", help="cpu or cuda")
    f.add_argument("--overwrite", action="store_true", help="replace an existing store")
    f.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _add_engine_args(f)

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
                    compile=args.compile, device=args.device, overwrite=args.overwrite,
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


COMMANDS = {"featurize": cmd_featurize, "info": cmd_info, "models": cmd_models}


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
