"""A dataset's rows as a Manifest (ref, label, split code, classes), and seeded splits.

Where the rows come from is a *source* (``deeptransfer.sources``): a folder-per-class tree
(``sources.folder``, the default for a folder), a manifest file, a Parquet table, WebDataset
shards, a Hugging Face imagefolder. A row is an opaque ref the source's reader turns into
image bytes on the worker; for files (folders, manifests) it is the file's path or URL.

Splits are stratified per class, seeded per class (a class's split does not change when
another class is added or excluded), and the same on every engine because only the driver
computes them.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InvalidParameterError

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: split code of rows that belong to no split
UNASSIGNED = -1


@dataclass
class Manifest:
    """The images of a dataset: one row per image, in a deterministic order.

    ``paths`` holds each row's ref: a file's path or URL for folders and manifests, an
    opaque string its ``source`` reads otherwise (a Parquet row, a tar member)."""

    root: str
    paths: list[str]  # the refs
    labels: np.ndarray  # int32 class index per row
    split: np.ndarray  # int8 code per row: index into SPLITS, or UNASSIGNED
    classes: list[str]
    warnings: list[str] = field(default_factory=list)
    presplit: bool = False
    #: the deeptransfer.sources.Source the rows come from (None: refs are file paths/URLs)
    source: Any = None
    #: (ref, reason) of the rows the source refused while listing (a null label, ...)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def refs(self) -> list[str]:
        """The rows' refs (the same list as ``paths``)."""
        return self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def split_counts(self) -> dict[str, int]:
        """Number of rows per split name."""
        return {name: int((self.split == code).sum()) for code, name in enumerate(SPLITS)}

    def rows(self, split: str) -> np.ndarray:
        """Row indices of one split."""
        return np.flatnonzero(self.split == split_code(split))


def split_code(name: str) -> int:
    """The int8 code stored for a split name."""
    if name not in SPLITS:
        raise InvalidParameterError(
            f"Unknown split {name!r}: the splits are {', '.join(SPLITS)}.")
    return SPLITS.index(name)


def dataset_root(url: str, storage_options: Mapping | None = None) -> tuple[Any, str]:
    """The filesystem and root path of the dataset folder ``url`` (see
    ``deeptransfer.sources.folder``)."""
    from .sources.folder import dataset_root as _root

    return _root(url, storage_options)


def scan(url: str, *, exclude_classes: Sequence[str] = (),
         storage_options: Mapping | None = None) -> Manifest:
    """List a folder-per-class tree into a Manifest (``deeptransfer.sources.folder.scan``)."""
    from .sources.folder import FolderSource

    return FolderSource(url).manifest(exclude_classes=exclude_classes,
                                      storage_options=storage_options)


def check_dataset_options(url: Any, *, split: str | Mapping[str, float] | None = None,
                          per_class_train: int | None = None,
                          storage_options: Mapping | None = None) -> None:
    """What ``load_dataset`` would refuse before it scans: a missing folder or file, a bad
    split. Cheap (one listing call), so callers run it before starting an engine. ``url``: a
    dataset URL or a ``deeptransfer.sources.Source``."""
    from .sources import as_source

    _check_split(split, per_class_train)
    as_source(url, storage_options=storage_options).check(storage_options)


def _check_split(split: str | Mapping[str, float] | None, per_class_train: int | None) -> None:
    if split is not None and per_class_train is not None:
        raise InvalidParameterError("Give either a split by fractions or per-class counts, not both.")
    if isinstance(split, str):
        parse_fractions(split)
    elif split is not None:
        check_fractions(split)


