"""The compiled backend is prepared once per featurize job (deeptransfer.backends.prepared):
one engine task exports (and for int8 quantizes) the prefix into the store's ``_backend/``
folder, its files' sha256 and size recorded in the store's attrs; the workers compile that
network, never one of their own; a resume reuses it, a changed file is refused in one line,
``--overwrite`` removes it with the store (and nothing it did not make)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from deeptransfer.backends import prepared
from deeptransfer.errors import StoreError
from deeptransfer.featurization import FeaturizeSpec, _Runner
from deeptransfer.models import ModelSpec
from deeptransfer.store import open_store
from test_backends import featurize, photos  # noqa: F401 - the photos fixture

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("onnxruntime")

INT8 = {"backend": "openvino", "precision": "int8", "calibration_images": 6}

# counts, in every process of a job (the local engine's spawned workers import it at start),
# the prefix's ONNX exports and int8 quantizations
_COUNTER = '''
import os
log = os.environ["DT_TEST_BUILD_LOG"]
import deeptransfer.backends.openvino_backend as ovb
import deeptransfer.backends.onnxruntime_backend as ortb
import deeptransfer.models.export as ex

def counted(name, fn):
    def wrapper(*a, **k):
        with open(log, "a") as f:
            f.write(f"{name} {os.getpid()}\\n")
        return fn(*a, **k)
    return wrapper

ovb.quantize_int8 = counted("quantize", ovb.quantize_int8)
ortb.quantize_int8 = counted("quantize", ortb.quantize_int8)
ex.export_prefix_onnx = counted("export", ex.export_prefix_onnx)
'''


@pytest.fixture
def build_log(tmp_path, monkeypatch):
    """The file the exports and quantizations of a job's processes are written to."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_COUNTER)
    log = tmp_path / "builds.log"
    log.write_text("")
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("DT_TEST_BUILD_LOG", str(log))
    # and in this process (workers=0 runs the tasks here)
    import deeptransfer.backends.onnxruntime_backend as ortb
    import deeptransfer.backends.openvino_backend as ovb
    import deeptransfer.models.export as ex

    def counted(name, fn):
        def wrapper(*a, **k):
            with open(log, "a") as f:
                f.write(f"{name} {os.getpid()}\n")
            return fn(*a, **k)
        return wrapper

    for mod, name, kind in [(ovb, "quantize_int8", "quantize"),
                            (ortb, "quantize_int8", "quantize"),
                            (ex, "export_prefix_onnx", "export")]:
        monkeypatch.setattr(mod, name, counted(kind, getattr(mod, name)))
    return log


def _kinds(log: Path) -> list[str]:
    return sorted(line.split()[0] for line in log.read_text().splitlines())


def _record(store) -> dict:
    return open_store(str(store)).attrs[prepared.ATTR]


def _unfinish(store, chunk: int) -> np.ndarray:
    """Clear a chunk's features and done marker, as a job killed before it would leave it;
    returns the features it had."""
    g = zarr.open_group(str(store), mode="r+")
    rows = slice(chunk * 8, (chunk + 1) * 8)  # chunk_rows=8 (test_backends.featurize)
    had = g["features"][rows]
    g["features"][rows] = 0.0
    g["done"][chunk] = False
    return had


@pytest.fixture(scope="module")
def one_worker(photos, tmp_path_factory):
    store = tmp_path_factory.mktemp("one") / "q.zarr"
    rep = featurize(photos, store, **INT8)
    return store, rep


def test_the_int8_network_is_built_once_for_two_workers_and_gives_one_workers_features(
        photos, one_worker, tmp_path, build_log):
    store = tmp_path / "q.zarr"
    rep = featurize(photos, store, workers=2, **INT8)
    # one export and one quantization for the whole job (before: one of each per worker)
    assert _kinds(build_log) == ["export", "quantize"]
    assert rep.backend_network["built_now"] is True
    a = open_store(str(store))["features"][:]
    b = open_store(str(one_worker[0]))["features"][:]
    assert np.array_equal(a, b)
    # the same calibration gives the same quantized weights (the IR's node names are
    # numbered per process; its weights file is the network's numbers)
    assert _record(store)["files"]["prefix.bin"] == _record(one_worker[0])["files"]["prefix.bin"]


