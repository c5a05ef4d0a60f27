"""The manifest source: a CSV, JSONL or Parquet table of (uri, label[, split]) rows.

Columns by default: ``uri`` (or ``path``, or Hugging Face's ``file_name``), ``label`` and,
when there is one, ``split`` (train / val or validation / test); ``uri_column``,
``label_column`` and ``split_column`` name others (CLI: ``--uri-column``, ...). A uri is an
absolute path, any fsspec URL (``s3://bucket/cat/1.jpg``), or a path relative to the
manifest's folder (local or remote). A row's ref is its resolved uri, read as a file by the
worker (bounded, regular files only), so a manifest of a folder's files makes the very
store the folder does. A row with no uri or no label is left out with its reason.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ..errors import DatasetNotFoundError, InvalidParameterError
from ..fs import show_name, url_to_fs
from .base import Listing, Source, add_row, join_uri, parent

#: the uri columns looked for, in order, when none is named
URI_COLUMNS = ("uri", "path", "file_name", "filepath", "image_path")
FORMATS = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet")


def manifest_format(url: str) -> str | None:
    """The table format of a manifest path by its extension ("csv", "jsonl", "parquet")."""
    low = url.lower().rstrip("/")
    for ext, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                     (".ndjson", "jsonl"), (".json", "jsonl"), (".parquet", "parquet")):
        if low.endswith(ext):
            return fmt
    return None


def read_columns(url: str, storage_options: Mapping | None = None
                 ) -> tuple[list[str], Any]:
    """(column names, a function name -> the column as a list) of a manifest: with pyarrow
    (its CSV / JSON / Parquet readers, columnar: a million rows in about a second) when it
    is installed, else ``read_table``'s rows."""
    fmt = manifest_format(url)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        names, rows = read_table(url, storage_options)
        rows = list(rows)
        return names, lambda c: [r.get(c) for r in rows]
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        if fmt == "parquet":
            table = _pyarrow_parquet(url).read_table(f)
        elif fmt in ("csv", "tsv"):
            # every column as text, as the csv module reads it; "" is a null
            head = f.read(1 << 16)
            f.seek(0)
            first = head.decode("utf-8-sig", "replace").splitlines()[0] if head else ""
            cols = next(__import__("csv").reader([first],
                                                 delimiter="\t" if fmt == "tsv" else ","), [])
            import pyarrow as pa

            table = pcsv.read_csv(
                f, parse_options=pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                convert_options=pcsv.ConvertOptions(
                    column_types={c: pa.string() for c in cols}, strings_can_be_null=True))
        else:
            try:
                table = pjson.read_json(f)
            except Exception:  # noqa: BLE001 - a bad line: the row reader says which
                names, rows = read_table(url, storage_options)
                rows = list(rows)
                return names, lambda c: [r.get(c) if "__error__" not in r else r
                                         for r in rows]
    return list(table.column_names), lambda c: table.column(c).to_pylist()


def read_table(url: str, storage_options: Mapping | None = None,
               columns: list[str] | None = None) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """(column names, rows as dicts) of a CSV / TSV / JSONL / Parquet file on any fsspec
    filesystem. CSV cells are text; an empty cell is a null."""
    fmt = manifest_format(url)
    fs, path = url_to_fs(url, storage_options)
    if fmt == "parquet":
        pq = _pyarrow_parquet(url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns)
        return list(table.column_names), iter(table.to_pylist())
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    if fmt in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""),
                                delimiter="\t" if fmt == "tsv" else ",")
        names = list(reader.fieldnames or [])
        return names, ({k: (v if v != "" else None) for k, v in r.items()} for r in reader)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                rows.append({"__error__": f"line {n} is not JSON"})
    names = list(dict.fromkeys(k for r in rows[:1000] for k in r if k != "__error__"))
    return names, iter(rows)


def _pyarrow_parquet(url: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        from ..errors import EngineUnavailableError

        raise EngineUnavailableError(
            f"{show_name(url)} is a Parquet file, which needs the pyarrow package: "
            f"pip install 'deeptransfer[parquet]' (or pip install pyarrow).") from None
    return pq


def pick_column(names: list[str], given: str | None, defaults: tuple[str, ...], what: str,
                flag: str, url: str, required: bool = True) -> str | None:
    """The column to read: ``given`` if it exists, else the first default present."""
    if given is not None:
        if given not in names:
            raise InvalidParameterError(
                f"{flag} {given!r}: {show_name(url)} has no such column (its columns: "
                f"{', '.join(names[:12])}).")
        return given
    found = next((c for c in defaults if c in names), None)
    if found is None and required:
        raise InvalidParameterError(
            f"{show_name(url)} has no {what} column ({' or '.join(defaults)}); its columns are "
            f"{', '.join(names[:12])}: name one with {flag}.")
    return found


@dataclass(frozen=True)
class ManifestSource(Source):
    """A table of (uri, label[, split]) rows; refs are the resolved uris."""

    uri_column: str | None = None
    label_column: str | None = None
    split_column: str | None = None
    kind = "manifest"

    def options(self) -> dict[str, Any]:
        return {"uri_column": self.uri_column, "label_column": self.label_column,
                "split_column": self.split_column}

    def check(self, storage_options: Mapping | None = None) -> None:
        fs, path = url_to_fs(self.url, storage_options)
        if not fs.exists(path) or fs.isdir(path):
            raise DatasetNotFoundError(
                f"Manifest not found: {show_name(self.url)} is not a file. Give a CSV, JSONL or "
                f"Parquet file with uri and label columns.")

    def list(self, storage_options: Mapping | None = None) -> Listing:
        self.check(storage_options)
        names, column = read_columns(self.url, storage_options)
        uri_col = pick_column(names, self.uri_column, URI_COLUMNS, "uri", "--uri-column",
                              self.url)
        label_col = pick_column(names, self.label_column, ("label",), "label",
                                "--label-column", self.url)
        split_col = pick_column(names, self.split_column, ("split",), "split",
                                "--split-column", self.url, required=False)
        base = _base_dir(self.url)
        listing = Listing(refs=[], labels=[], splits=[] if split_col else None)
        uris, labels = column(uri_col), column(label_col)
        splits = column(split_col) if split_col else [None] * len(uris)
        name = os.path.basename(self.url)
        for n, (uri, label, split) in enumerate(zip(uris, labels, splits), 1):
            if isinstance(uri, dict):  # a line that is not JSON (read_table's marker)
                listing.skipped.append((f"{name} row {n}", uri["__error__"]))
                continue
            if not isinstance(uri, str) or not uri.strip():
                listing.skipped.append((f"{name} row {n}", "missing uri" if uri in (None, "")
                                        else f"uri is not text: {uri!r}"))
                continue
            add_row(listing, join_uri(base, uri.strip()), label, split)
        return listing


def _base_dir(url: str) -> str:
    """The folder relative uris are taken from: absolute for a local manifest."""
    if "://" in url and not url.startswith("file://"):
        return parent(url)
    return os.path.dirname(os.path.abspath(url.removeprefix("file://")))
