"""A loaded Hugging Face ``datasets.Dataset`` (or ``DatasetDict``) as a source (API only).

    ds = datasets.load_dataset("imagefolder", data_dir="photos")      # a DatasetDict
    dt.featurize(ds, "features.zarr")        # its train / validation / test splits kept

A loaded dataset is Arrow files memory-mapped from the datasets cache (or from a
``save_to_disk`` folder). The listing reads the label column (and the indices mapping that
``select``, ``shuffle`` and ``train_test_split`` make) on the driver; a row's ref is
``ARROW_FILE#ROW``, and a worker memory-maps the file and reads the image cell of its rows
itself: images never pass through the driver, and the workers need pyarrow, not the
``datasets`` package. An ``Image()`` cell holds the encoded bytes, or only a path to the
file (``imagefolder`` on local files), which the worker reads as a file.

The Arrow files must be where the workers can read them (the local engine, or a shared
filesystem). A dataset held only in memory (``Dataset.from_dict`` without saving) has no
files: it is refused with the way out (``save_to_disk`` or ``to_parquet``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import InvalidParameterError
from ..fs import DEFAULT_MAX_IMAGE_BYTES, FileRefusedError
from .base import (ListedOnDriver, Listing, RefReader, Source, add_row, cell_bytes,
                   split_name)
from .manifest import pick_column
from .parquet import IMAGE_COLUMNS


def is_hf_dataset(obj: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict`` (checked without importing ``datasets``)."""
    mod = type(obj).__module__
    return mod.startswith("datasets.") and type(obj).__name__ in ("Dataset", "DatasetDict")


def _arrow_blocks(ds: Any) -> list[tuple[str, int]]:
    """The (Arrow file, rows) blocks a Dataset's table is the concatenation of, in order.

    ``datasets`` keeps a loaded table as a ``MemoryMappedTable`` (one file) or a
    ``ConcatenationTable`` of them (``concatenate_datasets``); their ``path`` is public
    attribute-wise but not documented API, hence the checks and the one-line refusal."""
    table = ds.data
    blocks = getattr(table, "blocks", None)
    parts = [t for row in blocks for t in row] if blocks is not None else [table]
    if blocks is not None and any(len(row) != 1 for row in blocks):
        raise InvalidParameterError(
            "this Dataset was built by concatenating columns (axis=1): save it "
            "(ds.save_to_disk(path), then datasets.load_from_disk(path)) and featurize that.",
            param="dataset")
    out = []
    for t in parts:
        path = getattr(t, "path", None)
        if not isinstance(path, str):
            raise InvalidParameterError(
                "this Dataset is held in memory, not in Arrow files the workers can read: "
                "save it (ds.save_to_disk(path), then datasets.load_from_disk(path), or "
                "ds.to_parquet(url)) and featurize that.", param="dataset")
        out.append((path, t.num_rows))
    return out


def _indices(ds: Any) -> Any:
    """The rows of the underlying table a Dataset shows, in order (None: all, as stored).
    ``_indices`` is what ``select``/``shuffle``/``train_test_split`` leave instead of copying
    the table; ``datasets`` has no public accessor for it."""
    idx = getattr(ds, "_indices", None)
    return None if idx is None else idx.column(0).to_numpy()


def _label_names(ds: Any, column: str) -> list[str] | None:
    feat = ds.features.get(column)
    names = getattr(feat, "names", None)  # a ClassLabel
    return [str(n) for n in names] if isinstance(names, list) else None


def _file_columns(path: str) -> list[str]:
    import pyarrow as pa

    with pa.memory_map(path, "r") as f:
        return list(pa.ipc.open_stream(f).schema.names)


