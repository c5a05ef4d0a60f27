"""The WebDataset source: tar shards of samples ``{key}.jpg|png|...`` + ``{key}.cls`` (the
label as text) or ``{key}.json`` (``{"label": ...}``), local or on any fsspec filesystem.

The argument is one shard (``train-0000.tar``), a brace pattern
(``shards-{0000..0099}.tar``, ``{a,b}`` lists too), or a folder of ``*.tar`` shards. Shards are
uncompressed tars (as WebDataset writes them): a member's bytes can be read where the
header says they are.

Listing reads the tar headers and the small label members (never an image): a sample's
ref is ``SHARD#MEMBER@OFFSET+SIZE``. Rows keep the shards' order and each shard's member
order, so a task's rows are a stretch of one shard (or the end of one and the start of the
next), which its reader reads front to back through one open file. A sample with no
image, no label or an unknown one, and the samples of a shard cut short (a truncated
download) are left out or skipped with their reason.
"""
from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import DatasetNotFoundError
from ..fs import DEFAULT_MAX_IMAGE_BYTES, FileRefusedError, show_name, url_to_fs
from .base import Listing, RefReader, Source, add_row, natural_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
#: label members are tiny; a larger one is not a label
MAX_LABEL_BYTES = 1 << 20
_BRACE = re.compile(r"\{([^{}]*)\}")
_REF = re.compile(r"(.+?\.tar)#(.*)@(\d+)\+(\d+)", re.S)


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> a-00.tar, a-01.tar, a-02.tar (zero padding kept); ``{x,y}``
    lists; several braces multiply."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [s for o in options for s in expand_braces(head + o + tail)]


def is_shards(url: str) -> bool:
    """Whether a dataset argument names tar shards (a .tar, or a brace pattern of them)."""
    low = url.lower()
    return low.endswith(".tar") or bool(_BRACE.search(url) and ".tar" in low)


def shard_urls(url: str, storage_options: Mapping | None = None) -> list[str]:
    """The shards of a pattern or folder (those of a pattern in its order)."""
    if _BRACE.search(url):
        return expand_braces(url)
    fs, path = url_to_fs(url, storage_options)
    if fs.isdir(path):
        found = sorted((p for p in fs.find(path) if p.endswith(".tar")), key=natural_key)
        if not found:
            raise DatasetNotFoundError(f"{show_name(url)} holds no .tar shards.")
        return [fs.unstrip_protocol(p) if "://" in url else p for p in found]
    return [url]


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key and extension: the extension starts at the first dot of the base."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass(frozen=True)
class WebDatasetSource(Source):
    """Tar shards of samples; refs are ``SHARD#MEMBER@OFFSET+SIZE``."""

    label_column: str | None = None  # the key of the label in a .json member
    kind = "webdataset"

    def options(self) -> dict[str, Any]:
        return {"label_column": self.label_column}

    @property
    def root(self) -> str:
        return expand_braces(self.url)[0]

    def check(self, storage_options: Mapping | None = None) -> None:
        urls = shard_urls(self.url, storage_options)
        fs, path = url_to_fs(urls[0], storage_options)
        if not fs.exists(path):
            raise DatasetNotFoundError(f"Dataset not found: no shard at {show_name(urls[0])}.")

    def list(self, storage_options: Mapping | None = None) -> Listing:
        listing = Listing(refs=[], labels=[])
        for url in shard_urls(self.url, storage_options):
            self._list_shard(url, storage_options, listing)
        return listing

    def _list_shard(self, url: str, storage_options: Mapping | None, listing: Listing) -> None:
        fs, path = url_to_fs(url, storage_options)
        try:
            size = int(fs.info(path)["size"])
            # small blocks: the headers are read, the images between them skipped
            f = fs.open(path, "rb", block_size=1 << 16) if "://" in url else fs.open(path, "rb")
        except FileNotFoundError:
            listing.warnings.append(f"shard {show_name(url)} not found: its samples are left "
                                    f"out")
            return
        samples: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        with f:
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for m in tar:
                        if not m.isreg():
                            continue
                        key, ext = _split_name(m.name)
                        if key not in samples:
                            samples[key] = {}
                            order.append(key)
                        s = samples[key]
                        if m.offset_data + m.size > size:
                            s.setdefault("truncated", m.name)
                        elif ext in IMAGE_EXTS and "image" not in s:
                            s["image"] = m
                        elif ext in ("cls", "json", "txt") and m.size <= MAX_LABEL_BYTES:
                            s[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
            except (tarfile.ReadError, EOFError, OSError) as exc:
                listing.warnings.append(
                    f"shard {show_name(url)} is truncated or damaged after {len(order)} "
                    f"samples ({exc}): the rest of it is left out")
                if order:
                    samples[order[-1]].setdefault("truncated", order[-1])
        for key in order:
            self._add_sample(listing, url, key, samples[key])

    def _add_sample(self, listing: Listing, url: str, key: str, s: dict[str, Any]) -> None:
        shown = f"{url}#{key}"
        m = s.get("image")
        if m is None:
            listing.skipped.append((shown, "truncated shard: the sample's data is cut short"
                                    if "truncated" in s else "no image in the sample"))
            return
        ref = f"{url}#{m.name}@{m.offset_data}+{m.size}"
        if "truncated" in s:
            listing.skipped.append((ref, "truncated shard: the sample's data is cut short"))
            return
        try:
            label = self._label(s)
        except ValueError as exc:
            listing.skipped.append((ref, str(exc)))
            return
        add_row(listing, ref, label)

    def _label(self, s: dict[str, Any]) -> Any:
        col = self.label_column or "label"
        if "json" in s and (self.label_column or "cls" not in s):
            try:
                doc = json.loads(s["json"])
            except ValueError:
                raise ValueError("unknown label: the .json member is not JSON") from None
            if not isinstance(doc, dict) or col not in doc:
                raise ValueError(f"no label: the .json member has no {col!r} key")
            return doc[col]
        raw = s.get("cls", s.get("txt"))
        return None if raw is None else raw.decode("utf-8", "backslashreplace").strip()

    def reader(self, storage_options: Mapping | None = None,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> RefReader:
        return ShardReader(storage_options, max_bytes)


class ShardReader(RefReader):
    """Reads tar members where their headers said, through one open file per shard."""

    def __init__(self, storage_options: Mapping | None, max_bytes: int):
        super().__init__(storage_options, max_bytes)
        self._open: tuple[str, Any] | None = None

    def _file(self, shard: str) -> Any:
        if self._open is None or self._open[0] != shard:
            self.close()
            fs, path = url_to_fs(shard, self.storage_options)
            self._open = (shard, fs.open(path, "rb"))
        return self._open[1]

    def read(self, ref: str) -> bytes:
        m = _REF.fullmatch(ref)
        if m is None:
            raise FileRefusedError(f"not a tar member ref: {ref!r}")
        shard, offset, size = m.group(1), int(m.group(3)), int(m.group(4))
        if size > self.max_bytes:
            raise FileRefusedError(f"file too large: {size} bytes > limit {self.max_bytes} "
                                   f"bytes ({self.max_bytes / 2**20:g} MiB)")
        f = self._file(shard)
        if f.tell() != offset:
            f.seek(offset)
        data = f.read(size)
        if len(data) < size:
            raise FileRefusedError("truncated shard: the member's data is cut short")
        return data

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
        self._open = None
