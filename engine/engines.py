"""The engine selector: ``engine="local" | "dask" | "dask-cuda" | "spark"`` -> an Executor.

Engines are plugins found through the ``deeptransfer.engines`` entry-point group (declared
in pyproject.toml), so the core never imports an adapter, dask or pyspark, and a third
party can add an engine with a package of its own. A missing extra gives the install line
to run, the way fsspec's registry does.
"""
from __future__ import annotations

import inspect
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


#: engine options that belong to one kind of engine, and the engine to name instead
OPTION_OWNERS = {"address": "dask", "client": "dask", "master": "spark", "session": "spark"}


def _engine_class(engine: str) -> Any:
    eps = {ep.name: ep for ep in entry_points(group="deeptransfer.engines")}
    if engine not in eps:
        raise InvalidParameterError(
            f"Unknown engine {engine!r}: choose one of {', '.join(sorted(eps)) or 'local'}.",
            param="engine")
    try:
        return eps[engine].load()
    except ImportError as exc:
        hint = INSTALL_HINTS.get(engine, f"install the package that provides engine {engine!r}")
        raise EngineUnavailableError(
            f"The {engine!r} engine needs a package that is not installed ({exc.name or exc}). "
            f"Install it with: {hint}") from exc


def _check_options(engine: str, cls: Any, options: Mapping[str, Any]) -> None:
    """Options the engine's constructor does not take, named with the engine that does."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin or C class
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for opt in options:
        if opt in params:
            continue
        owner = OPTION_OWNERS.get(opt)
        if owner is not None and owner != engine:
            raise InvalidParameterError(
                f"{opt!r} is an option of the {owner} engine, not of the {engine!r} engine: "
                f"use engine={owner!r}, or leave {opt!r} out.", param=opt)
        known = ", ".join(n for n, p in params.items() if n != "self"
                          and p.kind is not inspect.Parameter.VAR_POSITIONAL)
        raise InvalidParameterError(
            f"Bad option for the {engine!r} engine: it has no option {opt!r}; its options "
            f"are: {known}.", param=opt)


def check_engine(engine: "str | Executor", options: Mapping[str, Any] | None = None) -> None:
    """Fail fast on an unknown engine name, a missing engine package or an option the
    engine does not take, before any work or cluster start."""
    if isinstance(engine, str):
        cls = _engine_class(engine)
        _check_options(engine, cls, dict(options or {}))


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
            f"or an Executor (a subclass of deeptransfer.executor.Executor). Got {engine!r} "
            f"instead.", param="engine")
    cls = _engine_class(engine)
    opts = dict(options or {})
    _check_options(engine, cls, opts)
    return cls(**opts)
