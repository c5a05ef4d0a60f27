"""The source protocol: where a dataset's rows come from and how a worker reads one.

A *source* is a small frozen, picklable description of a dataset (its URL and the options
that say how to read it: column names, nothing listed). It does three things:

- ``list(storage_options)`` on the driver: the rows, as a ``Listing`` of opaque refs (str),
  their label names and optionally their split names, plus the rows refused while listing
  (a missing uri, a null label) with their reasons. The listing reads metadata only
  (folder entries, a manifest's columns, Parquet footers and label columns, tar headers),
  never an image;
- ``reader(storage_options, max_bytes)`` on a worker: a ``RefReader`` whose ``read(ref)``
  returns the encoded bytes of one row, at most ``max_bytes`` long, or raises an OSError
  (``deeptransfer.fs.FileRefusedError`` for a row refused on purpose) with the reason;
  readers keep the file they read open, so a task reading its rows in order reads each
  Parquet row group and each tar shard once, front to back;
- ``describe()``: a JSON-able dict (kind, url, options) that goes into the store's identity,
  so resuming with another source of the same refs is refused.

The ref of a file (folder and manifest sources) is its path or URL, read with the bounded,
regular-file-only reads of ``deeptransfer.fs``, so a folder store holds the same rows as
before sources existed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from ..fs import DEFAULT_MAX_IMAGE_BYTES, FileRefusedError, read_local, read_url

#: split names a source may give, mapped to the store's (Hugging Face and Keras say
#: "validation", some tables "valid" or "dev")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test"}


@dataclass
class Listing:
    """The rows of a source in its own order (file order: row groups and shards stay
    together, so a task reads consecutive rows of one file)."""

    refs: list[str]
    labels: list[str]  # label name per row
    splits: list[str] | None = None  # store split name per row ("" none), or None: unsplit
    #: (ref or row description, reason) of rows left out while listing
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class RefReader:
    """Reads the bytes of refs on a worker; ``close`` releases what it holds open."""

    def __init__(self, storage_options: Mapping | None = None,
                 max_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.storage_options = dict(storage_options or {})
        self.max_bytes = max_bytes

    def read(self, ref: str) -> bytes:  # pragma: no cover - the protocol
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "RefReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FileReader(RefReader):
    """Refs that are file paths or fsspec URLs: ``deeptransfer.fs``'s bounded reads."""

    def read(self, ref: str) -> bytes:
        return read_file_ref(ref, self.storage_options, self.max_bytes)


