"""The command line: ``deeptransfer featurize|train|evaluate|predict|info|models|demo``.

Every user error (bad path, unknown model, bad option, missing engine) is one line on
stderr naming the option, and exit code 2; a crash is a bug and keeps its traceback.
Options are checked here, at the edge (numbers for finiteness and range), and the core
checks the rest before any engine starts; a core error that names a parameter is shown
with its flag (``--batch-size-per-worker``, not ``TrainConfig``).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from . import jsonutil
from .errors import DeeptransferError, InvalidParameterError


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help: argparse's, or the TrainConfig default of a
    train option (those default to None here, meaning "not given": see ``_config_default``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "%(default)" in text:
            return text
        path = getattr(action, "config_default", None)
        if path is not None:
            return f"{text} (default: {_config_default(path)})".replace("%", "%%")
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def _config_default(path: str) -> Any:
    """TrainConfig's default for ``path`` ("epochs", "optimizer.lr", "head.kind")."""
    from .training import TrainConfig

    value: Any = TrainConfig()
    for part in path.split("."):
        value = getattr(value, part)
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else value


def _int_type(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {v}")
        return v
    parse.__name__ = f"int>={low}"
    return parse


def _float_type(low: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number (NaN and infinities refused), optionally bounded below."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (v < low or (low_open and v == low)):
            raise argparse.ArgumentTypeError(
                f"must be a number {'>' if low_open else '>='} {low:g}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


#: what `predict` takes from a folder (the formats kernels/decode.py reads)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")

#: core parameter names that the CLI spells otherwise
_PARAM_ALIASES = {"n_workers": "workers", "address": "scheduler", "exclude_classes": "exclude_class",
                  "kind": "head", "top_k": "top_k"}


def _flag_for(parser: argparse.ArgumentParser | None, param: str | None) -> str | None:
    """The command-line flag of a core parameter (``batch_size_per_worker`` ->
    ``--batch-size-per-worker``), looked up in the command's own parser."""
    if parser is None or not param:
        return None
    dest = _PARAM_ALIASES.get(param, param)
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of actions
        if action.dest == dest and action.option_strings:
            return max(action.option_strings, key=len)
    return None


def _user_message(exc: DeeptransferError, parser: argparse.ArgumentParser | None) -> str:
    """The error in the command line's words: the flag in place of the parameter."""
    msg = str(exc)
    if isinstance(exc, InvalidParameterError):
        param = exc.param
        if param is None:  # a core message that follows the "The 'x' parameter" template
            found = re.search(r"The '(\w+)' parameter", msg)
            param = found.group(1) if found else None
        flag = _flag_for(parser, param)
        if flag is not None:
            if exc.requirement is not None:
                return exc.for_flag(flag)
            rewritten = re.sub(rf"The '{param}' parameter( of (the \S+ engine|\S+))?", flag, msg)
            return rewritten if flag in rewritten else f"{flag}: {msg}"
    return msg


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


DASK_ENGINES = ("dask", "dask-cuda")


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine's options from the flags; a flag of another engine is a user error."""
    opts: dict[str, Any] = {}
    engine = getattr(args, "engine", "local")
    if getattr(args, "scheduler", None):
        if engine not in DASK_ENGINES:
            raise InvalidParameterError(
                f"--scheduler is a Dask option (use --engine dask); the {engine!r} engine "
                f"does not take it.")
        opts["address"] = args.scheduler
    if getattr(args, "master", None):
        if engine != "spark":
            raise InvalidParameterError(
                f"--master is a Spark option (use --engine spark); the {engine!r} engine "
                f"does not take it.")
        opts["master"] = args.master
    return opts


#: the commands that run on an engine (and take --engine, --workers, --scheduler, --master)
ENGINE_COMMANDS = ("featurize", "train", "evaluate", "demo", "report", "search", "curve")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="local",
                   help="local (no cluster), dask, dask-cuda or spark")
    g.add_argument("--workers", type=_int_type(0), default=None, metavar="N",
                   help="worker processes: local (0 = run in this process), a new Dask "
                        "cluster, Spark local[N]; train also averages over N workers "
                        "(default: one per core; train: the engine's workers)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="Dask only: scheduler address, e.g. tcp://10.0.0.1:8786 "
                        "(default: a new local cluster)")
    g.add_argument("--master", default=None, metavar="URL",
                   help="Spark only: master URL, e.g. yarn or spark://host:7077 "
                        "(default: local[N])")


SPLIT_HELP = ("stratified, seeded split by fractions, e.g. train=0.7,val=0.1,test=0.2 (default: "
              "train=0.7,val=0.1,test=0.2; a dataset with train/ val/ test/ folders keeps its "
              "own split)")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = _Parser(
        prog="deeptransfer", formatter_class=_HelpFormatter,
        description="Distributed transfer learning on images: featurize with a frozen "
                    "pretrained CNN, train a head with parameter averaging.",
        epilog="Exit codes: 0 success; 2 a user error (one line on stderr); predict: 1 when "
               "some images failed.")
    ap.add_argument("--version", action="version", version=f"deeptransfer {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_HelpFormatter, **kw)

    f = command("featurize", help="images -> Zarr store of pretrained-CNN features",
                description="Push every image of DATASET once through a frozen pretrained CNN "
                            "into the Zarr store STORE. Resumable: rerun the same command after "
                            "a crash. Default split: " + SPLIT_HELP.split("(default: ")[1][:-1]
                            + ".")
    f.add_argument("dataset", help="folder (or fsspec URL) with one sub-folder per class, or "
                                   "train/ val/ test/ folders holding those; a manifest "
                                   "(*.csv, *.jsonl, *.parquet of uri + label); a Parquet "
                                   "table of image bytes + label; WebDataset shards (*.tar, "
                                   "'shards-{0000..0099}.tar'); a Hugging Face imagefolder")
    src = f.add_argument_group("source")
    src.add_argument("--source", default=None,
                     choices=["folder", "imagefolder", "manifest", "parquet", "webdataset"],
                     help="what DATASET is (default: told by its name and contents)")
    src.add_argument("--uri-column", default=None, metavar="NAME",
                     help="manifest: the image path/URL column (default: uri, or path)")
    src.add_argument("--label-column", default=None, metavar="NAME",
                     help="the label column (default: label; WebDataset: the .json key)")
    src.add_argument("--split-column", default=None, metavar="NAME",
                     help="the split column, train/val/test (default: split, when there is one)")
    src.add_argument("--image-column", default=None, metavar="NAME",
                     help="Parquet: the image bytes column (default: content, or image)")
    f.add_argument("store", help="Zarr store to write (path or fsspec URL)")
    f.add_argument("--model", default="efficientnet_lite0",
                   help="backbone: see `deeptransfer models`; several joined with '+' "
                        "(efficientnet_lite0+efficientnet_lite1) store their pooled features "
                        "side by side")
    f.add_argument("--layer", default=None,
                   help="layer to cut the network at (default: the model's, see `deeptransfer models`)")
    f.add_argument("--weights", default=None, metavar="FILE",
                   help="state-dict file or URL for the model (default: the bundled package "
                        "or the torch hub cache)")
    sp = f.add_mutually_exclusive_group()
    sp.add_argument("--split", default=None, metavar="FRACTIONS", help=SPLIT_HELP)
    sp.add_argument("--per-class-train", type=_int_type(1), default=None, metavar="N",
                    help="N training images per class, the rest test (default: --split's)")
    f.add_argument("--per-class-val", type=_int_type(0), default=0, metavar="N",
                   help="with --per-class-train: N validation images per class")
    f.add_argument("--exclude-class", action="append", default=[], metavar="CLASS",
                   help="leave a class folder out (repeat for several) (default: none)")
    f.add_argument("--seed", type=_int_type(0), default=0, help="seed of the split")
    f.add_argument("--batch-size", type=_int_type(1), default=16, help="images per forward pass")
    f.add_argument("--chunk-rows", type=_int_type(1), default=256, metavar="N",
                   help="images per task / Zarr chunk")
    f.add_argument("--dtype", default=None, choices=["float32", "float16"],
                   help="type of the stored features (default: float16 with --keep-maps, "
                        "else float32)")
    f.add_argument("--keep-maps", action="store_true",
                   help="store the C x H x W map of --layer (a map layer, see `deeptransfer "
                        "models`), not its global average: for `train --train-from`")
    f.add_argument("--train-views", type=_int_type(0), default=0, metavar="K",
                   help="K seeded augmented views (random-resized crop + flip) of every "
                        "training image, stored as extra rows; training draws one view per "
                        "image per epoch (default: 0, none)")
    f.add_argument("--compile", action="store_true", help="torch.compile the network")
    f.add_argument("--backend", default=None, choices=["torch", "openvino", "onnxruntime"],
                   help="inference runtime of the frozen network (default: the store's own "
                        "on a resume, else openvino, measured fastest on CPUs; torch if "
                        "openvino is not installed)")
    f.add_argument("--precision", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="int8: static post-training quantization of the frozen network "
                        "(openvino/onnxruntime), calibrated on --calibration-images seeded "
                        "training images and recorded in the store; bfloat16/float16: CUDA "
                        "autocast (torch)")
    f.add_argument("--calibration-images", type=_int_type(1), default=None, metavar="N",
                   help="training images that calibrate --precision int8 (default: 128)")
    f.add_argument("--views", default="center", choices=["center", "center+flip"],
                   help="center+flip: average the features of each image and its mirror (2x compute)")
    f.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: the engine's: cuda on dask-cuda, else cpu)")
    f.add_argument("--max-image-mb", type=_int_type(1), default=64, metavar="MB",
                   help="larger image files are skipped with a reason, never read")
    f.add_argument("--overwrite", action="store_true",
                   help="replace an existing feature store (never anything else)")
    f.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    i = command("info", help="describe a feature store")
    i.add_argument("store", help="feature store made by `deeptransfer featurize`")
    i.add_argument("--json", action="store_true", help="print one JSON object")

    m = command("models", help="list the model zoo, its layers and whether each is usable now")
    m.add_argument("pattern", nargs="?", default=None,
                   help="shell-style filter on the names, e.g. 'vgg*' (default: all)")

    for name, fn in _EXTRA_COMMANDS:
        fn(command)
    for name in ENGINE_COMMANDS:
        _add_engine_args(sub.choices[name])
    return ap


_EXTRA_COMMANDS: list[tuple[str, Any]] = []


def _reused(rep: Any) -> bool:
    """Whether a featurize run found its store complete and computed nothing."""
    reused = getattr(rep, "reused", None)
    return bool(reused) if reused is not None else rep.computed_now == 0


def _print_featurize(rep: Any, as_json: bool) -> None:
    if as_json:
        print(jsonutil.dumps(rep.to_dict()))
        return
    print(f"store        {rep.store}")
    shape = " x ".join(map(str, rep.feature_shape)) if len(rep.feature_shape) > 1 else None
    what = f"{shape} maps" if shape else f"{rep.feature_dim}-d"
    print(f"model        {rep.model['name']} @ {rep.model['layer']} ({what}), engine {rep.engine}")
    print(f"images       {rep.images}: {rep.featurized} featurized, {len(rep.skipped)} skipped")
    quant = getattr(rep, "quantization", None)
    if getattr(rep, "backend", None):
        print(f"backend      {rep.backend}" + (f", int8 calibrated on {quant['images']} "
                                               f"training images (seed {quant['seed']})"
                                               if quant else ""))
    net = getattr(rep, "backend_network", None)
    if net:  # the compiled network, prepared once for the job and kept in the store
        size = sum(net["files"].values()) / 2**20
        print(f"network      " + (f"built once in {net['seconds']:.1f} s" if net["built_now"]
                                  else "the store's own, reused") + f" ({size:.1f} MB in the "
              "store's _backend/)")
    if rep.train_views:
        print(f"train views  {rep.train_views} per training image ({rep.view_rows} rows)")
    if _reused(rep):
        print(f"reused       {rep.store} was already complete (0 images computed)")
    else:
        what = "rows" if rep.train_views else "images"  # rows: images and their views
        print(f"this run     {rep.computed_now} {what} in {rep.seconds:.1f} s "
              f"({rep.images_per_second:.1f} {what}/s)")
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

    engine_options = _engine_options(args)
    rep = featurize(args.dataset, args.store, model=args.model, layer=args.layer,
                    weights=args.weights, engine=args.engine, workers=args.workers,
                    engine_options=engine_options, split=args.split,
                    per_class_train=args.per_class_train, per_class_val=args.per_class_val,
                    exclude_classes=args.exclude_class, seed=args.seed,
                    batch_size=args.batch_size, dtype=args.dtype, chunk_rows=args.chunk_rows,
                    compile=args.compile, device=args.device, views=args.views,
                    max_image_bytes=args.max_image_mb * 1024 * 1024, overwrite=args.overwrite,
                    keep_maps=args.keep_maps, train_views=args.train_views,
                    progress=not args.json, source=args.source, uri_column=args.uri_column,
                    label_column=args.label_column, split_column=args.split_column,
                    image_column=args.image_column,
                    backend=args.backend, precision=args.precision,
                    calibration_images=args.calibration_images)
    _print_featurize(rep, args.json)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .api import info

    s = info(args.store)
    if args.json:
        print(jsonutil.dumps(s))
        return 0
    for k in ("url", "rows", "featurized", "skipped", "chunks_done", "classes", "splits",
              "feature_dim", "dtype", "model", "preprocess", "seed"):
        print(f"{k:12s} {s[k]}")
    shape = " x ".join(map(str, s["feature_shape"]))
    print(f"{'shape':12s} {shape} per row ({'maps' if s['maps'] else 'pooled vectors'}, "
          f"{_human_bytes(s['bytes_per_row'])} as {s['dtype']} before compression)")
    q = s.get("quantization")
    print(f"{'backend':12s} {s.get('backend', 'torch')}" + (
        f", int8 ({q['images']} calibration images of the training split, seed {q['seed']}: "
        f"{q['method']})" if q else ""))
    tv = s["train_views"]
    if tv.get("k"):
        print(f"{'train views':12s} {tv['k']} per training image ({s['view_rows']} rows; "
              f"scale {tv['scale']}, ratio {[round(r, 4) for r in tv['ratio']]}, "
              f"flip {tv['flip']})")
    rows = s["rows"] + s["view_rows"]
    per = f", {_human_bytes(s['bytes'] // rows)} per row" if rows else ""
    print(f"{'bytes':12s} {_human_bytes(s['bytes'])} on disk{per}")
    from .store import open_store

    for path, reason in open_store(args.store).skipped()[:50]:
        print(f"skipped      {path}: {reason}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import get_model_info, list_models
    from .models.registry import availability

    for name in list_models(args.pattern):
        mi = get_model_info(name)
        layers = ", ".join(f"{k}:{v}" for k, v in mi.layers.items())
        print(f"{name:22s} default {mi.default_layer} | {layers}")
        print(f"{'':22s} {availability(name)}")
    return 0


def _option(g: Any, *flags: str, config: str | None = None, **kw: Any) -> argparse.Action:
    """A train option that is None unless given (the TrainConfig default applies then, and
    ``--help`` shows that default)."""
    action = g.add_argument(*flags, default=None, **kw)
    action.config_default = config or action.dest  # type: ignore[attr-defined]
    return action


PREDICT_EXIT = ("exit code: 0 when every image was classified, 1 when some failed (each has "
                "its error in the output), 2 on a user error (bad option, no images found)")


def add_optimizer_options(p: argparse.ArgumentParser) -> None:
    """The update rule's options (train, curve): TrainConfig.optimizer's fields."""
    _option(p, "--lr", type=_float_type(0.0, low_open=True), config="optimizer.lr",
            help="base learning rate")
    _option(p, "--optimizer", choices=["sgd", "nesterov", "adam"], config="optimizer.name",
            help="update rule")
    _option(p, "--momentum", type=_float_type(0.0), config="optimizer.momentum",
            help="sgd / nesterov momentum, in [0, 0.999]")
    _option(p, "--weight-decay", type=_float_type(0.0), config="optimizer.weight_decay",
            help="L2 coefficient on the weights")


def add_head_options(p: argparse.ArgumentParser) -> None:
    """The head's options and label smoothing (train, curve): TrainConfig.head's fields."""
    _option(p, "--head", choices=["softmax", "mlp"], config="head.kind",
            help="softmax: one linear layer; mlp: hidden layers (--hidden), then linear")
    _option(p, "--hidden", config="head.hidden", metavar="WIDTHS",
            help="mlp hidden layer widths, e.g. 512,256")
    _option(p, "--dropout", type=_float_type(0.0), config="head.dropout",
            help="mlp: dropout after each hidden layer, in [0, 0.95]")
    _option(p, "--input-dropout", type=_float_type(0.0), config="head.input_dropout",
            help="dropout on the features, in [0, 0.95]")
    _option(p, "--batch-norm", action="store_true", config="head.batch_norm",
            help="BatchNorm before the first linear layer (softmax) / in each hidden layer (mlp)")
    _option(p, "--label-smoothing", type=_float_type(0.0), help="cross-entropy label smoothing, in [0, 0.999]")


def _add_train(command: Callable[..., argparse.ArgumentParser]) -> None:
    t = command("train", help="train a classifier head with parameter averaging",
                description="Train a classifier head on STORE's features with parameter "
                            "averaging, into MODEL_DIR (resumable). Epochs are numbered from 0 "
                            "everywhere: the progress bar, rounds.jsonl, the summary's best_epoch.")
    t.add_argument("store", help="feature store made by `deeptransfer featurize`")
    t.add_argument("model_dir", help="folder for the trained model, its checkpoint and statistics")
    _option(t, "--batch-size-per-worker", type=_int_type(1), metavar="N",
            help="minibatch size of each worker")
    _option(t, "--averaging-frequency", type=_int_type(1), metavar="N",
            help="minibatches each worker runs between averagings")
    _option(t, "--epochs", type=_int_type(1), metavar="N", help="most passes over the train split")
    add_optimizer_options(t)
    _option(t, "--schedule", choices=["constant", "step", "cosine", "exponential"],
            config="optimizer.schedule", help="learning-rate schedule")
    add_head_options(t)
    _option(t, "--class-weights", choices=["balanced"], help="weigh the loss by inverse class frequency")
    _option(t, "--save-updater", dest="save_updater", action="store_true",
            help="average the optimizer state too")
    t.add_argument("--no-save-updater", dest="save_updater", action="store_false",
                   help="fresh optimizer state every round")
    _option(t, "--repartition", choices=["epoch", "never"],
            help="epoch: reshuffle into balanced partitions every epoch; never: fixed partitions")
    _option(t, "--patience", type=_int_type(1), metavar="EPOCHS",
            help="stop after this many epochs without validation improvement")
    _option(t, "--seed", type=_int_type(0),
            help="seed of the head's initialization, partitions, shuffles and dropout")
    _option(t, "--train-from", metavar="STAGE",
            help="for a store of maps (featurize --keep-maps): the first backbone stage to "
                 "fine-tune, which is the stage after the store's layer ('none' picks it); "
                 "'head' trains the head alone on the pooled maps")
    _option(t, "--suffix-lr-scale", type=_float_type(0.0, low_open=True), metavar="SCALE",
            help="learning rate of the fine-tuned stages = --lr x this")
    t.add_argument("--no-resume", action="store_true",
                   help="start over instead of resuming the run checkpointed in MODEL_DIR")
    t.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    t.add_argument("--log", action="append", default=[], metavar="SINK",
                   help="telemetry of every round (repeatable): tensorboard=DIR (event files), "
                        "mlflow (./mlruns, or $MLFLOW_TRACKING_URI) or mlflow=URI; needs the "
                        "tensorboard / mlflow extra (default: none)")

    e = command("evaluate", help="metrics of a trained model on a split of a store")
    e.add_argument("model_dir", help="model directory made by `deeptransfer train`")
    e.add_argument("store", help="feature store made with the model's settings")
    e.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the split to score (it must have rows)")
    e.add_argument("--report", default=None, metavar="DIR",
                   help="write metrics.json, report.txt and confusion.png there (default: no report)")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("predict", help="classify image files with a trained model",
                description="Classify images with a trained model. " + PREDICT_EXIT + ".",
                epilog=PREDICT_EXIT)
    p.add_argument("model_dir", help="model directory made by `deeptransfer train`")
    p.add_argument("images", nargs="+",
                   help="image files, or folders (searched recursively for image files by "
                        "extension: " + ", ".join(IMAGE_EXTENSIONS) + ")")
    p.add_argument("--top-k", type=_int_type(1), default=5, metavar="K", help="classes per image")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="write the predictions to FILE instead: .jsonl (one JSON object per "
                        "line) or .csv; an existing file is never overwritten (default: stdout)")
    p.add_argument("--backend", default=None, choices=["torch", "openvino", "onnxruntime"],
                   help="inference runtime of the frozen network (default: the one that made "
                        "the training store's features)")

    x = command("export", help="export the model (backbone, tuned suffix, head) for serving")
    x.add_argument("model_dir", help="model directory made by `deeptransfer train`")
    x.add_argument("output", help="file to write (and OUTPUT.json beside it)")
    x.add_argument("--format", default="torchscript", choices=["torchscript", "onnx"],
                   help="serving format")

    d = command("demo", help="the whole recipe on scikit-learn's digits (no network)")
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="where the demo writes")
    d.add_argument("--epochs", type=_int_type(1), default=30, metavar="N", help="training epochs")

    command("spark-entry", help="print the script path to give spark-submit")


_EXTRA_COMMANDS.append(("train", _add_train))

_TRAIN_FLAGS = ("batch_size_per_worker", "averaging_frequency", "epochs", "lr", "optimizer",
                "momentum", "weight_decay", "schedule", "head", "dropout", "input_dropout",
                "batch_norm", "label_smoothing", "class_weights", "save_updater", "repartition",
                "patience", "seed", "train_from", "suffix_lr_scale")


# -- arguments in the wrong order ----------------------------------------------------------

def _looks_like(path: str) -> str | None:
    """"store" or "model" when a local path is a feature store or a model directory (read
    from their metadata files; nothing is opened for writing), else None."""
    import json

    for kind, meta, key, fmt in (("store", "zarr.json", ("attributes", "format"),
                                  "deeptransfer.features/"),
                                 ("model", "config.json", ("format",), "deeptransfer.model/")):
        try:
            with open(os.path.join(path, meta), encoding="utf-8") as fh:
                value: Any = json.load(fh)
            for k in key:
                value = value.get(k) if isinstance(value, dict) else None
        except (OSError, ValueError):
            continue
        if isinstance(value, str) and value.startswith(fmt):
            return kind
    return None


def _check_order(command: str, store: str, model_dir: str) -> None:
    """Recognise swapped STORE and MODEL_DIR arguments before anything is opened."""
    order = ("`deeptransfer train STORE MODEL_DIR`" if command == "train"
             else "`deeptransfer evaluate MODEL_DIR STORE`")
    s_kind, m_kind = _looks_like(store), _looks_like(model_dir)
    if s_kind == "model" and m_kind == "store":
        first = ("STORE looks like a model directory and MODEL_DIR like a feature store"
                 if command == "train" else
                 "MODEL_DIR looks like a feature store and STORE like a model directory")
        raise InvalidParameterError(f"{first}: the order is {order}.")
    if m_kind == "store":
        raise InvalidParameterError(
            f"MODEL_DIR {model_dir!r} is a feature store, not a model directory: the order is "
            f"{order}.")
    if s_kind == "model":
        raise InvalidParameterError(
            f"STORE {store!r} is a model directory, not a feature store: the order is {order}.")


def cmd_train(args: argparse.Namespace) -> int:
    from .api import train

    _check_order("train", args.store, args.model_dir)
    engine_options = _engine_options(args)
    opts = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    if args.hidden:
        try:
            opts["hidden"] = tuple(int(h) for h in args.hidden.split(","))
        except ValueError:
            raise InvalidParameterError(
                f"--hidden takes layer widths like 512,256. Got {args.hidden!r}.") from None
    res = train(args.store, args.model_dir, engine=args.engine, workers=args.workers,
                engine_options=engine_options, resume=not args.no_resume,
                progress=not args.json, log=args.log, **opts)
    best = res.best or {}
    summary = {"model_dir": args.model_dir, "rounds": res.rounds, "epochs": len(res.history),
               "stopped_early": res.stopped_early, "best_epoch": best.get("epoch"),
               "val_top1": best.get("val_top1"), "val_mean_per_class": best.get("val_mean_per_class")}
    reused = getattr(res, "reused", None)
    warnings = list(getattr(res, "warnings", None) or [])
    if reused is not None:
        summary["reused"] = bool(reused)
    if warnings:
        summary["warnings"] = warnings
    if args.json:
        print(jsonutil.dumps(summary))
        return 0
    if reused:
        print(f"{'reused':20s} {args.model_dir} holds a finished run with these settings "
              f"(0 rounds run; --no-resume trains again)")
    for k, v in summary.items():
        if k in ("reused", "warnings"):
            continue
        if k == "best_epoch" and v is not None:
            v = f"{v} (epochs are numbered from 0)"
        print(f"{k:20s} {v}")
    print(f"{'statistics':20s} {os.path.join(args.model_dir, 'rounds.jsonl')}, "
          f"{os.path.join(args.model_dir, 'training.png')}")
    for w in warnings:
        print(f"{'warning':20s} {w}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import evaluate
    from .evaluation import format_report

    _check_order("evaluate", args.store, args.model_dir)
    engine_options = _engine_options(args)
    m = evaluate(args.model_dir, args.store, split=args.split, engine=args.engine,
                 workers=args.workers, engine_options=engine_options, report_dir=args.report)
    if args.json:
        print(jsonutil.dumps(m))
    else:
        print(format_report(m, title=f"{args.model_dir} on {args.store} [{args.split}]",
                            max_classes=30))
    return 0


# -- predict ----------------------------------------------------------------------------------

def expand_images(items: Sequence[str]) -> list[str]:
    """Files as given; folders replaced by their image files (by extension, recursively,
    hidden ones left out, sorted). A folder without images is a user error."""
    out: list[str] = []
    for item in items:
        if not os.path.isdir(item):
            out.append(item)
            continue
        found = []
        for root, dirs, files in os.walk(item):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.join(root, f) for f in files
                      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise InvalidParameterError(
                f"The folder {item!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        out += sorted(found)
    return out


def _output_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".csv"):
        raise InvalidParameterError(
            f"--output {path!r}: the format follows the extension, .jsonl or .csv.")
    if os.path.lexists(path):
        raise InvalidParameterError(
            f"--output {path!r} exists: give a new file name (predict never overwrites a file).")
    return ext[1:]


def _write_predictions(path: str, fmt: str, preds: Sequence[Any]) -> None:
    """Write to a temporary name beside ``path``, then link it there (an existing file that
    appeared meanwhile is not replaced)."""
    import csv
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".predict-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            if fmt == "jsonl":
                for p in preds:
                    fh.write(jsonutil.dumps(p.to_dict()) + "\n")
            else:
                w = csv.writer(fh)
                w.writerow(["path", "label", "score", "top_k", "error"])
                for p in preds:
                    w.writerow([p.path, p.label or "", "" if p.score is None else f"{p.score:.6f}",
                                ";".join(f"{c}:{s:.6f}" for c, s in p.top_k), p.error or ""])
        os.chmod(tmp, 0o666 & ~_umask())
        os.link(tmp, path)  # fails if path exists: never overwrites
    finally:
        os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cmd_predict(args: argparse.Namespace) -> int:
    from .artifact import load

    fmt = _output_format(args.output) if args.output else None
    images = expand_images(args.images)
    preds = load(args.model_dir).predict(images, top_k=args.top_k, backend=args.backend)
    failed = sum(p.error is not None for p in preds)
    if fmt is not None:
        _write_predictions(args.output, fmt, preds)
        print(f"wrote {len(preds)} predictions to {args.output} ({failed} failed)")
    else:
        for p in preds:
            if args.json:
                print(jsonutil.dumps(p.to_dict()))
            elif p.error:
                print(f"{p.path}: error: {p.error}")
            else:
                tops = ", ".join(f"{c} {s:.3f}" for c, s in p.top_k)
                print(f"{p.path}: {p.label} ({p.score:.3f})  [{tops}]")
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .artifact import load

    path = load(args.model_dir).export(args.output, format=args.format)
    print(f"exported {args.format} pipeline to {path} (preprocessing and classes in {path}.json)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _engine_options(args)  # a flag of another engine is refused here too
    if args.workers == 0:  # before minutes of featurizing: train averages over N >= 1 workers
        raise InvalidParameterError("--workers must be at least 1 for the demo: it trains with "
                                    "that many averaging workers.")
    run_demo(args.out, engine=args.engine, workers=2 if args.workers is None else args.workers,
             epochs=args.epochs)
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
# the commands defined in their own modules register themselves (_EXTRA_COMMANDS, COMMANDS)
from . import cli_report, cli_selection  # noqa: E402,F401


def _command_parser(ap: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    for action in ap._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices.get(command)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    # Spark workers must start this interpreter (it has torch), and servers bind to loopback
    # unless the user said otherwise.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DeeptransferError as exc:
        msg = _user_message(exc, _command_parser(ap, args.command))
        print(f"deeptransfer {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
