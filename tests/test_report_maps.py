"""The report of a fine-tuned model (a suffix on a store of maps): the predictions are the
saved suffix's, the label-error refits train a head on the pooled maps."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import deeptransfer as dt
from deeptransfer.dataset import Manifest
from deeptransfer.engines import get_executor
from deeptransfer.report import ReportOptions, collect
from deeptransfer.store import create_store
from suffix_models import CLASSES, SHAPE, save_suffix_model, store_attrs, tuned_params


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    base = tmp_path_factory.mktemp("maps")
    rng = np.random.default_rng(0)
    n_per, c = 10, len(CLASSES)
    paths, labels, split = [], [], []
    for k in range(c):
        for i in range(n_per):
            p = base / f"{k}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
            labels.append(k)
            split.append(2 if i < 3 else 0)
    labels = np.array(labels, np.int32)
    m = Manifest(str(base), paths, labels, np.array(split, np.int8), CLASSES)
    url = str(base / "maps.zarr")
    attrs = {k: v for k, v in store_attrs(dtype="float16").items()
             if k not in ("feature_dim", "maps", "feature_shape", "dtype")}
    st = create_store(url, m, feature_dim=SHAPE[0], attrs=attrs, dtype="float16",
                      feature_shape=SHAPE, chunk_rows=16)
    centres = rng.normal(0, 1, (c, SHAPE[0], 1, 1))
    x = (np.abs(centres[labels] + rng.normal(0, 0.5, (len(labels), *SHAPE)))).astype(np.float16)
    for i in range(st.n_chunks):
        a, b = st.chunk_bounds(i)
        st.write_chunk(i, x[a:b], np.ones(b - a, bool), [""] * (b - a))
    model = save_suffix_model(base / "model", tuned_params(), dtype="float16")
    return str(model), url


def test_a_suffix_model_s_report_uses_its_suffix(maps, tmp_path):
    model, store = maps
    ex = get_executor("local", {"n_workers": 0})
    try:
        data = collect(ex, model, store, ReportOptions(folds=3, oof_epochs=5, gallery=5))
    finally:
        ex.close()
    m = dt.evaluate(model, store, split="test", workers=0)
    assert data.per_class == m["per_class"] and data.headline["top1"] == m["top1"]
    assert data.label_errors is not None and data.oof_accuracy is not None
    assert len(data.low_margin) == 5 and set(data.gallery_rows()) == set(data.thumbs)
    out = tmp_path / "r.html"
    dt.report(model, store, str(out), workers=0, folds=0)
    assert 'id="per-class"' in out.read_text(encoding="utf-8")
