"""Image preprocessing kernels: decode (simplejpeg / Pillow) and a fused numba
resize + center crop + normalize. Imports nothing else of deeptransfer."""

from .decode import ImageDecodeError, decode_image
from .reference import reference_preprocess
from .resize import resize_crop_normalize, resized_crop_normalize

__all__ = ["ImageDecodeError", "decode_image", "reference_preprocess", "resize_crop_normalize",
           "resized_crop_normalize"]
