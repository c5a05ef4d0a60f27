"""DataFrames as sources (API only): a pandas, Dask or Spark DataFrame of image paths or
URLs and labels (columns ``uri``/``path`` and ``label``, ``split`` optional; or named).

Only the path, label and split columns are collected on the driver -- never an image. A
DataFrame of image *bytes* (Spark's ``binaryFile``) is written where the workers can read
it and featurized as the Parquet source: ``df.write.parquet(url)`` then
``featurize(url, ...)``, which reads each task's row groups on its worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidParameterError
from .base import ListedOnDriver, Listing, Source, add_row
from .manifest import URI_COLUMNS, pick_column
from .parquet import IMAGE_COLUMNS


@dataclass(frozen=True)
class FrameSource(ListedOnDriver, Source):
    """The rows of a DataFrame, collected when it was given; refs are file paths/URLs.
    The listing is kept out of the spec the workers get (``compare=False``, not pickled)."""

    uri_column: str | None = None
    label_column: str | None = None
    split_column: str | None = None
    listing: Listing | None = field(default=None, compare=False, repr=False)
    kind = "dataframe"

    def options(self) -> dict[str, Any]:
        return {"uri_column": self.uri_column, "label_column": self.label_column,
                "split_column": self.split_column}



def _collect(df: Any, columns: list[str]) -> dict[str, list]:
    """The named columns of a pandas / Dask / Spark DataFrame as lists."""
    mod = type(df).__module__
    if mod.startswith("pyspark."):
        rows = df.select(*columns).collect()
        return {c: [r[c] for r in rows] for c in columns}
    if mod.startswith(("dask.", "dask_expr")):
        df = df[columns].compute()
    return {c: df[c].tolist() for c in columns}


def frame_source(df: Any, *, uri_column: str | None = None, label_column: str | None = None,
                 split_column: str | None = None, **other: Any) -> FrameSource:
    """The FrameSource of a DataFrame's path, label and split columns."""
    if other:
        raise InvalidParameterError(f"{', '.join(other)}: not an option of a DataFrame source "
                                    f"(uri_column, label_column, split_column).")
    names = [str(c) for c in df.columns]
    shown = f"the {type(df).__name__}"
    if uri_column is None and not any(c in names for c in URI_COLUMNS) and \
            any(c in names for c in IMAGE_COLUMNS):
        raise InvalidParameterError(
            f"{shown} holds image bytes ({', '.join(c for c in IMAGE_COLUMNS if c in names)}): "
            f"write it as Parquet where the workers can read it (df.write.parquet(url)) and "
            f"featurize that url; a DataFrame source is one of paths or URLs.")
    uri = pick_column(names, uri_column, URI_COLUMNS, "uri", "uri_column", shown)
    label = pick_column(names, label_column, ("label",), "label", "label_column", shown)
    split = pick_column(names, split_column, ("split",), "split", "split_column", shown,
                        required=False)
    cols = _collect(df, [c for c in (uri, label, split) if c])
    listing = Listing(refs=[], labels=[], splits=[] if split else None)
    for n, (u, lab) in enumerate(zip(cols[uri], cols[label])):
        if not isinstance(u, str) or not u.strip():
            listing.skipped.append((f"row {n}", "missing uri"))
            continue
        add_row(listing, u.strip(), lab, cols[split][n] if split else None)
    return FrameSource(url=f"<{type(df).__name__}>", uri_column=uri_column,
                       label_column=label_column, split_column=split_column, listing=listing)