def parse_fractions(text: str) -> dict[str, float]:
    """``"train=0.7,val=0.1,test=0.2"`` -> dict, validated (known names, sum 1)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value) if sep else float("nan")
        except ValueError:
            out[name.strip()] = float("nan")
    return check_fractions(out, text)


def check_fractions(fractions: Mapping[str, float], shown: object = None) -> dict[str, float]:
    """Validate split fractions: names in SPLITS, each in [0, 1], summing to 1."""
    shown = fractions if shown is None else shown
    bad = [k for k in fractions if k not in SPLITS]
    vals = list(fractions.values())
    if bad or not vals or any(not (0.0 <= v <= 1.0) for v in vals) or abs(sum(vals) - 1) > 1e-6:
        raise InvalidParameterError(
            f"The 'split' parameter must name splits among {', '.join(SPLITS)} with fractions in "
            f"[0, 1] that sum to 1, e.g. 'train=0.7,val=0.1,test=0.2'. Got {shown!r} instead.")
    return dict(fractions)


def _class_rng(seed: int, cls: str) -> np.random.Generator:
    # seeded by class *name*: excluding or adding a class leaves the others' splits unchanged
    return np.random.default_rng([seed, zlib.crc32(cls.encode())])


def assign_fractions(manifest: Manifest, fractions: Mapping[str, float], seed: int = 0) -> Manifest:
    """Stratified split by fractions, seeded; returns a new Manifest."""
    fractions = check_fractions(fractions)
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    cum = np.cumsum([fractions[s] for s in names])
    split = np.full(len(manifest), UNASSIGNED, dtype=np.int8)
    for cls, idx in zip(manifest.classes, _class_rows(manifest)):
        idx = idx[_class_rng(seed, cls).permutation(len(idx))]
        bounds = np.concatenate([[0], np.round(cum * len(idx)).astype(int)])
        bounds[-1] = len(idx)
        for k, s in enumerate(names):
            split[idx[bounds[k]:bounds[k + 1]]] = SPLITS.index(s)
    return dataclasses.replace(manifest, split=split, warnings=list(manifest.warnings),
                               presplit=False)


def _class_rows(manifest: Manifest) -> list[np.ndarray]:
    """The rows of each class, in row order (one stable sort: a million rows of a thousand
    classes are grouped in a fraction of a second, not a pass per class)."""
    labels = np.asarray(manifest.labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(manifest.classes) + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(len(manifest.classes))]


def assign_per_class(manifest: Manifest, train: int, val: int = 0, seed: int = 0) -> Manifest:
    """``train`` (and ``val``) images per class drawn at random, the rest test."""
    if not isinstance(train, int) or train < 1 or not isinstance(val, int) or val < 0:
        raise InvalidParameterError(
            f"per-class counts must be integers, train >= 1 and val >= 0. Got train={train!r}, "
            f"val={val!r} instead.")
    split = np.full(len(manifest), SPLITS.index("test"), dtype=np.int8)
    warnings = list(manifest.warnings)
    for cls, idx in zip(manifest.classes, _class_rows(manifest)):
        idx = idx[_class_rng(seed, cls).permutation(len(idx))]
        if len(idx) <= train + val:
            warnings.append(f"class {cls!r} has {len(idx)} images, fewer than {train + val + 1}: "
                            f"it has no test images")
        split[idx[:train]] = SPLITS.index("train")
        split[idx[train:train + val]] = SPLITS.index("val")
    return dataclasses.replace(manifest, split=split, warnings=warnings, presplit=False)


def _resplit_warning(m: Manifest, flag: str) -> str:
    folders = "/".join(s for s, n in m.split_counts().items() if n)
    return (f"the dataset is already split into {folders} folders; {flag} re-splits it "
            f"(its images are pooled and drawn again); omit {flag} to keep the folders' split")


DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def load_dataset(url: Any, *, split: str | Mapping[str, float] | None = None,
                 per_class_train: int | None = None, per_class_val: int = 0,
                 exclude_classes: Sequence[str] = (), seed: int = 0,
                 storage_options: Mapping | None = None) -> Manifest:
    """Scan and split in one call, the way the CLI and the API do. ``url``: a dataset URL
    (its source picked by ``deeptransfer.sources.as_source``) or a Source.

    A pre-split tree keeps its own splits unless ``split`` or ``per_class_train`` is given
    (which re-splits it, with a warning in ``Manifest.warnings``); otherwise the default is a
    0.7/0.1/0.2 stratified split.
    """
    from .sources import as_source

    _check_split(split, per_class_train)  # before the scan, which may take a while
    m = as_source(url, storage_options=storage_options).manifest(
        exclude_classes=exclude_classes, storage_options=storage_options)
    if m.presplit and (per_class_train is not None or split is not None):
        m.warnings.append(_resplit_warning(m, "--per-class-train" if per_class_train is not None
                                           else "--split"))
    if per_class_train is not None:
        return assign_per_class(m, per_class_train, per_class_val, seed)
    if split is not None:
        fr = parse_fractions(split) if isinstance(split, str) else check_fractions(split)
        return assign_fractions(m, fr, seed)
    if m.presplit:
        return m
    return assign_fractions(m, DEFAULT_FRACTIONS, seed)
