"""Path arguments of the API: a ``pathlib.Path`` (any ``os.PathLike``) wherever a str path or
URL is taken, as ``open()``, numpy and torch accept them."""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def fspath(value: Any) -> Any:
    """``os.fspath(value)`` for a path object; anything else (a str URL, a DataFrame, a
    Source, None) as it is; a list or tuple of paths item by item."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, os.PathLike) for v in value):
        return type(value)(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
    return value


def accepts_paths(*names: str) -> Callable[[F], F]:
    """Decorate an API function: its arguments ``names`` go through ``fspath`` first, so
    the code behind it sees str paths only."""
    def deco(fn: F) -> F:
        sig = inspect.signature(fn)
        unknown = [n for n in names if n not in sig.parameters]
        if unknown:
            raise TypeError(f"{fn.__name__} has no parameter {unknown}")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind_partial(*args, **kwargs)
            for n in names:
                if n in bound.arguments:
                    bound.arguments[n] = fspath(bound.arguments[n])
            return fn(*bound.args, **bound.kwargs)

        return wrapper  # type: ignore[return-value]
    return deco
