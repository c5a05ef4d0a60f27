"""The driver loop of parameter-averaged head training (DL4J ParameterAveragingTrainingMaster).

    result = train_head(executor, "features.zarr", TrainConfig(epochs=20), "runs/head")

Per epoch, ``rounds_per_epoch`` averaging rounds: broadcast the parameters (and optimizer
state) in a ``RoundState``, ``executor.map_reduce(fit_shard, tasks, combine, affinity=...)``
with one ``ShardTask`` per worker (a spec of its rows, which it reads itself), ``average``,
checkpoint, next. After the epoch's rounds, the validation split is scored through
``executor.map_unordered(predict_rows, blocks)``; the head with the best validation score is
kept, and training stops after ``patience`` epochs without improvement.

Everything random is a function of (seed, epoch, round, worker), and the checkpoint written
after every round (by a background thread, while the next round runs) holds the parameters,
the optimizer state, the best head and all counters (one safetensors file, written to a
temporary name and renamed: no pickle, never half written). So a killed run, started again
with ``resume=True``, continues at the round after the last checkpoint and ends with exactly
the head an uninterrupted run ends with.

Files in ``out_dir``: ``checkpoint.safetensors``; ``rounds.jsonl`` (one JSON line per round:
epoch, round, start time, loss, train accuracy, lr, examples, compute seconds of the slowest
worker, round seconds, overhead = round - compute); ``val_metrics.json`` (the best epoch's
validation metrics); ``training.png`` (score vs iteration, see ``plot.py``).
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import jsonutil
from ..errors import InvalidParameterError, StoreError, check_choice, check_float, check_int
from ..evaluation import cross_entropy, metrics, predict_split, topk_key
from ..executor import Executor
from ..files import append_line, atomic_write, make_dirs
from ..modeldir import CHECKPOINT, CHECKPOINT_FORMAT, RUN_FILES, check_model_dir, remove_run_files
from ..store import open_store
from .averaging import RoundState, average, combine, fit_shard
from .heads import (HeadConfig, _check_keys, balanced_class_weights, build_head,
                    check_class_weights, head_params)
from .optim import OptimizerConfig, init_state, lr_at
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

    def module(self):
        """The best head as a torch module in eval mode."""
        from .heads import head_from_params

        return head_from_params(self.head, self.params, in_dim=self.feature_dim,
                                n_classes=len(self.classes))


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


# -- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: str, state: Mapping[str, Any], params: Mapping[str, np.ndarray],
                    opt_state: Mapping[str, np.ndarray] | None,
                    best_params: Mapping[str, np.ndarray] | None) -> None:
    """Atomically write the training state: one safetensors file (arrays + JSON metadata)."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for prefix, d in (("params/", params), ("opt/", opt_state or {}), ("best/", best_params or {})):
        for k, v in d.items():
            tensors[prefix + k] = np.require(v, requirements="C")  # keeps 0-d arrays 0-d
    meta = dict(state)
    meta["param_order"] = list(params)
    meta["opt_order"] = list(opt_state) if opt_state is not None else None
    meta["has_best"] = best_params is not None
    # bytes through our writer: safetensors' save_file makes the file 0600, not umask
    atomic_write(path, save(tensors, metadata={"format": CHECKPOINT_FORMAT,
                                               "state": json.dumps(meta)}))


def load_checkpoint(path: str) -> tuple[dict[str, Any], "OrderedDict[str, np.ndarray]",
                                        "OrderedDict[str, np.ndarray] | None",
                                        "OrderedDict[str, np.ndarray] | None"]:
    """(state, params, optimizer state or None, best params or None) of a checkpoint."""
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        meta = json.loads(f.metadata()["state"])
        params = OrderedDict((k, f.get_tensor("params/" + k)) for k in meta["param_order"])
        opt = None
        if meta["opt_order"] is not None:
            opt = OrderedDict((k, f.get_tensor("opt/" + k)) for k in meta["opt_order"])
        best = None
        if meta["has_best"]:
            best = OrderedDict((k, f.get_tensor("best/" + k)) for k in meta["param_order"])
    return meta, params, opt, best


def resume_checkpoint(path: str) -> tuple[dict[str, Any], "OrderedDict[str, np.ndarray]",
                                          "OrderedDict[str, np.ndarray] | None",
                                          "OrderedDict[str, np.ndarray] | None"]:
    """``load_checkpoint`` for a resume: a damaged file is one StoreError saying what to do."""
    try:
        out = load_checkpoint(path)
        missing = [k for k in _STATE_KEYS if k not in out[0]]
        if missing or not isinstance(out[0]["identity"], dict):
            raise KeyError(f"no {', '.join(missing) or 'identity'} in its state")
        return out
    except Exception as exc:  # noqa: BLE001 - SafetensorError, JSON and key errors alike
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StoreError(
            f"The checkpoint {path} is damaged ({type(exc).__name__}: {first}), so the run "
            f"cannot be resumed: use --no-resume (resume=False) to start over in that folder."
        ) from None


