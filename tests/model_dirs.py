"""Saved-model directories and random weights for tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_with_views(model_dir: str | Path, dest: str | Path, views: str) -> str:
    """A copy of a saved model whose features are declared to be made with ``views``
    (the head stays the same, so predictions differ only by the views)."""
    dest = Path(dest)
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["preprocess"]["views"] = views
    (dest / "config.json").write_text(json.dumps(cfg))
    return str(dest)


def randomize_bn(model, seed: int = 0):
    """``model`` (in eval mode) with seeded random BatchNorm statistics and affine terms, so
    that random-weights backbones give features of a realistic spread (fresh BatchNorm layers
    are identities, and their outputs would barely vary between images)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * 0.5 + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model.eval()
