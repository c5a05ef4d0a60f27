"""The numba resize + crop + normalize kernel against the Pillow + NumPy reference.

Error bound (the kernel's contract): per value, at most one 8-bit level, i.e.
|kernel - reference| <= 1/255/std[c] in normalized units, and on average much less
(< 0.02 levels). The kernel follows Pillow's fixed-point algorithm, so in practice the
8-bit values are identical (the normalized ones differ by float rounding, ~1e-6).

Run: python -m pytest tests/test_resize.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deeptransfer.kernels import reference_preprocess, resize_crop_normalize
from deeptransfer.kernels.resize import crop_offsets, resized_size

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
SENTINEL = np.float32(-12345.0)


def _photos() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_image

    return {
        "coffee": data.coffee(),  # 400 x 600
        "chelsea": data.chelsea(),  # 300 x 451
        "astronaut": data.astronaut(),  # 512 x 512
        "china": load_sample_image("china.jpg"),  # 427 x 640
    }


PHOTOS = _photos()


def _resized(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))


def _odd_sizes() -> dict[str, np.ndarray]:
    coffee, chelsea = PHOTOS["coffee"], PHOTOS["chelsea"]
    grey = np.asarray(Image.fromarray(chelsea).convert("L"))
    return {
        "caltech-like 240x300 (upscale)": _resized(coffee, 240, 300),
        "tall 500x120": _resized(coffee, 500, 120),
        "wide 90x700": _resized(chelsea, 90, 700),
        "short side exactly 256 (no resize)": _resized(coffee, 256, 341),
        "square exactly 256": _resized(chelsea, 256, 256),
        "smaller than the crop 100x120": _resized(coffee, 100, 120),
        "strided view": coffee[::2, 1::2],  # not contiguous
        "1 pixel wide": np.ascontiguousarray(coffee[150:190, 300:301]),
        "1 pixel tall": np.ascontiguousarray(coffee[200:201, 100:140]),
        "2x3": coffee[10:12, 10:13].copy(),
        "greyscale as RGB": np.repeat(grey[:, :, None], 3, axis=2),
        "large downscale 1200x1800": _resized(coffee, 1200, 1800),
    }


ODD = _odd_sizes()


def _levels(got: np.ndarray, ref: np.ndarray, std) -> np.ndarray:
    """|got - ref| in 8-bit levels (one level = 1/255/std[c] in normalized units)."""
    level = (1.0 / 255.0 / np.asarray(std, np.float64)).reshape(1, 1, 3)
    return np.abs(got.astype(np.float64) - ref.astype(np.float64)) / level


def _check_close(got: np.ndarray, ref: np.ndarray, std, what: str) -> None:
    assert got.shape == ref.shape, what
    assert np.isfinite(got).all(), what
    d = _levels(got, ref, std)
    assert d.max() <= 1.0 + 1e-3, f"{what}: max diff {d.max():.3f} levels > 1"
    assert d.mean() <= 0.02, f"{what}: mean diff {d.mean():.4f} levels"
    # a kernel that merely stays "close" (e.g. float instead of Pillow's fixed point)
    # differs by one level in a few % of the values; this one should match almost all
    assert (d > 0.5).mean() <= 0.01, f"{what}: {(d > 0.5).mean():.2%} values off by a level"


def _run(images, layout, parallel, resize=256, crop=224, norm=IMAGENET, extra=2):
    n = len(images)
    shape = (n + extra, crop, crop, 3) if layout == "nhwc" else (n + extra, 3, crop, crop)
    # guard slots before and after `out` inside one buffer, plus `extra` unused slots
    big = np.full((shape[0] + 2,) + shape[1:], SENTINEL, np.float32)
    out = big[1:-1]
    assert out.flags.c_contiguous
    resize_crop_normalize(
        images, out, resize=resize, crop=crop, layout=layout, parallel=parallel, **norm
    )
    assert (big[0] == SENTINEL).all() and (big[-1] == SENTINEL).all(), "wrote outside out"
    assert (out[n:] == SENTINEL).all(), "wrote into unused batch slots"
    got = out[:n] if layout == "nhwc" else out[:n].transpose(0, 2, 3, 1)
    assert not (got == SENTINEL).any(), "left output values unwritten"
    return got


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
def test_photos_and_odd_sizes_match_reference(layout, parallel):
    items = list(PHOTOS.items()) + list(ODD.items())
    got = _run([im for _, im in items], layout, parallel)
    for (name, im), g in zip(items, got):
        ref = reference_preprocess(im, resize=256, crop=224, **IMAGENET)
        _check_close(g, ref, IMAGENET["std"], f"{name} {im.shape} {layout} parallel={parallel}")


@pytest.mark.parametrize("resize,crop", [(224, 224), (160, 128), (300, 299)])
def test_other_sizes_and_normalization(resize, crop):
    imgs = [PHOTOS["chelsea"], ODD["tall 500x120"], ODD["smaller than the crop 100x120"]]
    got = _run(imgs, "nhwc", False, resize=resize, crop=crop, norm=HALF)
    for im, g in zip(imgs, got):
        ref = reference_preprocess(im, resize=resize, crop=crop, **HALF)
        _check_close(g, ref, HALF["std"], f"{im.shape} {resize}/{crop}")


def test_greyscale_2d_input_equals_replicated_rgb():
    grey = np.asarray(Image.fromarray(PHOTOS["chelsea"]).convert("L"))
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    got = _run([grey, grey[:, :, None], rgb], "nhwc", True, norm=HALF)
    np.testing.assert_array_equal(got[0], got[2])
    np.testing.assert_array_equal(got[1], got[2])
    ref = reference_preprocess(rgb, resize=256, crop=224, **HALF)
    _check_close(got[0], ref, HALF["std"], "greyscale")


def test_same_image_same_result_in_any_batch_position_and_mode():
    imgs = [PHOTOS["astronaut"], ODD["wide 90x700"], PHOTOS["coffee"]] * 3
    a = _run(imgs, "nhwc", True)
    b = _run(imgs[::-1], "nhwc", False)[::-1]
    np.testing.assert_array_equal(a, b)
    c = _run(imgs, "nchw", True)
    np.testing.assert_array_equal(a, c)


def test_nhwc_output_is_channels_last_nchw_view():
    out = np.empty((2, 224, 224, 3), np.float32)
    resize_crop_normalize([PHOTOS["chelsea"]] * 2, out, resize=256, crop=224, **HALF)
    nchw = out.transpose(0, 3, 1, 2)  # what torch.from_numpy(out).permute(0, 3, 1, 2) sees
    assert nchw.shape == (2, 3, 224, 224)
    assert nchw.strides[1] == 4 and nchw.strides[3] == 12  # channels innermost


def test_geometry_follows_torchvision():
    assert resized_size(300, 451, 256) == (256, int(256 * 451 / 300))
    assert resized_size(500, 120, 256) == (int(256 * 500 / 120), 256)
    assert resized_size(256, 256, 256) == (256, 256)
    # Python's round (half to even), like torchvision's CenterCrop
    assert crop_offsets(257, 259, 224) == (16, 18)
    assert crop_offsets(256, 385, 224) == (16, 80)


def test_empty_batch_is_a_no_op():
    out = np.full((1, 224, 224, 3), SENTINEL, np.float32)
    resize_crop_normalize([], out, resize=256, crop=224, **HALF)
    assert (out == SENTINEL).all()


@pytest.mark.parametrize(
    "kwargs,images,out,match",
    [
        ({}, [np.zeros((10, 10, 3), np.float32)], None, "uint8"),
        ({}, [np.zeros((10, 10, 4), np.uint8)], None, r"\(H, W, 3\)"),
        ({}, [np.zeros((0, 10, 3), np.uint8)], None, "empty"),
        ({"layout": "chw"}, None, None, "layout"),
        ({"resize": 200}, None, None, "resize"),
        ({"std": (0.5, 0.0, 0.5)}, None, None, "std"),
        ({"mean": (0.5, 0.5)}, None, None, "3 values"),
        ({}, None, np.zeros((1, 224, 224, 3), np.float64), "float32"),
        ({}, None, np.zeros((1, 3, 224, 224), np.float32), "shape"),
        ({}, None, np.zeros((1, 224, 224, 3), np.float32)[:, ::-1], "C-contiguous"),
        ({}, [np.zeros((9, 9, 3), np.uint8)] * 2, np.zeros((1, 224, 224, 3), np.float32), "N >= 2"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, images, out, match):
    args = dict(resize=256, crop=224, **HALF)
    args.update(kwargs)
    images = images if images is not None else [np.zeros((9, 9, 3), np.uint8)]
    out = out if out is not None else np.zeros((len(images), 224, 224, 3), np.float32)
    with pytest.raises(ValueError, match=match):
        resize_crop_normalize(images, out, **args)
