"""The training chart, like DL4J's training UI: score vs iteration, and where time goes.

Top: the training loss of every averaging round (raw, thin) and smoothed (exponential moving
average, bias-corrected), against the iteration (minibatches per worker so far), with the
validation accuracy of each epoch on a second axis. Bottom: each round's wall time and the
slowest worker's compute time; the gap is the engine's overhead (broadcast, scheduling,
reduction). Written with matplotlib's Agg canvas directly, without pyplot's global state.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def read_rounds(path: str) -> list[dict[str, Any]]:
    """The records of a rounds.jsonl file (missing file: none)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out = np.empty(len(values))
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * float(v)
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


def plot_training(rounds: Iterable[Mapping[str, Any]], history: Sequence[Mapping[str, Any]],
                  path: str, *, title: str | None = None, smoothing: float | None = None) -> str:
    """Write the training chart to ``path`` (PNG) and return the path.

    ``smoothing`` is the moving average's weight; by default 0.9, less for short runs
    (``1 - 10 / rounds``) so the smoothed curve does not lag behind a few points.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = list(rounds)
    it = np.array([r["iteration"] for r in rounds], dtype=float)
    loss = np.array([r["loss"] for r in rounds], dtype=float)
    if smoothing is None:
        smoothing = float(min(0.9, max(0.0, 1.0 - 10.0 / max(len(rounds), 1))))
    fig = Figure(figsize=(9, 6.5))
    FigureCanvasAgg(fig)
    ax, ax_t = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    if len(rounds):
        ax.plot(it, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss (each round)")
        ax.plot(it, smooth(loss, smoothing), color="tab:blue", linewidth=1.8,
                label=f"loss (smoothed {smoothing:.2f})")
    ax.set_ylabel("training loss (score)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    val = [(h["iteration"], h["val_top1"]) for h in history
           if h.get("val_top1") is not None and h.get("iteration") is not None]
    if val:
        ax_v = ax.twinx()
        vx, vy = zip(*val)
        ax_v.plot(vx, vy, "o-", color="tab:orange", label="validation accuracy (epoch)")
        ax_v.set_ylabel("validation accuracy")
        ax_v.set_ylim(0, 1.02)
        h2, l2 = ax_v.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="center right", fontsize=8)
    ax.set_title(title or "score vs iteration")
    if len(rounds):
        ax_t.plot(it, [r["round_seconds"] * 1e3 for r in rounds], color="tab:gray", linewidth=0.8,
                  label="round")
        ax_t.plot(it, [r["compute_seconds"] * 1e3 for r in rounds], color="tab:green",
                  linewidth=0.8, label="slowest worker's compute")
        ax_t.legend(loc="upper right", fontsize=8)
        ax_t.set_yscale("log")  # the first round (reading shards, warming up) dwarfs the rest
    ax_t.set_ylabel("ms")
    ax_t.set_xlabel("iteration (minibatches per worker)")
    ax_t.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.09, right=0.91, top=0.94, bottom=0.08, hspace=0.08)
    from ..files import atomic_target

    with atomic_target(path) as tmp:  # a unique name, removed if drawing fails
        fig.savefig(tmp, dpi=100, format="png")
    return path
