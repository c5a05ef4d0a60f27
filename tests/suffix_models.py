"""A saved model with a tuned suffix, made without training: lite0 cut at blocks.5 (maps),
blocks.6 + conv_head from the bundled weights, perturbed so that a pipeline which ran the
pretrained suffix instead of the saved one would give other probabilities."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from deeptransfer.artifact import save_model
from deeptransfer.models import get_model_info
from deeptransfer.training.heads import HeadConfig, head_params
from deeptransfer.training.trainable import SuffixSpec, build_trainable

MODEL = "efficientnet_lite0"
CUT = "blocks.5"
SHAPE = (192, 7, 7)
SUFFIX = SuffixSpec(model=MODEL, weights=None, cut=CUT, in_shape=SHAPE, train_from="blocks.6")
CLASSES = ["cat", "coffee", "scene"]


def tuned_params(seed: int = 0) -> "dict[str, np.ndarray]":
    """The trainable module's parameters: pretrained suffix x (1 + 5% noise), a head whose
    logits spread the photos' probabilities."""
    module = build_trainable(SUFFIX, HeadConfig(), SHAPE[0], len(CLASSES), seed=seed,
                             pretrained=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("suffix."):
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
        module.fc.weight.mul_(4.0)
    return dict(head_params(module))


def store_attrs(views: str = "center", dtype: str | None = None) -> dict:
    """What a store of lite0 blocks.5 maps holds in its attrs (the part save_model reads)."""
    attrs = {"model": {"name": MODEL, "layer": CUT, "weights": None},
             "preprocess": {**get_model_info(MODEL).preprocess.to_dict(), "views": views},
             "feature_dim": SHAPE[0], "maps": True, "feature_shape": list(SHAPE)}
    if dtype:
        attrs["dtype"] = dtype
    return attrs


def save_suffix_model(model_dir: str | Path, params: Mapping[str, np.ndarray], *,
                      views: str = "center", dtype: str | None = None) -> Path:
    return save_model(model_dir, params=params, head_config=HeadConfig().to_dict(),
                      store_attrs=store_attrs(views, dtype), classes=CLASSES,
                      suffix=SUFFIX.to_dict())
