"""Parameter averaging: the engine-agnostic steps of one averaging round.

DL4J's ``ParameterAveragingTrainingMaster`` semantics: the driver broadcasts the trainable
module's parameters (the head's, and the fine-tuned backbone stages' with a ``suffix``;
``trainable.py``) (and, with ``save_updater``, the optimizer state); each worker fits
``averaging_frequency`` minibatches of ``batch_size_per_worker`` of its own rows starting from
them; the results are summed (a tree reduction on the engine) and divided by the number of
workers, every worker weighing the same. With ``save_updater=False`` the optimizer state is
not averaged: every round starts from a fresh state on every worker.

- ``fit_shard(task, shared)`` runs on a worker: it reads its rows itself (``shards``), trains,
  and returns a ``ShardResult`` holding its parameters and state as they are (float32);
- ``combine(a, b)`` is the associative and commutative sum the engines reduce with, in
  float64, so that the sum is insensitive to order (to within the final float32 rounding).
  A float32 value is exact in float64, so sending float32 and summing in float64 gives the
  same bits as sending float64 copies, at half the bytes per worker per round;
- ``average(result)`` divides and casts back to the parameters' own dtypes.

Determinism: one torch thread inside fit_shard, and dropout masks from a ``torch.Generator``
seeded by (seed, epoch, round, worker): the same seed gives the same head on every engine.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np
import torch

from .heads import (HeadConfig, has_batch_norm, head_params, load_params, loss_fn,
                    set_dropout_generator)
from .optim import OptimizerConfig, export_state, import_state, init_state, make_optimizer
from .shards import ShardTask, load_round
from .trainable import SUFFIX, SuffixSpec, worker_module

__all__ = ["RoundState", "ShardResult", "ShardTask", "fit_shard", "combine", "average",
           "round_seed", "one_torch_thread", "round_stats"]


@dataclass(frozen=True)
class RoundState:
    """What the driver broadcasts each round: the head, its state, and the hyper-parameters."""

    head: HeadConfig
    in_dim: int
    n_classes: int
    params: Mapping[str, np.ndarray]  # the averaged parameters (state_dict order)
    optimizer: OptimizerConfig
    opt_state: Mapping[str, np.ndarray] | None  # averaged optimizer state; None: fresh
    lr: float  # learning rate of this round
    epoch: int
    round: int
    seed: int
    batch_size: int  # batch_size_per_worker
    save_updater: bool = True
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    suffix: SuffixSpec | None = None  # the backbone stages trained in front of the head
    suffix_lr_scale: float = 1.0  # their learning rate is lr x this


@dataclass
class ShardResult:
    """A sum over workers of their round results (one worker's own result before combining)."""

    # one worker's own values (float32), or float64 sums once combined
    params: "OrderedDict[str, np.ndarray]"
    opt_state: "OrderedDict[str, np.ndarray] | None"  # the same; None without save_updater
    dtypes: dict[str, str]  # the parameters' own dtypes, to cast the average back to
    n_workers: int = 1
    examples: int = 0
    loss_sum: float = 0.0  # sum over examples of the minibatch-mean losses
    correct: int = 0  # training predictions that were right (before each step)
    steps: int = 0  # most minibatches any worker ran
    compute_s: float = 0.0  # slowest worker's time in fit_shard
    compute_s_sum: float = 0.0  # all workers' time together
    workers: tuple[int, ...] = field(default_factory=tuple)  # partitions that contributed
    # telemetry (see the block at the end): per parameter, the sum over workers of the
    # squared norm of its values, for the cross-worker divergence before averaging
    sq_norms: dict[str, float] = field(default_factory=dict)


def round_seed(seed: int, epoch: int, rnd: int, worker: int) -> int:
    """The dropout seed of one worker in one round."""
    return int(np.random.SeedSequence([seed, epoch, rnd, worker]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded (heads are small; results then match across machines)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _head(shared: RoundState) -> torch.nn.Module:
    """The trainable module (suffix + head) of this worker thread (see worker_module)."""
    return worker_module(shared.suffix, shared.head, shared.in_dim, shared.n_classes)


def fit_shard(task: ShardTask, shared: RoundState) -> ShardResult:
    """One worker's part of one round: ``ceil(task.count / batch_size)`` minibatch steps.

    Starts from the broadcast parameters and optimizer state (or a fresh state), reads the
    round's rows (cached per worker process), and returns the new parameters and state (in
    their own dtypes; ``combine`` sums them in float64) with the round's statistics.
    """
    t0 = time.perf_counter()
    with one_torch_thread():
        x, y = load_round(task)
        head = _head(shared)
        load_params(head, shared.params)
        head.train()
        scales = {f"{SUFFIX}.": shared.suffix_lr_scale} if shared.suffix is not None else None
        opt = make_optimizer(shared.optimizer, head, shared.lr, scales)
        if shared.optimizer.has_state:
            state = shared.opt_state if (shared.save_updater and shared.opt_state is not None) \
                else init_state(shared.optimizer, head)
            import_state(shared.optimizer, opt, head, state)
        gen = torch.Generator().manual_seed(round_seed(shared.seed, shared.epoch, shared.round,
                                                       task.part))
        set_dropout_generator(head, gen)
        bn = has_batch_norm(head)
        loss_sum, correct, steps = 0.0, 0, 0
        try:
            for start in range(0, len(y), shared.batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(x[start:start + shared.batch_size]))
                yb = torch.from_numpy(np.ascontiguousarray(y[start:start + shared.batch_size]))
                single = bn and len(yb) == 1
                if single:  # BatchNorm cannot normalize one example by its own statistics
                    _bn_eval(head, True)
                logits = head(xb)
                loss = loss_fn(logits, yb, label_smoothing=shared.label_smoothing,
                               class_weights=shared.class_weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if single:
                    _bn_eval(head, False)
                loss_sum += float(loss.detach()) * len(yb)
                correct += int((logits.detach().argmax(1) == yb).sum())
                steps += 1
        finally:
            set_dropout_generator(head, None)
        params = head_params(head)
        dtypes = {k: str(v.dtype) for k, v in shared.params.items()}
        opt_state = None
        if shared.save_updater and shared.optimizer.has_state:
            opt_state = export_state(shared.optimizer, opt, head)
    dt = time.perf_counter() - t0
    return ShardResult(params=params, opt_state=opt_state, dtypes=dtypes, n_workers=1,
                       examples=int(len(y)), loss_sum=loss_sum, correct=correct, steps=steps,
                       compute_s=dt, compute_s_sum=dt, workers=(task.part,),
                       sq_norms=sq_norms(params))


def _bn_eval(head: torch.nn.Module, on: bool) -> None:
    for m in head.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train(not on)


def _add(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], what: str) -> "OrderedDict[str, np.ndarray]":
    if list(a) != list(b):
        raise ValueError(f"cannot combine round results with different {what}: "
                         f"{list(a)[:3]}... vs {list(b)[:3]}...")
    # float64 whatever the inputs: exact for float32 and int64 counters alike
    return OrderedDict((k, np.add(a[k], b[k], dtype=np.float64)) for k in a)


def combine(a: ShardResult, b: ShardResult) -> ShardResult:
    """The sum of two (partial) round results: associative and commutative; inputs untouched."""
    if (a.opt_state is None) != (b.opt_state is None):
        raise ValueError("cannot combine round results with and without optimizer state")
    return ShardResult(
        params=_add(a.params, b.params, "parameters"),
        opt_state=None if a.opt_state is None else _add(a.opt_state, b.opt_state, "optimizer state"),
        dtypes=a.dtypes,
        n_workers=a.n_workers + b.n_workers,
        examples=a.examples + b.examples,
        loss_sum=a.loss_sum + b.loss_sum,
        correct=a.correct + b.correct,
        steps=max(a.steps, b.steps),
        compute_s=max(a.compute_s, b.compute_s),
        compute_s_sum=a.compute_s_sum + b.compute_s_sum,
        workers=tuple(sorted(a.workers + b.workers)),
        sq_norms=_add_sq_norms(a.sq_norms, b.sq_norms),
    )


def average(result: ShardResult) -> tuple["OrderedDict[str, np.ndarray]", "OrderedDict[str, np.ndarray] | None"]:
    """(parameters, optimizer state) averaged over the workers, every worker weighing the same.

    Parameters come back in their own dtypes (float32; BatchNorm's counter rounded to int64),
    the state as float32; the state is None when it was not averaged (``save_updater=False``).
    """
    n = float(result.n_workers)
    params: OrderedDict[str, np.ndarray] = OrderedDict()
    for k, v in result.params.items():
        dt = np.dtype(result.dtypes.get(k, "float32"))
        m = v / n
        params[k] = np.rint(m).astype(dt) if dt.kind in "iu" else m.astype(dt)
    state = None
    if result.opt_state is not None:
        state = OrderedDict((k, (v / n).astype(np.float32)) for k, v in result.opt_state.items())
    return params, state


# -- telemetry statistics (train --log): read-only views of a round, the averaging unchanged --

def sq_norms(params: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Squared L2 norm of each floating-point parameter (float64)."""
    return {k: float(np.square(v, dtype=np.float64).sum()) for k, v in params.items()
            if np.asarray(v).dtype.kind == "f"}


def _add_sq_norms(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: a[k] + b[k] for k in a if k in b}


def round_stats(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                result: ShardResult) -> dict[str, dict[str, float]]:
    """Per parameter tensor of one round:

    - ``update_ratio``: mean |after - before| / mean |before| (DL4J's update:parameter
      ratio; healthy training sits near 1e-3);
    - ``divergence``: the workers' RMS distance from their mean before averaging, over the
      mean's norm: sqrt(mean_w ||p_w||^2 - ||mean_w p_w||^2) / ||mean_w p_w|| (0 with one
      worker), from the float64 sums the reduction carries.
    """
    n = float(result.n_workers)
    ratio, div = {}, {}
    for k, old in before.items():
        old = np.asarray(old)
        if old.dtype.kind != "f" or k not in after:
            continue
        new = np.asarray(after[k], dtype=np.float64)
        scale = float(np.abs(old).mean()) if old.size else 0.0
        ratio[k] = float(np.abs(new - old).mean()) / scale if scale > 0 else 0.0
        if k in result.sq_norms and k in result.params:
            mean = np.asarray(result.params[k], dtype=np.float64) / n
            mean_sq = float(np.square(mean).sum())
            spread = max(result.sq_norms[k] / n - mean_sq, 0.0)
            div[k] = math.sqrt(spread) / math.sqrt(mean_sq) if mean_sq > 0 else 0.0
    return {"update_ratio": ratio, "divergence": div}
