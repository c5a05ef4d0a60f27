"""``timm:NAME`` and ``torchvision:NAME``: any pretrained model of those libraries as a backbone.

    create_backbone("timm:convnext_tiny")          # pool = forward_head(pre_logits=True)
    create_backbone("torchvision:resnet18")        # pool = input of the final Linear

They need ``pip install 'deeptransfer[zoo]'`` (torchvision and timm builds matching the
installed torch); the built-in models need neither. Both packages are imported only here and
only when such a name is used; any failure of the import (here a CUDA torchvision beside a
CPU torch raises RuntimeError about ``torchvision::nms``) becomes one EngineUnavailableError
that says what to install.

Layers: ``pool`` (default; alias ``pre_logits``) and ``logits``. Preprocessing comes from the
model's pretrained config: timm's ``pretrained_cfg`` (input_size, crop_pct, mean, std,
interpolation; resize = floor(crop / crop_pct) as in timm's transforms) or the torchvision
weights' ``transforms()`` (resize_size, crop_size, mean, std, interpolation). Widths are read
from the model built without weights (timm: one forward of a zero image), cached per name.
BatchNorm folding is not applied to bridged models.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import math
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import (EngineUnavailableError, UnknownModelError,
                      WeightsNotFoundError)
from .imagenet import IMAGENET_MEAN, IMAGENET_STD
from .registry import ModelDef, ModelInfo, Preprocess, list_models
from .stages import Stage
from .weights import describe_source, hub_cache_path, load_state_dict_file, load_strict

__all__ = ["model_def", "import_optional"]

# a model trained on "nearest" resizes (none of timm's or torchvision's ImageNet weights) gets
# bilinear: the kernel applies Pillow's convolution filters only
_INTERP = {"bicubic": "bicubic", "bilinear": "bilinear",
           "lanczos": "lanczos", "box": "box", "hamming": "hamming"}


def import_optional(package: str) -> ModuleType:
    """Import timm / torchvision, or raise one EngineUnavailableError with the install hint."""
    try:
        return importlib.import_module(package)
    except Exception as e:   # noqa: BLE001 -- ImportError, or RuntimeError from a CUDA torchvision
        first = (str(e).splitlines() or [""])[0]
        raise EngineUnavailableError(
            f"Model names starting with '{package}:' need the {package} package, which cannot "
            f"be imported here ({type(e).__name__}: {first}). Install it with "
            f"pip install 'deeptransfer[zoo]' -- torchvision and timm builds that match your "
            f"torch (a CUDA torchvision beside a CPU torch fails with 'operator torchvision::nms "
            f"does not exist'). The built-in models need neither: {', '.join(list_models())}."
        ) from e


def model_def(name: str) -> ModelDef:
    prefix, _, model_name = name.partition(":")
    if not model_name:
        raise UnknownModelError(
            f"{name!r} names no model: write '{prefix}:NAME', e.g. 'timm:resnet50' or "
            "'torchvision:resnet50'.")
    if prefix == "timm":
        return _timm_def(name, model_name)
    if prefix == "torchvision":
        return _torchvision_def(name, model_name)
    raise UnknownModelError(f"Unknown model prefix in {name!r}: use 'timm:' or 'torchvision:'.")


def _unknown(name: str, model_name: str, known: list[str]) -> UnknownModelError:
    close = difflib.get_close_matches(model_name, known, n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    return UnknownModelError(f"Unknown model {name!r}.{hint}")


def _info(name: str, widths: tuple[int, int], preprocess: Preprocess, source: str) -> ModelInfo:
    return ModelInfo(name=name, default_layer="pool",
                     layers={"pool": widths[0], "logits": widths[1]}, preprocess=preprocess,
                     weights_source=source, aliases={"pre_logits": "pool"})


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------

class Bridged(nn.Module):
    """A bridged model as two stages: ``pool`` (the model up to its classifier's input) and
    ``logits`` (that classifier). Their maps are not exposed: timm's and torchvision's models
    share no stage layout (and some have tokens, not maps), so ``--keep-maps`` and
    fine-tuning a suffix are for the built-in models."""

    def __init__(self, pool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.classifier = classifier

    def stages(self) -> list[Stage]:
        return [Stage("pool", self.pool, False), Stage("logits", self.classifier, False)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))


class TimmFeatures(nn.Module):
    """forward_features + forward_head(pre_logits=True) (``pool``) or the full head (``logits``)."""

    def __init__(self, model: nn.Module, pre_logits: bool) -> None:
        super().__init__()
        self.model = model
        self.pre_logits = pre_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(x)
        return self.model.forward_head(x, pre_logits=self.pre_logits)


def _timm_cfg(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    elif not isinstance(cfg, dict):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    return cfg


def timm_preprocess(cfg: dict[str, Any]) -> Preprocess:
    """timm's eval transform as plain numbers: crop from input_size, resize = crop / crop_pct."""
    input_size = cfg.get("input_size") or (3, 224, 224)
    crop = int(input_size[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    return Preprocess(resize=max(crop, math.floor(crop / crop_pct)), crop=crop,
                      mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
                      std=tuple(cfg.get("std") or IMAGENET_STD),
                      interpolation=_INTERP.get(str(cfg.get("interpolation")), "bilinear"))


def _timm_create(timm: ModuleType, name: str, model_name: str, pretrained: bool) -> nn.Module:
    is_model = getattr(timm, "is_model", None)
    if is_model is not None and not is_model(model_name):
        lister = getattr(timm, "list_models", None)
        raise _unknown(name, model_name, list(lister()) if lister else [])
    try:
        model = timm.create_model(model_name, pretrained=pretrained)
    except Exception as e:   # noqa: BLE001
        if pretrained:
            raise WeightsNotFoundError(
                f"timm could not load pretrained weights for {name} ({type(e).__name__}: {e}). "
                "Offline, put them in the Hugging Face cache beforehand or pass weights=PATH "
                "to a state dict in timm's key names.") from e
        raise UnknownModelError(f"timm cannot build {model_name!r}: {type(e).__name__}: {e}") from e
    return model.eval()


def _widths(body_pool: nn.Module, body_logits: nn.Module, crop: int) -> tuple[int, int]:
    x = torch.zeros(1, 3, crop, crop)
    with torch.no_grad():
        return int(body_pool(x).shape[1]), int(body_logits(x).shape[1])


@functools.lru_cache(maxsize=32)
def _timm_info(name: str, model_name: str, timm: ModuleType) -> ModelInfo:
    model = _timm_create(timm, name, model_name, pretrained=False)
    pre = timm_preprocess(_timm_cfg(model))
    widths = _widths(TimmFeatures(model, True), TimmFeatures(model, False), pre.crop)
    return _info(name, widths, pre, f"timm pretrained: {model_name}")


def _timm_def(name: str, model_name: str) -> ModelDef:
    cached = _timm_info(name, model_name, import_optional("timm"))
    info = dataclasses.replace(cached, layers=dict(cached.layers))   # callers may mutate it

    def build(*, weights: str | None, pretrained: bool,
              fold_bn: bool) -> tuple[nn.Module, str]:
        del fold_bn   # not applied to bridged models
        timm = import_optional("timm")
        model = _timm_create(timm, name, model_name, pretrained=pretrained and weights is None)
        if weights is not None:
            load_strict(model, load_state_dict_file(weights), model_name=name, source=weights)
        return (Bridged(TimmFeatures(model, pre_logits=True), model.get_classifier()),
                describe_source(weights, info.weights_source, pretrained))

    return ModelDef(info=info, build=build)


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------

def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (mod_name, mod)
    if found is None:
        raise UnknownModelError(
            f"{type(model).__name__} has no final Linear classifier to cut at 'pool'; use "
            "layer='logits'.")
    return found


def cut_classifier(model: nn.Module) -> nn.Module:
    """Replace the model's final Linear by Identity, so it returns that Linear's input."""
    mod_name, _ = _last_linear(model)
    parent_name, _, child = mod_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model


def _tv_weights(tv: ModuleType, name: str, model_name: str) -> Any:
    try:
        return tv.models.get_model_weights(model_name).DEFAULT
    except Exception as e:   # noqa: BLE001 -- ValueError/KeyError for unknown names
        known = list(tv.models.list_models()) if hasattr(tv.models, "list_models") else []
        raise _unknown(name, model_name, known) from e


def torchvision_preprocess(transforms: Any) -> Preprocess:
    """A torchvision ``ImageClassification`` transform as plain numbers."""
    def first(v: Any) -> int:
        return int(v[0] if isinstance(v, (list, tuple)) else v)
    interp = getattr(transforms.interpolation, "value", transforms.interpolation)
    return Preprocess(resize=first(transforms.resize_size), crop=first(transforms.crop_size),
                      mean=tuple(transforms.mean), std=tuple(transforms.std),
                      interpolation=_INTERP.get(str(interp), "bilinear"))


@functools.lru_cache(maxsize=32)
def _torchvision_info(name: str, model_name: str, tv: ModuleType) -> ModelInfo:
    w = _tv_weights(tv, name, model_name)
    pre = torchvision_preprocess(w.transforms())
    model = tv.models.get_model(model_name, weights=None).eval()
    fc = _last_linear(model)[1]
    n_pool, n_logits = fc.in_features, fc.out_features
    return _info(name, (n_pool, n_logits), pre, f"torch hub: {w.url}")


def _torchvision_def(name: str, model_name: str) -> ModelDef:
    cached = _torchvision_info(name, model_name, import_optional("torchvision"))
    info = dataclasses.replace(cached, layers=dict(cached.layers))   # callers may mutate it

    def build(*, weights: str | None, pretrained: bool,
              fold_bn: bool) -> tuple[nn.Module, str]:
        del fold_bn   # not applied to bridged models
        tv = import_optional("torchvision")
        w = _tv_weights(tv, name, model_name)
        if pretrained and weights is None:
            try:
                model = tv.models.get_model(model_name, weights=w)
            except Exception as e:   # noqa: BLE001 -- offline: URLError and friends
                raise WeightsNotFoundError(
                    f"Pretrained weights for {name} are not in the torch hub cache "
                    f"({hub_cache_path(w.url)}) and could not be downloaded from {w.url} "
                    f"({type(e).__name__}: {e}). Download that file there, or pass "
                    "weights=PATH.") from e
        else:
            model = tv.models.get_model(model_name, weights=None)
            if weights is not None:
                load_strict(model, load_state_dict_file(weights), model_name=name,
                            source=weights)
        fc = _last_linear(model)[1]
        return (Bridged(cut_classifier(model), fc).eval(),
                describe_source(weights, info.weights_source, pretrained))

    return ModelDef(info=info, build=build)