def list_dataset(ds: Any, split: str | None, listing: Listing, *, image_column: str | None,
                 label_column: str | None) -> str:
    """Append one Dataset's rows to ``listing`` (``split``: its DatasetDict key, or None).
    Returns the image column read."""
    import numpy as np

    names = list(ds.column_names)
    shown = f"the Dataset{f' {split!r}' if split else ''}"
    image = pick_column(names, image_column, IMAGE_COLUMNS, "image", "image_column", shown)
    label = pick_column(names, label_column, ("label", "labels"), "label", "label_column",
                        shown)
    blocks = _arrow_blocks(ds)
    for path, _ in blocks:
        if image not in _file_columns(path):  # renamed in memory after it was written
            raise InvalidParameterError(
                f"the image column {image!r} of {shown} is not in its Arrow file {path} "
                f"(renamed after loading?): save it (ds.save_to_disk) and load that.",
                param="image_column")
    starts = np.cumsum([0] + [n for _, n in blocks])
    # the label cells of the table as stored (casts and renames applied), then the view
    cells = ds.data.column(label).to_pylist()
    class_names = _label_names(ds, label)
    rows = _indices(ds)
    rows = np.arange(ds.data.num_rows) if rows is None else rows
    store_split = None
    if split is not None:
        store_split = split_name(split)
        if store_split is None:
            listing.warnings.append(f"split {split!r} of the DatasetDict is not train, "
                                    f"validation or test: its rows are unassigned")
            store_split = ""
    for r in rows:
        r = int(r)
        b = int(np.searchsorted(starts, r, side="right")) - 1
        ref = f"{blocks[b][0]}#{r - int(starts[b])}"
        value = cells[r]
        if class_names is not None and isinstance(value, int) and not isinstance(value, bool):
            if value == -1:  # a ClassLabel's missing label
                value = None
            elif not 0 <= value < len(class_names):
                listing.skipped.append((ref, f"unknown label {value} (the ClassLabel has "
                                             f"{len(class_names)} names)"))
                continue
            else:
                value = class_names[value]
        add_row(listing, ref, value, store_split)
    return image


@dataclass(frozen=True)
class HFDatasetSource(ListedOnDriver, Source):
    """The rows of a loaded Dataset / DatasetDict, listed when it was given; refs are
    ``ARROW_FILE#ROW``. The listing stays on the driver (not pickled to the workers)."""

    image_column: str = "image"
    label_column: str | None = None
    files: tuple[str, ...] = ()
    listing: Listing | None = field(default=None, compare=False, repr=False)
    kind = "hf_dataset"

    def options(self) -> dict[str, Any]:
        return {"image_column": self.image_column, "label_column": self.label_column}

    @property
    def root(self) -> str:
        import os

        return os.path.dirname(self.files[0]) if self.files else self.url

    def reader(self, storage_options: Mapping | None = None,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> RefReader:
        return ArrowReader(self.image_column, storage_options, max_bytes)


class ArrowReader(RefReader):
    """Reads image cells from memory-mapped Arrow stream files (the datasets cache format),
    keeping the last file mapped: a task's rows are mostly in one file."""

    def __init__(self, column: str, storage_options: Mapping | None, max_bytes: int):
        super().__init__(storage_options, max_bytes)
        self.column = column
        self._open: tuple[str, Any, Any] | None = None  # (path, memory map, image column)

    def _cells(self, path: str) -> Any:
        if self._open is None or self._open[0] != path:
            import pyarrow as pa

            self.close()
            mm = pa.memory_map(path, "r")
            # read_all of a memory-mapped stream is zero-copy: only the rows read are paged in
            table = pa.ipc.open_stream(mm).read_all()
            self._open = (path, mm, table.column(self.column))
        return self._open[2]

    def read(self, ref: str) -> bytes:
        path, sep, row = ref.rpartition("#")
        if not sep or not row.isdigit():
            raise FileRefusedError(f"not an Arrow row ref: {ref!r}")
        try:
            value = self._cells(path)[int(row)].as_py()
        except IndexError:
            raise FileRefusedError("row not in the Arrow file (changed after listing?)") \
                from None
        except (OSError, ValueError) as exc:  # a file gone or damaged since the listing
            raise FileRefusedError(f"unreadable Arrow file: {exc}") from None
        return cell_bytes(value, self)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
        self._open = None


def hf_dataset_source(ds: Any, *, image_column: str | None = None,
                      label_column: str | None = None, **other: Any) -> HFDatasetSource:
    """The source of a loaded Dataset or DatasetDict (its keys are the splits)."""
    if other:
        raise InvalidParameterError(f"{', '.join(other)}: not an option of a Hugging Face "
                                    f"Dataset source (image_column, label_column).")
    parts = list(ds.items()) if type(ds).__name__ == "DatasetDict" else [(None, ds)]
    if not parts:
        raise InvalidParameterError("the DatasetDict has no splits.", param="dataset")
    listing = Listing(refs=[], labels=[], splits=[] if parts[0][0] is not None else None)
    image = None
    for split, part in parts:
        got = list_dataset(part, split, listing, image_column=image_column,
                           label_column=label_column)
        if image is not None and got != image:
            raise InvalidParameterError(
                f"the DatasetDict's splits name their images differently ({image!r}, "
                f"{got!r}): give image_column.", param="image_column")
        image = got
    files = tuple(dict.fromkeys(p for _, part in parts for p, _ in _arrow_blocks(part)))
    fingerprints = ",".join(str(getattr(part, "_fingerprint", "")) for _, part in parts)
    return HFDatasetSource(url=f"<datasets {type(ds).__name__} {fingerprints}>",
                           image_column=image or "image", label_column=label_column,
                           files=files, listing=listing)
