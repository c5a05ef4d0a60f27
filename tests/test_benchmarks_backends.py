"""benchmarks/featurize.py's backend measurements and benchmarks/peers.py's Ray Data peer, on
a few generated photos: each gives real numbers (features of every image, a finite rate)."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

from photos import make_photo_dataset  # noqa: E402


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    make_photo_dataset(root, bad=False)
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def test_backend_forward_ips_and_probe_accuracy(photo_paths, tmp_path):
    pytest.importorskip("onnxruntime")
    import featurize as bench  # benchmarks/featurize.py

    import deeptransfer as dt

    batch = np.zeros((2, 224, 224, 3), np.float32)
    ips = bench.backend_forward_ips("onnxruntime", "efficientnet_lite0", None, batch, 0.2, 1)
    assert ips > 0 and math.isfinite(ips)
    store = str(tmp_path / "s.zarr")
    root = os.path.dirname(os.path.dirname(photo_paths[0]))
    dt.featurize(root, store, workers=0, backend="onnxruntime", split="train=0.5,test=0.5",
                 chunk_rows=8, batch_size=4, progress=False)
    acc = bench.probe_accuracy(store)
    assert acc is not None and 0.0 <= acc <= 1.0


def test_the_ray_data_peer_featurizes_every_image(photo_paths, tmp_path):
    pytest.importorskip("ray")
    import ray

    import peers

    paths = photo_paths[:6]
    startup = peers.start_ray(1)
    try:
        out = peers.featurize_ray(paths, str(tmp_path / "ray.parquet"), workers=1,
                                  batch_size=4)
        rows = ray.data.read_parquet(str(tmp_path / "ray.parquet")).take_all()
    finally:
        ray.shutdown()
    assert startup > 0 and out["seconds"] > 0 and out["images"] == len(paths)
    assert sorted(os.path.basename(r["path"]) for r in rows) == \
        sorted(os.path.basename(p) for p in paths)
    feats = np.stack([np.asarray(r["features"], np.float32) for r in rows])
    assert feats.shape == (len(paths), 1280) and np.isfinite(feats).all()
    assert (np.abs(feats).sum(1) > 0).all()
