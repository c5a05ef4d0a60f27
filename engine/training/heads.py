"""Classifier heads trained on frozen features, and their loss.

A head is built from a small frozen ``HeadConfig`` (which is what travels to workers and into
the saved model), never shipped as a module. Its parameters travel as an ordered dict
``name -> np.ndarray``: the head's ``state_dict``, BatchNorm running statistics included.

Kinds:

- ``softmax``: one Linear layer (logistic regression). ``input_dropout`` and ``batch_norm``
  put Dropout and BatchNorm in front of it: the original Caltech-256 head of the
  EfficientNet transfer-learning example was Dropout -> BatchNorm -> softmax, i.e.
  ``HeadConfig("softmax", input_dropout=0.5, batch_norm=True)``.
- ``mlp``: ``hidden`` Linear(+BatchNorm)+ReLU(+Dropout) layers, then the output Linear.

Dropout is ``SeededDropout``: in training it draws its mask from a ``torch.Generator`` that
``fit_shard`` seeds from (seed, epoch, round, worker), so a head trained on any engine, in any
process, is bitwise the same. In eval mode (and in exported models) it is the identity.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InvalidParameterError, check_choice, check_float, check_int

HEAD_KINDS = ("softmax", "mlp")


@dataclass(frozen=True)
class HeadConfig:
    """What head to put on the features (see the module docstring)."""

    kind: str = "softmax"  # "softmax" (one Linear) or "mlp" (hidden layers, then Linear)
    hidden: tuple[int, ...] = ()  # widths of the mlp's hidden layers, e.g. (512,)
    dropout: float = 0.0  # dropout after each hidden layer (mlp only)
    batch_norm: bool = False  # BatchNorm1d before the first Linear (softmax) / in each hidden layer (mlp)
    input_dropout: float = 0.0  # dropout applied to the features themselves

    def __post_init__(self) -> None:
        w = "HeadConfig"
        check_choice("kind", self.kind, HEAD_KINDS, where=w)
        hidden = self.hidden
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = (hidden,)
        if not isinstance(hidden, (tuple, list)):
            raise InvalidParameterError(
                f"The 'hidden' parameter of HeadConfig must be a tuple of ints (layer widths), "
                f"e.g. (512,). Got {self.hidden!r} instead.", param="hidden")
        for h in hidden:
            check_int("hidden", h, low=1, where=w)
        object.__setattr__(self, "hidden", tuple(hidden))
        check_float("dropout", self.dropout, low=0.0, high=0.95, where=w)
        check_float("input_dropout", self.input_dropout, low=0.0, high=0.95, where=w)
        if not isinstance(self.batch_norm, bool):
            raise InvalidParameterError(
                f"The 'batch_norm' parameter of HeadConfig must be a bool. "
                f"Got {self.batch_norm!r} instead.", param="batch_norm")
        if self.kind == "softmax" and self.hidden:
            raise InvalidParameterError(
                f"A 'softmax' head has no hidden layers (got hidden={self.hidden!r}): use "
                f"kind='mlp' (CLI: --head mlp) for hidden layers.", param="hidden")
        if self.kind == "softmax" and self.dropout:
            raise InvalidParameterError(
                "'dropout' is the dropout after hidden layers, which a 'softmax' head does not "
                "have: use input_dropout (CLI: --input-dropout) to drop features before the "
                "softmax layer, or kind='mlp' (CLI: --head mlp).", param="dropout")
        if self.kind == "mlp" and not self.hidden:
            raise InvalidParameterError(
                "An 'mlp' head needs at least one hidden layer, e.g. hidden=(512,) (CLI: "
                "--hidden 512); use kind='softmax' for a single Linear layer.", param="hidden")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "HeadConfig") -> "HeadConfig":
        if isinstance(d, HeadConfig):
            return d
        _check_keys(cls, d, "HeadConfig")
        d = dict(d)
        if "hidden" in d and isinstance(d["hidden"], list):
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


def _check_keys(cls: type, d: Mapping[str, Any], what: str) -> None:
    if not isinstance(d, Mapping):
        raise InvalidParameterError(f"{what} must be given as a dict. Got {d!r} instead.")
    allowed = list(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise InvalidParameterError(
            f"Unknown {what} option(s) {unknown}: the options are {', '.join(allowed)}.")


class SeededDropout(nn.Module):
    """Dropout whose training mask comes from ``self.generator`` when one is set.

    ``generator`` is not state (not in the state_dict): ``fit_shard`` sets it for one call and
    clears it. Without one it is ``torch.nn.functional.dropout``; in eval mode the identity.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generator is None:
            return nn.functional.dropout(x, self.p, True)
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def build_head(cfg: HeadConfig, in_dim: int, n_classes: int, seed: int = 0):
    """A freshly initialized head (``torch.nn.Sequential``), deterministic in ``seed``.

    Layer names make stable parameter names: ``bn``/``fc`` for softmax, ``fc0``, ``bn0``...
    then ``out`` for mlp.
    """
    cfg = HeadConfig.from_dict(cfg)
    check_int("in_dim", in_dim, low=1, where="build_head")
    check_int("n_classes", n_classes, low=2, where="build_head")
    check_int("seed", seed, low=0, where="build_head")
    layers: list[tuple[str, Any]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.input_dropout:
            layers.append(("input_dropout", SeededDropout(cfg.input_dropout)))
        if cfg.kind == "softmax":
            if cfg.batch_norm:
                layers.append(("bn", nn.BatchNorm1d(in_dim)))
            layers.append(("fc", nn.Linear(in_dim, n_classes)))
        else:
            prev = in_dim
            for i, h in enumerate(cfg.hidden):
                layers.append((f"fc{i}", nn.Linear(prev, h)))
                if cfg.batch_norm:
                    layers.append((f"bn{i}", nn.BatchNorm1d(h)))
                layers.append((f"relu{i}", nn.ReLU()))
                if cfg.dropout:
                    layers.append((f"dropout{i}", SeededDropout(cfg.dropout)))
                prev = h
            layers.append(("out", nn.Linear(prev, n_classes)))
    return nn.Sequential(OrderedDict(layers))


def head_params(module) -> "OrderedDict[str, np.ndarray]":
    """The head's state_dict as numpy arrays (copies), in state_dict order."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in module.state_dict().items())


def load_params(module, params: Mapping[str, np.ndarray]) -> None:
    """Load parameters (as travel between driver and workers) into a head, strictly."""
    own = module.state_dict()
    if list(own) != list(params):
        missing = [k for k in own if k not in params]
        extra = [k for k in params if k not in own]
        raise InvalidParameterError(
            f"These parameters do not fit this head (missing {missing}, unexpected {extra}): "
            f"was it trained with another head configuration?")
    state = OrderedDict()
    for k, v in params.items():
        a = np.asarray(v)
        if tuple(a.shape) != tuple(own[k].shape):
            raise InvalidParameterError(
                f"Parameter {k!r} has shape {a.shape}, the head expects {tuple(own[k].shape)}: "
                f"was it trained on features of another width or with another class list?")
        state[k] = torch.from_numpy(np.ascontiguousarray(a)).to(own[k].dtype)
    module.load_state_dict(state, strict=True)


def head_from_params(cfg: HeadConfig, params: Mapping[str, np.ndarray], *, in_dim: int,
                     n_classes: int):
    """A head in eval mode holding the given parameters (for prediction and export)."""
    m = build_head(cfg, in_dim, n_classes, seed=0)
    load_params(m, params)
    return m.eval()


def set_dropout_generator(module, generator) -> None:
    """Point every SeededDropout of a head at ``generator`` (None: torch's global RNG)."""
    for m in module.modules():
        if isinstance(m, SeededDropout):
            m.generator = generator


def has_batch_norm(module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


# -- loss ---------------------------------------------------------------------------------

def balanced_class_weights(labels: np.ndarray, n_classes: int) -> tuple[float, ...]:
    """scikit-learn's "balanced" weights, n / (n_classes * count_c); 1.0 for absent classes."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    n = counts.sum()
    w = np.where(counts > 0, n / (n_classes * np.maximum(counts, 1)), 1.0)
    return tuple(float(x) for x in w)


def check_class_weights(class_weights: Any, *, where: str = "TrainConfig") -> Any:
    """None, "balanced", or a sequence of non-negative numbers (length checked at train time)."""
    if class_weights is None or class_weights == "balanced":
        return class_weights
    if isinstance(class_weights, (list, tuple)) and class_weights and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 and np.isfinite(x)
            for x in class_weights):
        return tuple(float(x) for x in class_weights)
    raise InvalidParameterError(
        f"The 'class_weights' parameter of {where} must be None, 'balanced' or a list of one "
        f"non-negative weight per class. Got {class_weights!r} instead.", param="class_weights")


def loss_fn(logits, targets, *, label_smoothing: float = 0.0,
            class_weights: Sequence[float] | None = None):
    """Mean cross entropy over the minibatch (weighted mean when class weights are given)."""
    weight = None
    if class_weights is not None:
        weight = torch.tensor(list(class_weights), dtype=logits.dtype)
    return torch.nn.functional.cross_entropy(logits, targets, weight=weight,
                                             label_smoothing=float(label_smoothing))
