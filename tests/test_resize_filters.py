"""Every Pillow filter the model zoo can declare (``Preprocess.interpolation``) is the one the
kernel applies: torchvision's VGG16 and ResNet-50 weights were trained on bilinear resizes,
the EfficientNet-Lite ones on bicubic, and the features follow what the model declares."""
from __future__ import annotations

import numpy as np
import pytest

from deeptransfer.kernels import reference_preprocess, resize_crop_normalize, resized_crop_normalize
from deeptransfer.kernels.resize import FILTERS
from test_resize import HALF, PHOTOS, _odd_sizes

IMAGES = {**{k: PHOTOS[k] for k in ("coffee", "chelsea")}, **_odd_sizes()}


def _levels(a: np.ndarray) -> np.ndarray:  # normalized (mean=std=0.5) -> 8-bit levels
    return (a * 0.5 + 0.5) * 255.0


@pytest.mark.parametrize("interpolation", sorted(FILTERS))
def test_each_filter_equals_pillows(interpolation):
    worst = 0.0
    for name, im in IMAGES.items():
        out = np.empty((1, 224, 224, 3), np.float32)
        resize_crop_normalize([im], out, resize=256, crop=224, parallel=False,
                              interpolation=interpolation, **HALF)
        ref = reference_preprocess(im, resize=256, crop=224, interpolation=interpolation, **HALF)
        d = np.abs(_levels(out[0]) - _levels(ref)).max()
        worst = max(worst, d)
        # Pillow's fixed-point algorithm, step by step: the same 8-bit values
        assert d < 0.01, (name, d)
    print(interpolation, "max difference in 8-bit levels", worst)


def test_the_filter_changes_the_pixels_and_the_default_is_bicubic():
    im = PHOTOS["coffee"]
    outs = {}
    for f in ("bicubic", "bilinear", None):
        out = np.empty((1, 224, 224, 3), np.float32)
        kw = {} if f is None else {"interpolation": f}
        resize_crop_normalize([im], out, resize=256, crop=224, **HALF, **kw)
        outs[f] = out
    assert np.array_equal(outs[None], outs["bicubic"])
    assert not np.array_equal(outs["bicubic"], outs["bilinear"])


def test_augmented_views_take_the_filter_too():
    from PIL import Image

    im = PHOTOS["chelsea"]
    out = np.empty((1, 224, 224, 3), np.float32)
    resized_crop_normalize([im], [(20, 30, 200, 260)], out, crop=224, parallel=False,
                           interpolation="bilinear", **HALF)
    box = Image.fromarray(im[20:220, 30:290])
    ref = np.asarray(box.resize((224, 200), Image.BILINEAR).resize((224, 224), Image.BILINEAR))
    assert np.abs(_levels(out[0]) - ref).max() < 0.01


def test_an_unknown_filter_is_refused():
    out = np.empty((1, 224, 224, 3), np.float32)
    with pytest.raises(ValueError, match="interpolation"):
        resize_crop_normalize([PHOTOS["coffee"]], out, resize=256, crop=224,
                              interpolation="nearest", **HALF)


@pytest.fixture
def bilinear_model(monkeypatch):
    """A registered model that declares bilinear resizes (as torchvision's weights do)."""
    import torch
    from torch import nn

    from deeptransfer.models import GlobalAvgPool, ModelDef, ModelInfo, Preprocess, Stage, registry

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 6, 3, stride=2)

        def stages(self):
            return [Stage("conv", self.conv, True), Stage("pool", GlobalAvgPool(), False)]

    @registry.register_model("tiny_bilinear")
    def tiny_bilinear() -> ModelDef:
        info = ModelInfo(name="tiny_bilinear", default_layer="pool",
                         layers={"conv": 6, "pool": 6}, map_layers=("conv",),
                         preprocess=Preprocess(72, 64, (0.5,) * 3, (0.25,) * 3,
                                               interpolation="bilinear"),
                         weights_source="none")
        return ModelDef(info=info, build=lambda **kw: (Tiny(), "random"))

    return Tiny


def test_featurize_applies_the_models_filter_and_marks_the_store(tmp_path, bilinear_model):
    import torch
    from PIL import Image

    import deeptransfer as dt
    from deeptransfer.models import get_model_info
    from deeptransfer.store import open_store
    from photos import pil_preprocess

    root = tmp_path / "data"
    imgs = {}
    for c, key in enumerate(("coffee", "chelsea")):
        (root / f"class{c}").mkdir(parents=True)
        for k, v in enumerate((PHOTOS[key], PHOTOS[key][::2, ::3])):
            path = root / f"class{c}" / f"{k}.png"  # lossless: the test sees the same pixels
            Image.fromarray(np.ascontiguousarray(v)).save(path)
            imgs[f"class{c}/{k}.png"] = np.ascontiguousarray(v)
    store = str(tmp_path / "f.zarr")
    dt.featurize(str(root), store, model="tiny_bilinear", engine="local", workers=0,
                 split="train=0.5,test=0.5", progress=False)
    st = open_store(store)
    assert st.attrs["preprocess"]["interpolation"] == "bilinear"
    assert st.attrs["preprocess"]["kernel"]  # an older (bicubic) store is not resumed
    pre = get_model_info("tiny_bilinear").preprocess
    net = bilinear_model()
    feats = st.group["features"][:]
    for i, p in enumerate(st.group["paths"][:]):
        rel = str(p).replace(str(root) + "/", "")
        want = net.conv(pil_preprocess(imgs[rel], pre)[None]).mean(dim=(2, 3))[0]
        np.testing.assert_allclose(feats[i], want.detach().numpy(), atol=1e-5)


def test_a_bicubic_store_keeps_its_identity():
    from deeptransfer.featurization import mark_resample_kernel
    from deeptransfer.models import get_model_info

    pp = get_model_info("efficientnet_lite0").preprocess.to_dict()
    before = dict(pp)
    mark_resample_kernel(pp)
    assert pp == before
    vgg = get_model_info("vgg16").preprocess.to_dict()
    mark_resample_kernel(vgg)
    assert "kernel" in vgg
    composite = {"views": "center", "parts": [before, get_model_info("resnet50").preprocess.to_dict()]}
    mark_resample_kernel(composite)
    assert "kernel" in composite


def test_the_zoos_filters_are_the_kernels():
    from deeptransfer.models.registry import INTERPOLATIONS

    assert sorted(INTERPOLATIONS) == sorted(FILTERS)
