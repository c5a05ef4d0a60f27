"""Decode image bytes to a C-contiguous (H, W, 3) uint8 RGB array, or raise ImageDecodeError.

    arr = decode_image(data, target_short_side=256)

JPEG (the common case) goes through simplejpeg (libjpeg-turbo): the header is read first
for the decompression-bomb check, then the image is decoded with ``strict=True`` so that a
truncated or corrupt file raises instead of returning grey blocks, using libjpeg-turbo's
DCT-domain downscaling (by 1/2 .. 1/8) when the short side is at least twice
``target_short_side`` (the decoded short side stays >= ``target_short_side``), and the
EXIF orientation is read cheaply from the APP1 segment and applied with NumPy flips and
transposes. CMYK/YCCK JPEGs, and JPEG variants libjpeg-turbo's TurboJPEG API refuses, go
through Pillow.

Everything else goes through Pillow (PNG, GIF (first frame), BMP, WebP, TIFF, ...), with
the pixel count checked from the header before any pixels are decoded. Conversions to RGB:

- greyscale ("1", "L") is replicated to three channels; palettes ("P") are expanded;
- transparency ("RGBA", "LA", "PA", "P" or "L"/"RGB" with a transparent colour key) is
  composited over white: ``rgb * a/255 + 255 * (1 - a/255)``, rounded;
- 16-bit greyscale ("I;16*", and "I" in 0..65535) is scaled with ``round(v / 257)``
  (Pillow's own ``convert("L")`` clips everything above 255 to white); other "I" values
  are clipped to 0..65535 first; float ("F") images in [0, 1] are scaled by 255, otherwise
  clipped to 0..255;
- CMYK, YCbCr, HSV and the rest go through Pillow's ``convert("RGB")``;
- EXIF orientation (tag 0x0112) is applied like ``ImageOps.exif_transpose``.

Every failure caused by the bytes themselves raises ImageDecodeError (a ValueError) whose
``reason`` says what is wrong in a few words, e.g. "zero-byte file", "not an image (no
known image signature)", "truncated or corrupt JPEG: Premature end of JPEG file",
"decompression bomb: 30000x30000 = 900 Mpx > limit 89 Mpx".
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageDecodeError", "decode_image", "DEFAULT_MAX_PIXELS"]

# Pillow's own Image.MAX_IMAGE_PIXELS default (a 1024 MB RGBA image, 0.25 GB of pixels / 3).
DEFAULT_MAX_PIXELS = 89_478_485

_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image. ``reason`` is a short human explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------
# Signatures (only used to word the error message; Pillow identifies formats itself)
# --------------------------------------------------------------------------------------


def _sniff(data) -> str | None:
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    return None


# formats every Pillow build reads: failing to identify one means damaged data
_ALWAYS_SUPPORTED = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.0f} Mpx" if n >= 1e6 else f"{n / 1e6:.2g} Mpx"


def _bomb(w: int, h: int, max_pixels: int) -> ImageDecodeError:
    return ImageDecodeError(
        f"decompression bomb: {w}x{h} = {_megapixels(w * h)} > limit {_megapixels(max_pixels)}"
    )


# --------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------


def _tiff_orientation(t) -> int:
    """Orientation tag of IFD0 of a TIFF-structured Exif block; 1 when absent/unreadable."""
    if len(t) < 8:
        return 1
    order = bytes(t[:2])
    if order == b"II":
        end = "little"
    elif order == b"MM":
        end = "big"
    else:
        return 1
    ifd = int.from_bytes(t[4:8], end)
    if ifd + 2 > len(t):
        return 1
    count = int.from_bytes(t[ifd : ifd + 2], end)
    for k in range(count):
        p = ifd + 2 + 12 * k
        if p + 12 > len(t):
            break
        if int.from_bytes(t[p : p + 2], end) == _EXIF_ORIENTATION:
            typ = int.from_bytes(t[p + 2 : p + 4], end)
            if typ == 3:  # SHORT
                val = int.from_bytes(t[p + 8 : p + 10], end)
            elif typ == 4:  # LONG
                val = int.from_bytes(t[p + 8 : p + 12], end)
            else:
                return 1
            return val if 1 <= val <= 8 else 1
    return 1


def jpeg_exif_orientation(data) -> int:
    """EXIF orientation (1..8) from a JPEG's APP1 "Exif" segment, walking the marker
    segments up to the first scan; 1 when there is none or it cannot be read."""
    n = len(data)
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return 1
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more headers
            return 1
        seglen = (data[i + 2] << 8) | data[i + 3]
        if seglen < 2:
            return 1
        if marker == 0xE1 and bytes(data[i + 4 : i + 10]) == b"Exif\x00\x00":
            return _tiff_orientation(data[i + 10 : i + 2 + seglen])
        i += 2 + seglen
    return 1


def _apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """The NumPy equivalent of ImageOps.exif_transpose for an (H, W, C) array."""
    if orientation == 2:  # mirror horizontal
        a = a[:, ::-1]
    elif orientation == 3:  # rotate 180
        a = a[::-1, ::-1]
    elif orientation == 4:  # mirror vertical
        a = a[::-1]
    elif orientation == 5:  # transpose
        a = a.transpose(1, 0, 2)
    elif orientation == 6:  # rotate 90 clockwise (PIL ROTATE_270)
        a = a[::-1].transpose(1, 0, 2)
    elif orientation == 7:  # transverse
        a = a[::-1, ::-1].transpose(1, 0, 2)
    elif orientation == 8:  # rotate 90 counter-clockwise (PIL ROTATE_90)
        a = a[:, ::-1].transpose(1, 0, 2)
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------
# JPEG through simplejpeg
# --------------------------------------------------------------------------------------

# libjpeg-turbo messages that mean "valid JPEG, but not something TurboJPEG decodes to
# RGB" (fall back to Pillow) rather than "damaged data" (raise).
_TJ_UNSUPPORTED = (
    "Unsupported JPEG process",
    "Unsupported JPEG data precision",
    "Unsupported color conversion",
    "Unsupported color space",
    "not supported",
    "not implemented",
    "omitted at compile time",
    "incompatible",
)


def _decode_jpeg(data, target_short_side: int | None, max_pixels: int) -> np.ndarray:
    try:
        h, w, colorspace, _sub = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        # TurboJPEG cannot parse the header (damaged, or an unusual variant): Pillow decides.
        return _decode_pil(data, target_short_side, max_pixels, jpeg_error=str(e))
    if h * w > max_pixels:
        raise _bomb(w, h, max_pixels)
    if h < 1 or w < 1:
        raise ImageDecodeError(f"truncated or corrupt JPEG: size {w}x{h}")
    if colorspace not in ("YCbCr", "Gray", "RGB"):  # CMYK, YCCK: Pillow handles Adobe's inversion
        return _decode_pil(data, target_short_side, max_pixels)
    min_side = 0
    if target_short_side is not None and min(h, w) >= 2 * target_short_side:
        min_side = int(target_short_side)
    try:
        arr = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=min_side, min_width=min_side, strict=True
        )
    except ValueError as e:
        msg = str(e)
        if any(s in msg for s in _TJ_UNSUPPORTED):
            return _decode_pil(data, target_short_side, max_pixels, jpeg_error=msg)
        raise ImageDecodeError(f"truncated or corrupt JPEG: {msg}") from None
    orientation = jpeg_exif_orientation(data)
    if orientation != 1:
        arr = _apply_orientation(arr, orientation)
    return arr


# --------------------------------------------------------------------------------------
# Everything else through Pillow
# --------------------------------------------------------------------------------------


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _scale16(v: np.ndarray) -> np.ndarray:
    v = np.clip(v.astype(np.int64), 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I;16") or mode == "I":
        g = _scale16(np.asarray(im))
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        f = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if f.size and f.min() >= 0.0 and f.max() <= 1.0:
            f = f * 255.0
        g = np.clip(np.rint(f), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in im.info
    )
    if has_alpha:
        return _composite_over_white(np.asarray(im.convert("RGBA")))
    if mode in ("L", "1"):
        g = np.asarray(im.convert("L"))
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _pil_error(kind: str, e: BaseException) -> ImageDecodeError:
    msg = str(e) or type(e).__name__
    return ImageDecodeError(f"truncated or corrupt {kind}: {msg}")


def _peek_size(data, kind: str | None) -> tuple[int, int] | None:
    """(width, height) straight from the first bytes of a PNG, GIF or BMP header, so that
    bombs are refused with the same message before Pillow (which has its own, larger,
    limit) even parses them."""
    try:
        if kind == "PNG" and bytes(data[12:16]) == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if kind == "GIF" and len(data) >= 10:
            return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
        if kind == "BMP" and len(data) >= 26 and int.from_bytes(data[14:18], "little") >= 40:
            w = int.from_bytes(data[18:22], "little", signed=True)
            h = int.from_bytes(data[22:26], "little", signed=True)
            return abs(w), abs(h)
    except Exception:
        pass
    return None


def _decode_pil(
    data, target_short_side: int | None, max_pixels: int, jpeg_error: str | None = None
) -> np.ndarray:
    """Pillow path. ``jpeg_error``: what libjpeg-turbo said about these bytes, when they
    were a JPEG it refused; it is the better message if Pillow fails too."""
    kind = _sniff(data)
    peek = _peek_size(data, kind)
    if peek is not None and peek[0] * peek[1] > max_pixels:
        raise _bomb(peek[0], peek[1], max_pixels)

    def corrupt(fmt: str, e: BaseException) -> ImageDecodeError:
        if jpeg_error is not None:
            return ImageDecodeError(f"truncated or corrupt JPEG: {jpeg_error}")
        return _pil_error(fmt, e)

    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        if jpeg_error is not None:
            raise ImageDecodeError(f"truncated or corrupt JPEG: {jpeg_error}") from None
        if kind is None:
            raise ImageDecodeError("not an image (no known image signature)") from None
        what = "truncated or corrupt" if kind in _ALWAYS_SUPPORTED else "unsupported or corrupt"
        raise ImageDecodeError(f"{what} {kind}: Pillow cannot identify it") from None
    except MemoryError:
        raise
    except Exception as e:
        raise corrupt(kind or "image", e) from None
    try:
        fmt = im.format or kind or "image"
        w, h = im.size
        if w * h > max_pixels:
            raise _bomb(w, h, max_pixels)
        if w < 1 or h < 1:
            raise ImageDecodeError(f"truncated or corrupt {fmt}: size {w}x{h}")
        if fmt == "JPEG" and target_short_side and min(w, h) >= 2 * target_short_side:
            short = min(w, h)
            t = int(target_short_side)
            im.draft(im.mode, (max(1, w * t // short), max(1, h * t // short)))
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(f"decompression bomb: {e}") from None
        except MemoryError:
            raise
        except Exception as e:
            raise corrupt(fmt, e) from None
        try:  # after load(): Pillow's PNG reader finds an eXIf chunk only then
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:  # a damaged Exif block does not make the pixels unreadable
            orientation = 1
        try:
            arr = _to_rgb(im)
        except MemoryError:
            raise
        except Exception as e:
            raise ImageDecodeError(f"unsupported image: {fmt} in mode {im.mode} ({e})") from None
        if orientation != 1:
            arr = _apply_orientation(arr, orientation)
        return np.ascontiguousarray(arr, dtype=np.uint8)
    finally:
        im.close()


# --------------------------------------------------------------------------------------


def decode_image(
    data: bytes,
    *,
    target_short_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode encoded image bytes to a C-contiguous (H, W, 3) uint8 RGB array.

    target_short_side: the short side the caller will resize to; JPEGs whose short side is
        at least twice this are decoded at a reduced scale (1/2 .. 1/8, in the DCT domain)
        whose short side is still >= target_short_side. Other formats ignore it.
    max_pixels: refuse images with more pixels than this (read from the header, before
        decoding); the default is Pillow's own limit.

    Raises ImageDecodeError (a ValueError with a ``reason``) for anything the bytes
    themselves get wrong: empty, not an image, truncated, corrupt, decompression bomb,
    unsupported variant.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    if isinstance(data, memoryview):
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    if target_short_side is not None and int(target_short_side) < 1:
        raise ValueError(
            "The 'target_short_side' parameter must be an int >= 1 or None. "
            f"Got {target_short_side!r} instead."
        )
    if len(data) == 0:
        raise ImageDecodeError("zero-byte file")
    try:
        if _sniff(data) == "JPEG":
            return _decode_jpeg(data, target_short_side, max_pixels)
        return _decode_pil(data, target_short_side, max_pixels)
    except (ImageDecodeError, MemoryError):
        raise
    except Exception as e:  # last line of defence: a bad file never raises anything else
        raise ImageDecodeError(f"undecodable image: {type(e).__name__}: {e}") from None
