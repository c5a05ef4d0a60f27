"""decode_image on every format and failure it is meant to handle; all inputs are made
here with Pillow (no data files).

Run: python -m pytest tests/test_decode.py -q
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from deeptransfer.kernels import ImageDecodeError, decode_image


def _photo() -> np.ndarray:
    from skimage import data

    return data.chelsea()  # 300 x 451 RGB


PHOTO = _photo()


def enc(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_rgb(a: np.ndarray, shape=None) -> None:
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8
    assert a.ndim == 3 and a.shape[2] == 3 and a.flags.c_contiguous
    if shape is not None:
        assert a.shape[:2] == shape


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


# ---------------------------------------------------------------------------- JPEG


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_matches_pillow(progressive):
    data = enc(Image.fromarray(PHOTO), "JPEG", quality=90, progressive=progressive)
    a = decode_image(data)
    check_rgb(a, PHOTO.shape[:2])
    # both are libjpeg-turbo with the same DCT and upsampling: identical, or nearly so
    p = pil_rgb(data)
    assert mad(a, p) < 0.1 and np.abs(a.astype(int) - p).max() <= 2
    assert mad(a, PHOTO) < 3  # and it is the photo


def _marker_image(w=60, h=40) -> Image.Image:
    """Grey image with a red block in the top-left corner and a blue one top-right."""
    a = np.full((h, w, 3), 128, np.uint8)
    a[:10, :10] = (255, 0, 0)
    a[:10, -10:] = (0, 0, 255)
    return Image.fromarray(a)


def _with_orientation(im: Image.Image, fmt: str, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return enc(im, fmt, exif=exif.tobytes(), **kw)


def _is(px, rgb, tol=40) -> bool:
    return bool(np.all(np.abs(px.astype(int) - np.array(rgb)) < tol))


def test_jpeg_exif_orientation_6_rotates_clockwise():
    a = decode_image(_with_orientation(_marker_image(), "JPEG", 6, quality=95))
    check_rgb(a, (60, 40))  # portrait now
    # rotated 90 degrees clockwise: top-left (red) -> top-right, top-right (blue) -> bottom-right
    assert _is(a[4, 35], (255, 0, 0))
    assert _is(a[55, 35], (0, 0, 255))
    assert _is(a[30, 5], (128, 128, 128))


def test_jpeg_exif_orientation_3_rotates_180():
    a = decode_image(_with_orientation(_marker_image(), "JPEG", 3, quality=95))
    check_rgb(a, (40, 60))
    assert _is(a[35, 55], (255, 0, 0))  # red: bottom-right
    assert _is(a[35, 4], (0, 0, 255))  # blue: bottom-left
    assert _is(a[4, 4], (128, 128, 128))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_like_pillow_exif_transpose(fmt, orientation):
    kw = {"quality": 95} if fmt == "JPEG" else {}
    data = _with_orientation(_marker_image(), fmt, orientation, **kw)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    a = decode_image(data)
    check_rgb(a, expected.shape[:2])
    assert mad(a, expected) < 0.5


def test_large_jpeg_uses_dct_scaling():
    big = Image.fromarray(PHOTO).resize((2400, 1600), Image.BICUBIC)
    data = enc(big, "JPEG", quality=90)
    target = 256
    a = decode_image(data, target_short_side=target)
    check_rgb(a)
    short, long_ = min(a.shape[:2]), max(a.shape[:2])
    assert target <= short < 2 * target  # 1600 -> 400 (scale 1/4)
    assert abs(long_ / short - 1.5) < 0.01
    full = decode_image(data)
    assert full.shape[:2] == (1600, 2400)
    # content: the same picture as Pillow's full decode resized to the same size
    ref = Image.open(io.BytesIO(data)).convert("RGB")
    ref = np.asarray(ref.resize((a.shape[1], a.shape[0]), Image.BICUBIC))
    assert mad(a, ref) < 3
    # no scaling when the short side is less than twice the target
    assert decode_image(data, target_short_side=1000).shape[:2] == (1600, 2400)


def test_cmyk_jpeg_goes_through_pillow():
    im = Image.fromarray(PHOTO).convert("CMYK")
    a = decode_image(enc(im, "JPEG", quality=95))
    check_rgb(a, PHOTO.shape[:2])
    assert mad(a, PHOTO) < 4


def test_greyscale_jpeg_is_replicated():
    g = Image.fromarray(PHOTO).convert("L")
    a = decode_image(enc(g, "JPEG", quality=95))
    check_rgb(a, PHOTO.shape[:2])
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert mad(a[..., 0], np.asarray(g)) < 2


# ---------------------------------------------------------------------------- Pillow formats


def test_png_rgba_is_composited_over_white():
    a = np.zeros((4, 4, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 255)  # opaque red
    a[0, 1] = (255, 0, 0, 0)  # transparent -> white
    a[0, 2] = (255, 0, 0, 128)  # half red over white
    a[0, 3] = (0, 0, 0, 51)  # 20% black over white
    out = decode_image(enc(Image.fromarray(a, "RGBA"), "PNG"))
    check_rgb(out, (4, 4))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[0, 2]) == (255, 127, 127)
    assert tuple(out[0, 3]) == (204, 204, 204)


def test_la_png_is_composited_over_white():
    a = np.zeros((2, 2, 2), np.uint8)
    a[0, 0] = (0, 0)  # transparent black -> white
    a[0, 1] = (0, 255)
    out = decode_image(enc(Image.fromarray(a, "LA"), "PNG"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 0, 0)


def test_palette_png_with_transparency():
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 5] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2, 1, 0, 0, 2, 2])
    data = enc(im, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data)
    check_rgb(out, (2, 4))
    assert tuple(out[0, 0]) == (255, 255, 255)  # index 0 is transparent: white, not black
    assert tuple(out[0, 1]) == (10, 200, 30)
    assert tuple(out[0, 2]) == (250, 5, 5)


def test_16bit_png_is_scaled_not_clipped():
    v = np.array([[0, 257 * 100, 65535, 32768], [1000, 20000, 40000, 60000]], np.uint16)
    data = enc(Image.fromarray(v), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data)
    check_rgb(out, (2, 4))
    expected = np.rint(v / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    assert out[0, 1, 0] == 100  # Pillow's convert("L") would give 255


def test_gif_first_frame():
    frames = [Image.fromarray(np.full((8, 8, 3), c, np.uint8)) for c in ((200, 0, 0), (0, 200, 0))]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(b.getvalue())
    check_rgb(out, (8, 8))
    assert _is(out[4, 4], (200, 0, 0), tol=10)


@pytest.mark.parametrize(
    "fmt,kw",
    [("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("PNG", {}), ("PPM", {})],
)
def test_lossless_formats_exact(fmt, kw):
    out = decode_image(enc(Image.fromarray(PHOTO), fmt, **kw))
    check_rgb(out, PHOTO.shape[:2])
    np.testing.assert_array_equal(out, PHOTO)


def test_lossy_webp():
    out = decode_image(enc(Image.fromarray(PHOTO), "WEBP", quality=90))
    check_rgb(out, PHOTO.shape[:2])
    assert mad(out, PHOTO) < 4


def test_greyscale_png_and_bytes_like_inputs():
    g = np.asarray(Image.fromarray(PHOTO).convert("L"))
    data = enc(Image.fromarray(g), "PNG")
    for d in (data, bytearray(data), memoryview(data)):
        out = decode_image(d)
        check_rgb(out, g.shape)
        np.testing.assert_array_equal(out[..., 1], g)


# ---------------------------------------------------------------------------- bad files


def _jpeg() -> bytes:
    return enc(Image.fromarray(PHOTO), "JPEG", quality=90)


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk


def _corrupt_jpeg_middle(data: bytes) -> bytes:
    # 1024 one-bits inside the entropy-coded data: no Huffman code is all ones, so this is
    # always detected (as "bad Huffman code" or as data left over before the end marker)
    sos = data.find(b"\xff\xda")
    m = sos + (len(data) - sos) // 2
    return data[:m] + b"\xff\x00" * 128 + data[m + 256 :]


def _raises(data, match: str, **kw) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kw)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.reason == str(err)
    assert match in err.reason, err.reason
    return err


def test_truncated_jpeg():
    data = _jpeg()
    _raises(data[: len(data) // 2], "truncated or corrupt JPEG")
    _raises(data[:100], "truncated or corrupt JPEG")  # inside the header


@pytest.mark.parametrize("progressive", [False, True])
def test_corrupt_jpeg_middle(progressive):
    data = enc(Image.fromarray(PHOTO), "JPEG", quality=90, progressive=progressive)
    _raises(_corrupt_jpeg_middle(data), "truncated or corrupt JPEG: Corrupt JPEG data")


def test_zero_bytes():
    _raises(b"", "zero-byte file")


def test_text_file():
    _raises(b"label,path\ncat,cat.jpg\n" * 10, "not an image (no known image signature)")


def test_truncated_png_and_gif():
    png = enc(Image.fromarray(PHOTO), "PNG")
    _raises(png[: len(png) // 2], "truncated or corrupt PNG")
    _raises(png[:40], "PNG")
    gif = enc(Image.fromarray(PHOTO).convert("P"), "GIF")
    _raises(gif[: len(gif) // 3], "GIF")


def test_decompression_bomb_png_header_is_refused_before_decoding():
    # the header is followed by 64 zero bytes, not image data: a decoder that got past the
    # header would fail as a truncated PNG, so the bomb reason shows it stopped at the header
    err = _raises(_png_header(30000, 30000) + b"\x00" * 64, "decompression bomb")
    assert "30000x30000" in err.reason and "900 Mpx" in err.reason and "89 Mpx" in err.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_max_pixels(fmt):
    data = enc(Image.fromarray(PHOTO), fmt)
    err = _raises(data, "decompression bomb", max_pixels=100_000)
    assert "451x300" in err.reason
    check_rgb(decode_image(data, max_pixels=451 * 300), PHOTO.shape[:2])


def test_error_pickles_with_its_reason():
    try:
        decode_image(b"")
    except ImageDecodeError as e:
        e2 = pickle.loads(pickle.dumps(e))
        assert type(e2) is ImageDecodeError and e2.reason == "zero-byte file"


def test_not_bytes_is_a_type_error():
    with pytest.raises(TypeError):
        decode_image("cat.jpg")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about damaged EXIF
def test_damaged_files_only_ever_raise_image_decode_error():
    """Truncations and overwritten bytes of every format: decoded or ImageDecodeError,
    never another exception."""
    im = Image.fromarray(PHOTO[:64, :96])
    sources = [
        enc(im, "JPEG"),
        enc(im, "JPEG", progressive=True),
        enc(im.convert("CMYK"), "JPEG"),
        enc(im, "PNG"),
        enc(im.convert("RGBA"), "PNG"),
        enc(im.convert("P"), "GIF"),
        enc(im, "BMP"),
        enc(im, "WEBP"),
        enc(im, "TIFF"),
        _with_orientation(im, "JPEG", 6),
    ]
    rng = np.random.default_rng(0)
    n_err = 0
    for data in sources:
        cases = [data[:k] for k in (1, 2, 3, 8, 16, 30, len(data) // 3, len(data) - 1)]
        for _ in range(6):
            bad = bytearray(data)
            pos = rng.integers(0, len(data), 4)
            for p in pos:
                bad[p] = rng.integers(0, 256)
            cases.append(bytes(bad))
        for case in cases:
            try:
                out = decode_image(case)
            except ImageDecodeError as e:
                assert e.reason
                n_err += 1
            else:
                check_rgb(out)
    assert n_err > 50
