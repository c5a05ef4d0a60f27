"""The OpenVINO backend: the exported ONNX prefix compiled for the CPU, one per worker."""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .base import Features

#: what the store records about an int8 prefix (besides the sample's size and seed)
INT8_METHOD = ("nncf.quantize: static post-training int8, MinMax ranges + fast bias "
               "correction, preset performance, on the center views of the sample")


#: the files of a saved network (``save_network``): OpenVINO's IR, graph and weights
FILES = ("prefix.xml", "prefix.bin")


class OpenVINOBackend(Features):
    """``openvino.Core().compile_model`` of the prefix: f32 inference precision (no silent
    bf16 on CPUs that have it), ``threads`` inference threads, a latency hint (one stream:
    the engine already runs one process per core) and no CPU pinning: OpenVINO pins its
    threads to cores by default, so N one-thread worker processes all land on the same core
    (measured: 2 workers 25.7 + 25.9 img/s pinned, 50.9 + 47.4 unpinned); the engines place
    one process per core themselves.

    Built from a torch prefix (exported here, for predict and the Spark ML stages) or, for a
    featurize job, from the network its prepare step saved once (``from_files``)."""

    name = "openvino"

    def __init__(self, module: Any, *, batch_size: int, crop: int, threads: int,
                 precision: str = "auto", calibration: Sequence[np.ndarray] = ()) -> None:
        import openvino as ov

        core = ov.Core()
        with tempfile.TemporaryDirectory(prefix="deeptransfer-ov-") as d:
            model = _network(core, module, Path(d), batch_size=batch_size, crop=crop,
                             precision=precision, calibration=calibration)
            self._compile(core, model, threads)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], *, threads: int) -> "OpenVINOBackend":
        """Compile the IR ``save_network`` wrote (its bytes, read and checked by the caller)."""
        import openvino as ov

        core = ov.Core()
        self = cls.__new__(cls)
        self._compile(core, core.read_model(files[FILES[0]], files[FILES[1]]), threads)
        return self

    def _compile(self, core: Any, model: Any, threads: int) -> None:
        self.compiled = core.compile_model(model, "CPU", compile_config(threads))
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def run(self, x: np.ndarray) -> np.ndarray:
        # copy: the request's output tensor is reused by the next inference
        return np.array(self.request.infer({0: x}, share_inputs=True)[self.output],
                        dtype=np.float32)


def compile_config(threads: int) -> dict[str, Any]:
    """The CPU plugin's properties for one worker process (see ``OpenVINOBackend``)."""
    return {"INFERENCE_NUM_THREADS": max(1, int(threads)), "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}


def _network(core: Any, module: Any, tmp: Path, *, batch_size: int, crop: int,
             precision: str, calibration: Sequence[np.ndarray]) -> Any:
    from ..models.export import export_prefix_onnx

    path = export_prefix_onnx(module, tmp / "prefix.onnx", batch_size=batch_size, crop=crop)
    model = core.read_model(str(path))
    return quantize_int8(model, calibration) if precision == "int8" else model


def save_network(module: Any, folder: Path, *, batch_size: int, crop: int, precision: str,
                 calibration: Sequence[np.ndarray] = ()) -> list[Path]:
    """Export (and for int8 quantize) the prefix once and save it as OpenVINO IR in
    ``folder``: the files ``FILES``. Weights stay float32 (no fp16 compression): the
    workers' network is the one measured against torch."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="deeptransfer-ov-") as d:
        model = _network(ov.Core(), module, Path(d), batch_size=batch_size, crop=crop,
                         precision=precision, calibration=calibration)
        ov.save_model(model, str(folder / FILES[0]), compress_to_fp16=False)
    return [folder / f for f in FILES]


def quantize_int8(model: Any, calibration: Sequence[np.ndarray]) -> Any:
    """The model with int8 weights and activations, its ranges calibrated on ``calibration``
    (NHWC batches of the dataset's own training images)."""
    import nncf

    from ..errors import InvalidParameterError

    if not calibration:
        raise InvalidParameterError("precision 'int8' needs calibration images (the "
                                    "dataset's training split is empty)", param="precision")
    # subset_size counts dataset items, here batches: all of the sample
    with _quiet_nncf():
        return nncf.quantize(model, nncf.Dataset(list(calibration)),
                             preset=nncf.QuantizationPreset.PERFORMANCE,
                             subset_size=len(calibration), fast_bias_correction=True)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """No progress bars or info lines from NNCF in the workers' output (errors stay)."""
    import nncf

    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
    del nncf
