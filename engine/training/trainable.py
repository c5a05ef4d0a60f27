"""What is trained on the stored features: a spec of the backbone's suffix, then the head.

    suffix = SuffixSpec.from_store(store.attrs, train_from="blocks.6")  # blocks.5 maps stored
    module = build_trainable(suffix, HeadConfig(), n_classes=101, seed=0, pretrained=True)
    module(maps)                # (B, 192, 7, 7) -> blocks.6 -> conv_head -> pool -> head

The trainable module is one ``nn.Sequential``: a ``suffix`` child (the backbone's stages from
the cut on, ``models.stages.split``, ending in the pooled layer the head is put on), then the
head's own layers. Its ``state_dict`` is what travels between driver and workers and what the
saved model holds. With pooled features (a store without maps) there is no suffix child, so
the module is the head as it always was: the same parameter names and, for the same seed,
the same head bit for bit.

BatchNorm in the suffix is frozen by folding it into the convolution before it (DL4J's
``FrozenLayer`` and Keras' advice for fine-tuning keep its statistics fixed; folded, the
scale and shift train as the convolution's weight and bias): the suffix has no batch
statistics to average, and its train and eval modes compute the same function.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from torch import nn

from ..errors import InvalidParameterError
from .heads import HeadConfig, build_head, load_params

__all__ = ["SuffixSpec", "build_trainable", "trainable_from_params", "worker_module",
           "head_in_dim", "SUFFIX", "HEAD_ONLY"]

#: name of the suffix child of a trainable module (its parameters are "suffix.*")
SUFFIX = "suffix"
#: ``train_from`` value that trains the head only (on pooled maps, for a store of maps)
HEAD_ONLY = "head"


@dataclass(frozen=True)
class SuffixSpec:
    """The part of the backbone between the store's cut and the head.

    ``in_shape`` is the stored feature shape, (C, H, W) for maps. ``train_from`` is the first
    trained stage (the stage after ``cut``), or None for the head alone (then only the
    pooling of the maps is in front of it).
    """

    model: str  # the backbone's registered name
    weights: str | None  # its weights (None: the model's default source)
    cut: str  # the store's layer (a map layer)
    in_shape: tuple[int, ...]
    train_from: str | None = None

    @property
    def end(self) -> str:
        """The pooled layer the head is put on."""
        from ..models import get_model_info

        return get_model_info(self.model).default_layer if self.train_from else self.cut

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "weights": self.weights, "cut": self.cut,
                "in_shape": list(self.in_shape), "train_from": self.train_from}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SuffixSpec | None":
        if d is None or isinstance(d, SuffixSpec):
            return d
        return cls(model=d["model"], weights=d.get("weights"), cut=d["cut"],
                   in_shape=tuple(int(x) for x in d["in_shape"]), train_from=d.get("train_from"))

    @classmethod
    def from_store(cls, attrs: Mapping[str, Any], train_from: str | None) -> "SuffixSpec | None":
        """The suffix for a store's features and the ``train_from`` option.

        A store of pooled vectors has no suffix (None) and refuses any ``train_from`` but
        ``"head"``; for a store of maps, None means the stage after the cut (fine-tuning, the
        measured best) and ``"head"`` the head alone.
        """
        from ..models import get_model_info

        if not attrs.get("maps"):
            if train_from not in (None, HEAD_ONLY):
                raise InvalidParameterError(
                    f"--train-from {train_from} needs a store of maps, and this store holds "
                    f"pooled {attrs.get('layer') or ''} vectors: featurize again with "
                    f"--keep-maps at the layer before {train_from} (e.g. --layer blocks.5 "
                    f"--keep-maps for blocks.6).", param="train_from")
            return None
        model = dict(attrs["model"])
        layer = attrs.get("layer") or model.get("layer")
        shape = tuple(int(x) for x in attrs.get("feature_shape") or (attrs["feature_dim"],))
        info = get_model_info(model["name"])
        after = info.next_layer(layer)
        if train_from == HEAD_ONLY:
            chosen = None
        elif train_from is None or train_from == after:
            chosen = after
        else:
            raise InvalidParameterError(
                f"--train-from {train_from} does not fit this store: it holds the {layer} maps "
                f"of {model['name']}, so the stage trained first is {after!r} (or 'head' for "
                f"the head alone). To train from {train_from!r}, featurize at the layer "
                "before it with --keep-maps.", param="train_from")
        return cls(model=model["name"], weights=model.get("weights"), cut=layer,
                   in_shape=shape, train_from=chosen)


def head_in_dim(suffix: SuffixSpec | None, in_dim: int) -> int:
    """The width of the head's input: the store's width, or the suffix's pooled output."""
    if suffix is None:
        return int(in_dim)
    from ..models import get_model_info

    return int(get_model_info(suffix.model).layers[suffix.end]) if suffix.train_from \
        else int(suffix.in_shape[0])


def _suffix_module(suffix: SuffixSpec, *, pretrained: bool) -> nn.Module:
    from ..models import ModelSpec
    from ..models.registry import build_stages
    from ..models.stages import GlobalAvgPool, split

    if not suffix.train_from:
        return nn.Sequential(OrderedDict(global_pool=GlobalAvgPool()))
    spec = ModelSpec(name=suffix.model, weights=suffix.weights if pretrained else None)
    stages, _, _ = build_stages(spec, pretrained=pretrained, fold_bn=True)
    _, module = split(stages, suffix.cut, pooled=False, end=suffix.end)
    return module


def build_trainable(suffix: SuffixSpec | None, head: HeadConfig, in_dim: int, n_classes: int,
                    seed: int = 0, *, pretrained: bool = False) -> nn.Sequential:
    """The trainable module: [suffix,] then the head's layers (see the module docstring).

    ``pretrained``: the suffix starts from the backbone's weights (the driver's first round);
    without, it has the right structure only (workers, which load the broadcast parameters).
    The head is initialized from ``seed`` either way.
    """
    h = build_head(head, head_in_dim(suffix, in_dim), n_classes, seed=seed)
    if suffix is None:
        return h
    children = [(SUFFIX, _suffix_module(suffix, pretrained=pretrained))]
    return nn.Sequential(OrderedDict(children + list(h.named_children())))


#: kind of the trainable modules in the one worker cache (``worker_state``); keyed by thread
#: too, since a module's parameters are loaded into it by each call
MODULES = "trainable"
#: bytes of parameters that the cached modules may hold together per process
MODULE_CACHE_BYTES = 256 << 20


def worker_module(suffix: SuffixSpec | None, head: HeadConfig, in_dim: int,
                  n_classes: int) -> nn.Sequential:
    """The trainable module's structure for this worker thread, built once and reused by
    every round and validation block (the caller loads the parameters into it)."""
    import json
    import threading

    from .. import worker_state

    parts = (threading.get_ident(), json.dumps(head.to_dict(), sort_keys=True), int(in_dim),
             int(n_classes),
             None if suffix is None else json.dumps(suffix.to_dict(), sort_keys=True))
    return worker_state.get(
        MODULES, parts, lambda: build_trainable(suffix, head, in_dim, n_classes),
        nbytes=lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values()),
        cap=MODULE_CACHE_BYTES)


def trainable_from_params(suffix: SuffixSpec | None, head: HeadConfig,
                          params: Mapping[str, np.ndarray], *, in_dim: int,
                          n_classes: int) -> nn.Sequential:
    """A trainable module in eval mode holding the given parameters (predict, export)."""
    m = build_trainable(suffix, head, in_dim, n_classes, seed=0)
    load_params(m, params)
    return m.eval()
