"""The engine selector: ``engine="local" | "dask" | "dask-cuda" | "spark"`` -> an Executor.

Engines are plugins found through the ``deeptransfer.engines`` entry-point group (declared
in pyproject.toml), so the core never imports an adapter, dask or pyspark, and a third
party can add an engine with a package of its own. A missing extra gives the install line
to run, the way fsspec's registry does.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Mapping

from .errors import EngineUnavailableError, InvalidParameterError
from .executor import Executor

INSTALL_HINTS = {
    "dask": "pip install 'deeptransfer[dask]'",
    "dask-cuda": "pip install 'deeptransfer[cuda]' (dask-cuda with its CUDA extra, on a machine with an NVIDIA GPU)",
    "spark": "pip install 'deeptransfer[spark]' (and a Java 17 runtime on PATH)",
}


def available_engines() -> list[str]:
    """Names registered in the ``deeptransfer.engines`` entry-point group."""
    return sorted(ep.name for ep in entry_points(group="deeptransfer.engines"))


def check_engine(engine: "str | Executor") -> None:
    """Fail fast on an unknown engine name, before any work or cluster start."""
    if isinstance(engine, str) and engine not in available_engines():
        raise InvalidParameterError(
            f"Unknown engine {engine!r}: choose one of {', '.join(available_engines())}.")


def get_executor(engine: "str | Executor" = "local",
                 options: Mapping[str, Any] | None = None) -> Executor:
    """Build the executor for an engine name, or pass an Executor through unchanged.

    ``options`` go to the engine's constructor (e.g. ``{"n_workers": 2}`` for local,
    ``{"address": "tcp://host:8786"}`` for dask, ``{"master": "yarn"}`` for spark); each
    engine validates its own options.
    """
    if not isinstance(engine, str):
        if isinstance(engine, Executor):
            return engine
        raise InvalidParameterError(
            f"The 'engine' parameter must be an engine name ({', '.join(available_engines())}) "
            f"or an Executor. Got {engine!r} instead.")
    eps = {ep.name: ep for ep in entry_points(group="deeptransfer.engines")}
    if engine not in eps:
        raise InvalidParameterError(
            f"Unknown engine {engine!r}: choose one of {', '.join(sorted(eps)) or 'local'}.")
    try:
        cls = eps[engine].load()
    except ImportError as exc:
        hint = INSTALL_HINTS.get(engine, f"install the package that provides engine {engine!r}")
        raise EngineUnavailableError(
            f"The {engine!r} engine needs a package that is not installed ({exc.name or exc}). "
            f"Install it with: {hint}") from exc
    try:
        return cls(**dict(options or {}))
    except TypeError as exc:
        raise InvalidParameterError(f"Bad option for the {engine!r} engine: {exc}") from exc
