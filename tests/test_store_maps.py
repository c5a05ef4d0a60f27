"""A store of maps (featurize --keep-maps): the N x C x H x W array, its attrs, its identity,
`info`, the refusal for a vector layer, and the bytes a map takes on disk."""
from __future__ import annotations

import json

import numpy as np
import pytest

import deeptransfer as dt
from deeptransfer.cli import main
from deeptransfer.errors import StoreError, UnknownModelError
from deeptransfer.store import open_store
from photos import make_photo_dataset

SPLIT = "train=0.5,val=0.25,test=0.25"
KW = dict(engine="local", workers=0, chunk_rows=8, batch_size=4, split=SPLIT, progress=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("photos")
    make_photo_dataset(r, bad=False)
    return str(r)


@pytest.fixture(scope="module")
def stores(root, tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    maps, pooled = str(d / "maps.zarr"), str(d / "pooled.zarr")
    dt.featurize(root, maps, layer="blocks.5", keep_maps=True, **KW)
    dt.featurize(root, pooled, layer="blocks.5", **KW)
    return maps, pooled


def test_map_store_holds_n_c_h_w_float16_with_its_shape_in_the_attrs(stores):
    st = open_store(stores[0])
    n = st.n_rows
    assert st["features"].shape == (n, 192, 7, 7)
    assert st["features"].dtype == np.float16  # the default for maps
    assert st["features"].chunks == (8, 192, 7, 7)  # chunk_rows whole maps: one task each
    assert st.attrs["maps"] is True and st.attrs["feature_shape"] == [192, 7, 7]
    assert st.attrs["feature_dim"] == 192 and st.attrs["layer"] == "blocks.5"
    assert st.feature_shape == (192, 7, 7) and st.maps
    x, y = st.read_rows(np.array([3, 0, 5]))
    assert x.dtype == np.float32 and x.shape == (3, 192, 7, 7) and y.dtype == np.int64
    assert st.read_rows(np.array([], dtype=np.int64))[0].shape == (0, 192, 7, 7)


def test_a_maps_global_average_is_the_pooled_feature(stores):
    """The stored map is the cut's map, not something else of that shape."""
    maps, pooled = (open_store(s) for s in stores)
    rows = np.arange(maps.n_rows)
    xm, ym = maps.read_rows(rows)
    xp, yp = pooled.read_rows(rows)
    assert np.array_equal(ym, yp)
    # float16 maps: ~3 decimal digits per value, the mean over 49 of them as close or closer
    np.testing.assert_allclose(xm.mean(axis=(2, 3)), xp, rtol=2e-3, atol=2e-3)


def test_pooled_store_attrs_and_an_old_store_without_them(stores, root, tmp_path):
    st = open_store(stores[1])
    assert st.attrs["maps"] is False and st.attrs["feature_shape"] == [192]
    assert st["features"].dtype == np.float32  # vectors keep float32 by default
    old = str(tmp_path / "old.zarr")
    dt.featurize(root, old, **KW)
    import zarr

    g = zarr.open_group(old, mode="r+")
    attrs = dict(g.attrs)
    for k in ("maps", "feature_shape", "train_views"):
        attrs.pop(k)
    g.attrs.put(attrs)  # as written before maps existed
    o = open_store(old)
    assert o.feature_shape == (1280,) and not o.maps and o.train_views == 0
    assert o.read_rows(np.array([0, 1]))[0].shape == (2, 1280)
    again = dt.featurize(root, old, **KW)  # the same job resumes it: missing keys = pooled
    assert again.computed_now == 0


def test_a_resume_with_maps_where_the_store_has_vectors_is_refused(stores, root):
    with pytest.raises(StoreError, match="feature_shape|maps"):
        dt.featurize(root, stores[1], layer="blocks.5", keep_maps=True, dtype="float32", **KW)


def test_keep_maps_of_a_vector_layer_is_one_line_before_any_engine(root, tmp_path, capsys,
                                                                  monkeypatch):
    import deeptransfer.api as api

    def no_engine(*a, **k):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(api, "get_executor", no_engine)
    store = str(tmp_path / "v.zarr")
    with pytest.raises(UnknownModelError, match="--keep-maps") as exc:
        dt.featurize(root, store, layer="pool", keep_maps=True, progress=False)
    assert "--layer" in str(exc.value) and "\n" not in str(exc.value)
    rc = main(["featurize", root, store, "--layer", "pool", "--keep-maps"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--keep-maps" in err[0] and "blocks.5" in err[0]
    import os

    assert not os.path.exists(store)


def test_info_shows_the_shape_dtype_and_size_on_disk(stores, capsys):
    assert main(["info", stores[0]]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("shape"))
    assert "192 x 7 x 7" in line and "maps" in line and "float16" in line
    assert "18.4 KB" in line  # 192 * 49 * 2 bytes before compression
    assert "on disk" in next(ln for ln in out.splitlines() if ln.startswith("bytes"))
    assert main(["info", stores[0], "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["feature_shape"] == [192, 7, 7] and s["maps"] and s["dtype"] == "float16"
    assert s["bytes_per_row"] == 192 * 49 * 2 and s["bytes"] > 0


def test_caltech256_map_cache_fits_in_1_gb(stores):
    """Issue 12's target: lite0 blocks.5 maps of 30,607 images (one center view) <= 1 GB.
    Measured on the compressed chunk files of real photos (compression helps little on
    float16 activations; the raw bound alone is 0.58 GB)."""
    import os

    st = open_store(stores[0])
    feats = os.path.join(stores[0], "features")
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(feats) for f in fs)
    per_image = size / st.n_rows
    raw = 192 * 7 * 7 * 2
    caltech256 = per_image * 30_607
    print(f"\nlite0 blocks.5 float16 maps: {per_image / 1000:.1f} KB/image on disk "
          f"(raw {raw / 1000:.1f} KB); Caltech-256 (30,607 images): {caltech256 / 1e9:.2f} GB")
    assert per_image <= raw * 1.01  # zstd never makes them larger (beyond its header)
    assert caltech256 <= 1e9
