"""The search space of head search: what each trial's options are drawn from.

A space maps an option name to a *fixed value*, a *list of choices*, or a *distribution*
(``{"log_uniform": [1e-4, 1e-1]}``, ``{"uniform": [0, 0.5]}``, ``{"int_uniform": [1, 8]}``):

    {"head": ["linear", "mlp"], "hidden": [256, 512, 1024], "lr": {"log_uniform": [1e-4, 0.1]},
     "optimizer": ["nesterov", "adam"], "epochs": 10}

Options: ``head`` (``linear`` = one Linear layer, the ``softmax`` head; ``mlp``), ``hidden``
(the mlp's hidden width), ``dropout`` (on the features for a linear head, after the hidden
layer for an mlp), ``input_dropout`` (mlp: on the features), ``batch_norm``, ``lr``,
``weight_decay``, ``momentum``, ``label_smoothing``, ``optimizer``, ``schedule``, ``epochs``
and ``train_from`` (a store of maps: the first backbone stage fine-tuned, or ``head``).
A file given with ``--space`` (JSON, or YAML when PyYAML is installed) overrides the default
space option by option. ``random`` sampling draws ``n`` trials (seeded); ``grid`` takes the
product of the choices (a distribution cannot be gridded), all of it or a seeded sample of
``n`` of it.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import InvalidParameterError

#: the default space: what a user of a frozen-feature head would try first
DEFAULT_SPACE: dict[str, Any] = {
    "head": ["linear", "mlp"],
    "hidden": [256, 512, 1024],
    "dropout": [0.0, 0.2, 0.5],
    "input_dropout": 0.0,
    "batch_norm": [False, True],
    "optimizer": ["nesterov", "adam"],
    "lr": {"log_uniform": [1e-4, 1e-1]},
    "momentum": 0.9,
    "weight_decay": [0.0, 1e-5, 1e-4, 1e-3],
    "label_smoothing": [0.0, 0.1],
    "schedule": "constant",
    "epochs": 10,
    "train_from": "head",
}
OPTIONS = tuple(DEFAULT_SPACE)
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
HEADS = ("linear", "mlp")
#: the options only an mlp has (a linear trial records them as None)
MLP_ONLY = ("hidden", "input_dropout")
SEARCH_SPACE_FORMAT = "deeptransfer.space/1"


def _is_dist(v: Any) -> bool:
    return isinstance(v, Mapping)


@dataclass(frozen=True)
class SearchSpace:
    """Option name -> fixed value, list of choices, or distribution (see the module docstring)."""

    options: Mapping[str, Any]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None, *, where: str = "space") -> "SearchSpace":
        """The default space with ``d``'s options in place of the defaults (checked)."""
        if isinstance(d, SearchSpace):
            return d
        if d is not None and not isinstance(d, Mapping):
            raise InvalidParameterError(
                f"The search space ({where}) must be an object of option -> value, list of "
                f"choices or distribution. Got {type(d).__name__}.", param="space")
        out = dict(DEFAULT_SPACE)
        for k, v in (d or {}).items():
            if k not in DEFAULT_SPACE:
                raise InvalidParameterError(
                    f"Unknown search option {k!r} in {where}: the options are "
                    f"{', '.join(OPTIONS)}.", param="space")
            _check_entry(k, v, where)
            out[k] = v
        return cls(out)

    @classmethod
    def from_file(cls, path: str) -> "SearchSpace":
        """A space file: JSON, or YAML (``.yaml`` / ``.yml``, needs PyYAML)."""
        if not os.path.isfile(path):
            raise InvalidParameterError(f"Search space file {path!r} not found (--space).",
                                        param="space")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.lower().endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise InvalidParameterError(
                    f"{path!r} is YAML, which needs PyYAML (`pip install pyyaml`): install "
                    f"it or write the space as JSON.", param="space") from None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise InvalidParameterError(f"Search space file {path!r} is not valid YAML: "
                                            f"{str(exc).splitlines()[0]}", param="space") from None
        else:
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise InvalidParameterError(f"Search space file {path!r} is not valid JSON: "
                                            f"{exc}", param="space") from None
        return cls.from_dict(data, where=path)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dict(self.options)))

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, n: int | None, *, seed: int = 0, method: str = "random") -> list[dict[str, Any]]:
        """``n`` trials' options (dicts over ``OPTIONS``), seeded; duplicates removed for grid."""
        if method == "random":
            if n is None:
                raise InvalidParameterError("Random search needs a number of trials "
                                            "(--trials N).", param="trials")
            rng = np.random.default_rng([seed, 15])
            return [_normalized({k: _draw(rng, v) for k, v in self.options.items()})
                    for _ in range(n)]
        if method != "grid":
            raise InvalidParameterError(f"The sampler must be 'random' or 'grid'. Got "
                                        f"{method!r}.", param="sampler")
        grid = self.grid()
        if n is not None and n < len(grid):
            pick = np.sort(np.random.default_rng([seed, 16]).choice(len(grid), n, replace=False))
            grid = [grid[i] for i in pick]
        return grid

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the choices, in order, with the combinations that only differ
        in options the head does not have (a linear head's hidden width) counted once."""
        dists = [k for k, v in self.options.items() if _is_dist(v)]
        if dists:
            raise InvalidParameterError(
                f"Grid search needs lists of values, and {', '.join(dists)} "
                f"{'is a distribution' if len(dists) == 1 else 'are distributions'}: give "
                f"lists there, or use --sampler random.", param="sampler")
        keys = list(self.options)
        values = [v if isinstance(v, list) else [v] for v in self.options.values()]
        out, seen = [], set()
        for combo in itertools.product(*values):
            t = _normalized(dict(zip(keys, combo)))
            key = json.dumps(t, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(t)
        return out


def _check_entry(k: str, v: Any, where: str) -> None:
    if _is_dist(v):
        if len(v) != 1 or next(iter(v)) not in DISTRIBUTIONS:
            raise InvalidParameterError(
                f"Search option {k!r} in {where}: a distribution is one of "
                f"{', '.join(DISTRIBUTIONS)} with [low, high], e.g. "
                f'{{"log_uniform": [0.0001, 0.1]}}. Got {v!r}.', param="space")
        kind, bounds = next(iter(v.items()))
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                        and math.isfinite(b) for b in bounds) and bounds[0] <= bounds[1]):
            raise InvalidParameterError(
                f"Search option {k!r} in {where}: {kind} needs [low, high] with low <= high. "
                f"Got {bounds!r}.", param="space")
        if kind == "log_uniform" and bounds[0] <= 0:
            raise InvalidParameterError(
                f"Search option {k!r} in {where}: log_uniform needs low > 0. Got {bounds!r}.",
                param="space")
        return
    if isinstance(v, list) and not v:
        raise InvalidParameterError(f"Search option {k!r} in {where} has an empty list of "
                                    f"choices.", param="space")
    for x in v if isinstance(v, list) else [v]:
        if isinstance(x, (list, dict)):
            raise InvalidParameterError(
                f"Search option {k!r} in {where}: choices are single values. Got {x!r}.",
                param="space")
        if k == "head" and x not in HEADS + ("softmax",):
            raise InvalidParameterError(
                f"Search option 'head' in {where}: 'linear' or 'mlp'. Got {x!r}.", param="space")


