"""One training run as an object: plan a round, apply its result, end an epoch, checkpoint.

    run = TrainRun("features.zarr", TrainConfig(epochs=20), "runs/head", workers=2)
    with run:
        while not run.done:
            run.step(executor)          # one averaging round, or the epoch's validation
        result = run.finish()           # chart + saved model (config.json + head.safetensors)

``train_head`` is exactly that loop (plus a progress bar). A scheduler that trains many
heads drives many runs: ``plan_round()`` gives the round's tasks and broadcast state,
``executor.map_reduce(fit_shard, plan.tasks, combine, shared=plan.shared, ...)`` runs it on
any executor, ``apply_round(plan, result, ...)`` takes the averaged parameters in (and logs
and checkpoints the round), and ``end_epoch(executor)`` validates; runs interleaved on one
executor each end with the head they end with alone, since everything a round does is a
function of the run's own state. ``RunState`` is the typed state a checkpoint holds.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from .. import jsonutil
from ..errors import InvalidParameterError, StoreError
from ..evaluation import cross_entropy, headline, metrics, predict_split, topk_key
from ..executor import Executor
from ..modeldir import CHECKPOINT, check_model_dir
from ..store import open_store
from . import checkpoint as ck
from . import telemetry
from .averaging import RoundState, ShardResult, average, combine, fit_shard
from .checkpoint import STATE_KEYS, CheckpointWriter, RunDir
from .heads import balanced_class_weights, head_params
from .loop import (NO_VAL_WARNING, PLOT, PLOT_EVERY_S, ROUNDS, VAL_METRICS, TrainConfig,
                   TrainingWarning, TrainResult, _diverged, _identity, _non_finite,
                   continue_with, early_stop, round_tasks, rounds_per_epoch)
from .optim import init_state, lr_at
from .shards import ShardTask, store_key
from .trainable import SuffixSpec, build_trainable

__all__ = ["RunState", "RoundPlan", "TrainRun"]


@dataclass
class RunState:
    """Where a run is: what its checkpoint holds besides the arrays (one JSON object)."""

    identity: dict[str, Any]  # options and training data the run was started with
    epoch: int = 0  # the epoch being trained (= epochs finished)
    round: int = 0  # the next round within it
    global_round: int = 0  # rounds run over the whole run
    iteration: int = 0  # minibatches per worker so far
    epoch_loss_sum: float = 0.0  # this epoch's sums so far: loss x examples,
    epoch_examples: int = 0  # examples,
    epoch_correct: int = 0  # right training predictions
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    best: dict[str, Any] | None = None  # epoch, iteration, score of the best head
    bad_epochs: int = 0  # epochs since the monitored score last improved
    done: bool = False
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in STATE_KEYS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunState":
        return cls(**{k: d[k] for k in STATE_KEYS})


@dataclass(frozen=True)
class RoundPlan:
    """One averaging round to run: ``executor.map_reduce(fit_shard, tasks, combine,
    shared=shared, affinity=affinity)``."""

    epoch: int
    round: int
    lr: float
    tasks: list[ShardTask]
    shared: RoundState

    @property
    def affinity(self) -> list[int]:
        return [t.part for t in self.tasks]


def check_trainable(store: Any, config: TrainConfig) -> np.ndarray:
    """What training refuses about a store, checked without an engine (``api.train`` calls
    it before starting one): unfinished chunks, no train rows, a ``train_from`` that does not
    fit the store, class weights that do not fit.
    Returns the train rows."""
    store.require_complete("training")
    train_rows = store.split_rows("train")
    if len(train_rows) == 0:
        raise StoreError(f"The feature store {store.url!r} has no training rows: featurize "
                         f"with a split that has a train part, e.g. "
                         f"--split train=0.7,val=0.1,test=0.2.")
    SuffixSpec.from_store(store.attrs, config.train_from)  # --train-from fits the store
    cw = config.class_weights
    if cw is not None and cw != "balanced" and len(cw) != len(store.classes):
        raise InvalidParameterError(
            f"The 'class_weights' parameter has {len(cw)} weights but the store has "
            f"{len(store.classes)} classes: give one weight per class, or 'balanced'.",
            param="class_weights")
    return train_rows


class TrainRun:
    """A training run in ``out_dir`` (a local folder or an fsspec URL), started or resumed.

    Creating it checks the store and the folder, and resumes the checkpoint there
    (``resume=True``, same settings; only ``epochs`` may grow) or starts over (only a run's
    own files are removed). ``workers`` is the number of averaging workers (the executor's,
    in ``train_head``). ``callback(record)`` gets each round's rounds.jsonl record once its
    checkpoint is written (in round order; the writes run in the background, so the call
    comes at the next round's ``apply_round`` or at the epoch's end).
    """

    def __init__(self, store_url: str, config: TrainConfig | Mapping[str, Any] | None,
                 out_dir: str, *, workers: int, storage_options: Mapping | None = None,
                 resume: bool = True, plot: bool = True,
                 callback: Callable[[dict[str, Any]], None] | None = None,
                 out_storage_options: Mapping | None = None):
        config = TrainConfig() if config is None else TrainConfig.from_dict(config)
        self.config = cfg = replace(config, workers=config.workers or int(workers))
        self.store_url, self.out_dir = store_url, out_dir
        self.storage_options = storage_options
        self.plot, self.callback = plot, callback
        check_model_dir(out_dir, store_url)
        self.store = store = open_store(store_url, storage_options=storage_options)
        train_rows = check_trainable(store, cfg)
        self.classes = store.classes
        self.in_dim = store.feature_dim
        #: the backbone stages trained in front of the head (None: the head alone)
        self.suffix = SuffixSpec.from_store(store.attrs, cfg.train_from)
        self.n_train, self.n_val = len(train_rows), len(store.split_rows("val"))
        n_classes = len(self.classes)
        class_weights = cfg.class_weights
        if class_weights == "balanced":
            labels = np.asarray(store["labels"][:])[train_rows]
            class_weights = balanced_class_weights(labels, n_classes)
        self.class_weights = class_weights
        self.key = store_key(store.attrs)
        self.rounds_per_epoch = rounds_per_epoch(self.n_train, cfg.workers,
                                                 cfg.batch_size_per_worker,
                                                 cfg.averaging_frequency)
        self.keeps_state = cfg.save_updater and cfg.optimizer.has_state
        identity = _identity(cfg, store)

        self.warnings = [] if self.n_val else [NO_VAL_WARNING]
        for w in self.warnings:
            warnings.warn(w, TrainingWarning, stacklevel=3)

        self.dir = RunDir(out_dir, out_storage_options)
        self.dir.make()
        self._ck_target = (self.dir, CHECKPOINT)
        if resume and self.dir.exists(CHECKPOINT):
            meta, self.params, self.opt_state, self.best_params = \
                ck.read_checkpoint(self.dir, CHECKPOINT)
            self.state = RunState.from_dict(meta)
            was_done = self.state.done
            continue_with(out_dir, self.state, identity, cfg, self.n_val)
            self.reused = was_done and self.state.done
            ck.truncate_rounds(self.dir, ROUNDS, self.state.global_round)
        else:
            self.reused = False
            # the suffix starts from the backbone's weights, the head from the seed
            head = build_trainable(self.suffix, cfg.head, self.in_dim, n_classes, seed=cfg.seed,
                                   pretrained=True)
            self.params = head_params(head)
            self.opt_state = init_state(cfg.optimizer, head) if self.keeps_state else None
            self.best_params = None
            self.state = RunState(identity=identity)
            self.dir.remove_run_files()  # an earlier run's: never other files
            ck.save_checkpoint(self._ck_target, self.state.to_dict(), self.params,
                               self.opt_state, self.best_params)
        self._writer = CheckpointWriter(self._ck_target)
        self._last_plot = time.perf_counter()
        self._t_epoch: float | None = None

    # -- the steps ----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state.done

    def plan_round(self) -> RoundPlan | None:
        """The next round of this epoch; None when the epoch's rounds are run (then
        ``end_epoch``) or the run is done."""
        st, cfg = self.state, self.config
        if st.done or st.round >= self.rounds_per_epoch:
            return None
        if self._t_epoch is None:
            self._t_epoch = time.perf_counter()
        epoch, rnd = st.epoch, st.round
        tasks = round_tasks(cfg, self.store_url, self.n_train, epoch, rnd,
                            storage_options=self.storage_options, key=self.key)
        lr = lr_at(cfg.optimizer, epoch, rnd, self.rounds_per_epoch, cfg.epochs)
        shared = RoundState(head=cfg.head, in_dim=self.in_dim, n_classes=len(self.classes),
                            params=self.params, optimizer=cfg.optimizer,
                            opt_state=self.opt_state if self.keeps_state else None, lr=lr,
                            epoch=epoch, round=rnd, seed=cfg.seed,
                            batch_size=cfg.batch_size_per_worker,
                            save_updater=cfg.save_updater,
                            label_smoothing=cfg.label_smoothing,
                            class_weights=self.class_weights, suffix=self.suffix,
                            suffix_lr_scale=cfg.suffix_lr_scale)
        return RoundPlan(epoch=epoch, round=rnd, lr=lr, tasks=tasks, shared=shared)

    def run_round(self, executor: Executor, plan: RoundPlan) -> dict[str, Any]:
        """Run ``plan`` on ``executor`` and apply it: the round's rounds.jsonl record."""
        started = time.time()
        t0 = time.perf_counter()
        res = executor.map_reduce(fit_shard, plan.tasks, combine, shared=plan.shared,
                                  affinity=plan.affinity)
        return self.apply_round(plan, res, started=started, round_s=time.perf_counter() - t0)

    def apply_round(self, plan: RoundPlan, res: ShardResult, *, started: float,
                    round_s: float) -> dict[str, Any]:
        """Take a round's combined result in: average, check, log, checkpoint (in the
        background). ``started``: its start (epoch seconds); ``round_s``: its wall time."""
        st, cfg = self.state, self.config
        epoch, rnd = plan.epoch, plan.round
        if (epoch, rnd) != (st.epoch, st.round):
            raise ValueError(f"a plan for epoch {epoch} round {rnd} applied at epoch "
                             f"{st.epoch} round {st.round}")
        new_params, new_state = average(res)
        if res.n_workers != len(plan.tasks):
            raise RuntimeError(f"round {rnd} of epoch {epoch}: {res.n_workers} results for "
                               f"{len(plan.tasks)} tasks; the engine lost or duplicated a task")
        # checked before anything of the round is logged or saved
        bad = _non_finite(new_params, new_state if self.keeps_state else None, res.loss_sum)
        if bad is not None:
            raise _diverged(bad, cfg, epoch, rnd, self.rounds_per_epoch, plan.lr,
                            self.dir.path(CHECKPOINT), st.global_round)
        self.params = new_params
        if self.keeps_state:
            self.opt_state = new_state
        record = {
            "epoch": epoch, "round": rnd, "global_round": st.global_round,
            "start_time": started, "iteration": st.iteration + res.steps,
            "loss": res.loss_sum / max(res.examples, 1),
            "train_accuracy": res.correct / max(res.examples, 1),
            "lr": plan.lr, "examples": res.examples, "workers": res.n_workers,
            "compute_seconds": res.compute_s, "compute_seconds_total": res.compute_s_sum,
            "round_seconds": round_s, "overhead_seconds": max(round_s - res.compute_s, 0.0),
        }
        self.dir.append_line(ROUNDS, jsonutil.dumps(record))
        telemetry.on_round(self, plan, res, record)  # train --log: the same record
        st.round += 1
        st.global_round += 1
        st.iteration = record["iteration"]
        st.epoch_loss_sum += res.loss_sum
        st.epoch_examples += res.examples
        st.epoch_correct += res.correct
        # written while the next round runs; the callback follows the write
        self.checkpoint(then=_checkpointed(record, self.callback))
        return record

    def end_epoch(self, executor: Executor) -> dict[str, Any]:
        """After the epoch's last round: validate on ``executor``, keep the best head, decide
        whether to stop, checkpoint. Returns the epoch's history entry."""
        st, cfg = self.state, self.config
        if st.done or st.round < self.rounds_per_epoch:
            raise ValueError(f"epoch {st.epoch} is not over ({st.round} of "
                             f"{self.rounds_per_epoch} rounds run)")
        t_epoch = self._t_epoch if self._t_epoch is not None else time.perf_counter()
        self._writer.flush()  # the epoch's last round is on disk, its callback run
        epoch, rpe = st.epoch, self.rounds_per_epoch
        entry: dict[str, Any] = {
            "epoch": epoch, "iteration": st.iteration, "global_round": st.global_round,
            "train_loss": st.epoch_loss_sum / max(st.epoch_examples, 1),
            "train_accuracy": st.epoch_correct / max(st.epoch_examples, 1),
            "lr": lr_at(cfg.optimizer, epoch, rpe - 1, rpe, cfg.epochs),
        }
        val_m = None
        if self.n_val:
            pred = predict_split(executor, self.store_url, self.params, cfg.head, "val",
                                 storage_options=self.storage_options,
                                 block_rows=cfg.val_block_rows, cache_bytes=cfg.cache_bytes,
                                 suffix=self.suffix)
            val_m = metrics(pred.labels, pred.logits, self.classes)
            val_m["loss"] = cross_entropy(pred.labels, pred.logits)
            top = topk_key(val_m)  # top5, or top{k} with fewer than 5 classes
            entry.update(val_top1=val_m["top1"], **{f"val_{top}": val_m[top]},
                         val_mean_per_class=val_m["mean_per_class"], val_loss=val_m["loss"])
            score = _monitor_value(cfg.monitor, entry)
            improved = st.best is None or score > st.best["score"] + cfg.min_delta
        else:  # no validation split: the last head is the best one
            score, improved = float("nan"), True
        entry["seconds"] = time.perf_counter() - t_epoch
        if improved:
            self.best_params = self.params
            st.best = {"epoch": epoch, "iteration": st.iteration, "score": score,
                       "monitor": cfg.monitor,
                       **{k: v for k, v in entry.items() if k.startswith("val_")}}
            st.bad_epochs = 0
            if val_m is not None:
                self.dir.write(VAL_METRICS, jsonutil.dumps(val_m))
        else:
            st.bad_epochs += 1
        entry["best"] = bool(improved)
        st.history.append(entry)
        st.epoch += 1
        st.round = 0
        st.epoch_loss_sum, st.epoch_examples, st.epoch_correct = 0.0, 0, 0
        early = early_stop(cfg, st, self.n_val)
        st.stopped_early = early and st.epoch < cfg.epochs
        st.done = early or st.epoch >= cfg.epochs
        self.checkpoint()
        if self.plot and (st.done or time.perf_counter() - self._last_plot > PLOT_EVERY_S):
            self._draw()
            self._last_plot = time.perf_counter()
        self._t_epoch = None
        return entry

    def step(self, executor: Executor) -> tuple[str, dict[str, Any]]:
        """One round (``("round", record)``) or, after the epoch's last, its end
        (``("epoch", entry)``)."""
        plan = self.plan_round()
        if plan is not None:
            return "round", self.run_round(executor, plan)
        return "epoch", self.end_epoch(executor)

    def checkpoint(self, then: Callable[[float, float], None] | None = None) -> None:
        """Write the state as it is now (in the background; ``then`` once it is written)."""
        self._writer.save(self.state.to_dict(), self.params, self.opt_state, self.best_params,
                          then=then)

    # -- the end ------------------------------------------------------------------------------
    def result(self) -> TrainResult:
        """What the run has (the best head so far, the history, ...)."""
        best_metrics = None
        if self.n_val and self.dir.exists(VAL_METRICS):
            best_metrics = json.loads(self.dir.read_bytes(VAL_METRICS).decode("utf-8"))
        st = self.state
        return TrainResult(
            params=self.best_params if self.best_params is not None else self.params,
            last_params=self.params, classes=self.classes, head=self.config.head,
            feature_dim=self.in_dim, config=self.config, history=list(st.history),
            best=st.best, best_metrics=best_metrics, rounds=st.global_round,
            rounds_per_epoch=self.rounds_per_epoch, stopped_early=st.stopped_early,
            out_dir=self.out_dir, reused=self.reused, warnings=list(self.warnings),
            suffix=self.suffix)

    def finish(self) -> TrainResult:
        """Once done: wait for the last checkpoint, draw the chart, save the model
        (``config.json`` + ``head.safetensors``; a reused run whose model is there writes
        nothing), close; the result."""
        if not self.state.done:
            raise ValueError(f"the run in {self.out_dir} is not done (epoch {self.state.epoch})")
        try:
            self._writer.flush()
        finally:
            self.close()
        if self.plot and not self.dir.exists(PLOT):
            self._draw()
        res = self.result()
        self.save_model(res)
        return res

    def save_model(self, res: TrainResult) -> None:
        """Write the model files of ``res`` (the one writer of ``config.json``), when the store
        says which backbone made its features (every store featurize makes does)."""
        from ..artifact import model_files, saved_model_matches

        attrs = self.store.attrs
        if not (isinstance(attrs.get("model"), Mapping) and isinstance(attrs.get("preprocess"),
                                                                        Mapping)):
            return  # a store made by hand, not by featurize: no backbone to save a model of
        training = res.config.to_dict()
        if res.reused and self.dir.local and saved_model_matches(self.dir.url, res.params,
                                                                  training):
            return
        files = model_files(
            params=res.params, head_config=res.head.to_dict(),
            store_attrs={**self.store.attrs, "store_url": self.store_url}, classes=res.classes,
            training=training,
            metrics=jsonutil.finite({  # no val split: NaN -> null
                "validation": res.best_metrics and headline(res.best_metrics),
                "best": res.best, "rounds": res.rounds, "stopped_early": res.stopped_early}),
            suffix=res.suffix)
        if res.reused and not self.dir.local and all(
                self.dir.exists(n) and self.dir.read_bytes(n) == b for n, b in files.items()):
            return
        for name, data in files.items():
            self.dir.write(name, data)

    def close(self) -> None:
        """Finish the checkpoint in flight (without its callback) and stop the writer."""
        self._writer.close()

    def __enter__(self) -> "TrainRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _draw(self) -> None:
        from .plot import plot_training, read_rounds

        if self.dir.local:  # plot_training writes atomically itself
            plot_training(read_rounds(self.dir.path(ROUNDS)), self.state.history,
                          self.dir.path(PLOT))
            return
        with self.dir.local_copy(ROUNDS) as rounds, self.dir.target(PLOT) as tmp:
            plot_training(read_rounds(rounds), self.state.history, tmp)


def _monitor_value(monitor: str, entry: Mapping[str, Any]) -> float:
    """Higher is better."""
    if monitor == "loss":
        return -float(entry["val_loss"])
    return float(entry["val_" + monitor])


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
