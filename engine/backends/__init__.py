"""Inference backends for the frozen prefix of featurize: torch, OpenVINO, ONNX Runtime.

    backend = build_backend("openvino", backbone, batch_size=16, threads=1)
    feats = backend.features(buffer, views="center")   # buffer: the runner's NHWC batch

For a featurize job the network is *prepared* once (``prepared``): one engine task exports
it through the one ONNX export path (``models.export``) and, for int8, calibrates and
quantizes it, then writes it into the store (``_backend/``, digests in the store's attrs);
each worker process reads that file, checks its digest and compiles it once (``_Runner``
caches it in ``worker_state``; nothing is pickled from the driver). Elsewhere (predict, the
Spark ML stages) a worker builds its backend from the torch prefix module itself. Either
way the compiled network has the batch's static shape and the worker's thread count. It runs the kernels' batch buffer as it
is, NHWC float32 (the exported graph starts with the permute to NCHW, which the runtimes fold
into the first convolution: no copy per batch), and returns features as numpy.

``resolve_backend`` is the driver's choice: ``None`` is the measured default
(``DEFAULT_BACKEND``), falling back to torch, with a warning, when its extra is missing; a
backend named explicitly and not installed is one error line naming the extra.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import numpy as np

from ..errors import EngineUnavailableError, InvalidParameterError
from .base import Backend, view_features_np

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "PRECISIONS", "Backend", "build_backend",
           "resolve_backend", "default_backend", "check_backend", "backend_available", "view_features_np"]

BACKENDS = ("torch", "openvino", "onnxruntime")
#: measured on this 2-core AVX-512 machine (docs/benchmarks.md, benchmarks/featurize.py
#: --backend best): OpenVINO's forward pass of the default model is 1.9-2.3x torch eager's
DEFAULT_BACKEND = "openvino"
#: the pip extra and the module each backend needs
_EXTRA = {"openvino": ("openvino", "openvino"), "onnxruntime": ("onnxruntime", "onnxruntime")}
#: the precisions a CPU backend runs ("int8": static post-training quantization)
PRECISIONS = {"torch": ("auto", "float32", "bfloat16", "float16"),
              "openvino": ("auto", "float32", "int8"),
              "onnxruntime": ("auto", "float32", "int8")}


def backend_available(name: str) -> bool:
    """Whether the backend's package is importable here (torch always is)."""
    if name == "torch":
        return True
    return importlib.util.find_spec(_EXTRA[name][1]) is not None


def _missing(name: str) -> EngineUnavailableError:
    extra, module = _EXTRA[name]
    return EngineUnavailableError(
        f"backend {name!r} (CLI: --backend {name}) needs the {module} package: "
        f"pip install 'deeptransfer[{extra}]', or use --backend torch.")


def check_backend(name: str, *, precision: str = "auto", device: str = "cpu",
                  compile: bool = False) -> None:
    """One line for a backend that is unknown, not installed, or given options it lacks."""
    if name not in BACKENDS:
        raise InvalidParameterError(
            f"The 'backend' parameter (CLI: --backend) must be one of {', '.join(BACKENDS)}. "
            f"Got {name!r} instead.", param="backend")
    if not backend_available(name):
        raise _missing(name)
    if precision not in PRECISIONS[name]:
        hint = ("int8 needs --backend openvino or onnxruntime" if precision == "int8"
                else f"{precision} is a CUDA precision of --backend torch")
        raise InvalidParameterError(
            f"precision {precision!r} (CLI: --precision) is not one of backend {name!r}'s "
            f"({', '.join(PRECISIONS[name])}): {hint}.", param="precision")
    if name != "torch" and str(device).split(":")[0] != "cpu":
        raise InvalidParameterError(
            f"backend {name!r} (CLI: --backend) runs on the CPU; device {device!r} needs "
            "--backend torch.", param="backend")
    if name != "torch" and compile:
        raise InvalidParameterError(
            f"--compile is torch.compile; backend {name!r} compiles the network itself: "
            "drop --compile, or use --backend torch.", param="compile")


def resolve_backend(name: str | None, *, device: str = "cpu", precision: str = "auto",
                    compile: bool = False) -> tuple[str, str | None]:
    """The backend a job runs, and a warning if the default had to fall back to torch.

    ``None``: ``DEFAULT_BACKEND`` on the CPU, unless its package is missing (torch, with the
    warning), or the job asks for what only torch does (a CUDA device, ``compile``)."""
    if name is not None:
        check_backend(name, precision=precision, device=device, compile=compile)
        return name, None
    if str(device).split(":")[0] != "cpu" or compile or precision not in PRECISIONS[DEFAULT_BACKEND]:
        return "torch", None
    if not backend_available(DEFAULT_BACKEND):
        extra = _EXTRA[DEFAULT_BACKEND][0]
        return "torch", (f"the default backend {DEFAULT_BACKEND!r} is not installed (pip "
                         f"install 'deeptransfer[{extra}]'): featurizing with torch, slower")
    return DEFAULT_BACKEND, None


def default_backend() -> str:
    """The backend a job without --backend runs here (``DEFAULT_BACKEND``, or torch)."""
    return resolve_backend(None)[0]


def build_backend(name: str, module: Any, *, batch_size: int, crop: int, threads: int,
                  precision: str = "auto",
                  calibration: Sequence[np.ndarray] = ()) -> Backend:
    """Compile ``module`` (a torch prefix: NCHW float in, features out) for one worker.

    ``calibration``: NHWC batches of the dataset's own images for ``precision="int8"``."""
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(module)
    if not backend_available(name):
        raise _missing(name)
    if name == "openvino":
        from .openvino_backend import OpenVINOBackend

        return OpenVINOBackend(module, batch_size=batch_size, crop=crop, threads=threads,
                               precision=precision, calibration=calibration)
    if name == "onnxruntime":
        from .onnxruntime_backend import ONNXRuntimeBackend

        return ONNXRuntimeBackend(module, batch_size=batch_size, crop=crop, threads=threads,
                                  precision=precision, calibration=calibration)
    raise InvalidParameterError(f"unknown backend {name!r}; one of {', '.join(BACKENDS)}")
