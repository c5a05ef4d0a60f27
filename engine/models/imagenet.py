"""ImageNet's normalization and torchvision's evaluation preprocessing, shared by the models
built on torchvision-format weights (VGG16, ResNet-50) and the zoo bridges."""
from __future__ import annotations

from .registry import Preprocess

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_PREPROCESS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: torchvision's ImageNet weights (``IMAGENET1K_V1``): Resize(256) bilinear, CenterCrop(224)
IMAGENET_PREPROCESS = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                 interpolation="bilinear")
