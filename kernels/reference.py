"""The plain Pillow + NumPy preprocessing that the numba kernel must reproduce.

Resize the short side to ``resize`` with ``Image.resize(..., Image.BICUBIC)`` (or another of
Pillow's filters; torchvision's
``Resize(int)`` size rule), center crop like torchvision's ``CenterCrop``, scale to [0, 1],
normalize per channel, all in float32 (torchvision's ToTensor + Normalize arithmetic). Used
by the tests as the ground truth and by the benchmarks as the baseline: the obvious code
(resize the whole image, then crop), without needless slowness.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .resize import crop_offsets, resized_size

__all__ = ["reference_preprocess"]

_PIL_FILTERS = {"box": Image.BOX, "bilinear": Image.BILINEAR, "hamming": Image.HAMMING,
                "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def reference_preprocess(
    img: np.ndarray,
    *,
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> np.ndarray:
    """(crop, crop, 3) float32: PIL resize (``interpolation``: a Pillow filter name) + center crop + ``(x/255 - mean) / std``
    of one uint8 (H, W, 3) RGB (or (H, W) greyscale) image."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"img must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"img must be (H, W, 3) RGB or (H, W) greyscale, got {arr.shape}")
    if crop > resize:
        raise ValueError(f"resize ({resize}) must be >= crop ({crop})")
    h, w = arr.shape[:2]
    rh, rw = resized_size(h, w, resize)
    pil = Image.fromarray(np.ascontiguousarray(arr))
    resized = np.asarray(pil.resize((rw, rh), _PIL_FILTERS[interpolation]))
    top, left = crop_offsets(rh, rw, crop)
    cropped = resized[top : top + crop, left : left + crop]
    # torchvision's ToTensor + Normalize, in float32, one channel plane at a time (NumPy
    # broadcasting over a last axis of 3 would be 4x slower and the same numbers)
    chw = cropped.transpose(2, 0, 1).astype(np.float32)
    chw /= np.float32(255.0)
    for c in range(3):
        chw[c] -= np.float32(mean[c])
        chw[c] /= np.float32(std[c])
    return np.ascontiguousarray(chw.transpose(1, 2, 0))
