"""A small real-photo dataset for tests, made from images that installed packages ship.

Three classes of real photographs (scikit-image's coffee/chelsea/astronaut..., scikit-learn's
china/flower), each image also flipped/cropped/rescaled so a class has several distinct
files, in JPEG, PNG (greyscale, RGBA, palette) and other formats; plus one bad file of each
kind featurize must skip with a reason.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

    from deeptransfer.models import Preprocess


def _sources() -> dict[str, list[np.ndarray]]:
    from skimage import data
    from sklearn.datasets import load_sample_image

    return {
        "cat": [data.chelsea(), data.cat() if hasattr(data, "cat") else data.chelsea()[::-1]],
        "coffee": [data.coffee()],
        "scene": [load_sample_image("china.jpg"), load_sample_image("flower.jpg"),
                  data.astronaut()],
    }


def _variants(img: np.ndarray) -> list[np.ndarray]:
    h, w = img.shape[:2]
    return [img, img[:, ::-1], img[h // 8: h - h // 8, w // 8: w - w // 8],
            np.asarray(Image.fromarray(img).resize((w * 2 // 3, h * 2 // 3)))]


def make_photo_dataset(root: str | os.PathLike, *, bad: bool = True) -> dict[str, str]:
    """Write the dataset under ``root``; returns {relative path of each bad file: reason word}."""
    root = Path(root)
    for cls, imgs in _sources().items():
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        k = 0
        for img in imgs:
            for v in _variants(img):
                im = Image.fromarray(np.ascontiguousarray(v))
                fmt = k % 4
                if fmt == 0:
                    im.save(d / f"{cls}_{k}.jpg", quality=92)
                elif fmt == 1:
                    im.save(d / f"{cls} {k} (copy).png")  # spaces and brackets in names
                elif fmt == 2:
                    im.convert("L").save(d / f"{cls}_{k}_grey.jpg", quality=90)
                else:
                    im.convert("RGBA").save(d / f"{cls}_ü_{k}#.png")
                k += 1
    expected: dict[str, str] = {}
    if bad:
        d = root / "cat"
        good = (d / "cat_0.jpg").read_bytes()
        (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
        expected["cat/truncated.jpg"] = "JPEG"
        (d / "empty.jpg").write_bytes(b"")
        expected["cat/empty.jpg"] = "zero-byte"
        (d / "notes.txt").write_text("not an image")
        expected["cat/notes.txt"] = "not an image"
        (d / "bomb.png").write_bytes(_bomb_png(40000, 40000))
        expected["cat/bomb.png"] = "bomb"
        os.symlink(d / "does-not-exist.jpg", d / "dangling.jpg")
        expected["cat/dangling.jpg"] = "not found"
    return expected


def _bomb_png(w: int, h: int) -> bytes:
    """A valid PNG header announcing ``w`` x ``h`` pixels with a tiny body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def jpeg_bytes(img: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pil_preprocess(img: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """A model's documented preprocessing (``deeptransfer.models.Preprocess``), written
    independently with PIL (not the featurize kernel): (3, crop, crop) float32."""
    import torch
    im = Image.fromarray(img)
    w, h = im.size
    s = pre.resize / min(w, h)
    im = im.resize((max(pre.resize, int(w * s)), max(pre.resize, int(h * s))),
                   getattr(Image.Resampling, pre.interpolation.upper()))  # the declared filter
    w, h = im.size
    left, top = (w - pre.crop) // 2, (h - pre.crop) // 2
    im = im.crop((left, top, left + pre.crop, top + pre.crop))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())