def _draw(rng: np.random.Generator, v: Any) -> Any:
    if isinstance(v, list):
        return v[int(rng.integers(len(v)))]
    if _is_dist(v):
        kind, (lo, hi) = next(iter(v.items()))
        if kind == "uniform":
            return float(rng.uniform(lo, hi))
        if kind == "log_uniform":
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return int(rng.integers(int(lo), int(hi) + 1))
    return v


def _normalized(t: dict[str, Any]) -> dict[str, Any]:
    """One trial's options with what its head does not have set to None."""
    t = dict(t)
    if t.get("head") == "softmax":
        t["head"] = "linear"
    if t.get("head") == "linear":
        for k in MLP_ONLY:
            t[k] = None
    return t


def baseline_params(base: Any, space: SearchSpace) -> dict[str, Any] | None:
    """The options of ``base`` (a TrainConfig: ``train``'s defaults unless given) as a trial
    of ``space`` -- the head one would train without searching -- or None when it is not one
    the space can express (several hidden layers). The space's fixed values of ``epochs``
    and ``train_from`` apply, as to every trial."""
    from ..training import TrainConfig

    base = TrainConfig() if base is None else TrainConfig.from_dict(base)
    h, o = base.head, base.optimizer
    if len(h.hidden) > 1:
        return None
    linear = h.kind == "softmax"
    fixed = {k: v for k, v in space.options.items() if not isinstance(v, (list, Mapping))}
    return _normalized({
        "head": "linear" if linear else "mlp", "hidden": None if linear else h.hidden[0],
        "dropout": h.input_dropout if linear else h.dropout, "input_dropout": h.input_dropout,
        "batch_norm": h.batch_norm, "optimizer": o.name, "lr": o.lr, "momentum": o.momentum,
        "weight_decay": o.weight_decay, "label_smoothing": base.label_smoothing,
        "schedule": o.schedule, "epochs": fixed.get("epochs", base.epochs),
        "train_from": fixed.get("train_from", "head")})


def trial_train_config(params: Mapping[str, Any], base: Any = None) -> Any:
    """The ``TrainConfig`` of a trial: ``base`` (a TrainConfig; default the default) with the
    trial's head, optimizer and training options in place."""
    from dataclasses import replace

    from ..training import HeadConfig, OptimizerConfig, TrainConfig

    base = TrainConfig() if base is None else TrainConfig.from_dict(base)
    p = dict(params)
    dropout = float(p.get("dropout") or 0.0)
    try:
        if p["head"] == "linear":
            head = HeadConfig("softmax", input_dropout=dropout,
                              batch_norm=bool(p.get("batch_norm")))
        else:
            head = HeadConfig("mlp", hidden=(int(p["hidden"]),), dropout=dropout,
                              input_dropout=float(p.get("input_dropout") or 0.0),
                              batch_norm=bool(p.get("batch_norm")))
        opt = OptimizerConfig(**{**base.optimizer.to_dict(), "betas": tuple(base.optimizer.betas),
                                 "name": p["optimizer"], "lr": float(p["lr"]),
                                 "momentum": float(p["momentum"]),
                                 "weight_decay": float(p["weight_decay"]),
                                 "schedule": p["schedule"], "min_lr": 0.0})
        train_from = p.get("train_from")
        return replace(base, head=head, optimizer=opt, epochs=int(p["epochs"]),
                       label_smoothing=float(p["label_smoothing"]),
                       train_from=None if train_from in (None, "none") else str(train_from))
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"A trial of the search space is not a valid head: {exc}",
                                    param="space") from None
