"""Sources of images: where a dataset's rows come from (see ``base`` for the protocol).

``as_source(dataset)`` picks one from the argument; today the folder tree
(``sources.folder``). Adding a source is one module with a ``Source`` subclass, listed in
``KINDS``.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import InvalidParameterError
from .base import FileReader, Listing, RefReader, Source, to_manifest
from .folder import FolderSource

KINDS: dict[str, type[Source]] = {"folder": FolderSource}

__all__ = ["KINDS", "FileReader", "FolderSource", "Listing", "RefReader", "Source",
           "as_source", "to_manifest"]


def as_source(dataset: Any, kind: str | None = None, *,
              storage_options: Mapping | None = None, **options: Any) -> Source:
    """The Source of a dataset argument: a Source as it is, or a folder URL."""
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(dataset, Source):
        return dataset
    if not isinstance(dataset, str) or given or kind not in (None, "folder"):
        raise InvalidParameterError(f"Unsupported dataset {dataset!r}.", param="dataset")
    return FolderSource(dataset)
