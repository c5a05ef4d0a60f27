"""Features out of a store, the way users want them: numpy, dask.array, a Spark DataFrame.

    import deeptransfer as dt
    f = dt.open_features("features.zarr", split="train")
    X, y = f.numpy(), f.labels                   # numpy, on this machine
    X = f.to_dask()                              # dask.array, lazily, chunk by store chunk
    df = f.to_spark(spark)                       # features, label, label_name, split, ref

Only the *valid* rows are given: featurized (their chunk done, not skipped) image rows
(augmented view rows are training's own), optionally of one split, in store order. The
Dask array and the Spark DataFrame read the store where they run (each task or partition
its own store chunks), never through the driver.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .dataset import SPLITS, split_code
from .pathargs import accepts_paths


class Features:
    """The valid rows of a feature store (see the module docstring)."""

    def __init__(self, url: str, *, split: str | None = None,
                 storage_options: Mapping | None = None):
        from .store import open_store

        self.url = url
        self.storage_options = dict(storage_options or {})
        self.store = st = open_store(url, storage_options=storage_options)
        self.split_name = split
        mask = st["ok"][:] & st._done_rows()
        image = st._is_image()
        if image is not True:
            mask &= image
        self._split_codes = st["split"][:]
        if split is not None:
            mask &= self._split_codes == split_code(split)
        #: the store rows given, in store order
        self.rows: np.ndarray = np.flatnonzero(mask)
        self.classes: list[str] = st.classes
        #: class index per row (int64), as training reads them
        self.labels: np.ndarray = st["labels"][:][self.rows].astype(np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.store.feature_shape

    @property
    def label_names(self) -> list[str]:
        return [self.classes[i] for i in self.labels]

    @property
    def splits(self) -> list[str]:
        """The split name of each row ("" for none)."""
        return [SPLITS[c] if c >= 0 else "" for c in self._split_codes[self.rows]]

    @property
    def refs(self) -> list[str]:
        """Each row's ref: the image's path or URL, or its source's ref (a Parquet row...)."""
        return [str(p) for p in self.store["paths"].oindex[self.rows]] if len(self) else []

    def numpy(self) -> np.ndarray:
        """The features, float32, (n, *feature_shape)."""
        return self.store.read_rows(self.rows)[0]

    def to_dask(self) -> Any:
        """A dask.array of the features (float32), chunked as the store: each task reads
        its store chunk on its worker."""
        import dask.array as da

        arr = da.from_zarr(self.store["features"])
        return arr[self.rows].astype(np.float32)

    def to_spark(self, spark: Any, *, num_partitions: int | None = None) -> Any:
        """A Spark DataFrame of the rows: ``features`` array<float> (flattened for maps),
        ``label`` int (class index), ``label_name``, ``split``, ``ref``. Each partition reads
        its store chunks on its executor (``pyspark.ml.functions.array_to_vector`` turns
        ``features`` into an ML vector)."""
        st = self.store
        chunks = sorted({int(r) // st.chunk_rows for r in self.rows})
        schema = ("features array<float>, label int, label_name string, split string, "
                  "ref string")
        n = num_partitions or max(1, min(len(chunks), spark.sparkContext.defaultParallelism))
        frame = spark.createDataFrame([(c,) for c in chunks] or [(-1,)], "chunk int")
        url, options, split = self.url, self.storage_options, self.split_name

        def read(batches: Any) -> Any:
            for pdf in batches:
                for c in pdf["chunk"]:
                    if c >= 0:
                        yield chunk_frame(url, int(c), split=split, storage_options=options)

        return frame.repartition(n).mapInPandas(read, schema)


def chunk_frame(url: str, chunk: int, *, split: str | None = None,
                storage_options: Mapping | None = None) -> Any:
    """The valid rows of one store chunk as a pandas DataFrame (``Features.to_spark``)."""
    import pandas as pd

    from .store import cached_store

    st = cached_store(url, storage_options)
    a, b = st.chunk_bounds(chunk)
    done = bool(st["done"][chunk])
    ok = st["ok"][a:b] & done
    if "view" in st.group:
        ok &= st["view"][a:b] == 0
    codes = st["split"][a:b]
    if split is not None:
        ok &= codes == split_code(split)
    keep = np.flatnonzero(ok)
    feats = st["features"][a:b][keep].astype(np.float32).reshape(len(keep), -1)
    labels = st["labels"][a:b][keep].astype(np.int32)
    classes = st.classes
    return pd.DataFrame({
        "features": list(feats), "label": labels,
        "label_name": [classes[i] for i in labels],
        "split": [SPLITS[c] if c >= 0 else "" for c in codes[keep]],
        "ref": [str(p) for p in st["paths"][a:b][keep]]})


@accepts_paths("store")
def open_features(store: str, *, split: str | None = None,
                  storage_options: Mapping | None = None) -> Features:
    """The valid rows of a feature store (optionally of one split) as numpy, dask.array or
    a Spark DataFrame: ``open_features("f.zarr").numpy()``."""
    return Features(store, split=split, storage_options=storage_options)
