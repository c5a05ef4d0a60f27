"""JSON that is always valid JSON: NaN and infinities become ``null``.

Python's ``json`` writes ``NaN``/``Infinity`` by default, which no JSON parser but Python's
accepts. Every JSON this package prints or writes for people and other programs goes
through ``dumps``/``dump``: non-finite floats (Python's or numpy's) are mapped to ``None``
first, and the encoder runs with ``allow_nan=False`` so that nothing slips through.
"""
from __future__ import annotations

import json
import math
from typing import IO, Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (dicts, lists, tuples, numpy)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    try:  # numpy scalars and arrays, without importing numpy here
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a core dependency
        return obj
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    if isinstance(obj, np.generic):
        return finite(obj.item())
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` of ``finite(obj)``; never NaN or Infinity in the text."""
    return json.dumps(finite(obj), allow_nan=False, **kw)


def dump(obj: Any, fp: IO[str], **kw: Any) -> None:
    """``json.dump`` of ``finite(obj)``; never NaN or Infinity in the file."""
    json.dump(finite(obj), fp, allow_nan=False, **kw)


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN and Infinity, as standard JSON does (Python's
    parser accepts them): how tests and readers check what ``dumps`` wrote."""
    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)
