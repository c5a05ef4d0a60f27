"""Sources of images: where a dataset's rows come from (see ``base`` for the protocol).

``as_source(dataset)`` picks one from the argument, or from ``kind`` (CLI ``--source``):

============== ===================================================== ==========================
kind           argument                                              module
============== ===================================================== ==========================
folder         a folder of class folders (or train/ val/ test/)      ``sources.folder``
imagefolder    a folder with metadata.csv / metadata.jsonl           ``sources.imagefolder``
manifest       ``*.csv``, ``*.tsv``, ``*.jsonl``, or a Parquet file   ``sources.manifest``
               with a uri column
parquet        a Parquet file or folder with an image-bytes column   ``sources.parquet``
webdataset     ``*.tar``, ``shards-{0000..0099}.tar``, a folder of   ``sources.webdataset``
               shards
dataframe      (API) a pandas, Dask or Spark DataFrame of paths      ``sources.frames``
hf_dataset     (API) a loaded Hugging Face ``Dataset`` / ``DatasetDict`` ``sources.hfdataset``
============== ===================================================== ==========================

Adding a source is one module with a ``Source`` subclass, listed in ``KINDS``, and the
shared checks of ``deeptransfer.testing.source_checks``.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import InvalidParameterError
from .base import FileReader, Listing, RefReader, Source, to_manifest
from .folder import FolderSource
from .imagefolder import ImageFolderSource, metadata_files
from .manifest import ManifestSource, manifest_format
from .parquet import IMAGE_COLUMNS, ParquetSource
from .webdataset import WebDatasetSource, is_shards

KINDS: dict[str, type[Source]] = {
    "folder": FolderSource, "imagefolder": ImageFolderSource, "manifest": ManifestSource,
    "parquet": ParquetSource, "webdataset": WebDatasetSource,
}

__all__ = ["KINDS", "FileReader", "FolderSource", "ImageFolderSource", "Listing",
           "ManifestSource", "ParquetSource", "RefReader", "Source", "WebDatasetSource",
           "as_source", "detect_kind", "to_manifest"]

#: the options each kind takes (CLI flags --uri-column, --label-column, ...)
_OPTIONS = {"folder": (), "imagefolder": ("label_column", "split_column"),
            "manifest": ("uri_column", "label_column", "split_column"),
            "parquet": ("image_column", "label_column", "split_column"),
            "webdataset": ("label_column",)}


def _is_frame(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod.startswith(("pandas.", "dask.", "dask_expr", "pyspark.")) and \
        hasattr(obj, "columns")


def detect_kind(url: str, storage_options: Mapping | None = None) -> str:
    """The source kind of a dataset argument: by its form (a brace pattern, an extension),
    then, for a folder, by what it holds (metadata files, Parquet files, tar shards)."""
    if is_shards(url):
        return "webdataset"
    fmt = manifest_format(url)
    if fmt == "parquet":
        return _parquet_kind(url, storage_options)
    if fmt is not None:
        return "manifest"
    from ..fs import url_to_fs

    fs, path = url_to_fs(url, storage_options)
    try:
        if not fs.isdir(path):
            return "folder"  # a missing folder: the folder source says so
        names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
    except OSError:
        return "folder"
    if any(n in ("metadata.csv", "metadata.jsonl") for n in names) or \
            metadata_files(url, storage_options):
        return "imagefolder"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if names and all(n.endswith(".tar") or n.startswith((".", "_")) for n in names):
        return "webdataset"
    return "folder"


def _parquet_kind(url: str, storage_options: Mapping | None) -> str:
    """A Parquet file holds image bytes (a dataset) or uris (a manifest): its schema says."""
    try:
        from .manifest import _pyarrow_parquet
        from ..fs import url_to_fs

        pq = _pyarrow_parquet(url)
        fs, path = url_to_fs(url, storage_options)
        if not fs.exists(path):
            return "parquet"
        with fs.open(path, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
    except (OSError, ValueError):
        return "parquet"
    return "parquet" if any(c in names for c in IMAGE_COLUMNS) else "manifest"


def as_source(dataset: Any, kind: str | None = None, *,
              storage_options: Mapping | None = None, **options: Any) -> Source:
    """The Source of a dataset argument: a Source as it is, a DataFrame (API), or a URL
    whose kind is ``kind`` or detected (``detect_kind``). ``options``: uri_column,
    label_column, split_column, image_column (None: the defaults); one a kind does not
    take is an error naming the flag."""
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(dataset, Source):
        if given:
            raise InvalidParameterError(
                f"column options ({', '.join(given)}) go with a dataset URL; this Source "
                f"already has its own.")
        return dataset
    if _is_frame(dataset):
        from .frames import frame_source

        return frame_source(dataset, **given)
    from .hfdataset import hf_dataset_source, is_hf_dataset

    if is_hf_dataset(dataset):
        return hf_dataset_source(dataset, **given)
    if not isinstance(dataset, str):
        raise InvalidParameterError(
            f"The dataset must be a folder, a manifest, Parquet or tar shards (a path or "
            f"fsspec URL), a deeptransfer Source, a DataFrame or a Hugging Face Dataset. Got "
            f"{type(dataset).__name__} instead.", param="dataset")
    if kind is None:
        kind = detect_kind(dataset, storage_options)
    if kind not in KINDS:
        raise InvalidParameterError(
            f"--source {kind!r}: the sources are {', '.join(KINDS)}.", param="source")
    bad = [k for k in given if k not in _OPTIONS[kind]]
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        takes = ", ".join("--" + k.replace("_", "-") for k in _OPTIONS[kind]) or "none"
        raise InvalidParameterError(
            f"{flags} does not apply to a {kind} source ({dataset!r}); it takes: {takes}.")
    return KINDS[kind](dataset, **given)
