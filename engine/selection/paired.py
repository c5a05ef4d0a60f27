"""Choosing the search's winner against the incumbent: a paired comparison on validation.

The incumbent is the head one would have trained without searching (the search's trial 0,
``train``'s defaults). Among the trials of the last rung, the one with the best validation
score replaces it only if it beats it by more than the noise of the validation split: the
difference of their scores on the *same* validation images must exceed ``threshold`` times
its standard error (Breiman's one-standard-error rule, applied to the paired difference).
Otherwise the incumbent is selected. On a few hundred validation images the standard error of
an accuracy is about a point, more than what separates good heads on frozen features, and the
best of many trials on such a split is mostly the luckiest: without this rule the search is
worse than no search about as often as it is better.

The standard error comes from a seeded paired bootstrap stratified by class: each replicate
draws, within every class, as many of that class's validation images as it has (with
replacement), and scores both heads on the same draw, so the correlation of their mistakes
counts (two heads that err on the same images differ by little, with a small error) and
every class keeps its support (mean per-class accuracy is defined on each replicate).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["SELECTIONS", "N_BOOTSTRAP", "metric_value", "paired_difference", "choose"]

#: ``one-se``: the incumbent unless a finalist beats it by more than ``threshold`` standard
#: errors of the paired difference; ``best``: the best validation score, whatever the noise
SELECTIONS = ("one-se", "best")
N_BOOTSTRAP = 2000


def metric_value(pred: np.ndarray, y: np.ndarray, n_classes: int, metric: str) -> float:
    """``top1`` or ``mean_per_class`` (mean over the classes present of their recall)."""
    right = np.asarray(pred) == np.asarray(y)
    if metric == "top1":
        return float(right.mean())
    support = np.bincount(y, minlength=n_classes)
    hits = np.bincount(y, weights=right, minlength=n_classes)
    present = support > 0
    return float((hits[present] / support[present]).mean())


#: indices drawn at once (bounds the bootstrap's memory on large validation splits)
_DRAW_BLOCK = 1 << 21


def paired_difference(pred_a: np.ndarray, pred_b: np.ndarray, y: np.ndarray, n_classes: int,
                      metric: str, *, n_boot: int = N_BOOTSTRAP, seed: int = 0
                      ) -> tuple[float, float]:
    """(metric(a) - metric(b), its bootstrap standard error) on the same images ``y``.

    The replicates depend on ``y`` and ``seed`` only (the same draws for every pair of
    heads compared on these images: common random numbers)."""
    y = np.asarray(y, np.int64)
    diff = (metric_value(pred_a, y, n_classes, metric)
            - metric_value(pred_b, y, n_classes, metric))
    d = (np.asarray(pred_a) == y).astype(np.float64) - (np.asarray(pred_b) == y)
    classes = [np.flatnonzero(y == c) for c in np.unique(y)]
    rng = np.random.default_rng([seed, 15, 1])
    reps = np.zeros(n_boot)
    block = max(1, _DRAW_BLOCK // max(len(y), 1))
    for lo in range(0, n_boot, block):
        n = min(block, n_boot - lo)
        for members in classes:  # within each class, as many draws as it has images
            got = d[members[rng.integers(0, len(members), size=(n, len(members)))]]
            # top1: every class keeps its count, so it is the total over the classes
            reps[lo:lo + n] += got.sum(1) / len(y) if metric == "top1" else \
                got.mean(1) / len(classes)
    return diff, float(np.std(reps, ddof=1)) if n_boot > 1 else 0.0


def choose(finalists: Sequence[int], scores: Mapping[int, Any],
           predictions: Mapping[int, np.ndarray], y: np.ndarray, n_classes: int, *,
           metric: str, incumbent: int | None, rule: str = "one-se", threshold: float = 1.0,
           seed: int = 0, n_boot: int = N_BOOTSTRAP) -> dict[str, Any]:
    """The winner among ``finalists`` (the last rung's trials; ``scores``: their validation
    score, None for a diverged trial) and the record of why (see the module docstring).

    Returns ``{"rule", "threshold", "incumbent", "leader", "winner", "reason", "finalists":
    [{"trial", "val_score", "diff_vs_incumbent", "diff_se", "z"}]}``.
    """
    ok = [t for t in finalists if scores.get(t) is not None]
    leader = min(ok, key=lambda t: (-scores[t], t)) if ok else min(finalists)
    rows = []
    inc_ok = incumbent is not None and incumbent in ok and incumbent in predictions
    for t in sorted(finalists):
        row: dict[str, Any] = {"trial": t, "val_score": scores.get(t), "diff_vs_incumbent": None,
                               "diff_se": None, "z": None}
        if inc_ok and t in ok and t != incumbent and t in predictions:
            diff, se = paired_difference(predictions[t], predictions[incumbent], y, n_classes,
                                         metric, n_boot=n_boot, seed=seed)
            row.update(diff_vs_incumbent=diff, diff_se=se,
                       z=(diff / se) if se > 0 else None)
        elif inc_ok and t == incumbent:
            row.update(diff_vs_incumbent=0.0, diff_se=0.0)
        rows.append(row)
    out = {"rule": rule, "threshold": threshold, "metric": metric, "incumbent": incumbent,
           "leader": leader, "n_bootstrap": n_boot, "finalists": rows}
    if rule == "best":
        return {**out, "winner": leader, "reason": "best validation score (--selection best)"}
    if not inc_ok:
        why = ("there is no incumbent (grid sampling, --no-baseline, or a default head the "
               "space cannot express)" if incumbent is None else "the incumbent diverged")
        return {**out, "winner": leader, "reason": f"best validation score: {why}"}
    if leader == incumbent:
        return {**out, "winner": incumbent,
                "reason": "the incumbent has the best validation score"}
    lead = next(r for r in rows if r["trial"] == leader)
    diff, se = lead["diff_vs_incumbent"], lead["diff_se"]
    if diff > threshold * se:
        return {**out, "winner": leader,
                "reason": f"trial {leader} beats the incumbent by {diff:+.4f} on validation "
                          f"{metric}, more than {threshold:g} standard error(s) ({se:.4f}) "
                          f"of the paired difference"}
    return {**out, "winner": incumbent,
            "reason": f"the best trial ({leader}) is {diff:+.4f} from the incumbent on "
                      f"validation {metric}, within {threshold:g} standard error(s) ({se:.4f}) "
                      f"of the paired difference: the incumbent is kept"}
