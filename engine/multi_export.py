"""Exporting a model trained on several backbones' features (``models/composite.py``).

    dt.load("model/").export("model.onnx", format="onnx")
    # inputs image_0 (3 x 224 x 224, Lite0's crop), image_1 (3 x 240 x 240, Lite1's), ...

Each part reads its own crop, so the exported pipeline has one input per part, named
``image_0``, ``image_1``, ... in the order of the model's name; the sidecar JSON says each
input's model and preprocessing. Inside: each part's backbone (with the views the features
were made with) -> the features side by side -> the head -> softmax, which is what
``TransferModel.predict`` computes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .featurization import view_features
from .models import composite


class CompositePipeline(nn.Module):
    """Preprocessed images, one batch per part -> class probabilities."""

    def __init__(self, backbones: list[nn.Module], head: nn.Module, views: str):
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        self.head = head
        self.views = views

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        feats = [view_features(b, x, self.views) for b, x in zip(self.backbones, images)]
        return torch.softmax(self.head(torch.cat(feats, dim=1)), dim=1)


def pipeline_module(model: Any) -> CompositePipeline:
    """The pipeline of a loaded ``TransferModel`` of a composite (``model.spec``)."""
    from .models import create_backbone

    backbones = [create_backbone(p.spec) for p in composite.parts_of(model.spec)]
    return CompositePipeline(backbones, model.head, model.views).eval()


def _export_onnx(module: nn.Module, examples: tuple[torch.Tensor, ...], path: Path,
                 names: list[str]) -> None:
    """One ONNX file with one input per part (the TorchScript-based exporter, the one
    ``models/export.py`` measured to export these models exactly and fast)."""
    from .errors import EngineUnavailableError
    from .models.export import (ExportError, _first_line, _missing, _write_atomically,
                                quiet_exporter)

    if _missing(("onnx",)):
        raise EngineUnavailableError(
            "ONNX export needs the onnx package: pip install 'deeptransfer[onnx]'.")
    out = "probabilities"

    def write(tmp: str) -> None:
        try:
            with quiet_exporter(), torch.inference_mode():
                torch.onnx.export(module, examples, tmp, input_names=names,
                                  output_names=[out], dynamo=False,
                                  dynamic_axes={n: {0: "batch"} for n in [*names, out]})
        except Exception as exc:  # noqa: BLE001 - any exporter failure: one line
            raise ExportError(f"ONNX export failed: {_first_line(exc)}") from exc

    _write_atomically(path, write)


def export(model: Any, path: str | os.PathLike, format: str) -> Path:  # noqa: A002
    """``TransferModel.export`` for a composite (the target already checked there)."""
    from .models.export import export_torchscript, write_sidecar

    path = Path(path)
    parts = composite.parts_of(model.spec)
    names = list(composite.input_names(len(parts)))
    examples = tuple(torch.zeros(1, 3, p.preprocess.crop, p.preprocess.crop) for p in parts)
    module = pipeline_module(model)
    if format == "torchscript":
        export_torchscript(module, examples, path)  # type: ignore[arg-type]
    else:
        _export_onnx(module, examples, path, names)
    write_sidecar(path, {
        "model": model.spec.to_dict(), "views": model.views, "classes": model.classes,
        "inputs": [{"name": n, "model": p.spec.to_dict(), "preprocess": p.preprocess.to_dict(),
                    "shape": f"float32 NCHW, 3 x {p.preprocess.crop} x {p.preprocess.crop}, "
                             "normalized"} for n, p in zip(names, parts)],
        "input": f"one batch per part, in this order: {', '.join(names)} (see inputs)",
        "output": "probabilities"})
    return path
