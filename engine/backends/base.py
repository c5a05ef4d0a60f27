"""The common interface of the inference backends, and the views computed on their outputs."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    """A compiled frozen prefix in one worker process."""

    #: "torch", "openvino" or "onnxruntime"
    name: str

    def run(self, x: np.ndarray) -> np.ndarray:
        """Features of an NHWC float32 batch of the compiled batch size (numpy, float32)."""
        ...

    def features(self, x: np.ndarray, views: str = "center") -> np.ndarray:
        """``run`` averaged over ``views`` (see ``view_features_np``)."""
        ...


def view_features_np(run: Any, x: np.ndarray, views: str) -> np.ndarray:
    """The numpy twin of ``featurization.view_features`` for a batch in NHWC: the mirror is
    flipped along the width (axis 2), a map output (B, C, H, W) flipped back along its own
    width before the average, so pooled and map features mean the same as torch's."""
    out = run(x)
    if views == "center+flip":
        mirror = run(np.ascontiguousarray(x[:, :, ::-1]))
        if mirror.ndim == 4:
            mirror = mirror[..., ::-1]
        out = (out + mirror) * np.float32(0.5)
    return np.asarray(out, dtype=np.float32)


class Features:
    """``features`` for a backend that defines ``run``."""

    def features(self, x: np.ndarray, views: str = "center") -> np.ndarray:
        return view_features_np(self.run, x, views)  # type: ignore[attr-defined]
