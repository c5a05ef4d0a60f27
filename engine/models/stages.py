"""The one stage interface every backbone follows, and ``split`` at a cut.

Follows timm's ``forward_intermediates`` / ``prune_intermediate_layers`` pattern, in its
simplest form: a model lists its ordered ``Stage``s, and running them one after the other is
the whole network (image -> logits). Each stage's output is a named layer, either a map
(B, C, H, W) or a vector (B, D). Global pooling is a stage of its own (``GlobalAvgPool``,
the ``pool`` layer), never hidden inside a model's forward, so a cut can be taken

- pooled: the map of a stage averaged over H x W (today's feature vectors, ``--layer``), or
- un-pooled: the map itself (C x H x W, ``featurize --keep-maps``),

and what follows a cut is a module too: ``split(stages, cut, end=...)`` gives a frozen prefix
(image -> the cut) and a suffix (the cut -> ``end``, the pooled layer a head is put on), the
part that fine-tuning trains. VGG16's suffix after ``pool5`` is its classifier (``fc1``
includes torchvision's 7 x 7 average pool and the flatten, which is how that classifier
reads a map).

Stages hold the model's own submodules (no copies): a stage list of a model whose BatchNorms
were folded runs the folded network.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

__all__ = ["Stage", "GlobalAvgPool", "stage_index", "split", "module_name"]


@dataclass(frozen=True, eq=False)
class Stage:
    """One step of a network: ``module`` maps the previous stage's output to layer ``name``."""

    name: str
    module: nn.Module
    spatial: bool  # output is a (B, C, H, W) map; False: a (B, D) vector


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C): the mean over H and W (the same op every model used inline)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def module_name(layer: str) -> str:
    """A layer name as a submodule name ("blocks.6" -> "blocks_6": "." is not allowed)."""
    return layer.replace(".", "_")


def stage_index(stages: Sequence[Stage], layer: str) -> int:
    for i, s in enumerate(stages):
        if s.name == layer:
            return i
    raise ValueError(f"no stage {layer!r} (stages: {[s.name for s in stages]})")


def _seq(stages: Sequence[Stage]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((module_name(s.name), s.module) for s in stages))


def split(stages: Sequence[Stage], cut: str, *, pooled: bool = True,
          end: str | None = None) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, suffix) of a network at ``cut``.

    ``prefix``: the image -> the output of stage ``cut``, globally average pooled when
    ``pooled`` and the cut is a map. ``suffix``: the cut's (un-pooled) output -> the output of
    stage ``end`` (None: the last stage), pooled if ``end`` is a map; when ``end`` is ``cut``
    it is empty, or only the pooling for an un-pooled map cut. Only the stages a part needs are in it: what is after ``end`` is not run.
    """
    i = stage_index(stages, cut)
    prefix = _seq(stages[:i + 1])
    if pooled and stages[i].spatial:
        prefix.add_module("global_pool", GlobalAvgPool())
    j = len(stages) - 1 if end is None else stage_index(stages, end)
    if j < i:
        raise ValueError(f"the suffix's end {end!r} comes before the cut {cut!r}")
    suffix = _seq(stages[i + 1:j + 1])
    if stages[j].spatial and (j > i or not pooled):
        suffix.add_module("global_pool", GlobalAvgPool())
    return prefix, suffix
