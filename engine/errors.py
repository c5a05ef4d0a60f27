"""Errors a user can act on.

Each inherits the built-in exception that existing ``except`` clauses already catch
(the approach of scikit-learn's ``InvalidParameterError`` and zarr's ``NodeNotFoundError``),
and each message says what to do about it.
"""
from __future__ import annotations

import math


class DeeptransferError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidParameterError(DeeptransferError, ValueError, TypeError):
    """A bad option: wrong type, out of range, or not one of the allowed values.

    ``param`` names the parameter (``"lr"``, ``"batch_size_per_worker"``) so that a front end
    can name it in its own words (the CLI says ``--lr``: ``for_flag``). When the check knows
    what was required and what it got (``requirement``, ``got``), ``for_flag`` rewrites the
    whole message around the flag; otherwise it prefixes the flag unless the message has it.
    """

    def __init__(self, message: str, *, param: str | None = None,
                 requirement: str | None = None, got: object = None):
        super().__init__(message)
        self.param = param
        self.requirement = requirement
        self.got = got

    def for_flag(self, flag: str) -> str:
        """The message with the command-line flag in place of the Python parameter."""
        if self.requirement is not None:
            return f"{flag} must be {self.requirement}. Got {self.got!r} instead."
        msg = str(self)
        return msg if flag in msg else f"{flag}: {msg}"


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


class EngineStartError(DeeptransferError, RuntimeError):
    """An engine whose workers could not start (e.g. a job started at import time in a
    script that multiprocessing's spawn re-imports)."""


class TaskError(DeeptransferError, RuntimeError):
    """A task failed on a worker (after the engine's retries); the worker's traceback is in
    the message."""


def _param_error(name: str, where: str, requirement: str, value: object) -> InvalidParameterError:
    return InvalidParameterError(
        f"The '{name}' parameter{' of ' + where if where else ''} must be {requirement}. "
        f"Got {value!r} instead.", param=name, requirement=requirement, got=value)


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None,
              where: str = "") -> int:
    """Validate an integer option with scikit-learn's message template."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise _param_error(name, where, f"an int in the range [{lo}, {hi}]", value)
    return value  # type: ignore[return-value]


def check_float(name: str, value: object, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, where: str = "") -> float:
    """Validate a real-valued option: a finite number (never NaN or infinity) in range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        # NaN compares False with everything, so it must be refused explicitly
        if not math.isfinite(v):
            ok = False
        elif low is not None and (v < low or (low_open and v == low)):
            ok = False
        elif high is not None and v > high:
            ok = False
    if not ok:
        lo = "-inf" if low is None else str(low)
        br = "(" if low_open else "["
        hi = "inf)" if high is None else f"{high}]"
        raise _param_error(name, where, f"a finite number in the range {br}{lo}, {hi}", value)
    return float(value)  # type: ignore[arg-type]


def check_choice(name: str, value: object, choices: "list[str] | tuple[str, ...]", *,
                 where: str = "") -> str:
    """Validate a string option against its allowed values."""
    if value not in choices:
        raise _param_error(name, where, f"one of {', '.join(repr(c) for c in choices)}", value)
    return value  # type: ignore[return-value]