#: what every checkpoint's state holds
_STATE_KEYS = ("identity", "epoch", "round", "global_round", "iteration", "epoch_loss_sum",
               "epoch_examples", "epoch_correct", "history", "best", "bad_epochs", "done",
               "stopped_early")


def _write_json(path: str, obj: Any) -> None:
    atomic_write(path, jsonutil.dumps(obj))


def _parses(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("global_round"), int) else None


def _truncate_rounds(path: str, keep_below: int) -> None:
    """Keep the records of rounds the checkpoint holds (a kill may have left one more, and a
    full disk half of one)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip()]
    kept = [ln for ln in lines if (rec := _parses(ln)) is not None
            and rec["global_round"] < keep_below]
    if len(kept) != len(lines):
        atomic_write(path, "".join(kept))


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


def _continue_with(out_dir: str, st: dict[str, Any], identity: Mapping[str, Any],
                   cfg: "TrainConfig", n_val: int) -> None:
    """Accept the checkpoint in ``st`` for a run with ``identity``, or refuse with what differs.

    Only the number of epochs may change: a run (finished or not) continues to the new
    number, and ends with the head an uninterrupted run with that number ends with, because
    nothing a round does depends on the total -- except the cosine schedule (its learning
    rate at every round depends on it), so there a change is refused. Fewer epochs than
    already trained cannot be undone and are refused too.
    """
    changes = identity_changes(st["identity"], identity)
    if not changes:
        return
    if set(changes) != {"epochs"}:
        _refuse_resume(out_dir, changes)
    if cfg.optimizer.schedule == "cosine":
        _refuse_resume(out_dir, changes, " (the cosine schedule spreads its learning rates over "
                                         "all epochs, so the rounds already run would differ)")
    if cfg.epochs < st["epoch"]:
        _refuse_resume(out_dir, changes, f" (it has already trained {st['epoch']} epochs)")
    st["identity"] = json.loads(json.dumps(identity))
    early = _early_stop(cfg, st, n_val)
    st["stopped_early"] = early and st["epoch"] < cfg.epochs
    st["done"] = early or st["epoch"] >= cfg.epochs


def _early_stop(cfg: "TrainConfig", st: Mapping[str, Any], n_val: int) -> bool:
    return bool(n_val and cfg.patience is not None and st["bad_epochs"] >= cfg.patience)


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


class CheckpointWriter:
    """Writes checkpoints on one background thread, in order, one at a time.

    A round's checkpoint (about 5 MB for a 1280 x 257 head with Adam's state, ~5-7 ms) is
    written while the next round runs instead of between rounds. ``save`` first waits for
    the previous write (raising its error, if any) and then runs that write's ``then``
    (the round's callback), so callbacks still come in round order, each after its round's
    checkpoint is on disk; ``flush`` waits for the last write. The arrays handed over must
    not be changed afterwards (the loop makes new ones every round); the state dict is
    copied.
    """

    def __init__(self, path: str):
        from concurrent.futures import ThreadPoolExecutor

        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="deeptransfer-checkpoint")
        self._pending: tuple[Any, Callable[[float, float], None] | None] | None = None

    def _write(self, state: dict[str, Any], params: Mapping[str, np.ndarray],
               opt_state: Mapping[str, np.ndarray] | None,
               best_params: Mapping[str, np.ndarray] | None) -> float:
        t0 = time.perf_counter()
        save_checkpoint(self.path, state, params, opt_state, best_params)
        return time.perf_counter() - t0

    def save(self, state: Mapping[str, Any], params: Mapping[str, np.ndarray],
             opt_state: Mapping[str, np.ndarray] | None,
             best_params: Mapping[str, np.ndarray] | None, *,
             then: Callable[[float, float], None] | None = None) -> None:
        """Start writing this checkpoint once the previous one is written.

        ``then(write_seconds, wait_seconds)`` runs on the caller's thread once this write is
        done (at the next ``save`` or ``flush``): how long the write took, and how long the
        caller was blocked waiting for it.
        """
        self.flush()
        snapshot = json.loads(json.dumps(state))  # the loop goes on changing ``state``
        fut = self._pool.submit(self._write, snapshot, params, opt_state, best_params)
        self._pending = (fut, then)

    def flush(self) -> None:
        """Wait for the write in flight, raise its error, run its ``then``."""
        if self._pending is None:
            return
        fut, then = self._pending
        self._pending = None
        t0 = time.perf_counter()
        write_s = fut.result()
        if then is not None:
            then(write_s, time.perf_counter() - t0)

    def close(self) -> None:
        """Wait for the write in flight without running its ``then`` (used on errors: a
        checkpoint half-way through is finished, not abandoned); errors are not raised."""
        if self._pending is not None:
            fut, _ = self._pending
            self._pending = None
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - the error being handled is the one to raise
                pass
        self._pool.shutdown(wait=True)


# -- the loop ---------------------------------------------------------------------------------

def _monitor_value(monitor: str, entry: Mapping[str, Any]) -> float:
    """Higher is better."""
    if monitor == "loss":
        return -float(entry["val_loss"])
    return float(entry["val_" + monitor])


def _identity(cfg: TrainConfig, store: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the options and the training data."""
    return {"config": cfg.to_dict(), "store_key": store_key(store.attrs),
            "n_train": len(store.split_rows("train")), "n_val": len(store.split_rows("val")),
            "classes": store.classes, "feature_dim": store.feature_dim}


def check_resume(out_dir: str, store_url: str, config: TrainConfig | Mapping[str, Any] | None,
                 *, storage_options: Mapping | None = None, resume: bool = True) -> None:
    """``train_head``'s checks that need no engine, to run before one starts: the output
    folder, and whether the run in it can be resumed with these settings (with
    ``config.workers`` None, the engine decides the workers later: not compared here)."""
    check_model_dir(out_dir, store_url)
    ck_path = os.path.join(out_dir, CHECKPOINT)
    if not (resume and os.path.exists(ck_path)):
        return
    cfg = TrainConfig() if config is None else TrainConfig.from_dict(config)
    st = resume_checkpoint(ck_path)[0]
    if cfg.workers is None:
        old = st["identity"].get("config", {}).get("workers")
        cfg = replace(cfg, workers=old if isinstance(old, int) and old >= 1 else None)
    store = open_store(store_url, storage_options=storage_options)
    _continue_with(out_dir, st, _identity(cfg, store), cfg, len(store.split_rows("val")))


def train_head(executor: Executor, store_url: str, config: TrainConfig | Mapping[str, Any] | None,
               out_dir: str, *, storage_options: Mapping | None = None, resume: bool = True,
               progress: bool = True, plot: bool = True,
               callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train a head on the store's train split with parameter averaging on ``executor``.

    ``resume=True`` continues the run checkpointed in ``out_dir`` (which must have the same
    configuration and store) or, with none there, starts one; ``resume=False`` starts over.
    ``callback(record)`` is called with each round's rounds.jsonl record once the round's
    checkpoint is written (in the background, while the next round runs: so the call comes
    after the next round's compute, and the epoch's last one before its validation), in
    round order; an exception it raises ends training (the run can be resumed). ``plot=False``
    skips the chart (``training.png``), which otherwise is drawn at the end and at most every
    ``PLOT_EVERY_S`` seconds after an epoch.

    ``out_dir`` must be new, empty or a model directory (``modeldir.check_model_dir``);
    starting over removes only the files a run writes. A resumed run may change ``epochs``
    (not with the cosine schedule): it continues to the new number, even once finished.
    A round whose loss, parameters or optimizer state are not finite stops training with
    an error and is not saved. A finished run resumed with the same settings trains nothing
    (``TrainResult.reused``); ``TrainResult.warnings`` says what the user should know (no
    validation split).
    """
    config = TrainConfig() if config is None else TrainConfig.from_dict(config)
    cfg = replace(config, workers=config.workers or int(executor.n_workers))
    check_model_dir(out_dir, store_url)
    store = open_store(store_url, storage_options=storage_options)
    if not store.is_complete():
        raise StoreError(f"The feature store {store_url!r} is not complete "
                         f"({len(store.pending_chunks())} chunks missing): run featurize again "
                         f"to finish it before training.")
    classes = store.classes
    n_classes, in_dim = len(classes), store.feature_dim
    train_rows = store.split_rows("train")
    n_train = len(train_rows)
    n_val = len(store.split_rows("val"))
    if n_train == 0:
        raise StoreError(f"The feature store {store_url!r} has no training rows: featurize with a "
                         f"split that has a train part, e.g. --split train=0.7,val=0.1,test=0.2.")
    class_weights = cfg.class_weights
    if class_weights == "balanced":
        labels = np.asarray(store["labels"][:])[train_rows]
        class_weights = balanced_class_weights(labels, n_classes)
    elif class_weights is not None and len(class_weights) != n_classes:
        raise InvalidParameterError(
            f"The 'class_weights' parameter has {len(class_weights)} weights but the store has "
            f"{n_classes} classes: give one weight per class, or 'balanced'.")
    key = store_key(store.attrs)
    rpe = rounds_per_epoch(n_train, cfg.workers, cfg.batch_size_per_worker, cfg.averaging_frequency)
    opt_cfg = cfg.optimizer
    keeps_state = cfg.save_updater and opt_cfg.has_state
    identity = _identity(cfg, store)

    run_warnings = [] if n_val else [NO_VAL_WARNING]
    for w in run_warnings:
        warnings.warn(w, TrainingWarning, stacklevel=2)

    make_dirs(out_dir)
    ck_path = os.path.join(out_dir, CHECKPOINT)
    rounds_path = os.path.join(out_dir, ROUNDS)
    val_path = os.path.join(out_dir, VAL_METRICS)

    if resume and os.path.exists(ck_path):
        st, params, opt_state, best_params = resume_checkpoint(ck_path)
        reused = bool(st.get("done"))
        _continue_with(out_dir, st, identity, cfg, n_val)
        reused = reused and st["done"]
        _truncate_rounds(rounds_path, st["global_round"])
    else:
        reused = False
        head = build_head(cfg.head, in_dim, n_classes, seed=cfg.seed)
        params = head_params(head)
        opt_state = init_state(opt_cfg, head) if keeps_state else None
        best_params = None
        st = {"identity": identity, "epoch": 0, "round": 0, "global_round": 0, "iteration": 0,
              "epoch_loss_sum": 0.0, "epoch_examples": 0, "epoch_correct": 0,
              "history": [], "best": None, "bad_epochs": 0, "done": False,
              "stopped_early": False}
        remove_run_files(out_dir, RUN_FILES)  # an earlier run's: never other files
        save_checkpoint(ck_path, st, params, opt_state, best_params)

    last_plot = time.perf_counter()
    writer = CheckpointWriter(ck_path)
    bar = None
    if progress and not st["done"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * rpe, initial=st["global_round"], unit="round",
                   desc="train", dynamic_ncols=True)
    try:
        while not st["done"]:
            epoch = st["epoch"]
            t_epoch = time.perf_counter()
            while st["round"] < rpe:
                rnd = st["round"]
                tasks = round_tasks(cfg, store_url, n_train, epoch, rnd,
                                    storage_options=storage_options, key=key)
                lr = lr_at(opt_cfg, epoch, rnd, rpe, cfg.epochs)
                shared = RoundState(head=cfg.head, in_dim=in_dim, n_classes=n_classes,
                                    params=params, optimizer=opt_cfg,
                                    opt_state=opt_state if keeps_state else None, lr=lr,
                                    epoch=epoch, round=rnd, seed=cfg.seed,
                                    batch_size=cfg.batch_size_per_worker,
                                    save_updater=cfg.save_updater,
                                    label_smoothing=cfg.label_smoothing,
                                    class_weights=class_weights)
                started = time.time()
                t0 = time.perf_counter()
                res = executor.map_reduce(fit_shard, tasks, combine, shared=shared,
                                          affinity=[t.part for t in tasks])
                new_params, new_state = average(res)
                round_s = time.perf_counter() - t0
                if res.n_workers != len(tasks):
                    raise RuntimeError(f"round {rnd} of epoch {epoch}: {res.n_workers} results for "
                                       f"{len(tasks)} tasks; the engine lost or duplicated a task")
                # checked before anything of the round is logged or saved
                bad = _non_finite(new_params, new_state if keeps_state else None, res.loss_sum)
                if bad is not None:
                    raise _diverged(bad, cfg, epoch, rnd, rpe, lr, ck_path, st["global_round"])
                params = new_params
                if keeps_state:
                    opt_state = new_state
                record = {
                    "epoch": epoch, "round": rnd, "global_round": st["global_round"],
                    "start_time": started, "iteration": st["iteration"] + res.steps,
                    "loss": res.loss_sum / max(res.examples, 1),
                    "train_accuracy": res.correct / max(res.examples, 1),
                    "lr": lr, "examples": res.examples, "workers": res.n_workers,
                    "compute_seconds": res.compute_s, "compute_seconds_total": res.compute_s_sum,
                    "round_seconds": round_s, "overhead_seconds": max(round_s - res.compute_s, 0.0),
                }
                append_line(rounds_path, jsonutil.dumps(record))
                st["round"] += 1
                st["global_round"] += 1
                st["iteration"] = record["iteration"]
                st["epoch_loss_sum"] += res.loss_sum
                st["epoch_examples"] += res.examples
                st["epoch_correct"] += res.correct
                # written while the next round runs; the callback follows the write
                writer.save(st, params, opt_state, best_params,
                            then=_checkpointed(record, callback))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}",
                                    acc=f"{record['train_accuracy']:.3f}", refresh=False)
            writer.flush()  # the epoch's last round is on disk, its callback run

            # -- end of epoch: validate, keep the best head, maybe stop ----------------------
            entry: dict[str, Any] = {
                "epoch": epoch, "iteration": st["iteration"], "global_round": st["global_round"],
                "train_loss": st["epoch_loss_sum"] / max(st["epoch_examples"], 1),
                "train_accuracy": st["epoch_correct"] / max(st["epoch_examples"], 1),
                "lr": lr_at(opt_cfg, epoch, rpe - 1, rpe, cfg.epochs),
            }
            val_m = None
            if n_val:
                pred = predict_split(executor, store_url, params, cfg.head, "val",
                                     storage_options=storage_options,
                                     block_rows=cfg.val_block_rows, cache_bytes=cfg.cache_bytes)
                val_m = metrics(pred.labels, pred.logits, classes)
                val_m["loss"] = cross_entropy(pred.labels, pred.logits)
                top = topk_key(val_m)  # top5, or top{k} with fewer than 5 classes
                entry.update(val_top1=val_m["top1"], **{f"val_{top}": val_m[top]},
                             val_mean_per_class=val_m["mean_per_class"], val_loss=val_m["loss"])
                score = _monitor_value(cfg.monitor, entry)
                best = st["best"]
                improved = best is None or score > best["score"] + cfg.min_delta
            else:  # no validation split: the last head is the best one
                score, improved = float("nan"), True
            entry["seconds"] = time.perf_counter() - t_epoch
            if improved:
                best_params = params
                st["best"] = {"epoch": epoch, "iteration": st["iteration"], "score": score,
                              "monitor": cfg.monitor,
                              **{k: v for k, v in entry.items() if k.startswith("val_")}}
                st["bad_epochs"] = 0
                if val_m is not None:
                    _write_json(val_path, val_m)
            else:
                st["bad_epochs"] += 1
            entry["best"] = bool(improved)
            st["history"].append(entry)
            st["epoch"] += 1
            st["round"] = 0
            st["epoch_loss_sum"], st["epoch_examples"], st["epoch_correct"] = 0.0, 0, 0
            early = _early_stop(cfg, st, n_val)
            st["stopped_early"] = early and st["epoch"] < cfg.epochs
            st["done"] = early or st["epoch"] >= cfg.epochs
            writer.save(st, params, opt_state, best_params)
            if plot and (st["done"] or time.perf_counter() - last_plot > PLOT_EVERY_S):
                _plot(out_dir, st["history"])
                last_plot = time.perf_counter()
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{entry['train_loss']:.4f}",
                                val=f"{entry.get('val_top1', float('nan')):.3f}")
                if st["done"]:
                    bar.total = st["global_round"]
                    bar.refresh()
        writer.flush()
    finally:
        writer.close()
        if bar is not None:
            bar.close()

    if plot and not os.path.exists(os.path.join(out_dir, PLOT)):
        _plot(out_dir, st["history"])
    best_metrics = None
    if n_val and os.path.exists(val_path):
        with open(val_path, encoding="utf-8") as f:
            best_metrics = json.load(f)
    return TrainResult(
        params=best_params if best_params is not None else params, last_params=params,
        classes=classes, head=cfg.head, feature_dim=in_dim, config=cfg,
        history=list(st["history"]), best=st["best"], best_metrics=best_metrics,
        rounds=st["global_round"], rounds_per_epoch=rpe, stopped_early=st["stopped_early"],
        out_dir=out_dir, reused=reused, warnings=run_warnings)


def _checkpointed(record: dict[str, Any], callback: Callable[[dict[str, Any]], None] | None
                  ) -> Callable[[float, float], None]:
    """What runs once a round's checkpoint is written: its times go into the record (the
    callback's copy; rounds.jsonl was written before), then the user's callback."""
    def then(write_s: float, wait_s: float) -> None:
        record["checkpoint_seconds"] = write_s
        record["checkpoint_wait_seconds"] = wait_s
        if callback is not None:
            callback(record)
    return then


def _plot(out_dir: str, history: Sequence[Mapping[str, Any]]) -> None:
    from .plot import plot_training, read_rounds

    plot_training(read_rounds(os.path.join(out_dir, ROUNDS)), history, os.path.join(out_dir, PLOT))
