"""The ONNX Runtime backend: the exported ONNX prefix in an InferenceSession, one per worker."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .base import Features

INT8_METHOD = ("onnxruntime.quantization.quantize_static: QDQ int8 (per-channel weights, "
               "MinMax activations) on the center views of the sample")


#: images per run of ONNX Runtime's int8 calibration (its memory grows with them; the
#: ranges do not depend on them)
CALIBRATION_BATCH = 1

#: the file of a saved network (``save_network``)
FILES = ("prefix.onnx",)


class ONNXRuntimeBackend(Features):
    """A CPU InferenceSession with every graph optimisation, ``threads`` intra-op threads and
    one inter-op thread (the engine runs one process per core).

    Built from a torch prefix (exported here, for predict and the Spark ML stages) or, for a
    featurize job, from the network its prepare step saved once (``from_files``)."""

    name = "onnxruntime"

    def __init__(self, module: Any, *, batch_size: int, crop: int, threads: int,
                 precision: str = "auto", calibration: Sequence[np.ndarray] = ()) -> None:
        with tempfile.TemporaryDirectory(prefix="deeptransfer-ort-") as d:
            path = save_network(module, Path(d), batch_size=batch_size, crop=crop,
                                precision=precision, calibration=calibration)[0]
            self._open(str(path), threads)

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], *, threads: int) -> "ONNXRuntimeBackend":
        """A session of the ONNX file ``save_network`` wrote (its bytes, checked by the caller)."""
        self = cls.__new__(cls)
        self._open(files[FILES[0]], threads)
        return self

    def _open(self, model: str | bytes, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: no "unused initializer" notes per worker
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {"image": x})[0], dtype=np.float32)


def save_network(module: Any, folder: Path, *, batch_size: int, crop: int, precision: str,
                 calibration: Sequence[np.ndarray] = ()) -> list[Path]:
    """Export (and for int8 quantize) the prefix once into ``folder``: the files ``FILES``."""
    from ..models.export import export_prefix_onnx

    dst = folder / FILES[0]
    with tempfile.TemporaryDirectory(prefix="deeptransfer-ort-") as d:
        src = export_prefix_onnx(module, Path(d) / "float.onnx", batch_size=batch_size,
                                 crop=crop)
        if precision == "int8":
            one = export_prefix_onnx(module, Path(d) / "calibration.onnx",
                                     batch_size=CALIBRATION_BATCH, crop=crop)
            quantize_int8(src, dst, calibration, calibrate_on=one)
        else:
            shutil.move(src, dst)
    return [dst]


def quantize_int8(src: Path, dst: Path, calibration: Sequence[np.ndarray], *,
                  calibrate_on: Path | None = None) -> Path:
    """``src`` quantized into ``dst`` (QDQ int8), its activation ranges calibrated on the
    images of ``calibration`` run through ``calibrate_on``: the same network exported for
    ``CALIBRATION_BATCH`` images (None: ``src`` itself, at its own batch)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..errors import InvalidParameterError

    if not calibration:
        raise InvalidParameterError("precision 'int8' needs calibration images (the "
                                    "dataset's training split is empty)", param="precision")
    step = CALIBRATION_BATCH if calibrate_on is not None else len(calibration[0])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (b[i:i + step] for b in calibration for i in range(0, len(b), step))

        def get_next(self) -> dict | None:
            b = next(self.batches, None)
            return None if b is None else {"image": b}

    def prepared(path: Path) -> str:
        pre = path.with_name(path.stem + ".pre.onnx")
        quant_pre_process(str(path), str(pre))
        return str(pre)

    options = dict(quant_format=QuantFormat.QDQ, per_channel=True,
                   activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    with tempfile.TemporaryDirectory(prefix="deeptransfer-ort-") as d:
        ranges = Path(d) / "ranges.json"
        if calibrate_on is not None:
            # ONNX Runtime's MinMax calibration runs a copy of the network that reduces every
            # intermediate tensor; its peak memory grows with the images per run (lite0:
            # ~120 MB per image, 4.7 GB at batch 32). Min and max do not depend on how the
            # images are batched, so the ranges are taken one image at a time on a batch-1
            # export (the same graph, the same tensor names) and the job's batch-size network
            # is quantized from them through ORT's calibration cache.
            quantize_static(prepared(calibrate_on), str(Path(d) / "unused.onnx"), Reader(),
                            calibration_cache_path=ranges, **options)
            quantize_static(prepared(src), str(dst), calibration_cache_path=ranges, **options)
        else:
            quantize_static(prepared(src), str(dst), Reader(), **options)
    return dst
