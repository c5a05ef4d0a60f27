"""Optimizers whose state can travel and be averaged, and learning-rate schedules.

The update rules are torch.optim's (``SGD`` with momentum / Nesterov, ``Adam``), run with the
single-tensor (``foreach=False``) implementation, so they are deterministic and match a
plain torch training loop bit for bit. What parameter averaging needs on top is the state
as plain arrays: ``export_state`` / ``import_state`` turn it into an ordered dict
``"<param>.<slot>" -> np.ndarray`` (momentum buffers; Adam's two moments and its step count)
that the driver averages like the parameters when ``save_updater`` is on (DL4J's
``saveUpdater``). ``init_state`` is the fresh state: zero buffers and step 0, which torch's
update rules treat exactly like "no state yet".

Weight decay is L2 (added to the gradient, as DL4J's ``l2``) and, as DL4J does by default,
applies to weights (tensors of two or more dimensions) only, not to biases and BatchNorm.

Schedules give the learning rate of an averaging round (every worker uses the same one);
they are functions of the epoch position ``e = epoch + round / rounds_per_epoch``:
``constant``; ``step`` (``lr * gamma ** floor(e / step_epochs)``); ``exponential``
(``lr * gamma ** e``: ``gamma`` per epoch); ``cosine`` (from ``lr`` to ``min_lr`` over
``epochs``); each optionally after ``warmup_rounds`` rounds of linear warm-up.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import InvalidParameterError, check_choice, check_float, check_int
from .heads import _check_keys

OPTIMIZERS = ("sgd", "nesterov", "adam")
SCHEDULES = ("constant", "step", "cosine", "exponential")


@dataclass(frozen=True)
class OptimizerConfig:
    """The update rule and its learning-rate schedule."""

    name: str = "nesterov"  # "sgd" (momentum SGD; momentum=0 for plain SGD), "nesterov", "adam"
    lr: float = 0.01  # base learning rate
    momentum: float = 0.9  # sgd / nesterov momentum
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decay rates
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.0  # L2 coefficient on weights (not biases / BatchNorm)
    schedule: str = "constant"  # "constant", "step", "cosine" or "exponential"
    gamma: float = 0.1  # step: factor every step_epochs; exponential: factor per epoch
    step_epochs: int = 10  # step schedule: epochs between decays
    min_lr: float = 0.0  # cosine schedule: final learning rate
    warmup_rounds: int = 0  # linear warm-up over the first averaging rounds

    def __post_init__(self) -> None:
        w = "OptimizerConfig"
        check_choice("name", self.name, OPTIMIZERS, where=w)
        check_float("lr", self.lr, low=0.0, low_open=True, where=w)
        check_float("momentum", self.momentum, low=0.0, high=0.999, where=w)
        if self.name == "nesterov" and self.momentum == 0:
            raise InvalidParameterError(
                "Nesterov momentum needs momentum > 0 (got momentum=0): use name='sgd' for "
                "plain SGD (CLI: --optimizer sgd).", param="momentum")
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise InvalidParameterError(
                f"The 'betas' parameter of OptimizerConfig must be a pair of numbers in [0, 1), "
                f"e.g. (0.9, 0.999). Got {betas!r} instead.", param="betas")
        for b in betas:
            check_float("betas", b, low=0.0, high=0.9999, where=w)
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        check_float("eps", self.eps, low=0.0, low_open=True, where=w)
        check_float("weight_decay", self.weight_decay, low=0.0, where=w)
        check_choice("schedule", self.schedule, SCHEDULES, where=w)
        check_float("gamma", self.gamma, low=0.0, high=1.0, low_open=True, where=w)
        check_int("step_epochs", self.step_epochs, low=1, where=w)
        check_float("min_lr", self.min_lr, low=0.0, high=float(self.lr), where=w)
        check_int("warmup_rounds", self.warmup_rounds, low=0, where=w)
        for k in ("lr", "momentum", "eps", "weight_decay", "gamma", "min_lr"):
            object.__setattr__(self, k, float(getattr(self, k)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "OptimizerConfig") -> "OptimizerConfig":
        if isinstance(d, OptimizerConfig):
            return d
        _check_keys(cls, d, "OptimizerConfig")
        d = dict(d)
        if isinstance(d.get("betas"), list):
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @property
    def has_state(self) -> bool:
        """Whether this optimizer keeps state between steps (momentum buffers, moments)."""
        return self.name == "adam" or self.momentum > 0


def lr_at(cfg: OptimizerConfig, epoch: int, round: int, rounds_per_epoch: int,  # noqa: A002
          epochs: int) -> float:
    """Learning rate of averaging round ``round`` of ``epoch`` (both from 0)."""
    e = epoch + round / max(rounds_per_epoch, 1)
    if cfg.schedule == "constant":
        lr = cfg.lr
    elif cfg.schedule == "step":
        lr = cfg.lr * cfg.gamma ** math.floor(e / cfg.step_epochs + 1e-9)
    elif cfg.schedule == "exponential":
        lr = cfg.lr * cfg.gamma ** e
    else:  # cosine
        lr = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(e / epochs, 1.0)))
    t = epoch * rounds_per_epoch + round
    if t < cfg.warmup_rounds:
        lr *= (t + 1) / (cfg.warmup_rounds + 1)
    return float(lr)


def make_optimizer(cfg: OptimizerConfig, module: torch.nn.Module, lr: float,
                   lr_scales: Mapping[str, float] | None = None) -> torch.optim.Optimizer:
    """A torch optimizer over the module's trainable parameters, with no state yet.

    Parameter groups: weight decay on weights only (see the module docstring), and a
    layer-wise learning rate: a parameter whose name starts with a key of ``lr_scales``
    (e.g. ``{"suffix.": 0.1}``, the fine-tuned backbone stages) gets ``lr * scale``.
    Parameters with ``requires_grad=False`` are not in any group.
    """
    by_kind: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for pre, s in (lr_scales or {}).items() if name.startswith(pre)), 1.0)
        by_kind.setdefault((float(scale), p.ndim >= 2), []).append(p)
    # (single-tensor updates: a parameter's update does not depend on its group's order)
    groups = [{"params": ps, "lr": lr * scale, "weight_decay": cfg.weight_decay if decays else 0.0}
              for (scale, decays), ps in by_kind.items()]
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.name == "nesterov",
                           foreach=False)


def _slots(cfg: OptimizerConfig) -> tuple[str, ...]:
    if cfg.name == "adam":
        return ("exp_avg", "exp_avg_sq", "step")
    return ("momentum_buffer",) if cfg.momentum > 0 else ()


def init_state(cfg: OptimizerConfig, module: torch.nn.Module) -> "OrderedDict[str, np.ndarray]":
    """The fresh optimizer state: zero buffers and a zero step count (empty for plain SGD)."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, p in module.named_parameters():
        for slot in _slots(cfg):
            shape = () if slot == "step" else tuple(p.shape)
            out[f"{name}.{slot}"] = np.zeros(shape, dtype=np.float32)
    return out


