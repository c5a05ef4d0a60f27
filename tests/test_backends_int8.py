"""--precision int8: the frozen prefix quantized statically (post-training), calibrated on a
seeded sample of the dataset's own training images, the calibration recorded in the store
(and part of its identity); never silent. Its accuracy cost is measured by
benchmarks/featurize.py --precision int8 (docs/benchmarks.md), not here."""
from __future__ import annotations

import numpy as np
import pytest

import deeptransfer as dt
from deeptransfer.backends.calibration import calibration_sample
from deeptransfer.dataset import load_dataset
from deeptransfer.errors import StoreError
from deeptransfer.store import open_store
from test_backends import featurize, photos  # noqa: F401 - the photos fixture

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("onnxruntime")

SPLIT = "train=0.5,val=0.25,test=0.25"


@pytest.fixture(scope="module")
def fp32(photos, tmp_path_factory):
    store = tmp_path_factory.mktemp("fp32") / "f.zarr"
    featurize(photos, store, backend="openvino")
    return str(store)


def test_the_calibration_sample_is_seeded_training_images(photos):
    m = load_dataset(photos, split=SPLIT, seed=0)
    train = set(np.asarray(m.paths)[m.rows("train")])
    a = calibration_sample(m.paths, m.rows("train"), seed=0, n=5)
    assert len(a) == 5 and set(a) <= train and len(set(a)) == 5
    assert calibration_sample(m.paths, m.rows("train"), seed=0, n=5) == a
    assert calibration_sample(m.paths, m.rows("train"), seed=1, n=5) != a
    assert len(calibration_sample(m.paths, m.rows("train"), seed=0, n=1000)) == len(train)


@pytest.mark.parametrize("backend,method", [("openvino", "nncf.quantize"),
                                            ("onnxruntime", "quantize_static")])
def test_int8_quantizes_the_prefix_and_records_its_calibration(photos, fp32, tmp_path,
                                                               backend, method):
    store = tmp_path / "q.zarr"
    rep = featurize(photos, store, backend=backend, precision="int8", calibration_images=6)
    q = open_store(str(store)).attrs["quantization"]
    assert rep.quantization == q and rep.backend == backend
    assert q["precision"] == "int8" and q["images"] == 6 and q["seed"] == 0
    assert q["split"] == "train" and method in q["method"]
    st, ref = open_store(str(store)), open_store(fp32)
    ok = ref["ok"][:]
    got, want = st["features"][:][ok], ref["features"][:][ok]
    assert np.isfinite(got).all() and st["ok"][:].sum() == ok.sum()
    # really int8: not the float features, yet the same features up to quantization noise
    assert not np.allclose(got, want, atol=1e-4)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.mean() > 0.9, cos
    # the info summary says so too
    assert dt.info(str(store))["quantization"]["images"] == 6


def test_int8_store_is_the_same_on_0_and_2_workers_and_refuses_a_float_resume(photos,
                                                                              tmp_path):
    a = featurize(photos, tmp_path / "a.zarr", backend="openvino", precision="int8",
                  calibration_images=6)
    featurize(photos, tmp_path / "b.zarr", backend="openvino", precision="int8",
              calibration_images=6, workers=2)
    assert np.array_equal(open_store(str(tmp_path / "a.zarr"))["features"][:],
                          open_store(str(tmp_path / "b.zarr"))["features"][:])
    assert a.quantization["images"] == 6
    with pytest.raises(StoreError) as e:
        featurize(photos, tmp_path / "a.zarr", backend="openvino")
    assert "int8" in str(e.value) and "--precision int8" in str(e.value)
    assert "\n" not in str(e.value)
    # another calibration is another store too
    with pytest.raises(StoreError):
        featurize(photos, tmp_path / "a.zarr", backend="openvino", precision="int8",
                  calibration_images=5)
    assert featurize(photos, tmp_path / "a.zarr", backend="openvino", precision="int8",
                     calibration_images=6).reused


def test_onnxruntime_calibrates_one_image_per_run_to_the_same_network(tmp_path, monkeypatch):
    """ORT's MinMax calibration's memory grows with the images per run (lite0: ~120 MB each,
    4.7 GB at batch 32), so the job's network is calibrated one image at a time on a batch-1
    export -- and is byte for byte the network calibrated at its own batch size."""
    import torch
    from onnxruntime.quantization import calibrate

    from deeptransfer.backends import onnxruntime_backend as ortb
    from deeptransfer.models.export import export_prefix_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    rng = np.random.default_rng(0)
    # batches of different spreads: ranges from any one image or batch alone would differ
    batches = [rng.normal(0, s, (4, 16, 16, 3)).astype(np.float32) for s in (1, 3, 0.5, 2)]

    runs: list[int] = []  # images in each of the calibration's inference runs
    collect = calibrate.MinMaxCalibrater.collect_data

    def counted(self, reader):
        class Counting:
            def get_next(_):
                x = reader.get_next()
                if x is not None:
                    runs.append(len(x["image"]))
                return x
        return collect(self, Counting())

    monkeypatch.setattr(calibrate.MinMaxCalibrater, "collect_data", counted)
    ortb.save_network(net, tmp_path, batch_size=4, crop=16, precision="int8",
                      calibration=batches)
    assert runs == [1] * 16
    got = (tmp_path / ortb.FILES[0]).read_bytes()

    runs.clear()
    src = export_prefix_onnx(net, tmp_path / "float.onnx", batch_size=4, crop=16)
    want = ortb.quantize_int8(src, tmp_path / "whole.onnx", batches)  # at its own batch
    assert runs == [4] * 4
    assert got == want.read_bytes()
