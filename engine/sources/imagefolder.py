"""The Hugging Face ``imagefolder`` source: a folder of images with ``metadata.csv`` or
``metadata.jsonl`` files (column ``file_name``, relative to the metadata file's folder).

The label is the metadata's ``label`` column (``--label-column``), else the name of the
folder the image is in (``imagefolder``'s own rule). Metadata in split folders
(``train/``, ``validation/`` or ``val/``, ``test/``) gives those splits; a ``split`` column
does too. Refs are the images' paths or URLs, read as files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import DatasetNotFoundError
from ..fs import show_name, url_to_fs
from .base import SPLIT_NAMES, Listing, Source, add_row, join_uri, natural_key
from .manifest import pick_column, read_table

METADATA = ("metadata.csv", "metadata.jsonl")


def metadata_files(url: str, storage_options: Mapping | None = None) -> list[str]:
    """The metadata files of an imagefolder (root and one level of split folders)."""
    fs, root = url_to_fs(url, storage_options)
    if not fs.isdir(root):
        return []
    root = root.rstrip("/")
    found = []
    for p in fs.find(root, maxdepth=2):
        rel = p[len(root) + 1:]
        if rel.rsplit("/", 1)[-1] in METADATA and rel.count("/") <= 1:
            found.append(p)
    return sorted(found, key=natural_key)


@dataclass(frozen=True)
class ImageFolderSource(Source):
    """A Hugging Face imagefolder tree with metadata files."""

    label_column: str | None = None
    split_column: str | None = None
    kind = "imagefolder"

    def options(self) -> dict[str, Any]:
        return {"label_column": self.label_column, "split_column": self.split_column}

    def check(self, storage_options: Mapping | None = None) -> None:
        if not metadata_files(self.url, storage_options):
            raise DatasetNotFoundError(
                f"{show_name(self.url)} has no metadata.csv or metadata.jsonl (a Hugging Face "
                f"imagefolder).")

    def list(self, storage_options: Mapping | None = None) -> Listing:
        self.check(storage_options)
        fs, root = url_to_fs(self.url, storage_options)
        root = root.rstrip("/")
        remote = "://" in self.url and not self.url.startswith("file://")
        listing = Listing(refs=[], labels=[], splits=[])
        for meta in metadata_files(self.url, storage_options):
            meta_url = fs.unstrip_protocol(meta) if remote else meta
            names, rows = read_table(meta_url, storage_options)
            uri_col = pick_column(names, None, ("file_name",), "file_name", "--uri-column",
                                  meta_url)
            label_col = pick_column(names, self.label_column, ("label",), "label",
                                    "--label-column", meta_url, required=False)
            split_col = pick_column(names, self.split_column, ("split",), "split",
                                    "--split-column", meta_url, required=False)
            rel = meta[len(root) + 1:]
            folder_split = SPLIT_NAMES.get(rel.split("/")[0].lower()) if "/" in rel else None
            base = meta_url.rsplit("/", 1)[0]
            for n, row in enumerate(rows, 1):
                name = row.get(uri_col)
                if not isinstance(name, str) or not name.strip():
                    listing.skipped.append((f"{meta_url} row {n}", "missing file_name"))
                    continue
                ref = join_uri(base, name.strip())
                label = row.get(label_col) if label_col else \
                    (name.strip().rsplit("/", 2)[-2] if "/" in name.strip() else None)
                split = folder_split or (row.get(split_col) if split_col else None)
                add_row(listing, ref, label, split)
        if not any(listing.splits or []):
            listing.splits = None
        return listing
