"""Inference backends of the frozen prefix (deeptransfer.backends): OpenVINO and ONNX Runtime
give torch's features within the stated tolerance for every bundled model, at a pooled and
a map cut; a backend's store is the same on 0 and 2 workers; a store remembers its backend
(a resume with another is refused in one line); a missing extra is one line.

Tolerance (stated in the README): cosine >= 0.99999 per image and a max abs difference of
at most 1e-4 of the largest feature's magnitude (measured: 1e-6 - 1e-5 of it; float32 sums
in another order).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import deeptransfer as dt
from deeptransfer import backends
from deeptransfer.backends import build_backend, resolve_backend
from deeptransfer.errors import EngineUnavailableError, InvalidParameterError, StoreError
from deeptransfer.kernels import resize_crop_normalize
from deeptransfer.models import create_backbone, get_model_info
from deeptransfer.store import open_store
from photos import make_photo_dataset

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

COSINE = 0.99999
REL_ABS = 1e-4
FLOAT_BACKENDS = ["openvino", "onnxruntime"]


def assert_features_match(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    g, w = got.reshape(len(got), -1), want.reshape(len(want), -1)
    cos = (g * w).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1))
    assert cos.min() >= COSINE, cos
    assert np.abs(g - w).max() <= REL_ABS * np.abs(w).max(), np.abs(g - w).max()


def photo_batch(crop: int, pp, n: int = 3) -> np.ndarray:
    """n real photos (and a mirror) through featurize's own kernel, NHWC as the runner's."""
    from sklearn.datasets import load_sample_image
    from skimage import data

    imgs = [data.chelsea(), data.coffee(), load_sample_image("china.jpg")][:n]
    out = np.zeros((n, crop, crop, 3), np.float32)
    resize_crop_normalize(imgs, out, resize=pp.resize if crop == pp.crop else crop,
                          crop=crop, mean=pp.mean, std=pp.std, layout="nhwc", parallel=False)
    return out


# lite0/1/2 with their real bundled weights at their own crop; resnet50 and vgg16 with
# random weights at 64 x 64 (their export and compile at 224 take 10+ s each)
CASES = [
    ("efficientnet_lite0", "pool", True, True),
    ("efficientnet_lite0", "blocks.5", False, True),
    ("efficientnet_lite1", "pool", True, True),
    ("efficientnet_lite2", "blocks.6", False, True),
    ("resnet50", "pool", True, False),
    ("resnet50", "layer3", False, False),
    ("vgg16", "fc2", True, False),
    ("vgg16", "conv5_3", False, False),
]


@pytest.fixture(scope="module")
def torch_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("backend", FLOAT_BACKENDS)
@pytest.mark.parametrize("name,layer,pooled,pretrained", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_backend_features_equal_torch_within_tolerance(name, layer, pooled, pretrained,
                                                       backend, torch_one_thread):
    torch.manual_seed(0)
    bb = create_backbone(name, layer=layer, pretrained=pretrained, pooled=pooled)
    pp = get_model_info(name).preprocess
    crop = pp.crop if pretrained else 64
    x = photo_batch(crop, pp)
    with torch.inference_mode():
        want = bb(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    if not pooled:
        assert want.ndim == 4  # a map cut really is a map
    be = build_backend(backend, bb, batch_size=len(x), crop=crop, threads=1)
    assert be.name == backend
    assert_features_match(be.run(x), want)
    # the mirrored view as featurize averages it (maps flipped back before the average)
    from deeptransfer.featurization import view_features

    with torch.inference_mode():
        want_flip = view_features(bb, torch.from_numpy(x).permute(0, 3, 1, 2),
                                  "center+flip").numpy()
    assert_features_match(be.features(x, "center+flip"), want_flip)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    make_photo_dataset(root, bad=False)
    return str(root)


def featurize(photos, store, **kw):
    kw = {"workers": 0, "chunk_rows": 8, "batch_size": 4, "progress": False,
          "split": "train=0.5,val=0.25,test=0.25", **kw}
    return dt.featurize(photos, str(store), **kw)


@pytest.fixture(scope="module")
def torch_store(photos, tmp_path_factory):
    store = tmp_path_factory.mktemp("torch") / "f.zarr"
    rep = featurize(photos, store, backend="torch")
    assert rep.backend == "torch" and open_store(str(store)).attrs["backend"] == "torch"
    return str(store)


@pytest.mark.parametrize("backend", FLOAT_BACKENDS)
def test_a_backends_store_is_bitwise_the_same_on_0_and_2_workers(photos, torch_store,
                                                                  tmp_path, backend):
    a = featurize(photos, tmp_path / "a.zarr", backend=backend, workers=0)
    b = featurize(photos, tmp_path / "b.zarr", backend=backend, workers=2)
    assert a.backend == b.backend == backend
    fa = open_store(str(tmp_path / "a.zarr"))["features"][:]
    fb = open_store(str(tmp_path / "b.zarr"))["features"][:]
    assert np.array_equal(fa, fb)
    assert open_store(str(tmp_path / "b.zarr")).attrs["backend"] == backend
    # and within the tolerance of torch's store, image for image
    ref = open_store(torch_store)
    ok = ref["ok"][:]
    assert ok.sum() > 10
    assert_features_match(fa[ok], ref["features"][:][ok])


def test_resume_with_another_backend_is_refused_in_one_line(photos, torch_store, tmp_path):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(torch_store, store)
    with pytest.raises(StoreError) as e:
        featurize(photos, store, backend="openvino")
    msg = str(e.value)
    assert "\n" not in msg and "backend torch" in msg and "--backend torch" in msg
    # no --backend: the store's own backend resumes it (here: nothing left to compute)
    rep = featurize(photos, store)
    assert rep.reused and rep.backend == "torch"
    # a store from before backends (no attr) is a torch store
    import zarr

    g = zarr.open_group(str(store), mode="r+")
    attrs = dict(g.attrs)
    del attrs["backend"]
    g.attrs.put(attrs)
    assert "backend" not in open_store(str(store)).attrs
    assert featurize(photos, store, backend="torch").reused
    with pytest.raises(StoreError, match="--backend torch"):
        featurize(photos, store, backend="onnxruntime")


def test_a_new_store_takes_the_default_and_falls_back_to_torch_without_its_extra(
        photos, tmp_path, monkeypatch):
    assert resolve_backend(None) == (backends.DEFAULT_BACKEND, None)
    assert resolve_backend(None, device="cuda")[0] == "torch"  # only torch runs CUDA
    real = backends.backend_available
    monkeypatch.setattr(backends, "backend_available",
                        lambda name: name == "torch" or (name != "openvino" and real(name)))
    name, warning = resolve_backend(None)
    assert name == "torch" and "deeptransfer[openvino]" in warning
    rep = featurize(photos, tmp_path / "s.zarr")
    assert rep.backend == "torch" and any("deeptransfer[openvino]" in w for w in rep.warnings)
    # named explicitly, a missing backend is one line naming its extra, before any engine
    with pytest.raises(EngineUnavailableError) as e:
        featurize(photos, tmp_path / "t.zarr", backend="openvino")
    assert "pip install 'deeptransfer[openvino]'" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "t.zarr").exists()


def test_options_a_backend_does_not_have_are_one_line(photos, tmp_path):
    for kw, word in [({"backend": "torch", "precision": "int8"}, "int8 needs --backend"),
                     ({"backend": "openvino", "compile": True}, "--compile"),
                     ({"backend": "onnxruntime", "device": "cuda"}, "--backend torch"),
                     ({"backend": "tensorrt"}, "must be one of")]:
        with pytest.raises(InvalidParameterError) as e:
            featurize(photos, tmp_path / "x.zarr", **kw)
        assert word in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))


def test_cli_featurize_backend_flag(photos, tmp_path, capsys):
    from deeptransfer.cli import main

    store = tmp_path / "c.zarr"
    assert main(["featurize", photos, str(store), "--backend", "onnxruntime", "--workers",
                 "0", "--chunk-rows", "8", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "backend      onnxruntime" in out
    assert open_store(str(store)).attrs["backend"] == "onnxruntime"
    assert main(["info", str(store)]) == 0
    assert "backend      onnxruntime" in capsys.readouterr().out
    assert main(["info", str(store), "--json"]) == 0
    assert '"backend": "onnxruntime"' in capsys.readouterr().out
    assert main(["featurize", photos, str(store), "--backend", "torch", "--workers",
                 "0", "--chunk-rows", "8", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend onnxruntime" in err[0]


def test_predict_runs_the_training_stores_backend_and_gives_its_probabilities(photos,
                                                                           tmp_path):
    from deeptransfer.evaluation import predict_split  # noqa: F401 - the public path below

    store = tmp_path / "o.zarr"
    featurize(photos, store, backend="onnxruntime")
    model_dir = tmp_path / "m"
    dt.train(str(store), str(model_dir), workers=1, progress=False, epochs=3)
    m = dt.load(model_dir)
    assert m.backend == "onnxruntime"
    st = open_store(str(store))
    rows = np.flatnonzero(st["ok"][:])[:6]
    paths = [str(p) for p in st["paths"][:][rows]]
    want = m.predict_proba_features(st.read_rows(rows)[0])
    runner = m.runner(4)
    assert runner.backend.name == "onnxruntime"
    got, reasons = m.predict_proba_sources(paths, batch_size=4)
    assert not any(reasons)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # another backend on request, within the tolerance of the store's features
    assert m.runner(4, "torch").backend.name == "torch"
    other, _ = m.predict_proba_sources(paths, batch_size=4, backend="torch")
    np.testing.assert_allclose(other, want, atol=1e-4)
    assert [p.label for p in m.predict(paths, backend="openvino")] == \
        [m.classes[i] for i in want.argmax(1)]
