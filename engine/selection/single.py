"""One trial per task, with the project's own worker step: for what cannot be stacked.

A trial that fine-tunes backbone stages (``train_from`` a stage, on a store of maps) has a
network per trial, so it is not vectorized: its task runs ``training.averaging.fit_shard``
with one worker and one round per epoch (exactly ``train_head`` with ``workers=1`` and
``averaging_frequency >= ceil(n_train / batch)``), then scores the module on the validation
split. Same inputs, same result: a rerun task gives the same numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from ..training.averaging import RoundState, average, fit_shard, one_torch_thread
from ..training.heads import head_params, load_params
from ..training.optim import lr_at
from ..training.shards import ShardTask, split_rows
from ..training.trainable import SuffixSpec, build_trainable, worker_module
from .vectorized import GroupResult, TrialSpec, _eval_data, accuracy_scores

__all__ = ["SingleTask", "train_single"]


@dataclass(frozen=True)
class SingleTask:
    """One trial (``TrialSpec``) with its suffix; ``state``: (params, opt_state) to go on from."""

    store_url: str
    storage_options: Mapping[str, Any]
    store_key: str
    trial: TrialSpec
    suffix: SuffixSpec | None
    batch_size: int
    suffix_lr_scale: float = 0.1
    state: Any = None
    eval_splits: tuple[str, ...] = ("val",)
    return_state: bool = True
    cache_bytes: int = 1 << 30
    return_predictions: bool = False


def train_single(task: SingleTask, shared: Any = None) -> GroupResult:
    """Train one trial from ``start_epoch`` to ``stop_epoch`` and score it."""
    from ..store import cached_store

    t0 = time.perf_counter()
    t = task.trial
    store = cached_store(task.store_url, task.storage_options)
    n_classes, in_dim = len(store.classes), store.feature_dim
    n_train = len(split_rows(task.store_url, "train", task.storage_options, task.store_key))
    if task.state is None:
        params = head_params(build_trainable(task.suffix, t.head, in_dim, n_classes, seed=t.seed,
                                             pretrained=True))
        opt_state = None
    else:
        params, opt_state = task.state
    loss_sum, seen, correct, diverged = 0.0, 0, 0, False
    for epoch in range(t.start_epoch, t.stop_epoch):
        shard = ShardTask(store_url=task.store_url, split="train", seed=t.seed, epoch=epoch,
                          n_parts=1, part=0, offset=0, count=n_train, repartition="epoch",
                          storage_options=dict(task.storage_options), store_key=task.store_key,
                          cache_bytes=task.cache_bytes)
        shared_state = RoundState(
            head=t.head, in_dim=in_dim, n_classes=n_classes, params=params,
            optimizer=t.optimizer, opt_state=opt_state,
            lr=lr_at(t.optimizer, epoch, 0, 1, t.epochs), epoch=epoch, round=0, seed=t.seed,
            batch_size=task.batch_size, save_updater=True, label_smoothing=t.label_smoothing,
            suffix=task.suffix, suffix_lr_scale=task.suffix_lr_scale)
        res = fit_shard(shard, shared_state)
        params, new_state = average(res)
        opt_state = new_state if new_state is not None else opt_state
        loss_sum, seen, correct = loss_sum + res.loss_sum, seen + res.examples, correct + res.correct
        if not np.isfinite(res.loss_sum) or not all(np.isfinite(v).all() for v in params.values()
                                                     if v.dtype.kind == "f"):
            diverged = True
            break
    scores: dict[str, Any] = {"train_loss": None if diverged else loss_sum / max(seen, 1),
                              "train_accuracy": correct / max(seen, 1) if seen else None}
    preds: dict[str, np.ndarray] = {}
    if not diverged:
        with one_torch_thread(), torch.no_grad():
            module = worker_module(task.suffix, t.head, in_dim, n_classes)
            load_params(module, params)
            module.eval()
            for split in task.eval_splits:
                x, y = _eval_data(task, split)
                if len(y) == 0:
                    continue
                logits = torch.cat([module(torch.from_numpy(np.ascontiguousarray(x[s:s + 256])))
                                    for s in range(0, len(y), 256)])
                scores[split] = accuracy_scores(logits.unsqueeze(0), y, n_classes)[0]
                preds[split] = logits.argmax(-1).numpy().astype(np.int32)
    state = (params, opt_state) if task.return_state else None
    return GroupResult(trials=[t.trial], scores=[scores], states=[state] if task.return_state
                       else None, seconds=time.perf_counter() - t0, diverged=[diverged],
                       predictions=[preds] if task.return_predictions else None)
