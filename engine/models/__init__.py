"""The model zoo: frozen pretrained CNN backbones, truncated at a named layer (torch only).

    from deeptransfer.models import ModelSpec, create_backbone, get_model_info, list_models
    list_models()                                   # ['efficientnet_lite0', ..., 'vgg16']
    info = get_model_info("efficientnet_lite0")     # layers/widths + Preprocess, nothing built
    backbone = create_backbone(ModelSpec("efficientnet_lite0", layer="pool"))
    features = backbone(batch)                      # (B, 3, 224, 224) -> (B, 1280)
    maps = create_backbone("efficientnet_lite0", layer="blocks.5", pooled=False)  # (B, 192, 7, 7)

Every model is a list of stages (``stages.py``): a cut gives a frozen prefix and the suffix
that fine-tuning trains (``split``).

Built in: efficientnet_lite0 (default), efficientnet_lite1, efficientnet_lite2, vgg16,
resnet50; several at once as ``"efficientnet_lite0+efficientnet_lite1"`` (``composite.py``).
With ``pip install 'deeptransfer[zoo]'``: ``timm:NAME`` and ``torchvision:NAME``.
Add a model with ``@register_model("name")`` on a function returning a ``ModelDef``.
"""
from .registry import (Backbone, ModelDef, ModelInfo, ModelSpec, Preprocess, build_stages,
                       check_map_layer, create_backbone, fold_batchnorm, get_model_info,
                       list_models, map_shape, register_model, resolve_layer)
from .stages import GlobalAvgPool, Stage, split
from . import efficientnet_lite, resnet, vgg  # noqa: F401,E402  (register the built-in models)
from . import composite  # noqa: F401,E402  (several backbones in one store)

__all__ = ["Backbone", "ModelDef", "ModelInfo", "ModelSpec", "Preprocess", "create_backbone",
           "fold_batchnorm", "get_model_info", "list_models", "register_model", "resolve_layer",
           "build_stages", "check_map_layer", "map_shape", "GlobalAvgPool", "Stage", "split"]
