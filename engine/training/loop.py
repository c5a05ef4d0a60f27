"""Options, the round plan and the resume rules of parameter-averaged head training (DL4J
ParameterAveragingTrainingMaster), and ``train_head``, which drives one ``TrainRun``.

    result = train_head(executor, "features.zarr", TrainConfig(epochs=20), "runs/head")

Per epoch, ``rounds_per_epoch`` averaging rounds: broadcast the parameters (and optimizer
state) in a ``RoundState``, ``executor.map_reduce(fit_shard, tasks, combine, affinity=...)``
with one ``ShardTask`` per worker (a spec of its rows, which it reads itself), ``average``,
checkpoint, next. After the epoch's rounds, the validation split is scored through
``executor.map_unordered(predict_rows, blocks)``; the head with the best validation score is
kept, and training stops after ``patience`` epochs without improvement. The steps are the
methods of ``run.TrainRun``; the files go through ``checkpoint.RunDir``.

Everything random is a function of (seed, epoch, round, worker), and the checkpoint written
after every round (by a background thread, while the next round runs) holds the parameters,
the optimizer state, the best head and all counters (one safetensors file, written to a
temporary name and renamed: no pickle, never half written). So a killed run, started again
with ``resume=True``, continues at the round after the last checkpoint and ends with exactly
the head an uninterrupted run ends with.

Files in ``out_dir``: ``checkpoint.safetensors``; ``rounds.jsonl`` (one JSON line per round:
epoch, round, start time, loss, train accuracy, lr, examples, compute seconds of the slowest
worker, round seconds, overhead = round - compute); ``val_metrics.json`` (the best epoch's
validation metrics); ``training.png`` (score vs iteration, see ``plot.py``); at the end the
saved model, ``config.json`` + ``head.safetensors`` (see ``artifact.py``).
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import InvalidParameterError, check_choice, check_float, check_int
from ..executor import Executor
from ..modeldir import CHECKPOINT, check_model_dir
from ..store import open_store
from .checkpoint import (CheckpointWriter, load_checkpoint, resume_checkpoint,  # noqa: F401
                         save_checkpoint)
from .heads import HeadConfig, _check_keys, check_class_weights
from .optim import OptimizerConfig
from .shards import REPARTITION, ShardTask, partition_sizes, store_key

MONITORS = ("top1", "mean_per_class", "loss")
ROUNDS = "rounds.jsonl"
PLOT = "training.png"
VAL_METRICS = "val_metrics.json"
#: the chart is redrawn after an epoch when this long has passed since the last time, and at the end
PLOT_EVERY_S = 30.0


@dataclass(frozen=True)
class TrainConfig:
    """Every option of head training (DL4J's names in brackets)."""

    head: HeadConfig = field(default_factory=HeadConfig)  # the classifier put on the features
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # update rule, lr schedule
    workers: int | None = None  # parallel workers (numWorkers); None: the engine's n_workers
    batch_size_per_worker: int = 32  # minibatch of each worker (batchSizePerWorker)
    averaging_frequency: int = 5  # minibatches per worker between averagings (averagingFrequency)
    save_updater: bool = True  # average optimizer state too; False: fresh state every round
    repartition: str = "epoch"  # "epoch": reshuffle into balanced partitions every epoch
    #                             (Repartition.Always + Balanced); "never": fixed partitions
    epochs: int = 10  # most epochs (passes over the training split)
    seed: int = 0  # head initialization, partitions, shuffles and dropout derive from it
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    class_weights: Any = None  # None, "balanced", or one weight per class
    patience: int | None = 5  # stop after this many epochs without validation improvement
    monitor: str = "top1"  # validation score for early stopping and the best head
    min_delta: float = 0.0  # smallest change of the monitored score that counts as better
    val_block_rows: int = 4096  # rows per validation task
    cache_bytes: int = 1 << 30  # per worker process: cap of the cached training features
    # the first backbone stage trained, for a store of maps: None -> the stage after the
    # store's cut (fine-tuning); "head" -> the head alone on the pooled maps
    train_from: str | None = None
    suffix_lr_scale: float = 0.1  # learning rate of the fine-tuned stages = lr x this

    def __post_init__(self) -> None:
        w = "TrainConfig"
        try:
            object.__setattr__(self, "head", HeadConfig.from_dict(self.head))
            object.__setattr__(self, "optimizer", OptimizerConfig.from_dict(self.optimizer))
        except TypeError as exc:
            if isinstance(exc, InvalidParameterError):
                raise
            raise InvalidParameterError(f"Bad head or optimizer options: {exc}") from exc
        if self.workers is not None:
            check_int("workers", self.workers, low=1, where=w)
        check_int("batch_size_per_worker", self.batch_size_per_worker, low=1, where=w)
        check_int("averaging_frequency", self.averaging_frequency, low=1, where=w)
        if not isinstance(self.save_updater, bool):
            raise InvalidParameterError(
                f"The 'save_updater' parameter of TrainConfig must be a bool. "
                f"Got {self.save_updater!r} instead.")
        check_choice("repartition", self.repartition, REPARTITION, where=w)
        check_int("epochs", self.epochs, low=1, where=w)
        check_int("seed", self.seed, low=0, where=w)
        object.__setattr__(self, "label_smoothing",
                           check_float("label_smoothing", self.label_smoothing, low=0.0, high=0.999,
                                       where=w))
        object.__setattr__(self, "class_weights", check_class_weights(self.class_weights))
        if self.patience is not None:
            check_int("patience", self.patience, low=1, where=w)
        check_choice("monitor", self.monitor, MONITORS, where=w)
        object.__setattr__(self, "min_delta", check_float("min_delta", self.min_delta, low=0.0, where=w))
        check_int("val_block_rows", self.val_block_rows, low=1, where=w)
        check_int("cache_bytes", self.cache_bytes, low=0, where=w)
        if self.train_from is not None and (not isinstance(self.train_from, str)
                                            or not self.train_from):
            raise InvalidParameterError(
                f"The 'train_from' parameter of TrainConfig must be a layer name, 'head' or "
                f"None. Got {self.train_from!r} instead.", param="train_from")
        object.__setattr__(self, "suffix_lr_scale", check_float(
            "suffix_lr_scale", self.suffix_lr_scale, low=0.0, low_open=True, where=w))

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["head"] = self.head.to_dict()
        d["optimizer"] = self.optimizer.to_dict()
        if isinstance(self.class_weights, tuple):
            d["class_weights"] = list(self.class_weights)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "TrainConfig") -> "TrainConfig":
        if isinstance(d, TrainConfig):
            return d
        _check_keys(cls, d, "TrainConfig")
        return cls(**dict(d))