def read_file_ref(ref: str, storage_options: Mapping | None = None,
                  max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of one regular file, local or any fsspec URL, at most ``max_bytes``."""
    if "://" not in ref or ref.startswith("file://"):
        return read_local(ref.removeprefix("file://"), max_bytes)
    return read_url(ref, storage_options, max_bytes)


def cell_bytes(value: Any, reader: RefReader) -> bytes:
    """The encoded bytes of a table's image cell: bytes, or Hugging Face's ``Image()``
    struct ``{"bytes", "path"}`` (a cell with only a path, as ``imagefolder`` keeps local
    files, is read as that file), at most ``reader.max_bytes`` long."""
    if isinstance(value, dict):
        data, where = value.get("bytes"), value.get("path")
        if data is None and where:
            return read_file_ref(where, reader.storage_options, reader.max_bytes)
        value = data
    if value is None:
        raise FileRefusedError("no image bytes (null)")
    if isinstance(value, str):
        raise FileRefusedError("the image column holds text, not bytes")
    return check_size(bytes(value), reader.max_bytes)


class ListedOnDriver:
    """For a source listed when it was given (a DataFrame, a loaded Dataset): its
    ``listing`` stays on the driver; the copy a worker gets with the featurize spec has
    none (workers read refs, not rows)."""

    listing: "Listing | None"

    def check(self, storage_options: Mapping | None = None) -> None:
        pass

    def list(self, storage_options: Mapping | None = None) -> "Listing":
        assert self.listing is not None
        return self.listing

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["listing"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def check_size(data: bytes, max_bytes: int) -> bytes:
    """``data`` unless it is longer than ``max_bytes`` (the cap a file read has too)."""
    if len(data) > max_bytes:
        raise FileRefusedError(f"image too large: {len(data)} bytes > limit {max_bytes} bytes "
                               f"({max_bytes / 2**20:g} MiB)")
    return data


@dataclass(frozen=True)
class Source:
    """Base of the sources: ``url`` and the options, frozen (broadcast with the featurize
    spec to every worker; never the listing)."""

    url: str
    kind: ClassVar[str] = "source"

    def list(self, storage_options: Mapping | None = None) -> Listing:  # pragma: no cover
        raise NotImplementedError

    def check(self, storage_options: Mapping | None = None) -> None:
        """DatasetNotFoundError when nothing is at the source's URL (one metadata call):
        run before any engine starts."""
        from ..errors import DatasetNotFoundError
        from ..fs import show_name, url_to_fs

        fs, path = url_to_fs(self.url, storage_options)
        if not fs.exists(path):
            raise DatasetNotFoundError(f"Dataset not found: nothing at {show_name(self.url)} "
                                       f"(a {self.kind} source).")

    def manifest(self, *, exclude_classes: Sequence[str] = (),
                 storage_options: Mapping | None = None) -> Any:
        """The source's Manifest: its listing, classes and splits (see ``to_manifest``)."""
        return to_manifest(self, self.list(storage_options), exclude_classes=exclude_classes)

    def reader(self, storage_options: Mapping | None = None,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> RefReader:
        return FileReader(storage_options, max_bytes)

    @property
    def reads_files(self) -> bool:
        """Whether a ref is a file path or URL (then a worker reads it as a file)."""
        return type(self).reader is Source.reader

    def options(self) -> dict[str, Any]:
        """The options that change what is read (columns): part of ``describe``."""
        return {}

    def describe(self) -> dict[str, Any]:
        from ..fs import escape_path

        return {"kind": self.kind, "url": escape_path(self.url), **self.options()}

    @property
    def root(self) -> str:
        """The location a store must not overlap (the folder, the manifest file, ...)."""
        return self.url


def natural_key(s: str) -> list:
    """image_2 before image_10: the order a person lists names in."""
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def label_text(value: Any) -> str | None:
    """A label cell as a class name: str as it is, an integer as its digits; None for a null
    (None, NaN, an empty string)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    if isinstance(value, float):
        if value != value:  # NaN: pandas' null
            return None
        if value.is_integer():
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"unknown label {value!r} (a class name or an integer is expected)")
    text = str(value).strip()
    return text or None


def split_name(value: Any) -> str | None:
    """A split cell as a store split name; "" for a null; None for an unknown name."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text = str(value).strip().lower()
    if not text:
        return ""
    return SPLIT_NAMES.get(text)


def add_row(listing: Listing, ref: str, label: Any, split: Any = None, *,
            shown: str | None = None) -> None:
    """Append one row to ``listing``, or to its skipped rows with the reason (a null or
    unknown label, an unknown split name)."""
    try:
        name = label_text(label)
    except ValueError as exc:
        listing.skipped.append((shown or ref, str(exc)))
        return
    if name is None:
        listing.skipped.append((shown or ref, "no label (null)"))
        return
    if listing.splits is not None:
        s = split_name(split)
        if s is None:
            listing.skipped.append((shown or ref, f"unknown split {split!r} (train, val or "
                                                  f"validation, test)"))
            return
        listing.splits.append(s)
    listing.refs.append(ref)
    listing.labels.append(name)


def join_uri(base_dir: str, uri: str) -> str:
    """``uri`` as an absolute path or URL: a relative one is taken relative to ``base_dir``
    (the folder of the manifest, local or fsspec)."""
    if "://" in uri:
        return uri.removeprefix("file://") if uri.startswith("file://") else uri
    if uri.startswith("/"):
        if "://" in base_dir and not base_dir.startswith("file://"):
            protocol = base_dir.split("://", 1)[0]
            return f"{protocol}://{uri.lstrip('/')}" if protocol != "memory" else \
                f"memory://{uri}"
        return uri
    import posixpath

    if "://" in base_dir:
        protocol, rest = base_dir.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return posixpath.normpath(posixpath.join(base_dir, uri))


def parent(url: str) -> str:
    """The folder of a file path or URL."""
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def dedupe(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def to_manifest(source: Source, listing: Listing, *, exclude_classes: Sequence[str] = ()
                ) -> Any:
    """The Manifest of a listing: classes in natural order of their names, rows in the
    listing's order, the listing's splits kept (a pre-split dataset) when it has them."""
    import numpy as np

    from ..dataset import SPLITS, UNASSIGNED, Manifest
    from ..errors import DatasetNotFoundError, InvalidParameterError
    from ..fs import show_name

    refs, labels, splits = listing.refs, listing.labels, listing.splits
    if exclude_classes:
        seen = set(labels)
        unknown = [c for c in exclude_classes if c not in seen]
        if unknown:
            raise InvalidParameterError(
                f"--exclude-class names no class of this dataset: "
                f"{', '.join(show_name(c) for c in unknown)}. Classes are the label values, "
                f"e.g. {sorted(seen, key=natural_key)[:5]}.")
        drop = set(exclude_classes)
        keep = [i for i, lab in enumerate(labels) if lab not in drop]
        refs = [refs[i] for i in keep]
        labels = [labels[i] for i in keep]
        splits = None if splits is None else [splits[i] for i in keep]
    if not refs:
        raise DatasetNotFoundError(
            f"Dataset {show_name(source.url)} holds no images"
            + (f" ({len(listing.skipped)} rows refused, e.g. {listing.skipped[0][1]})"
               if listing.skipped else "") + ".")
    classes = sorted(set(labels), key=natural_key)
    index = {c: i for i, c in enumerate(classes)}
    label_arr = np.fromiter((index[lab] for lab in labels), dtype=np.int32, count=len(labels))
    presplit = splits is not None and any(splits)
    if presplit:
        codes = {s: i for i, s in enumerate(SPLITS)}
        split = np.fromiter((codes.get(s, UNASSIGNED) for s in splits), dtype=np.int8,
                            count=len(splits))
    else:
        split = np.full(len(refs), UNASSIGNED, np.int8)
    warnings = list(listing.warnings)
    if listing.skipped:
        warnings.append(f"{len(listing.skipped)} row(s) of the source were left out while "
                        f"listing it (see the skipped rows), e.g. "
                        f"{show_name(listing.skipped[0][0])}: {listing.skipped[0][1]}")
    return Manifest(root=source.root, paths=refs, labels=label_arr, split=split,
                    classes=classes, warnings=warnings, presplit=presplit, source=source,
                    skipped=list(listing.skipped))
