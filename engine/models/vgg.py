"""VGG16 in torchvision's layout (``features.N``, ``avgpool``, ``classifier.0/3/6``).

Torchvision-format state dicts load as they are: ``weights=PATH`` (a .pth/.pt/.safetensors
file or fsspec URL) or torchvision's official file through the torch hub cache. Written in
torch only because torchvision cannot be imported beside the CPU torch build here (its
wheels are CUDA builds).

Layers (the conv and pool layers are maps: globally average pooled by default, kept with
``featurize --keep-maps``):
  ``conv1_1`` .. ``conv5_3`` -- a convolution's output after its ReLU (as in Keras/DL4J, where
  the activation belongs to the layer), ``pool1`` .. ``pool5`` -- the max-pool outputs,
  ``fc1`` and ``fc2`` -- 4096-d outputs after the classifier's ReLU (``fc2`` is the default,
  as in the original DL4J Caltech-256 transfer learning run), ``logits`` (1000).
"""
from __future__ import annotations

import torch
from torch import nn

from .imagenet import IMAGENET_PREPROCESS
from .registry import ModelDef, ModelInfo, register_model
from .stages import Stage
from .weights import build_torchvision_format, describe_source

__all__ = ["VGG", "VGG16_URL", "vgg16"]

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"   # torchvision IMAGENET1K_V1
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
              "M")


def _layer_table(cfg: tuple) -> dict[str, tuple[int, int]]:
    """Layer name -> (index in ``features`` whose output it is, width)."""
    table, idx, block, conv, ch = {}, 0, 1, 1, 3
    for v in cfg:
        if v == "M":
            table[f"pool{block}"] = (idx, ch)
            idx, block, conv = idx + 1, block + 1, 1
        else:
            ch = int(v)
            table[f"conv{block}_{conv}"] = (idx + 1, ch)   # conv at idx, its ReLU at idx + 1
            idx, conv = idx + 2, conv + 1
    return table


class VGG(nn.Module):
    """torchvision's VGG (no batch norm), truncated at a named layer."""

    def __init__(self, cfg: tuple = _VGG16_CFG, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes))
        self.table = _layer_table(cfg)

    def stages(self) -> list[Stage]:
        """conv1_1 .. pool5 (maps), fc1, fc2, logits (vectors).

        ``fc1`` is torchvision's 7 x 7 average pool, the flatten and the first Linear + ReLU:
        how VGG's classifier reads the pool5 map. The dropouts sit in front of fc2 and logits.
        """
        out, start = [], 0
        for name, (idx, _) in self.table.items():
            out.append(Stage(name, nn.Sequential(*self.features[start:idx + 1]), True))
            start = idx + 1
        c = self.classifier
        out += [Stage("fc1", nn.Sequential(self.avgpool, nn.Flatten(1), c[0], c[1]), False),
                Stage("fc2", nn.Sequential(c[2], c[3], c[4]), False),
                Stage("logits", nn.Sequential(c[5], c[6]), False)]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage.module(x)
        return x


def vgg16_layers() -> dict[str, int]:
    layers = {name: width for name, (_, width) in _layer_table(_VGG16_CFG).items()}
    layers.update({"fc1": 4096, "fc2": 4096, "logits": 1000})
    return layers


@register_model("vgg16")
def vgg16() -> ModelDef:
    """VGG16 (138M params), torchvision weights; default layer fc2 (4096)."""
    default_source = f"torch hub: {VGG16_URL}"
    info = ModelInfo(name="vgg16", default_layer="fc2", layers=vgg16_layers(),
                     map_layers=tuple(_layer_table(_VGG16_CFG)),
                     preprocess=IMAGENET_PREPROCESS, weights_source=default_source)

    def build(*, weights: str | None, pretrained: bool,
              fold_bn: bool) -> tuple[nn.Module, str]:
        del fold_bn   # VGG16 has no batch norm
        model = build_torchvision_format(VGG, weights=weights, hub_url=VGG16_URL,
                                         model_name="vgg16", pretrained=pretrained)
        return model.eval(), describe_source(weights, default_source, pretrained)

    return ModelDef(info=info, build=build)