def test_the_store_records_the_networks_digests_and_calibration(one_worker):
    store, rep = one_worker
    attrs = open_store(str(store)).attrs
    rec = attrs[prepared.ATTR]
    assert rec["backend"] == "openvino" and rec["format"] == "openvino-ir"
    assert rec["precision"] == "int8" and rec["batch_size"] == 4
    assert sorted(rec["files"]) == ["prefix.bin", "prefix.xml"]
    for name, f in rec["files"].items():
        data = (store / "_backend" / name).read_bytes()
        assert f == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert attrs["quantization"]["images"] == 6 and attrs["quantization"]["seed"] == 0
    assert rep.backend_network["files"] == {k: v["size"] for k, v in rec["files"].items()}


def test_another_calibration_builds_another_network(photos, one_worker, tmp_path):
    store = tmp_path / "q5.zarr"
    featurize(photos, store, **{**INT8, "calibration_images": 5})
    assert _record(store)["files"]["prefix.bin"] != _record(one_worker[0])["files"]["prefix.bin"]


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_resume_reuses_the_stored_network(photos, tmp_path, build_log, backend):
    store = tmp_path / "f.zarr"
    first = featurize(photos, store, backend=backend)
    rec = _record(store)
    assert first.backend_network["built_now"] is True
    assert _kinds(build_log) == ["export"]
    had = _unfinish(store, 1)
    again = featurize(photos, store, backend=backend)
    assert again.computed_now == 8 and again.backend_network["built_now"] is False
    assert _kinds(build_log) == ["export"]  # not exported again
    assert _record(store) == rec
    assert np.array_equal(open_store(str(store))["features"][8:16], had)
    # a complete store computes nothing and needs no network
    assert featurize(photos, store, backend=backend).backend_network is None


def test_a_changed_network_is_refused_in_one_line(photos, tmp_path):
    store = tmp_path / "f.zarr"
    featurize(photos, store, backend="onnxruntime")
    _unfinish(store, 0)
    path = store / "_backend" / "prefix.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as e:
        featurize(photos, store, backend="onnxruntime")
    msg = str(e.value)
    assert "\n" not in msg and "_backend/prefix.onnx" in msg and "sha256" in msg
    assert "--overwrite" in msg
    # a worker given the record checks it too, before it compiles anything
    rec = json.loads(json.dumps(_record(store)))
    spec = FeaturizeSpec(store_url=str(store), model=ModelSpec("efficientnet_lite0", "pool"),
                         backend="onnxruntime", batch_size=4,
                         artifact=prepared.spec_artifact(rec))
    with pytest.raises(StoreError, match="does not match its recorded sha256"):
        _Runner(spec)
    path.unlink()
    with pytest.raises(StoreError, match="is missing"):
        _Runner(spec)


def test_overwrite_removes_the_network_with_the_store_and_nothing_else(photos, tmp_path):
    store = tmp_path / "f.zarr"
    featurize(photos, store, backend="onnxruntime")
    note = store / "_backend" / "notes.txt"  # not ours: it stays
    note.write_text("mine")
    featurize(photos, store, backend="torch", overwrite=True)
    assert not (store / "_backend" / "prefix.onnx").exists()
    assert note.read_text() == "mine"
    assert prepared.ATTR not in open_store(str(store)).attrs
    note.unlink()
    featurize(photos, store, backend="openvino", overwrite=True)
    featurize(photos, store, backend="torch", overwrite=True)
    assert not (store / "_backend").exists()


def test_a_worker_compiles_the_stored_network_without_a_torch_model(one_worker):
    store, _ = one_worker
    rec = _record(store)
    spec = FeaturizeSpec(store_url=str(store), model=ModelSpec("efficientnet_lite0", "pool"),
                         backend="openvino", precision="int8", batch_size=4,
                         artifact=prepared.spec_artifact(rec))
    runner = _Runner(spec)
    assert runner.backbone is None and runner.module is None
    assert runner.backend.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert runner.feature_dim == 1280 and runner.pp.crop == 224


def test_the_cli_says_the_network_was_built_once_then_reused(photos, tmp_path, capsys):
    from deeptransfer.cli import main

    store = tmp_path / "c.zarr"
    args = ["featurize", photos, str(store), "--backend", "onnxruntime", "--workers", "0",
            "--chunk-rows", "8", "--batch-size", "4"]
    assert main(args) == 0
    assert "network      built once in " in capsys.readouterr().out
    _unfinish(store, 0)
    assert main(args) == 0
    assert "network      the store's own, reused" in capsys.readouterr().out
