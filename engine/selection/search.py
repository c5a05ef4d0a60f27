"""Head search: sample trials, train them as stacks on the engine, halve, retrain the best.

    result = run_search(executor, "features.zarr", "search/", trials=64)

1. ``SearchSpace.sample`` draws the trials (seeded); each is a ``TrainConfig``
   (``space.trial_train_config``) on top of the base options.
2. Rung by rung (``halving``), the trials still in are grouped by structure
   (``vectorized.structure_key``) into at least ``executor.n_workers`` groups of at most
   ``max_group`` trials; each group is one engine task (``vectorized.train_group``; a trial
   fine-tuning backbone stages is a task of its own, ``single.train_single``) that trains its
   trials to the rung's epochs and scores them on the validation split. A task's result is a
   function of its inputs, so an engine that reruns a task (a dead worker) changes nothing.
   The incumbent (trial 0, the head ``train`` would train: ``plan_trials``' baseline) goes
   on at every rung whatever its score: a control arm trained to the whole budget.
3. The winner is chosen among the last rung's trials (``paired.choose``): with
   ``selection="one-se"`` (default) the best of them replaces the incumbent only if it beats
   it on the validation images by more than ``selection_threshold`` standard errors of the
   paired difference; ``"best"``: the best validation score. It is trained again with
   parameter averaging (``training.train_head``) into ``out_dir``: a normal model directory.
4. ``search_results.csv`` / ``search_results.json`` (one row per trial: its options, its
   validation score at each rung, its rank and fit time: scikit-learn's ``cv_results_`` in
   spirit) and ``best_config.json`` (the ``TrainConfig`` of the best trial) go beside it.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from .. import jsonutil
from ..errors import InvalidParameterError, StoreError, check_choice, check_int
from ..executor import Executor
from ..files import atomic_write
from .halving import n_rungs, promote, ranks, rung_epochs
from .paired import SELECTIONS, choose
from .space import OPTIONS, SearchSpace, baseline_params, trial_train_config
from .single import SingleTask, train_single
from .tables import csv_text
from .vectorized import GroupTask, TrialSpec, structure_key, train_group

SEARCH_FORMAT = "deeptransfer.search/1"
RESULTS_CSV = "search_results.csv"
RESULTS_JSON = "search_results.json"
BEST_CONFIG = "best_config.json"
SEARCH_FILES = (RESULTS_CSV, RESULTS_JSON, BEST_CONFIG)
METRICS = ("top1", "mean_per_class")
#: what promotes trials from rung to rung: the validation ``metric`` or the validation loss
PROMOTE_BY = ("score", "loss")
#: floats of parameters one group task holds at most (x4 for gradients and Adam's moments)
MAX_GROUP_PARAMS = 1 << 25


@dataclass
class SearchResult:
    """What ``run_search`` returns (and writes into ``out_dir``)."""

    results: list[dict[str, Any]]  # one row per trial (search_results.json's "results")
    best: dict[str, Any]  # the best trial: id, params, val score, TrainConfig
    rungs: int
    seconds: float  # the search, without the retraining
    train_result: Any = None  # training.TrainResult of the retrained best model
    out_dir: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


def check_search_options(*, trials: int | None, sampler: str, eta: int, metric: str,
                         max_group: int, halving: bool, selection: str = "one-se",
                         selection_threshold: float = 1.0, promote_by: str = "score") -> None:
    w = "search"
    check_choice("selection", selection, SELECTIONS, where=w)
    check_choice("promote_by", promote_by, PROMOTE_BY, where=w)
    if (isinstance(selection_threshold, bool) or not isinstance(selection_threshold, (int, float))
            or not math.isfinite(selection_threshold) or selection_threshold < 0):
        raise InvalidParameterError(
            f"The 'selection_threshold' parameter of search must be a number >= 0 (standard "
            f"errors). Got {selection_threshold!r}.", param="selection_threshold")
    if trials is not None:
        check_int("trials", trials, low=1, where=w)
    check_choice("sampler", sampler, ("random", "grid"), where=w)
    check_int("eta", eta, low=2, where=w)
    check_choice("metric", metric, METRICS, where=w)
    check_int("max_group", max_group, low=1, where=w)
    if not isinstance(halving, bool):
        raise InvalidParameterError(f"The 'halving' parameter of search must be a bool. Got "
                                    f"{halving!r}.", param="halving")


def check_search_out(out_dir: str, store_url: str) -> None:
    """OUT is what ``train`` accepts as a model directory (new, empty, or one of ours), said
    in the search's words."""
    from ..errors import DeeptransferError
    from ..modeldir import check_model_dir

    try:
        check_model_dir(out_dir, store_url)
    except DeeptransferError as exc:
        msg = str(exc).replace("MODEL_DIR", "OUT").replace("train writes", "search writes")
        raise type(exc)(msg) from None


