"""ResNet-50 in torchvision's layout (``conv1``, ``bn1``, ``layer1..4``, ``fc``; v1.5 bottleneck).

Torchvision-format state dicts load as they are: ``weights=PATH`` or torchvision's official
IMAGENET1K_V1 file through the torch hub cache (the V1 weights' preprocessing is resize 256 /
crop 224, bilinear, ImageNet mean/std). Written in torch only because torchvision cannot be
imported beside the CPU torch build here. BatchNorm is folded into the convolutions at build
time.

Layers: ``stem`` (64, after the max pool), ``layer1`` .. ``layer4`` (256/512/1024/2048),
all maps (pooled by default, kept with ``featurize --keep-maps``), ``pool``
(default, 2048: the classifier's input; alias ``pre_logits``), ``logits`` (1000).
"""
from __future__ import annotations

import torch
from torch import nn

from .imagenet import IMAGENET_PREPROCESS
from .registry import ModelDef, ModelInfo, fold_batchnorm, register_model
from .stages import GlobalAvgPool, Stage
from .weights import build_torchvision_format, describe_source

__all__ = ["ResNet", "Bottleneck", "RESNET50_URL", "resnet50"]

RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"  # IMAGENET1K_V1


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (stride here, "v1.5") -> 1x1 x4, + shortcut."""
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def fold(self) -> None:
        fold_batchnorm(self.conv1, self.bn1)
        fold_batchnorm(self.conv2, self.bn2)
        fold_batchnorm(self.conv3, self.bn3)
        self.bn1 = self.bn2 = self.bn3 = nn.Identity()
        if self.downsample is not None:
            fold_batchnorm(self.downsample[0], self.downsample[1])
            self.downsample[1] = nn.Identity()


class ResNet(nn.Module):
    """torchvision's ResNet with Bottleneck blocks, truncated at a named layer."""

    def __init__(self, stage_blocks: tuple[int, ...] = (3, 4, 6, 3),
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        cin = 64
        for i, (n, width) in enumerate(zip(stage_blocks, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, stride=2 if (j == 0 and i > 0) else 1))
                cin = width * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        self.folded = False

    def stages(self) -> list[Stage]:
        """stem, layer1 .. layer4 (maps), pool, logits (vectors)."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return ([Stage("stem", stem, True)]
                + [Stage(f"layer{i}", getattr(self, f"layer{i}"), True) for i in range(1, 5)]
                + [Stage("pool", GlobalAvgPool(), False), Stage("logits", self.fc, False)])

    def fold_bn(self) -> None:
        if self.folded:
            return
        fold_batchnorm(self.conv1, self.bn1)
        self.bn1 = nn.Identity()
        for i in range(1, 5):
            for blk in getattr(self, f"layer{i}"):
                blk.fold()
        self.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage.module(x)
        return x


@register_model("resnet50")
def resnet50() -> ModelDef:
    """ResNet-50 (25.6M params), torchvision IMAGENET1K_V1 weights; default layer pool (2048)."""
    default_source = f"torch hub: {RESNET50_URL}"
    info = ModelInfo(
        name="resnet50", default_layer="pool",
        layers={"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048, "pool": 2048,
                "logits": 1000},
        map_layers=("stem", "layer1", "layer2", "layer3", "layer4"),
        preprocess=IMAGENET_PREPROCESS, weights_source=default_source,
        aliases={"pre_logits": "pool"})

    def build(*, weights: str | None, pretrained: bool,
              fold_bn: bool) -> tuple[nn.Module, str]:
        model = build_torchvision_format(ResNet, weights=weights, hub_url=RESNET50_URL,
                                         model_name="resnet50", pretrained=pretrained)
        if fold_bn:
            model.fold_bn()
        return model.eval(), describe_source(weights, default_source, pretrained)

    return ModelDef(info=info, build=build)
