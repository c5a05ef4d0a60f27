"""A synthetic feature store with real image files, and a model trained on it: for the
report's tests and benchmark (no backbone runs; features are drawn per class).

Each class has a colour and its images are small JPEGs of that colour with noise; each
row's feature vector is its class centre plus Gaussian noise. ``flip`` train rows get the
features of one class (near its centre) but the label of the next: planted label errors, which
``collect``'s confident-learning pass should find; ``hard`` test rows lie most of the way
to the next class (mistakes the galleries and confused pairs show).
"""
from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Synthetic", "make_synthetic"]


@dataclass
class Synthetic:
    store: str
    model_dir: str
    classes: list[str]
    flipped_rows: list[int]  # store rows whose label is wrong on purpose
    hard_rows: list[int]  # test rows drawn most of the way to the next class
    split: np.ndarray  # split code per row


def _image(path: Path, rgb: tuple[float, float, float], rng: np.random.Generator,
           px: int) -> None:
    from PIL import Image

    base = np.array(rgb, np.float32)[None, None, :] * 255
    img = np.clip(base + rng.normal(0, 25, (px, px, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=85)


def make_synthetic(root: str | os.PathLike, *, classes: int = 6, per_class: int = 20,
                   dim: int = 32, flip: int = 4, hard: int = 0, noise: float = 0.9, epochs: int = 8,
                   seed: int = 0, px: int = 64, class_names: list[str] | None = None,
                   train: bool = True) -> Synthetic:
    """Images under ``root/images``, ``root/f.zarr`` and (``train``) ``root/model``.

    Splits per class: 60% train, 20% val, 20% test (at least one val and test image)."""
    from ..dataset import Manifest
    from ..models import ModelSpec, get_model_info, resolve_layer
    from ..store import create_store

    root = Path(root)
    rng = np.random.default_rng(seed)
    names = class_names or [f"class_{i:03d}" for i in range(classes)]
    c = len(names)
    paths, labels, split = [], [], []
    for k, name in enumerate(names):
        d = root / "images" / f"c{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        rgb = colorsys.hsv_to_rgb(k / c, 0.7, 0.9)
        n_val = n_test = max(1, per_class // 5)
        for i in range(per_class):
            p = d / f"img_{i:03d}.jpg"
            _image(p, rgb, rng, px)
            paths.append(str(p))
            labels.append(k)
            split.append(2 if i < n_test else 1 if i < n_test + n_val else 0)
    labels_a = np.array(labels, np.int32)
    split_a = np.array(split, np.int8)
    centres = rng.normal(0, 1.0, (c, dim)).astype(np.float32)
    true = labels_a.copy()
    train_rows = np.flatnonzero(split_a == 0)
    flipped = sorted(int(r) for r in rng.choice(train_rows, size=min(flip, len(train_rows)),
                                                replace=False)) if flip else []
    for r in flipped:  # the features (and image) of class true[r], the label of the next class
        labels_a[r] = (true[r] + 1) % c
    x = (centres[true] + rng.normal(0, noise, (len(true), dim))).astype(np.float32)
    # a planted error is clear-cut: its features lie near its true class's centre
    x[flipped] = centres[true[flipped]] + rng.normal(0, noise / 4, (len(flipped), dim))
    # hard test rows: 60% of the way to the next class's centre (mistaken for it)
    test_rows = np.flatnonzero(split_a == 2)
    hard_rows = rng.choice(test_rows, size=min(hard, len(test_rows)), replace=False) \
        if hard else np.zeros(0, np.int64)
    nxt = (true[hard_rows] + 1) % c
    x[hard_rows] = 0.4 * centres[true[hard_rows]] + 0.6 * centres[nxt] + \
        rng.normal(0, noise / 4, (len(hard_rows), dim))
    manifest = Manifest(str(root / "images"), paths, labels_a, split_a, names)
    info = get_model_info("efficientnet_lite0")
    spec = ModelSpec("efficientnet_lite0", resolve_layer(info, None))
    attrs = {"model": spec.to_dict(), "layer": spec.layer,
             "preprocess": {**info.preprocess.to_dict(), "views": "center"}, "seed": seed}
    url = str(root / "f.zarr")
    st = create_store(url, manifest, feature_dim=dim, attrs=attrs, chunk_rows=256)
    for i in range(st.n_chunks):
        a, b = st.chunk_bounds(i)
        st.write_chunk(i, x[a:b], np.ones(b - a, bool), [""] * (b - a))
    model_dir = str(root / "model")
    if train:
        _train(url, model_dir, epochs=epochs, seed=seed)
    return Synthetic(store=url, model_dir=model_dir, classes=names, flipped_rows=flipped,
                     hard_rows=sorted(int(r) for r in hard_rows), split=split_a)


def _train(store: str, model_dir: str, *, epochs: int, seed: int, **options: Any) -> None:
    from ..api import train_config
    from ..engines import get_executor
    from ..training import train_head

    cfg = train_config(optimizer="adam", lr=0.01, epochs=epochs, seed=seed, workers=2,
                       batch_size_per_worker=16, averaging_frequency=2, **options)
    ex = get_executor("local", {"n_workers": 0})  # in this process
    try:
        train_head(ex, store, cfg, model_dir, progress=False)
    finally:
        ex.close()