@dataclass
class TrainResult:
    """What ``train_head`` returns."""

    params: "OrderedDict[str, np.ndarray]"  # the best head (by the validation monitor)
    last_params: "OrderedDict[str, np.ndarray]"  # the head after the last round
    classes: list[str]
    head: HeadConfig
    feature_dim: int
    config: TrainConfig  # with workers resolved
    history: list[dict[str, Any]]  # one entry per epoch
    best: dict[str, Any] | None  # epoch, iteration and validation scores of the best head
    best_metrics: dict[str, Any] | None  # full validation metrics of the best head
    rounds: int  # averaging rounds run, over the whole run
    rounds_per_epoch: int
    stopped_early: bool
    out_dir: str
    reused: bool = False  # the run in out_dir was already finished: nothing was trained
    warnings: list[str] = field(default_factory=list)  # surprises to tell the user (one line each)
    suffix: Any = None  # the fine-tuned backbone stages (trainable.SuffixSpec); None: head only

    def module(self):
        """The best trained module (suffix, then head) in eval mode."""
        from .trainable import trainable_from_params

        return trainable_from_params(self.suffix, self.head, self.params,
                                     in_dim=self.feature_dim, n_classes=len(self.classes))


# -- the plan ---------------------------------------------------------------------------------

def rounds_per_epoch(n_train: int, workers: int, batch_size_per_worker: int,
                     averaging_frequency: int) -> int:
    """Averaging rounds that take the largest partition through one epoch."""
    per_round = batch_size_per_worker * averaging_frequency
    return max(1, -(-max(partition_sizes(n_train, workers)) // per_round))


def round_tasks(config: TrainConfig, store_url: str, n_train: int, epoch: int, rnd: int, *,
                storage_options: Mapping | None = None, key: str = "") -> list[ShardTask]:
    """The ShardTasks of one round: one per worker that still has rows this epoch."""
    workers = config.workers or 1
    per_round = config.batch_size_per_worker * config.averaging_frequency
    tasks = []
    for part, size in enumerate(partition_sizes(n_train, workers)):
        offset = rnd * per_round
        count = min(per_round, size - offset)
        if count > 0:
            tasks.append(ShardTask(store_url=store_url, split="train", seed=config.seed,
                                   epoch=epoch, n_parts=workers, part=part, offset=offset,
                                   count=count, repartition=config.repartition,
                                   storage_options=dict(storage_options or {}), store_key=key,
                                   cache_bytes=config.cache_bytes))
    return tasks


# -- resuming ---------------------------------------------------------------------------------

#: identity keys -> the words a user knows them by (CLI flags without their dashes)
_IDENTITY_WORDS = {"store_key": "the feature store's contents", "n_train": "training rows",
                   "n_val": "validation rows", "classes": "classes",
                   "feature_dim": "feature width"}


def _flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A TrainConfig dict flattened to option names: ``head.kind`` -> ``head``,
    ``optimizer.name`` -> ``optimizer``, ``optimizer.lr`` -> ``lr``."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if k in ("head", "optimizer") and isinstance(v, Mapping):
            for kk, vv in v.items():
                out[k if kk in ("kind", "name") else kk] = vv
        else:
            out[k] = v
    return out


def _shown(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def identity_changes(old: Mapping[str, Any], new: Mapping[str, Any]
                     ) -> dict[str, tuple[Any, Any]]:
    """What differs between two run identities, in the user's words: ``{"epochs": (3, 5)}``."""
    new = json.loads(json.dumps(new))
    out: dict[str, tuple[Any, Any]] = {}
    fo, fn = _flat_config(old.get("config", {})), _flat_config(new.get("config", {}))
    for k in list(fo) + [k for k in fn if k not in fo]:
        if fo.get(k) != fn.get(k):
            out[k.replace("_", "-")] = (fo.get(k), fn.get(k))
    for k in new:
        if k != "config" and old.get(k) != new[k]:
            out[_IDENTITY_WORDS.get(k, k)] = (old.get(k), new[k])
    return out


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``epochs 3 -> 5, lr 0.1 -> 0.01``."""
    return ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" if k != _IDENTITY_WORDS["store_key"]
                     else k for k, (a, b) in changes.items())


def _refuse_resume(out_dir: str, changes: Mapping[str, tuple[Any, Any]], why: str = "") -> None:
    raise InvalidParameterError(
        f"{out_dir!r} holds a training run with other settings ({describe_changes(changes)}), "
        f"so it cannot be resumed{why}: use another output folder, or resume=False "
        f"(CLI: --no-resume) to start over there.")


def continue_with(out_dir: str, st: Any, identity: Mapping[str, Any], cfg: "TrainConfig",
                  n_val: int) -> None:
    """Accept the checkpointed ``RunState`` ``st`` for a run with ``identity``, or refuse
    with what differs.

    Only the number of epochs may change: a run (finished or not) continues to the new
    number, and ends with the head an uninterrupted run with that number ends with, because
    nothing a round does depends on the total -- except the cosine schedule (its learning
    rate at every round depends on it), so there a change is refused. Fewer epochs than
    already trained cannot be undone and are refused too.
    """
    changes = identity_changes(st.identity, identity)
    if not changes:
        return
    if set(changes) != {"epochs"}:
        _refuse_resume(out_dir, changes)
    if cfg.optimizer.schedule == "cosine":
        _refuse_resume(out_dir, changes, " (the cosine schedule spreads its learning rates over "
                                         "all epochs, so the rounds already run would differ)")
    if cfg.epochs < st.epoch:
        _refuse_resume(out_dir, changes, f" (it has already trained {st.epoch} epochs)")
    st.identity = json.loads(json.dumps(identity))
    early = early_stop(cfg, st, n_val)
    st.stopped_early = early and st.epoch < cfg.epochs
    st.done = early or st.epoch >= cfg.epochs


def early_stop(cfg: "TrainConfig", st: Any, n_val: int) -> bool:
    """Whether ``patience`` epochs without improvement have passed (never without val rows)."""
    return bool(n_val and cfg.patience is not None and st.bad_epochs >= cfg.patience)


def _non_finite(params: Mapping[str, np.ndarray], opt_state: Mapping[str, np.ndarray] | None,
                loss: float) -> str | None:
    """What became NaN or infinite in a round (None: all finite)."""
    if not math.isfinite(loss):
        return f"the training loss ({loss})"
    for what, d in (("parameter", params), ("optimizer state", opt_state or {})):
        for k, v in d.items():
            a = np.asarray(v)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                return f"the {what} {k!r}"
    return None


def _diverged(what: str, cfg: "TrainConfig", epoch: int, rnd: int, rpe: int, lr: float,
              ck_path: str, good_rounds: int) -> InvalidParameterError:
    return InvalidParameterError(
        f"Training diverged in epoch {epoch}, round {rnd} (counted from 0 as everywhere; "
        f"{rpe} rounds an epoch, {cfg.epochs} epochs): "
        f"{what} became NaN or infinite at learning rate {lr:g}. The learning rate is too high "
        f"for this head: try a lower one (--lr {cfg.optimizer.lr / 10:g}). Nothing of that "
        f"round was saved: {ck_path} holds the last good state ({good_rounds} rounds); other "
        f"settings cannot resume it, so rerun with --no-resume (resume=False).")


class TrainingWarning(UserWarning):
    """Something about a training run the user should know (also in ``TrainResult.warnings``,
    so a caller that prints those can filter this category)."""


NO_VAL_WARNING = (
    "the store has no validation rows: early stopping (--patience) and keeping the best "
    "epoch's head are off, and the model is the last epoch's head. Featurize with a val part "
    "(e.g. --split train=0.7,val=0.1,test=0.2) to have them.")


# -- the driver -------------------------------------------------------------------------------

def _identity(cfg: TrainConfig, store: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the options and the training data."""
    from .trainable import SuffixSpec

    ident = {"config": cfg.to_dict(), "store_key": store_key(store.attrs),
             "n_train": len(store.split_rows("train")), "n_val": len(store.split_rows("val")),
             "classes": store.classes, "feature_dim": store.feature_dim}
    suffix = SuffixSpec.from_store(store.attrs, cfg.train_from)
    if suffix is not None:
        ident["suffix"] = suffix.to_dict()
    return ident


def check_resume(out_dir: str, store_url: str, config: TrainConfig | Mapping[str, Any] | None,
                 *, storage_options: Mapping | None = None, resume: bool = True,
                 out_storage_options: Mapping | None = None) -> None:
    """``train_head``'s checks that need no engine, to run before one starts: the output
    folder, and whether the run in it can be resumed with these settings (with
    ``config.workers`` None, the engine decides the workers later: not compared here)."""
    from .checkpoint import RunDir, read_checkpoint
    from .run import RunState

    check_model_dir(out_dir, store_url)
    run_dir = RunDir(out_dir, out_storage_options)
    if not (resume and run_dir.exists(CHECKPOINT)):
        return
    cfg = TrainConfig() if config is None else TrainConfig.from_dict(config)
    st = RunState.from_dict(read_checkpoint(run_dir, CHECKPOINT)[0])
    if cfg.workers is None:
        old = st.identity.get("config", {}).get("workers")
        cfg = replace(cfg, workers=old if isinstance(old, int) and old >= 1 else None)
    store = open_store(store_url, storage_options=storage_options)
    continue_with(out_dir, st, _identity(cfg, store), cfg, len(store.split_rows("val")))


def train_head(executor: Executor, store_url: str, config: TrainConfig | Mapping[str, Any] | None,
               out_dir: str, *, storage_options: Mapping | None = None, resume: bool = True,
               progress: bool = True, plot: bool = True,
               callback: Callable[[dict[str, Any]], None] | None = None,
               out_storage_options: Mapping | None = None) -> TrainResult:
    """Train a head on the store's train split with parameter averaging on ``executor``,
    and save it in ``out_dir`` (a ``TrainRun`` driven to its end; see ``run.py``).

    ``resume=True`` continues the run checkpointed in ``out_dir`` (which must have the same
    configuration and store) or, with none there, starts one; ``resume=False`` starts over.
    ``callback(record)`` is called with each round's rounds.jsonl record once the round's
    checkpoint is written (in the background, while the next round runs: so the call comes
    after the next round's compute, and the epoch's last one before its validation), in
    round order; an exception it raises ends training (the run can be resumed). ``plot=False``
    skips the chart (``training.png``), which otherwise is drawn at the end and at most every
    ``PLOT_EVERY_S`` seconds after an epoch.

    ``out_dir`` must be new, empty or a model directory (``modeldir.check_model_dir``), or
    an fsspec URL (``out_storage_options``); starting over removes only the files a run
    writes. At the end the best head is saved there (``config.json`` + ``head.safetensors``,
    loadable by ``deeptransfer.load``). A resumed run may change ``epochs`` (not with the
    cosine schedule): it continues to the new number, even once finished. A round whose
    loss, parameters or optimizer state are not finite stops training with an error and is
    not saved. A finished run resumed with the same settings trains nothing and rewrites no
    model that is there (``TrainResult.reused``); ``TrainResult.warnings`` says what the user
    should know (no validation split).
    """
    from .run import TrainRun

    run = TrainRun(store_url, config, out_dir, workers=int(executor.n_workers),
                   storage_options=storage_options, resume=resume, plot=plot,
                   callback=callback, out_storage_options=out_storage_options)
    bar = None
    try:
        if progress and not run.done:
            from tqdm.auto import tqdm

            bar = tqdm(total=run.config.epochs * run.rounds_per_epoch,
                       initial=run.state.global_round, unit="round", desc="train",
                       dynamic_ncols=True)
        while not run.done:
            what, rec = run.step(executor)
            if bar is None:
                continue
            if what == "round":
                bar.update(1)
                bar.set_postfix(epoch=rec["epoch"], loss=f"{rec['loss']:.4f}",
                                acc=f"{rec['train_accuracy']:.3f}", refresh=False)
            else:
                bar.set_postfix(epoch=rec["epoch"], loss=f"{rec['train_loss']:.4f}",
                                val=f"{rec.get('val_top1', float('nan')):.3f}")
                if run.done:
                    bar.total = run.state.global_round
                    bar.refresh()
        return run.finish()
    finally:
        run.close()
        if bar is not None:
            bar.close()