def export_state(cfg: OptimizerConfig, opt: torch.optim.Optimizer,
                 module: torch.nn.Module) -> "OrderedDict[str, np.ndarray]":
    """The optimizer's state as arrays, keyed ``"<param>.<slot>"`` (init_state's keys)."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, p in module.named_parameters():
        st = opt.state.get(p, {})
        for slot in _slots(cfg):
            v = st.get(slot)
            if v is None:  # a parameter that has not stepped yet
                shape = () if slot == "step" else tuple(p.shape)
                out[f"{name}.{slot}"] = np.zeros(shape, dtype=np.float32)
            else:
                out[f"{name}.{slot}"] = v.detach().cpu().numpy().astype(np.float32, copy=True)
    return out


def import_state(cfg: OptimizerConfig, opt: torch.optim.Optimizer, module: torch.nn.Module,
                 state: Mapping[str, np.ndarray]) -> None:
    """Install exported (or averaged) state into a fresh optimizer over the same head."""
    expected = list(init_state(cfg, module))
    if sorted(expected) != sorted(state):
        raise InvalidParameterError(
            f"This optimizer state does not fit a {cfg.name!r} optimizer on this head (expected "
            f"entries {expected[:4]}..., got {list(state)[:4]}...): was it saved with another "
            f"optimizer or head?")
    for name, p in module.named_parameters():
        st: dict[str, torch.Tensor] = {}
        for slot in _slots(cfg):
            a = np.asarray(state[f"{name}.{slot}"], dtype=np.float32)
            if slot == "step":
                st[slot] = torch.tensor(float(a), dtype=torch.float32)
            else:
                st[slot] = torch.from_numpy(a.copy()).reshape(p.shape)
        if st:
            opt.state[p] = st
