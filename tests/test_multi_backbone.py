"""Several backbones in one store (``--model efficientnet_lite0+efficientnet_lite1``): each
image through each part with its own preprocessing, the pooled features side by side; the
parts in the attrs; predict, ONNX export and Spark ML's predictor run every part."""
from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import deeptransfer as dt
from deeptransfer.cli import main
from deeptransfer.errors import InvalidParameterError, UnknownModelError
from deeptransfer.featurization import FeaturizeSpec, featurize_sources, get_runner, load_image
from deeptransfer.kernels import resize_crop_normalize
from deeptransfer.models import ModelSpec, composite, get_model_info
from deeptransfer.store import open_store
from deeptransfer.training import TrainingWarning
from photos import make_photo_dataset
from test_train import SerialExecutor  # the training tests' in-process engine

LITE01 = "efficientnet_lite0+efficientnet_lite1"
FILES = {"cat": ["cat_0.jpg", "cat 1 (copy).png", "cat_2_grey.jpg"],
         "coffee": ["coffee_0.jpg", "coffee 1 (copy).png", "coffee_2_grey.jpg"],
         "scene": ["scene_0.jpg", "scene 1 (copy).png", "scene_2_grey.jpg"]}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """3 photos per class, and one truncated JPEG every part must skip with its reason."""
    full = tmp_path_factory.mktemp("full")
    make_photo_dataset(full, bad=False)
    root = tmp_path_factory.mktemp("photos")
    for cls, names in FILES.items():
        (root / cls).mkdir()
        for n in names:
            shutil.copy(full / cls / n, root / cls / n)
    good = (root / "cat" / "cat_0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def _featurize(photos: Path, store: Path, model) -> Path:
    dt.featurize(str(photos), str(store), model=model, workers=0, per_class_train=2,
                 progress=False)
    return store


@pytest.fixture(scope="module")
def stores(photos, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("stores")
    return {"lite01": _featurize(photos, d / "lite01.zarr",
                                 ["efficientnet_lite0", "efficientnet_lite1"]),
            "lite0": _featurize(photos, d / "lite0.zarr", "efficientnet_lite0"),
            "lite1": _featurize(photos, d / "lite1.zarr", "efficientnet_lite1")}


def test_features_are_the_parts_side_by_side_bitwise(stores):
    both, l0, l1 = (open_store(str(stores[k])) for k in ("lite01", "lite0", "lite1"))
    assert both.feature_dim == l0.feature_dim + l1.feature_dim == 2560
    f = both["features"][:]
    ok = both["ok"][:]
    assert np.array_equal(ok, l0["ok"][:]) and np.array_equal(ok, l1["ok"][:])
    assert ok.sum() == 9 and not ok.all()
    assert np.array_equal(f[:, :1280], l0["features"][:])   # bitwise, Lite0 at 224 px
    assert np.array_equal(f[:, 1280:], l1["features"][:])   # bitwise, Lite1 at 240 px
    assert not np.array_equal(f[ok, :1280], f[ok, 1280:])
    assert both.skipped() == l0.skipped()   # the truncated JPEG, with the first part's reason
    assert "truncated.jpg" in both.skipped()[0][0]


def test_attrs_list_the_parts(stores):
    attrs = open_store(str(stores["lite01"])).attrs
    assert attrs["model"] == {"name": LITE01, "layer": "pool", "weights": None}
    ModelSpec.from_dict(attrs["model"])   # one ModelSpec: readers of one backbone read it
    parts = attrs["parts"]
    assert [p["model"]["name"] for p in parts] == ["efficientnet_lite0", "efficientnet_lite1"]
    assert [p["preprocess"]["crop"] for p in parts] == [224, 240]
    assert [p["feature_dim"] for p in parts] == [1280, 1280]
    assert attrs["preprocess"] == {"views": "center",
                                   "parts": [p["preprocess"] for p in parts]}
    assert get_model_info(LITE01).layers == {"pool": 2560}


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("m") / "model"
    with warnings.catch_warnings():  # no val rows in so tiny a store: said, and meant here
        warnings.simplefilter("ignore", TrainingWarning)
        dt.train(str(stores["lite01"]), str(model_dir), engine=SerialExecutor(1), epochs=2,
                 progress=False)
    return model_dir


def _paths_and_rows(store_url: Path) -> tuple[list[str], np.ndarray]:
    st = open_store(str(store_url))
    rows = np.flatnonzero(st["ok"][:])
    return [str(p) for p in st["paths"][:][rows]], st.read_rows(rows)[0]


def _predict_probs(m, paths: list[str]) -> np.ndarray:
    preds = m.predict(paths, top_k=len(m.classes))
    assert all(p.error is None for p in preds)
    return np.array([[dict(p.top_k)[c] for c in m.classes] for p in preds], np.float32)


def test_predict_on_files_gives_the_store_rows_probabilities(stores, trained):
    m = dt.load(trained)
    paths, feats = _paths_and_rows(stores["lite01"])
    from_store = m.predict_proba_features(feats)
    np.testing.assert_allclose(_predict_probs(m, paths), from_store, rtol=0, atol=1e-6)
    assert m.feature_dim == 2560 and [p.crop for p in m.part_preprocess] == [224, 240]
    # evaluate accepts the store the model was trained on
    assert dt.evaluate(str(trained), str(stores["lite01"]), split="train", workers=0)["n"] == 6
    bad = m.predict([str(Path(paths[0]).parent / "truncated.jpg")])[0]
    assert bad.label is None and "JPEG" in bad.error


def test_spark_ml_runs_every_part(stores, trained):
    pytest.importorskip("pyspark")
    from deeptransfer.adapters import spark_ml

    paths, feats = _paths_and_rows(stores["lite01"])
    probs = spark_ml._predict_values(spark_ml._read_model(str(trained)), 4, paths + [None])
    assert probs[-1] is None
    np.testing.assert_allclose(np.stack(probs[:-1]),
                               dt.load(trained).predict_proba_features(feats), atol=1e-6)
    # the featurizer transformer takes a composite name too: the store's rows, bitwise
    fz = spark_ml.DeepImageFeaturizer(modelName=LITE01, batchSize=4)
    assert fz.feature_dim() == 2560
    rows = spark_ml.featurize_values(get_runner(fz._spec()), paths[:3])
    assert np.array_equal(np.stack(rows), feats[:3])


def test_export_has_one_input_per_part_and_matches_predict(stores, trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = dt.load(trained)
    paths, _ = _paths_and_rows(stores["lite01"])
    paths = paths[:3]
    out = m.export(tmp_path / "model.onnx", format="onnx")
    meta = json.loads(Path(f"{out}.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == ["image_0", "image_1"]
    assert [i["preprocess"]["crop"] for i in meta["inputs"]] == [224, 240]
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    feed = {}
    for inp in meta["inputs"]:
        pp = inp["preprocess"]
        x = np.zeros((len(paths), pp["crop"], pp["crop"], 3), np.float32)
        resize_crop_normalize([load_image(p, pp["resize"]) for p in paths], x,
                              resize=pp["resize"], crop=pp["crop"], mean=tuple(pp["mean"]),
                              std=tuple(pp["std"]), interpolation=pp["interpolation"],
                              layout="nhwc", parallel=False)
        feed[inp["name"]] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    assert [i.name for i in sess.get_inputs()] == ["image_0", "image_1"]
    (probs,) = sess.run(None, feed)
    expected = _predict_probs(m, paths)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
    # TorchScript: the same inputs, in the same order
    import torch

    ts = torch.jit.load(str(m.export(tmp_path / "model.pt", format="torchscript")))
    with torch.inference_mode():
        got = ts(*(torch.from_numpy(feed[n]) for n in ("image_0", "image_1"))).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_layer_weights_and_maps_are_refused_in_one_line(photos, tmp_path, capsys):
    with pytest.raises(InvalidParameterError, match="--layer blocks.5 .*--model"):
        dt.featurize(str(photos), str(tmp_path / "s.zarr"), model=LITE01, layer="blocks.5",
                     workers=0)
    with pytest.raises(InvalidParameterError, match="--weights"):
        dt.featurize(str(photos), str(tmp_path / "s.zarr"), model=LITE01, weights="w.pth",
                     workers=0)
    with pytest.raises(InvalidParameterError, match="--keep-maps .*--model"):
        composite.check_options(LITE01, keep_maps=True)
    with pytest.raises(InvalidParameterError, match="--keep-maps"):
        get_runner(FeaturizeSpec(store_url="", model=ModelSpec(LITE01, "pool"),
                                 keep_maps=True))
    assert main(["featurize", str(photos), str(tmp_path / "s.zarr"), "--model", LITE01,
                 "--layer", "blocks.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--layer" in err and "--model" in err
    assert not (tmp_path / "s.zarr").exists()


def test_an_unknown_part_gives_the_unknown_model_message(photos, tmp_path, capsys):
    with pytest.raises(UnknownModelError, match="Unknown model 'efficientnet_lite9'.*"
                                                "Did you mean"):
        dt.featurize(str(photos), str(tmp_path / "s.zarr"),
                     model="efficientnet_lite0+efficientnet_lite9", workers=0)
    assert main(["featurize", str(photos), str(tmp_path / "s.zarr"), "--model",
                 "efficientnet_lite0+efficientnet_lite9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Unknown model 'efficientnet_lite9'" in err
    with pytest.raises(InvalidParameterError, match="more than once"):
        composite.parts_of("efficientnet_lite0+efficientnet_lite0")


def test_throughput_of_two_parts_against_one(photos, tmp_path):
    """Printed, not asserted: featurize images/s of lite0+lite1 and of each alone, on one
    thread (as each featurize worker runs)."""
    import torch

    paths = sorted(str(p) for p in photos.rglob("*_0.jpg")) * 22   # 66 images
    rates = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model in ("efficientnet_lite0", "efficientnet_lite1", LITE01):
            runner = get_runner(FeaturizeSpec(store_url="", model=ModelSpec(model)))
            featurize_sources(runner, paths[:16])   # warm: model built, kernels compiled
            t0 = time.perf_counter()
            feats, reasons = featurize_sources(runner, paths)
            rates[model] = len(paths) / (time.perf_counter() - t0)
            assert not any(reasons) and feats.shape == (len(paths), runner.feature_dim)
    finally:
        torch.set_num_threads(threads)
    print(f"\nfeaturize throughput, {len(paths)} images, 1 thread: "
          + ", ".join(f"{k} {v:.1f} images/s" for k, v in rates.items()))
