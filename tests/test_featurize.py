"""The featurize step end to end on real photos: features, bad input, resume, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import deeptransfer as dt
from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.dataset import load_dataset
from deeptransfer.errors import (DatasetNotFoundError, InvalidParameterError, StoreError,
                                 UnknownModelError)
from deeptransfer.featurization import run_featurize
from deeptransfer.kernels import reference_preprocess
from deeptransfer.models import ModelSpec, create_backbone
from deeptransfer.store import open_store
from photos import make_photo_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    bad = make_photo_dataset(root)
    return str(root), bad


@pytest.fixture(scope="module")
def featurized(dataset, tmp_path_factory):
    root, _ = dataset
    store = str(tmp_path_factory.mktemp("s") / "f.zarr")
    rep = dt.featurize(root, store, engine="local", workers=2, chunk_rows=8, batch_size=4,
                       split="train=0.5,val=0.25,test=0.25", progress=False)
    return store, rep


def test_every_good_image_featurized_and_every_bad_one_skipped_with_reason(dataset, featurized):
    root, bad = dataset
    store, rep = featurized
    st = open_store(store)
    assert st.is_complete()
    skipped = {p.split(root + "/", 1)[1]: r for p, r in st.skipped()}
    assert set(skipped) == set(bad), skipped
    for rel, word in bad.items():
        assert word.lower() in skipped[rel].lower(), (rel, skipped[rel])
    assert rep.featurized == st.n_rows - len(bad) == 24
    ok = st["ok"][:]
    feats = st["features"][:]
    assert np.isfinite(feats).all()
    assert (np.abs(feats[ok]).sum(axis=1) > 0).all() and (feats[~ok] == 0).all()


def test_features_match_reference_preprocessing_and_backbone(featurized):
    """Decode + fused kernel + backbone == PIL reference preprocessing + backbone."""
    from PIL import Image

    store, _ = featurized
    st = open_store(store)
    rows = np.flatnonzero(st["ok"][:])[:6]
    bb = create_backbone(ModelSpec("efficientnet_lite0"))
    pp = bb.preprocess
    ref = []
    for r in rows:
        img = np.asarray(Image.open(str(st["paths"][r])).convert("RGB"))
        ref.append(reference_preprocess(img, resize=pp.resize, crop=pp.crop, mean=pp.mean,
                                        std=pp.std))
    with torch.inference_mode():
        x = torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2).contiguous()
        expected = bb(x).numpy()
    got = st.read_rows(rows)[0]
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.9999, cos


def test_store_metadata(featurized):
    store, _ = featurized
    g = zarr.open_group(store, mode="r")
    a = dict(g.attrs)
    assert a["model"] == {"name": "efficientnet_lite0", "layer": "pool", "weights": None}
    assert a["preprocess"]["crop"] == 224 and a["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert a["feature_dim"] == 1280 and g["features"].shape[1] == 1280
    assert a["classes"] == ["cat", "coffee", "scene"]
    assert {"torch", "numpy", "zarr", "numba"} <= set(a["versions"])
    assert a["split_config"]["split"] == "train=0.5,val=0.25,test=0.25"
    import dask.array as da

    assert da.from_zarr(store, component="features").shape == g["features"].shape


def test_same_store_inline_as_with_worker_processes(dataset, featurized, tmp_path):
    """Bitwise: the same threads per worker give the same features wherever they run."""
    root, _ = dataset
    store, _ = featurized
    other = str(tmp_path / "inline.zarr")
    with LocalExecutor(0, threads_per_worker=1) as ex:
        dt.featurize(root, other, engine=ex, chunk_rows=8, batch_size=4,
                     split="train=0.5,val=0.25,test=0.25", progress=False)
    a, b = open_store(store), open_store(other)
    for name in ("labels", "split", "paths", "ok", "reasons", "features"):
        assert np.array_equal(a[name][:], b[name][:]), name


def test_killed_run_resumes_to_the_same_store(dataset, tmp_path):
    root, _ = dataset
    manifest = load_dataset(root, split="train=0.5,val=0.25,test=0.25")
    clean, killed = str(tmp_path / "clean.zarr"), str(tmp_path / "killed.zarr")
    kw = dict(model=ModelSpec("efficientnet_lite0"), chunk_rows=8, batch_size=4)
    with LocalExecutor(0) as ex:
        run_featurize(ex, manifest, clean, progress=False, **kw)

        calls = []

        def die_after_two(res):
            calls.append(res.chunk)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the user pressed ^C half-way

        with pytest.raises(KeyboardInterrupt):
            run_featurize(ex, manifest, killed, progress=die_after_two, **kw)
        assert len(open_store(killed).pending_chunks()) == 2
        rep = run_featurize(ex, manifest, killed, progress=False, **kw)
    assert rep.computed_now == len(manifest) - 16  # only the two unfinished chunks
    a, b = open_store(clean), open_store(killed)
    for name in ("features", "ok", "reasons", "labels", "split"):
        assert np.array_equal(a[name][:], b[name][:]), name
    again = dt.featurize(root, killed, engine="local", workers=0, chunk_rows=8, batch_size=4,
                         split="train=0.5,val=0.25,test=0.25", progress=False)
    assert again.computed_now == 0  # idempotent: nothing left to do


def test_float16_store_and_other_layer(dataset, tmp_path):
    root, _ = dataset
    rep = dt.featurize(root, str(tmp_path / "h.zarr"), layer="blocks.5", dtype="float16",
                       engine="local", workers=0, chunk_rows=64, progress=False)
    st = open_store(str(tmp_path / "h.zarr"))
    assert rep.feature_dim == 192 and st["features"].dtype == np.float16
    assert st.summary()["featurized"] == 24


def test_clear_errors(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(DatasetNotFoundError, match="not a folder"):
        dt.featurize(str(tmp_path / "missing"), str(tmp_path / "s.zarr"), workers=0)
    with pytest.raises(UnknownModelError, match="efficientnet_lite0"):
        dt.featurize(root, str(tmp_path / "s.zarr"), model="efficientnet_b9", workers=0)
    with pytest.raises(UnknownModelError, match="pool"):
        dt.featurize(root, str(tmp_path / "s.zarr"), layer="fc9", workers=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="Cannot"):
        dt.featurize(root, str(blocker / "s.zarr"), workers=0)
    with pytest.raises(InvalidParameterError, match="batch_size"):
        dt.featurize(root, str(tmp_path / "s.zarr"), batch_size=0, workers=0)
    with pytest.raises(InvalidParameterError, match="engine"):
        dt.featurize(root, str(tmp_path / "s.zarr"), engine="ray")
    with pytest.raises(StoreError, match="in-memory"):
        dt.featurize(root, "memory://x.zarr", workers=2)


def test_flip_views_average_the_image_and_its_mirror(dataset, featurized, tmp_path):
    root, _ = dataset
    store, _ = featurized
    with LocalExecutor(0, threads_per_worker=1) as ex:
        dt.featurize(root, str(tmp_path / "flip.zarr"), engine=ex, chunk_rows=8, batch_size=4,
                     split="train=0.5,val=0.25,test=0.25", views="center+flip", progress=False)
    flip, center = open_store(str(tmp_path / "flip.zarr")), open_store(store)
    assert flip.attrs["preprocess"]["views"] == "center+flip"
    rows = np.flatnonzero(center["ok"][:])[:4]
    bb = create_backbone(ModelSpec("efficientnet_lite0"))
    pp = bb.preprocess
    from PIL import Image

    imgs = [np.asarray(Image.open(str(center["paths"][r])).convert("RGB")) for r in rows]
    x = np.stack([reference_preprocess(i, resize=pp.resize, crop=pp.crop, mean=pp.mean,
                                       std=pp.std) for i in imgs])
    with torch.inference_mode():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        expected = ((bb(t) + bb(torch.flip(t, dims=[3]))) / 2).numpy()
    got = flip.read_rows(rows)[0]
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert not np.allclose(got, center.read_rows(rows)[0], atol=1e-3)


@pytest.mark.parametrize("engine", ["dask", "spark"])
def test_bad_dataset_options_fail_before_the_engine_starts(engine, tmp_path, monkeypatch):
    # a mistyped path must not cost a cluster start (seconds on Dask, ~10 s on Spark)
    import deeptransfer.api as api

    def no_engine(*a, **kw):
        raise AssertionError("the engine was started before the options were checked")

    monkeypatch.setattr(api, "engine_scope", no_engine)
    with pytest.raises(DatasetNotFoundError, match="not a folder"):
        dt.featurize(str(tmp_path / "no-such-folder"), str(tmp_path / "f.zarr"), engine=engine)
    (tmp_path / "data").mkdir()
    with pytest.raises(InvalidParameterError, match="split"):
        dt.featurize(str(tmp_path / "data"), str(tmp_path / "f.zarr"), engine=engine,
                     split="train=0.7,val=0.9")
    with pytest.raises(InvalidParameterError, match="not both"):
        dt.featurize(str(tmp_path / "data"), str(tmp_path / "f.zarr"), engine=engine,
                     split="train=0.7,val=0.3", per_class_train=3)


def test_non_finite_features_are_a_reason_and_a_zero_row(dataset, monkeypatch):
    # every caller (featurize, predict, Spark ML) gets the same answer for a row whose
    # network output is not finite: a reason, and no NaN left in the row
    from deeptransfer.featurization import FeaturizeSpec, featurize_sources, get_runner

    root, _ = dataset
    paths = sorted(str(p) for p in __import__("pathlib").Path(root).rglob("*.jpg"))[:3]
    runner = get_runner(FeaturizeSpec(store_url="", model=ModelSpec("efficientnet_lite0"),
                                      batch_size=4))
    real = runner.forward

    def poisoned(n, views="center"):
        out = real(n, views)
        out[1, 5] = np.nan
        return out

    monkeypatch.setattr(runner, "forward", poisoned)
    feats, reasons = featurize_sources(runner, paths)
    good = [i for i in range(len(paths)) if i != 1 and not reasons[i]]
    assert reasons[1] == "non-finite features" and not feats[1].any()
    assert good and np.isfinite(feats).all() and all(feats[i].any() for i in good)
