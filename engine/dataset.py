"""Scan a folder-per-class image tree on any fsspec URL into a Manifest; seeded splits.

Layouts:
- ``ROOT/<class>/<file>`` (files in nested folders under a class belong to that class);
- ``ROOT/{train,val,test}/<class>/<file>``: a pre-split tree, whose splits are kept.

Every non-hidden file under a class folder is listed, whatever its extension, so that a
non-image file is *recorded as skipped with its reason* when featurized rather than silently
ignored. Splits are stratified per class, seeded per class (a class's split does not change
when another class is added or excluded), and the same on every engine because only the
driver computes them.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import fsspec
import numpy as np

from .errors import DatasetNotFoundError, InvalidParameterError

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: split code of rows that belong to no split
UNASSIGNED = -1


@dataclass
class Manifest:
    """The images of a dataset: one row per file, in a deterministic order."""

    root: str
    paths: list[str]
    labels: np.ndarray  # int32 class index per row
    split: np.ndarray  # int8 code per row: index into SPLITS, or UNASSIGNED
    classes: list[str]
    warnings: list[str] = field(default_factory=list)
    presplit: bool = False

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


def _natural_key(s: str) -> list:
    # image_2.jpg before image_10.jpg, so row order reads the way a person lists the folder
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def dataset_root(url: str, storage_options: Mapping | None = None) -> tuple[Any, str]:
    """The filesystem and root path of the dataset folder ``url``; DatasetNotFoundError if
    there is no folder there."""
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    if not fs.exists(root) or not fs.isdir(root):
        raise DatasetNotFoundError(
            f"Dataset not found: {url!r} is not a folder. Give a folder with one sub-folder of "
            f"images per class (or train/, val/, test/ folders holding class folders).")
    return fs, root


def check_dataset_options(url: str, *, split: str | Mapping[str, float] | None = None,
                          per_class_train: int | None = None,
                          storage_options: Mapping | None = None) -> None:
    """What ``load_dataset`` would refuse before it scans: a missing folder, a bad split.
    Cheap (one listing call), so callers run it before starting an engine."""
    _check_split(split, per_class_train)
    dataset_root(url, storage_options)


def _check_split(split: str | Mapping[str, float] | None, per_class_train: int | None) -> None:
    if split is not None and per_class_train is not None:
        raise InvalidParameterError("Give either a split by fractions or per-class counts, not both.")
    if isinstance(split, str):
        parse_fractions(split)
    elif split is not None:
        check_fractions(split)


def scan(url: str, *, exclude_classes: Sequence[str] = (),
         storage_options: Mapping | None = None) -> Manifest:
    """List a folder-per-class tree (local path or fsspec URL) into a Manifest.

    Raises DatasetNotFoundError when the path is missing or holds no class folder with files.
    """
    fs, root = dataset_root(url, storage_options)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    top = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in fs.ls(root, detail=False)
           if fs.isdir(p)}
    presplit = bool(top) and set(top) <= set(SPLITS) and len(top) >= 1
    excluded = set(exclude_classes)
    warnings: list[str] = []
    rows: list[tuple[str, str, int]] = []  # (class, path, split code)
    trees = [(top[s], SPLITS.index(s)) for s in SPLITS if s in top] if presplit else [(root, UNASSIGNED)]
    seen_classes: set[str] = set()
    for tree, code in trees:
        base = tree.rstrip("/")
        # a feature store written inside the dataset folder is not a class of images
        stores = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(tree, detail=False)
                  if fs.isdir(p) and (fs.exists(p.rstrip("/") + "/zarr.json")
                                      or fs.exists(p.rstrip("/") + "/.zgroup"))}
        for name in sorted(stores):
            warnings.append(f"ignored {name!r}: it is a Zarr store, not a class folder")
        for path in fs.find(tree, withdirs=False, detail=False):
            rel = path[len(base) + 1:] if path.startswith(base + "/") else path
            parts = rel.split("/")
            if any(p.startswith(".") for p in parts) or parts[0] in stores:
                continue  # .DS_Store, ._AppleDouble, .ipynb_checkpoints, feature stores
            if len(parts) < 2:
                warnings.append(f"ignored {rel!r}: files must sit in a class folder")
                continue
            seen_classes.add(parts[0])
            if parts[0] in excluded:
                continue
            rows.append((parts[0], path, code))
        # class folders with no file at all are reported, not silently dropped
        with_files = {r[0] for r in rows}
        for d in fs.ls(tree, detail=False):
            name = d.rstrip("/").rsplit("/", 1)[-1]
            if fs.isdir(d) and not name.startswith(".") and name not in excluded and \
                    name not in with_files and name not in stores:
                warnings.append(f"class folder {name!r} holds no files and is left out")
    unknown = excluded - seen_classes
    if unknown:
        raise InvalidParameterError(
            f"--exclude-class names no class of this dataset: {sorted(unknown)}. "
            f"Classes are folder names, e.g. {sorted(seen_classes)[:5]}.")
    if not rows:
        raise DatasetNotFoundError(
            f"Dataset {url!r} holds no images: expected class folders with image files in them.")
    classes = sorted({r[0] for r in rows}, key=_natural_key)
    index = {c: i for i, c in enumerate(classes)}
    rows.sort(key=lambda r: (index[r[0]], r[2], _natural_key(r[1])))
    if protocol not in ("file", "local"):
        paths = [fs.unstrip_protocol(r[1]) for r in rows]
    else:
        paths = [r[1] for r in rows]
    return Manifest(
        root=url, paths=paths,
        labels=np.array([index[r[0]] for r in rows], dtype=np.int32),
        split=np.array([r[2] for r in rows], dtype=np.int8),
        classes=classes, warnings=warnings, presplit=presplit)


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
    for c, cls in enumerate(manifest.classes):
        idx = np.flatnonzero(manifest.labels == c)
        idx = idx[_class_rng(seed, cls).permutation(len(idx))]
        bounds = np.concatenate([[0], np.round(cum * len(idx)).astype(int)])
        bounds[-1] = len(idx)
        for k, s in enumerate(names):
            split[idx[bounds[k]:bounds[k + 1]]] = SPLITS.index(s)
    return Manifest(manifest.root, manifest.paths, manifest.labels, split, manifest.classes,
                    list(manifest.warnings), presplit=False)


def assign_per_class(manifest: Manifest, train: int, val: int = 0, seed: int = 0) -> Manifest:
    """``train`` (and ``val``) images per class drawn at random, the rest test."""
    if not isinstance(train, int) or train < 1 or not isinstance(val, int) or val < 0:
        raise InvalidParameterError(
            f"per-class counts must be integers, train >= 1 and val >= 0. Got train={train!r}, "
            f"val={val!r} instead.")
    split = np.full(len(manifest), SPLITS.index("test"), dtype=np.int8)
    warnings = list(manifest.warnings)
    for c, cls in enumerate(manifest.classes):
        idx = np.flatnonzero(manifest.labels == c)
        idx = idx[_class_rng(seed, cls).permutation(len(idx))]
        if len(idx) <= train + val:
            warnings.append(f"class {cls!r} has {len(idx)} images, fewer than {train + val + 1}: "
                            f"it has no test images")
        split[idx[:train]] = SPLITS.index("train")
        split[idx[train:train + val]] = SPLITS.index("val")
    return Manifest(manifest.root, manifest.paths, manifest.labels, split, manifest.classes,
                    warnings, presplit=False)


DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def load_dataset(url: str, *, split: str | Mapping[str, float] | None = None,
                 per_class_train: int | None = None, per_class_val: int = 0,
                 exclude_classes: Sequence[str] = (), seed: int = 0,
                 storage_options: Mapping | None = None) -> Manifest:
    """Scan and split in one call, the way the CLI and the API do.

    A pre-split tree keeps its own splits unless ``split`` or ``per_class_train`` is given;
    otherwise the default is a 0.7/0.1/0.2 stratified split.
    """
    _check_split(split, per_class_train)  # before the scan, which may take a while
    m = scan(url, exclude_classes=exclude_classes, storage_options=storage_options)
    if per_class_train is not None:
        return assign_per_class(m, per_class_train, per_class_val, seed)
    if split is not None:
        fr = parse_fractions(split) if isinstance(split, str) else check_fractions(split)
        return assign_fractions(m, fr, seed)
    if m.presplit:
        return m
    return assign_fractions(m, DEFAULT_FRACTIONS, seed)
