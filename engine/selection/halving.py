"""Successive halving on validation accuracy (the rungs of ASHA, run synchronously).

Every trial has a budget in epochs. Rung ``k`` of ``K`` trains a trial to
``ceil(epochs / eta ** (K - 1 - k))`` epochs (at least 1), so the last rung is its whole
budget; after each rung but the last, the best ``ceil(n / eta)`` trials by validation score
go on (from where they are: their parameters and optimizer state travel to the next rung),
the rest stop. ASHA (Li et al. 2020) promotes asynchronously so that workers never wait; the
trials here advance as stacks -- one task trains many at once -- so a rung ends when its
tasks do, and the promotions are the synchronous ones: the same trials reach the last rung
on every engine, whatever order tasks finish in.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def n_rungs(n_trials: int, eta: int, max_rungs: int = 4) -> int:
    """Rungs so that about one trial is left at the last: ``1 + floor(log_eta(n))``, capped."""
    if n_trials <= 1:
        return 1
    return max(1, min(max_rungs, 1 + int(math.floor(math.log(n_trials) / math.log(eta) + 1e-9))))


def rung_epochs(epochs: int, eta: int, rungs: int) -> list[int]:
    """The epochs a trial with budget ``epochs`` has trained at the end of each rung."""
    return [max(1, math.ceil(epochs / eta ** (rungs - 1 - k) - 1e-9)) for k in range(rungs)]


def promote(scores: Mapping[int, Any], eta: int, keep: Sequence[int] = ()) -> list[int]:
    """The trials that go on: the best ``ceil(n / eta)`` by score (higher is better; None, a
    diverged trial, last; ties to the lower trial id), and the trials of ``keep`` that are
    still in (the incumbent: a control arm that reaches the last rung whatever its early
    scores), in trial order."""
    n_keep = max(1, math.ceil(len(scores) / eta))
    ranked = sorted(scores, key=lambda t: (scores[t] is None, -(scores[t] or 0.0), t))
    kept = [t for t in keep if t in scores and scores[t] is not None]
    return sorted(set(ranked[:n_keep]) | set(kept))


def ranks(final: Sequence[tuple[int, int, Any]]) -> dict[int, int]:
    """Rank (1 = best) of each trial from (trial, last rung reached, score at it; None: it
    diverged): a trial that went further ranks above one that stopped earlier, then by
    score; diverged trials last."""
    order = sorted(final, key=lambda r: (r[2] is None, -r[1], -(r[2] or 0.0), r[0]))
    return {t: i + 1 for i, (t, _, _) in enumerate(order)}
