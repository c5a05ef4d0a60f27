"""Errors a user can act on.

Each inherits the built-in exception that existing ``except`` clauses already catch
(the approach of scikit-learn's ``InvalidParameterError`` and zarr's ``NodeNotFoundError``),
and each message says what to do about it.
"""
from __future__ import annotations


class DeeptransferError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidParameterError(DeeptransferError, ValueError, TypeError):
    """A bad option: wrong type, out of range, or not one of the allowed values."""


class DatasetNotFoundError(DeeptransferError, FileNotFoundError):
    """The dataset path does not exist or holds no images."""


class UnknownModelError(DeeptransferError, ValueError):
    """A model or layer name that the zoo does not know."""


class WeightsNotFoundError(DeeptransferError, FileNotFoundError):
    """Pretrained weights are neither installed, on disk, nor downloadable."""


class StoreError(DeeptransferError, OSError):
    """The feature store cannot be created, opened or written."""


class EngineUnavailableError(DeeptransferError, ImportError):
    """An engine whose package, runtime (Java) or hardware (GPU) is missing."""


class TaskError(DeeptransferError, RuntimeError):
    """A task failed on a worker (after the engine's retries); the worker's traceback is in
    the message."""


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None,
              where: str = "") -> int:
    """Validate an integer option with scikit-learn's message template."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise InvalidParameterError(
            f"The '{name}' parameter{' of ' + where if where else ''} must be an int in the range "
            f"[{lo}, {hi}]. Got {value!r} instead.")
    return value  # type: ignore[return-value]


def check_float(name: str, value: object, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, where: str = "") -> float:
    """Validate a real-valued option."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        if low is not None and (v < low or (low_open and v == low)):
            ok = False
        if high is not None and v > high:
            ok = False
    if not ok:
        lo = "-inf" if low is None else str(low)
        br = "(" if low_open else "["
        hi = "inf" if high is None else str(high)
        raise InvalidParameterError(
            f"The '{name}' parameter{' of ' + where if where else ''} must be a number in the range "
            f"{br}{lo}, {hi}]. Got {value!r} instead.")
    return float(value)  # type: ignore[arg-type]


def check_choice(name: str, value: object, choices: "list[str] | tuple[str, ...]", *,
                 where: str = "") -> str:
    """Validate a string option against its allowed values."""
    if value not in choices:
        raise InvalidParameterError(
            f"The '{name}' parameter{' of ' + where if where else ''} must be one of "
            f"{', '.join(repr(c) for c in choices)}. Got {value!r} instead.")
    return value  # type: ignore[return-value]
