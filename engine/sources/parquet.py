"""The Parquet source: a table (one file or a folder of files, any fsspec URL) holding the
images' encoded bytes and their labels.

The layouts it reads with no flags:

- Spark's ``binaryFile`` data source plus a label (``spark.read.format("binaryFile")``,
  ``.withColumn("label", ...)``, written as Parquet or Delta's Parquet files): a ``content``
  binary column, ``path`` kept for messages;
- Hugging Face's Parquet export: an ``image`` column, a struct ``{bytes, path}`` (or plain
  bytes), and a ``label`` that is a class index with its names in the schema's
  ``huggingface`` metadata (a ``ClassLabel``), which are used as the class names.

``image_column``, ``label_column`` and ``split_column`` name other columns. A label may
also come from a Hive partition folder (``label=cat/part-0.parquet``, Spark's
``partitionBy("label")``). Files are the ``*.parquet`` files of the folder (Spark's
``_SUCCESS`` and ``.crc`` files are not data), in natural order.

A row's ref is ``FILE#ROW_GROUP/ROW``: listing reads only the footers and the label (and
split) columns; a worker reads the image column of the row groups its rows are in, one row
group at a time in order (the reader keeps the last one), so a task reads only its rows'
row groups. Row groups no larger than the chunk (``--chunk-rows``) are each read by one or
two tasks; Spark writes row groups of up to 128 MB.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import DatasetNotFoundError, InvalidParameterError
from ..fs import DEFAULT_MAX_IMAGE_BYTES, FileRefusedError, show_name, url_to_fs
from .base import Listing, RefReader, Source, add_row, cell_bytes, natural_key
from .manifest import _pyarrow_parquet, pick_column

IMAGE_COLUMNS = ("content", "image", "image_bytes", "bytes")
_HIVE = re.compile(r"^([^=/]+)=([^/]*)$")


def parquet_files(url: str, storage_options: Mapping | None = None) -> tuple[Any, list[str]]:
    """The filesystem and the data files of a Parquet file or folder (natural order)."""
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        raise DatasetNotFoundError(f"Dataset not found: nothing at {show_name(url)}.")
    if not fs.isdir(path):
        return fs, [path]
    files = [p for p in fs.find(path) if p.endswith(".parquet")
             and not any(part.startswith((".", "_")) for part in p[len(path):].split("/"))]
    if not files:
        raise DatasetNotFoundError(f"{show_name(url)} holds no .parquet files.")
    return fs, sorted(files, key=natural_key)


def _class_names(schema: Any, label_col: str) -> list[str] | None:
    """The names of a Hugging Face ClassLabel column, from the schema metadata."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feat = json.loads(meta)["info"]["features"][label_col]
    except (ValueError, KeyError, TypeError):
        return None
    names = feat.get("names") if isinstance(feat, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _hive(path: str, base: str) -> dict[str, str]:
    out = {}
    for part in path[len(base):].split("/")[:-1]:
        m = _HIVE.match(part)
        if m:
            out[m.group(1)] = m.group(2)
    return out


@dataclass(frozen=True)
class ParquetSource(Source):
    """Images as bytes in a Parquet table; refs are ``FILE#ROW_GROUP/ROW``."""

    image_column: str | None = None
    label_column: str | None = None
    split_column: str | None = None
    kind = "parquet"

    def options(self) -> dict[str, Any]:
        return {"image_column": self.image_column, "label_column": self.label_column,
                "split_column": self.split_column}

    def check(self, storage_options: Mapping | None = None) -> None:
        parquet_files(self.url, storage_options)

    def list(self, storage_options: Mapping | None = None) -> Listing:
        pq = _pyarrow_parquet(self.url)
        fs, files = parquet_files(self.url, storage_options)
        _, base = url_to_fs(self.url, storage_options)
        base = base.rstrip("/") + "/" if fs.isdir(base) else ""
        listing: Listing | None = None
        for path in files:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                names = list(schema.names)
                hive = _hive(path, base) if base else {}
                pick_column(names, self.image_column, IMAGE_COLUMNS, "image bytes",
                            "--image-column", fs.unstrip_protocol(path))
                label_col = pick_column(names + list(hive), self.label_column, ("label",),
                                        "label", "--label-column", fs.unstrip_protocol(path))
                split_col = pick_column(names + list(hive), self.split_column, ("split",),
                                        "split", "--split-column", fs.unstrip_protocol(path),
                                        required=False)
                if listing is None:
                    listing = Listing(refs=[], labels=[], splits=[] if split_col else None)
                cols = [c for c in (label_col, split_col) if c and c in names]
                table = pf.read(columns=cols) if cols else None
                col_values = {c: table.column(c).to_pylist() for c in cols} if cols else {}
                class_names = _class_names(schema, label_col) if label_col in names else None
                url = fs.unstrip_protocol(path) if "://" in self.url else path
                row = 0
                for g in range(pf.metadata.num_row_groups):
                    for i in range(pf.metadata.row_group(g).num_rows):
                        label = col_values[label_col][row] if label_col in col_values \
                            else hive.get(label_col)
                        if class_names is not None and isinstance(label, int):
                            label = class_names[label] if 0 <= label < len(class_names) else \
                                f"\0{label}"  # out of range: refused below
                        split = None
                        if split_col:
                            split = col_values[split_col][row] if split_col in col_values \
                                else hive.get(split_col)
                        ref = f"{url}#{g}/{i}"
                        if isinstance(label, str) and label.startswith("\0"):
                            listing.skipped.append((ref, f"unknown label {label[1:]} (the "
                                                         f"column's ClassLabel has "
                                                         f"{len(class_names or [])} names)"))
                        else:
                            add_row(listing, ref, label, split)
                        row += 1
        assert listing is not None
        return listing

    def reader(self, storage_options: Mapping | None = None,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> RefReader:
        return ParquetReader(self, storage_options, max_bytes)


class ParquetReader(RefReader):
    """Reads the image column of one row group at a time, keeping the last one (a task's
    rows are consecutive: each of its row groups is read once)."""

    def __init__(self, source: ParquetSource, storage_options: Mapping | None,
                 max_bytes: int):
        super().__init__(storage_options, max_bytes)
        self.source = source
        self._file: tuple[str, Any, Any] | None = None  # (path, open file, ParquetFile)
        self._group: tuple[str, int, Any] | None = None  # (path, row group, column)

    def _parquet(self, path: str) -> Any:
        if self._file is None or self._file[0] != path:
            self.close()
            pq = _pyarrow_parquet(path)
            fs, p = url_to_fs(path, self.storage_options)
            f = fs.open(p, "rb")
            self._file = (path, f, pq.ParquetFile(f))
        return self._file[2]

    def _column(self, path: str, group: int) -> Any:
        if self._group is None or self._group[:2] != (path, group):
            pf = self._parquet(path)
            names = pf.schema_arrow.names
            col = self.source.image_column or next((c for c in IMAGE_COLUMNS if c in names),
                                                   None)
            if col not in names:
                raise InvalidParameterError(f"{show_name(path)} has no image column {col!r}")
            self._group = (path, group, pf.read_row_group(group, columns=[col]).column(0))
        return self._group[2]

    def read(self, ref: str) -> bytes:
        path, sep, pos = ref.rpartition("#")
        g, _, i = pos.partition("/")
        if not sep or not g.isdigit() or not i.isdigit():
            raise FileRefusedError(f"not a Parquet row ref: {ref!r}")
        try:
            value = self._column(path, int(g))[int(i)].as_py()
        except IndexError:
            raise FileRefusedError("row not in the Parquet file (changed after the scan?)") \
                from None
        except (OSError, ValueError) as exc:  # a damaged file or row group
            raise FileRefusedError(f"unreadable Parquet row group: {exc}") from None
        return cell_bytes(value, self)

    def close(self) -> None:
        if self._file is not None:
            self._file[1].close()
        self._file = None
        self._group = None
