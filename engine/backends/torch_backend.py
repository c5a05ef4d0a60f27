"""The torch backend: the prefix module itself (eager, or torch.compile'd by the runner)."""
from __future__ import annotations

from typing import Any

import numpy as np


class TorchBackend:
    """Runs the module on the NHWC buffer viewed as channels_last NCHW (no copy)."""

    name = "torch"

    def __init__(self, module: Any) -> None:
        self.module = module

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.features(x, "center")

    def features(self, x: np.ndarray, views: str = "center") -> np.ndarray:
        import torch

        from ..featurization import view_features

        with torch.inference_mode():
            t = torch.from_numpy(x).permute(0, 3, 1, 2)
            return view_features(self.module, t, views).float().numpy()