def plan_trials(store: Any, space: SearchSpace, base: Any, *, trials: int | None, sampler: str,
                seed: int, baseline: bool = True) -> list[tuple[dict[str, Any], Any]]:
    """The trials' options and TrainConfigs, checked against the store (before any engine).

    With ``baseline`` (random sampling), trial 0 is ``base``'s own head and options (what
    ``train`` would train: ``space.baseline_params``), so the search is measured against it
    and the best trial is at least as good on validation; the others are drawn."""
    from ..training.trainable import SuffixSpec

    params = []
    first = baseline_params(base, space) if baseline and sampler == "random" else None
    if first is not None:
        params.append(first)
    if trials is None or trials > len(params):
        params += space.sample(None if trials is None else trials - len(params), seed=seed,
                               method=sampler)
    out = []
    for p in params:
        cfg = trial_train_config(p, base)
        SuffixSpec.from_store(store.attrs, cfg.train_from)  # a train_from that does not fit
        out.append((p, cfg))
    if not out:
        raise InvalidParameterError("The search space gives no trials.", param="trials")
    return out


def _groups(specs: list[tuple[TrialSpec, Any]], n_workers: int, max_group: int, in_dim: int,
            n_classes: int) -> list[list[tuple[TrialSpec, Any]]]:
    """Trials of one structure in chunks: at most ``max_group`` and MAX_GROUP_PARAMS each,
    and enough chunks for every worker to have one when there are trials enough."""
    by_key: dict[tuple, list[tuple[TrialSpec, Any]]] = {}
    for s in specs:
        by_key.setdefault(structure_key(s[0].head, s[0].optimizer), []).append(s)
    keys = list(by_key)
    chunks_per = {k: 1 for k in keys}
    for k in keys:
        h = by_key[k][0][0].head
        widths = [in_dim, *h.hidden, n_classes]
        per_trial = sum(a * b + b for a, b in zip(widths, widths[1:]))
        cap = max(1, min(max_group, MAX_GROUP_PARAMS // max(per_trial, 1)))
        chunks_per[k] = math.ceil(len(by_key[k]) / cap)
    # more chunks for the largest groups until every worker has a task (or trials run out)
    while sum(chunks_per.values()) < n_workers:
        k = max(keys, key=lambda k: len(by_key[k]) / chunks_per[k])
        if chunks_per[k] >= len(by_key[k]):
            break
        chunks_per[k] += 1
    out = []
    for k in keys:
        members = by_key[k]
        for part in np.array_split(np.arange(len(members)), chunks_per[k]):
            if len(part):
                out.append([members[i] for i in part])
    # the costliest first (longest-processing-time order: engines hand tasks out in order, so
    # the last tasks to start are the short ones and the workers finish close together)
    return sorted(out, key=lambda g: -_cost(g, in_dim, n_classes))


def _cost(group: list[tuple[TrialSpec, Any]], in_dim: int, n_classes: int) -> float:
    """A group's work, roughly: trial-epochs x parameters, x1.5 with batch norm (its
    backward pass multiplies through the first layer's input)."""
    total = 0.0
    for spec, _ in group:
        widths = [in_dim, *spec.head.hidden, n_classes]
        params = sum(a * b + b for a, b in zip(widths, widths[1:]))
        total += (spec.stop_epoch - spec.start_epoch) * params * (1.5 if spec.head.batch_norm
                                                                  else 1.0)
    return total


def run_search(executor: Executor, store_url: str, out_dir: str, *, trials: int | None = 64,
               space: Any = None, sampler: str = "random", halving: bool = True, eta: int = 3,
               metric: str = "top1", seed: int = 0, base: Any = None, max_group: int = 64,
               storage_options: Mapping | None = None, retrain: bool = True,
               progress: bool = True, baseline: bool = True, max_rungs: int = 4,
               selection: str = "one-se", selection_threshold: float = 1.0,
               promote_by: str = "score") -> SearchResult:
    """Search heads on ``store_url``'s features on ``executor`` (see the module docstring).

    ``base``: the TrainConfig (or dict) the trials start from (batch size, seed, patience
    and averaging options of the retraining). ``metric``: the validation score that ranks
    trials, ``top1`` or ``mean_per_class``. ``selection``: ``one-se`` or ``best`` (see
    ``paired``); ``selection_threshold``: in standard errors of the paired difference.
    ``promote_by``: ``score`` (the metric) or ``loss`` (validation cross entropy) between
    rungs.
    """
    from ..store import open_store
    from ..training import TrainConfig, check_trainable, train_head
    from ..training.shards import store_key
    from ..training.trainable import SuffixSpec

    check_search_options(trials=trials, sampler=sampler, eta=eta, metric=metric,
                         max_group=max_group, halving=halving, selection=selection,
                         selection_threshold=selection_threshold, promote_by=promote_by)
    base = TrainConfig() if base is None else TrainConfig.from_dict(base)
    space = SearchSpace.from_dict(space) if not isinstance(space, SearchSpace) else space
    check_search_out(out_dir, store_url)
    store = open_store(store_url, storage_options=storage_options)
    check_trainable(store, base)
    if len(store.split_rows("val")) == 0:
        raise StoreError(f"The feature store {store_url!r} has no validation rows, which the "
                         f"search scores trials on: featurize with a val part (e.g. --split "
                         f"train=0.7,val=0.1,test=0.2 or --per-class-val 5).")
    planned = plan_trials(store, space, base, trials=trials, sampler=sampler, seed=seed,
                          baseline=baseline)
    n_baseline = int(baseline and sampler == "random"
                     and baseline_params(base, space) is not None)
    key = store_key(store.attrs)
    opts = dict(storage_options or {})
    n_classes, in_dim = len(store.classes), store.feature_dim
    if store.maps:
        in_dim = int(store.feature_shape[0])  # trials on the head alone see the pooled maps
    check_int("max_rungs", max_rungs, low=1, where="search")
    K = n_rungs(len(planned), eta, max_rungs) if halving else 1
    t_start = time.perf_counter()

    specs: dict[int, TrialSpec] = {}
    suffixes: dict[int, Any] = {}
    targets: dict[int, list[int]] = {}
    for i, (_, cfg) in enumerate(planned):
        specs[i] = TrialSpec(trial=i, head=cfg.head, optimizer=cfg.optimizer,
                             label_smoothing=cfg.label_smoothing, seed=cfg.seed,
                             epochs=cfg.epochs, start_epoch=0, stop_epoch=0)
        suffixes[i] = SuffixSpec.from_store(store.attrs, cfg.train_from)
        targets[i] = rung_epochs(cfg.epochs, eta, K)
    rows: dict[int, dict[str, Any]] = {i: {"rungs": [], "fit_seconds": 0.0, "diverged": False}
                                       for i in specs}
    states: dict[int, Any] = {}
    alive = sorted(specs)
    rung_log: list[dict[str, Any]] = []
    val_preds: dict[int, np.ndarray] = {}
    incumbent = 0 if n_baseline else None
    for k in range(K):
        last = k == K - 1
        tasks: list[Any] = []
        done_before: dict[int, int] = {}
        vec: list[tuple[TrialSpec, Any]] = []
        for i in alive:
            start = rows[i]["rungs"][-1]["epochs"] if rows[i]["rungs"] else 0
            done_before[i] = start
            spec = replace(specs[i], start_epoch=start, stop_epoch=targets[i][k])
            sfx = suffixes[i]
            if sfx is not None and sfx.train_from:  # fine-tuned stages: one task per trial
                tasks.append(SingleTask(store_url, opts, key, spec, sfx,
                                        batch_size=base.batch_size_per_worker,
                                        suffix_lr_scale=base.suffix_lr_scale,
                                        state=states.get(i), return_state=not last,
                                        cache_bytes=base.cache_bytes,
                                        return_predictions=last))
            else:
                vec.append((spec, states.get(i)))
        for group in _groups(vec, max(1, int(executor.n_workers)), max_group, in_dim, n_classes):
            st = tuple(s for _, s in group)
            tasks.append(GroupTask(store_url, opts, key, tuple(s for s, _ in group),
                                   batch_size=base.batch_size_per_worker,
                                   states=None if all(s is None for s in st) else st,
                                   return_state=not last, cache_bytes=base.cache_bytes,
                                   return_predictions=last))
        scores: dict[int, Any] = {}
        promote_scores: dict[int, Any] = {}
        t_rung, task_s = time.perf_counter(), 0.0
        for _, res in _run(executor, tasks, progress, f"rung {k + 1}/{K}"):
            task_s += res.seconds
            share = res.seconds / max(len(res.trials), 1)
            for j, i in enumerate(res.trials):
                sc = res.scores[j]
                val = sc.get("val") or {}
                score = val.get(metric)
                rows[i]["fit_seconds"] += share
                rows[i]["diverged"] = bool(res.diverged[j])
                rows[i]["rungs"].append({
                    "rung": k, "epochs": targets[i][k], "val_score": score,
                    "val_top1": val.get("top1"), "val_mean_per_class": val.get("mean_per_class"),
                    "val_loss": val.get("loss"),
                    "train_loss": sc.get("train_loss"), "train_accuracy": sc.get("train_accuracy")})
                scores[i] = None if res.diverged[j] else score
                loss = val.get("loss")
                promote_scores[i] = scores[i] if promote_by == "score" else (
                    None if res.diverged[j] or loss is None else -loss)
                if res.predictions is not None and "val" in res.predictions[j]:
                    val_preds[i] = np.asarray(res.predictions[j]["val"])
                if res.states is not None:
                    states[i] = res.states[j]
        rung_log.append({"rung": k, "trials": len(alive), "tasks": len(tasks),
                         "epochs": sorted({targets[i][k] for i in alive}),
                         "seconds": time.perf_counter() - t_rung, "task_seconds": task_s})
        if progress:
            best_now = max((s for s in scores.values() if s is not None), default=None)
            print(f"search: rung {k + 1}/{K}: {len(alive)} trials in {len(tasks)} tasks to "
                  f"{rung_log[-1]['epochs']} epochs in {rung_log[-1]['seconds']:.1f} s (tasks "
                  f"{task_s:.1f} s), best val {metric} "
                  f"{'n/a' if best_now is None else f'{best_now:.4f}'}", file=sys.stderr)
        if not last:
            alive = promote(promote_scores, eta, keep=() if incumbent is None else (incumbent,))
            states = {i: states[i] for i in alive if i in states}
    seconds = time.perf_counter() - t_start

    final = [(i, len(r["rungs"]) - 1, None if r["diverged"] else r["rungs"][-1]["val_score"])
             for i, r in rows.items()]
    rank = ranks(final)
    finalists = sorted(i for i, r in rows.items() if len(r["rungs"]) == K)
    chosen = choose(finalists, {i: scores[i] for i in finalists}, val_preds,
                    _val_labels(store_url, storage_options, key), n_classes, metric=metric,
                    incumbent=incumbent, rule=selection, threshold=float(selection_threshold),
                    seed=seed)
    best_id = chosen["winner"]
    vs = {f["trial"]: f for f in chosen["finalists"]}
    results = [_row(i, planned[i][0], rows[i], rank[i], K, baseline=i < n_baseline,
                    selected=i == best_id, vs=vs.get(i)) for i in sorted(rows)]
    for f in chosen["finalists"]:  # what the differences were computed from (for checks)
        p = val_preds.get(f["trial"])
        f["val_predictions"] = None if p is None else p.tolist()
    if rows[best_id]["diverged"]:
        raise InvalidParameterError(
            "Every trial of the search diverged (its loss became NaN or infinite): lower the "
            "learning rates of the search space (--space).", param="space")
    best_cfg = planned[best_id][1]
    best = {"trial": best_id, "params": planned[best_id][0],
            "val_score": rows[best_id]["rungs"][-1]["val_score"], "metric": metric,
            "reason": chosen["reason"], "train_config": best_cfg.to_dict()}
    summary = {"format": SEARCH_FORMAT, "store": store_url, "trials": len(planned),
               "baseline_trial": 0 if n_baseline else None,
               "sampler": sampler, "seed": seed, "halving": {"on": halving, "eta": eta,
                                                              "rungs": K},
               "metric": metric, "promote_by": promote_by, "space": space.to_dict(),
               "search_seconds": seconds, "rungs": rung_log, "selection": chosen,
               "best": best, "model_dir": out_dir}
    train_result = None
    if retrain:
        if progress:
            print(f"search: selected trial {best_id}: {chosen['reason']}", file=sys.stderr)
            print(f"search: retraining trial {best_id} with parameter averaging into {out_dir}",
                  file=sys.stderr)
        train_result = train_head(executor, store_url, replace(best_cfg, workers=base.workers or max(1, int(executor.n_workers))), out_dir,
                                  storage_options=storage_options, resume=False,
                                  progress=progress)
        summary["retrained"] = {"best_epoch": (train_result.best or {}).get("epoch"),
                                "val_top1": (train_result.best or {}).get("val_top1"),
                                "val_mean_per_class":
                                    (train_result.best or {}).get("val_mean_per_class"),
                                "rounds": train_result.rounds}
    write_results(out_dir, summary, results, best_cfg.to_dict())
    return SearchResult(results=results, best=best, rungs=K, seconds=seconds,
                        train_result=train_result, out_dir=out_dir, summary=summary)


def _run(executor: Executor, tasks: Sequence[Any], progress: bool, desc: str):
    """The tasks on the engine (group tasks and single-trial tasks), as they finish."""
    vec = [t for t in tasks if isinstance(t, GroupTask)]
    single = [t for t in tasks if isinstance(t, SingleTask)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=f"search {desc}", unit="task", dynamic_ncols=True)
    try:
        for fn, part in ((train_group, vec), (train_single, single)):
            if part:
                for i, res in executor.map_unordered(fn, part):
                    if bar is not None:
                        bar.update(1)
                    yield i, res
    finally:
        if bar is not None:
            bar.close()


def _val_labels(store_url: str, storage_options: Mapping | None, key: str) -> np.ndarray:
    """The validation rows' labels, in the order the tasks score them."""
    from ..store import cached_store
    from ..training.shards import split_rows

    rows = split_rows(store_url, "val", dict(storage_options or {}), key)
    store = cached_store(store_url, dict(storage_options or {}))
    return np.asarray(store.group["labels"][:], np.int64)[np.asarray(rows)]


def _row(i: int, params: Mapping[str, Any], r: Mapping[str, Any], rank: int, K: int, *,
         baseline: bool = False, selected: bool = False,
         vs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One row of the results table. ``rank``: by validation score (the last rung reached
    first); ``selected``: the trial the search chose (the rank-1 trial, or the incumbent
    when the rank-1 trial does not beat it by more than the noise); ``vs``: its paired
    comparison with the incumbent (finalists only)."""
    last = r["rungs"][-1]
    row: dict[str, Any] = {"trial": i, "rank": rank, "baseline": baseline, "selected": selected}
    row.update({f"param_{k}": params.get(k) for k in OPTIONS})
    row.update({"val_score": None if r["diverged"] else last["val_score"],
                "val_diff_vs_incumbent": (vs or {}).get("diff_vs_incumbent"),
                "val_diff_se": (vs or {}).get("diff_se"),
                "val_top1": last["val_top1"], "val_mean_per_class": last["val_mean_per_class"],
                "val_loss": last["val_loss"],
                "train_loss": last["train_loss"], "train_accuracy": last["train_accuracy"],
                "epochs_trained": last["epochs"], "rung_reached": last["rung"],
                "diverged": r["diverged"], "fit_seconds": r["fit_seconds"]})
    for k in range(K):
        got = r["rungs"][k] if k < len(r["rungs"]) else None
        row[f"rung{k}_epochs"] = got["epochs"] if got else None
        row[f"rung{k}_val_score"] = got["val_score"] if got else None
        row[f"rung{k}_val_loss"] = got["val_loss"] if got else None
    return row


def write_results(out_dir: str, summary: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                  best_config: Mapping[str, Any]) -> None:
    """search_results.csv / .json and best_config.json in ``out_dir`` (atomically each)."""
    from ..files import make_dirs

    make_dirs(out_dir)
    atomic_write(os.path.join(out_dir, RESULTS_CSV), csv_text(results))
    atomic_write(os.path.join(out_dir, RESULTS_JSON),
                 jsonutil.dumps({**summary, "results": list(results)}, indent=1) + "\n")
    atomic_write(os.path.join(out_dir, BEST_CONFIG),
                 jsonutil.dumps({"format": SEARCH_FORMAT, **best_config}, indent=1) + "\n")


def read_results(out_dir: str) -> dict[str, Any]:
    """search_results.json of a finished search (for reports)."""
    import json

    with open(os.path.join(out_dir, RESULTS_JSON), encoding="utf-8") as f:
        return json.load(f)


__all__ = ["run_search", "SearchResult", "check_search_options", "plan_trials", "write_results",
           "read_results", "SEARCH_FILES", "RESULTS_CSV", "RESULTS_JSON", "BEST_CONFIG"]
