"""The folder tree source: a folder-per-class image tree on any fsspec URL.

Layouts:
- ``ROOT/<class>/<file>`` (files in nested folders under a class belong to that class);
- ``ROOT/{train,val,test}/<class>/<file>``: a pre-split tree, whose splits are kept.

Every non-hidden file under a class folder is listed, whatever its extension or kind, so that
a non-image file, a named pipe or a link to a device is *recorded as skipped with its reason*
when featurized rather than silently ignored; a folder that cannot be listed, or a link loop,
is a warning. Links to folders are followed. A name that is not valid UTF-8 is kept, escaped
(``deeptransfer.fs.escape_path``), so the file is featurized and the store can hold its name.
A row's ref is the file's path (local) or URL.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..dataset import SPLITS, UNASSIGNED, Manifest
from ..errors import DatasetNotFoundError, InvalidParameterError
from ..fs import escape_path, show_name, url_to_fs
from .base import Listing, Source, natural_key as _natural_key


def dataset_root(url: str, storage_options: Mapping | None = None) -> tuple[Any, str]:
    """The filesystem and root path of the dataset folder ``url``; DatasetNotFoundError if
    there is no folder there (EngineUnavailableError if its fsspec backend is missing)."""
    fs, root = url_to_fs(url, storage_options)
    if not fs.exists(root) or not fs.isdir(root):
        raise DatasetNotFoundError(
            f"Dataset not found: {show_name(url)} is not a folder. Give a folder with one "
            f"sub-folder of images per class (or train/, val/, test/ folders holding class "
            f"folders).")
    return fs, root


# -- listing ---------------------------------------------------------------------------------
#: folders nested deeper than this under a class folder are not listed (a link loop on a
#: filesystem that cannot say so)
MAX_DEPTH = 64


def _why(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


class _Lister:
    """Lists the folders of one filesystem: (name, path, is_folder) per entry. Local folders
    are listed with ``os.scandir`` (links to folders are followed, a loop is reported),
    others with fsspec's ``ls``. Hidden entries (.DS_Store, .ipynb_checkpoints) are left
    out. A folder that cannot be listed is a warning (in ``warnings``) with its path relative
    to ``root``, never dropped silently (fsspec's ``find`` swallows such errors)."""

    def __init__(self, fs: Any, root: str):
        protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        self.fs, self.root = fs, root.rstrip("/")
        self.local = protocol in ("file", "local")
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def rel(self, path: str) -> str:
        """``path`` relative to the dataset root, for messages."""
        p = path.rstrip("/")
        return p[len(self.root) + 1:] if p.startswith(self.root + "/") else p

    def entries(self, folder: str) -> list[tuple[str, str, bool]]:
        """The entries of ``folder``; OSError if it cannot be listed."""
        out = []
        if self.local:
            with os.scandir(folder) as it:  # the one local listing call
                for e in it:
                    try:
                        isdir = e.is_dir()  # follows links; False for a broken one
                    except OSError:
                        isdir = False
                    out.append((e.name, f"{folder.rstrip('/')}/{e.name}", isdir))
        else:
            base = folder.rstrip("/")
            for info in self.fs.ls(folder, detail=True):
                path = info["name"].rstrip("/")
                if path != base:
                    out.append((path.rsplit("/", 1)[-1], path, info.get("type") == "directory"))
        return [e for e in out if not e[0].startswith(".")]

    def _identity(self, folder: str) -> tuple[int, int] | None:
        if not self.local:
            return None  # no links on object stores: MAX_DEPTH stops any other loop
        st = os.stat(folder)
        return st.st_dev, st.st_ino

    def files(self, top: str, above: Sequence[str] = ()) -> Iterator[str]:
        """Every non-folder entry under ``top`` (regular or not: the worker says why it does
        not read a special file), depth first. Unlistable folders and link loops (a link to
        ``top``, a folder inside it, or one of the folders ``above`` it) are warned about."""
        try:
            ancestors = frozenset(self._identity(a) or a for a in above)
        except OSError:
            ancestors = frozenset()
        stack: list[tuple[str, frozenset]] = [(top, ancestors)]
        while stack:
            folder, ancestors = stack.pop()
            try:
                ident = self._identity(folder) or folder
                if ident in ancestors:
                    self.warn(f"skipped {show_name(self.rel(folder))}: a symbolic link loop "
                              f"(it links to a folder that contains it)")
                    continue
                if len(ancestors) > MAX_DEPTH:
                    self.warn(f"skipped {show_name(self.rel(folder))}: folders nested deeper "
                              f"than {MAX_DEPTH} levels (a link loop?)")
                    continue
                listing = self.entries(folder)
            except OSError as exc:
                self.warn(f"could not list {show_name(self.rel(folder))}: {_why(exc)}; its "
                          f"images are left out")
                continue
            below = ancestors | {ident}
            for _, path, isdir in listing:
                if isdir:
                    stack.append((path, below))
                else:
                    yield path


def _is_store(fs: Any, path: str) -> bool:
    p = path.rstrip("/")
    return fs.exists(p + "/zarr.json") or fs.exists(p + "/.zgroup")


def scan(url: str, *, exclude_classes: Sequence[str] = (),
         storage_options: Mapping | None = None) -> Manifest:
    """List a folder-per-class tree (local path or fsspec URL) into a Manifest.

    Every file that is not read gets a row (the featurize step records why) or a warning:
    files outside class folders, feature stores, folders that cannot be listed. Names that
    are not valid UTF-8 are kept, escaped (``deeptransfer.fs.escape_path``).
    Raises DatasetNotFoundError when the path is missing or holds no class folder with files.
    """
    fs, root = dataset_root(url, storage_options)
    lister = _Lister(fs, root)
    warnings = lister.warnings
    try:
        top_entries = lister.entries(root)
    except OSError as exc:
        raise DatasetNotFoundError(
            f"Cannot list the dataset folder {show_name(url)}: {_why(exc)}.") from None
    top = {name: path for name, path, isdir in top_entries if isdir}
    presplit = bool(top) and set(top) <= set(SPLITS)
    rows: list[tuple[str, str, int]] = []  # (class, path, split code)
    seen_classes: set[str] = set()
    if presplit:
        under = "/, ".join(s for s in SPLITS if s in top) + "/"
        warnings.extend(f"ignored {show_name(name)}: files must sit in a class folder under "
                        f"{under}" for name, _, isdir in sorted(top_entries) if not isdir)
        for s in SPLITS:
            if s in top:
                _scan_tree(lister, top[s], SPLITS.index(s), set(exclude_classes), rows,
                           seen_classes)
    else:
        _scan_tree(lister, root, UNASSIGNED, set(exclude_classes), rows, seen_classes,
                   entries=top_entries)
    unknown = [c for c in exclude_classes if c not in seen_classes and
               escape_path(c) not in seen_classes]
    if unknown:
        raise InvalidParameterError(
            f"--exclude-class names no class of this dataset: "
            f"{', '.join(show_name(c) for c in unknown)}. "
            f"Classes are folder names, e.g. {sorted(seen_classes)[:5]}.")
    if not rows:
        raise DatasetNotFoundError(
            f"Dataset {show_name(url)} holds no images: expected class folders with image "
            f"files in them.")
    classes = sorted({r[0] for r in rows}, key=_natural_key)
    index = {c: i for i, c in enumerate(classes)}
    rows.sort(key=lambda r: (index[r[0]], r[2], _natural_key(r[1])))
    if lister.local:
        paths = [r[1] for r in rows]
    else:
        paths = [fs.unstrip_protocol(r[1]) for r in rows]
    return Manifest(
        root=escape_path(url), paths=paths,
        labels=np.array([index[r[0]] for r in rows], dtype=np.int32),
        split=np.array([r[2] for r in rows], dtype=np.int8),
        classes=classes, warnings=warnings, presplit=presplit)


def _scan_tree(lister: _Lister, tree: str, code: int, excluded: set[str],
               rows: list[tuple[str, str, int]], seen_classes: set[str],
               entries: list[tuple[str, str, bool]] | None = None) -> None:
    """Add the rows of the class folders of ``tree`` (split ``code``) to ``rows``, and the
    class names (shown form) to ``seen_classes``; anything left out is a warning."""
    warn = lister.warn
    if entries is None:
        try:
            entries = lister.entries(tree)
        except OSError as exc:
            warn(f"could not list {show_name(lister.rel(tree))}: {_why(exc)}; its images are "
                 f"left out")
            return
    for name, path, isdir in sorted(entries):
        if not isdir:
            warn(f"ignored {show_name(lister.rel(path))}: files must sit in a class folder")
            continue
        if _is_store(lister.fs, path):  # a feature store written inside the dataset folder
            warn(f"ignored {show_name(name)}: it is a Zarr store, not a class folder")
            continue
        cls = escape_path(name)
        seen_classes.add(cls)
        if cls in excluded or name in excluded:  # the shown name, or the raw one
            continue
        n_rows, n_warnings = len(rows), len(lister.warnings)
        files = lister.files(path, above=(lister.root, tree))
        rows.extend((cls, escape_path(p), code) for p in files)
        if len(rows) == n_rows and len(lister.warnings) == n_warnings:
            # class folders with no file at all are reported, not silently dropped
            warn(f"class folder {show_name(name)} holds no files and is left out")




@dataclass(frozen=True)
class FolderSource(Source):
    """A folder-per-class tree (``scan``): refs are file paths or URLs."""

    kind = "folder"

    def check(self, storage_options: Mapping | None = None) -> None:
        """A missing folder, said before any engine starts (one listing call)."""
        dataset_root(self.url, storage_options)

    def manifest(self, *, exclude_classes: Sequence[str] = (),
                 storage_options: Mapping | None = None) -> Manifest:
        m = scan(self.url, exclude_classes=exclude_classes, storage_options=storage_options)
        m.source = self
        return m

    def list(self, storage_options: Mapping | None = None) -> Listing:
        m = self.manifest(storage_options=storage_options)
        splits = [SPLITS[c] if c >= 0 else "" for c in m.split] if m.presplit else None
        return Listing(refs=list(m.paths), labels=[m.classes[i] for i in m.labels],
                       splits=splits, warnings=list(m.warnings))

    def describe(self) -> dict[str, Any]:
        # None: a folder store's identity is what it was before sources existed (its refs
        # are its paths), so stores made then are resumed, not refused
        return {}
