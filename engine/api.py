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

from .engines import get_executor
from .executor import Executor
from .featurize import FeaturizeReport, run_featurize


@contextmanager
def engine_scope(engine: "str | Executor", workers: int | None,
                 engine_options: Mapping[str, Any] | None) -> Iterator[Executor]:
    """Resolve ``engine``; close it afterwards only if it was started here."""
    if isinstance(engine, str):
        opts = dict(engine_options or {})
        if workers is not None:
            opts.setdefault("n_workers", workers)
        ex = get_executor(engine, opts)
        try:
            yield ex
        finally:
            ex.close()
    else:
        yield get_executor(engine)


def featurize(dataset: str, store: str, *, model: str = "efficientnet_lite0",
              layer: str | None = None, weights: str | None = None,
              engine: "str | Executor" = "local", workers: int | None = None,
              engine_options: Mapping[str, Any] | None = None,
              split: "str | Mapping[str, float] | None" = None,
              per_class_train: int | None = None, per_class_val: int = 0,
              exclude_classes: Sequence[str] = (), seed: int = 0, batch_size: int = 16,
              dtype: str = "float32", chunk_rows: int = 256, compile: bool = False,
              device: str = "cpu", precision: str = "auto", overwrite: bool = False,
              storage_options: Mapping | None = None, progress: Any = True) -> FeaturizeReport:
    """Push every image of ``dataset`` once through a frozen pretrained CNN into ``store``.

    ``dataset`` is a folder (local or fsspec URL) with one sub-folder of images per class, or
    train/ val/ test/ folders holding those. Splits: ``split="train=0.7,val=0.1,test=0.2"``
    (stratified, seeded), or ``per_class_train=30`` (+ ``per_class_val``), the rest test.
    Resumable: a rerun computes only the chunks a killed run left unfinished.
    """
    from .dataset import load_dataset
    from .models import ModelSpec

    manifest = load_dataset(dataset, split=split, per_class_train=per_class_train,
                            per_class_val=per_class_val, exclude_classes=exclude_classes,
                            seed=seed, storage_options=storage_options)
    split_config = {"split": split if isinstance(split, (str, type(None))) else dict(split),
                    "per_class_train": per_class_train, "per_class_val": per_class_val,
                    "exclude_classes": list(exclude_classes), "seed": seed}
    with engine_scope(engine, workers, engine_options) as ex:
        return run_featurize(ex, manifest, store, model=ModelSpec(model, layer, weights),
                             batch_size=batch_size, dtype=dtype, chunk_rows=chunk_rows,
                             compile=compile, device=device, precision=precision, seed=seed,
                             split_config=split_config, storage_options=storage_options,
                             overwrite=overwrite, progress=progress)


def info(store: str, storage_options: Mapping | None = None) -> dict[str, Any]:
    """Describe a feature store."""
    from .store import open_store

    return open_store(store, storage_options=storage_options).summary()
