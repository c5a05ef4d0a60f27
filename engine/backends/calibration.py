"""Building a runner's backend, and the int8 calibration sample (seeded, training images)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InvalidParameterError

#: images in the default int8 calibration sample (NNCF's own default is 300; 128 is within
#: 0.1 point of it on Caltech-101 and calibrates in a few seconds per worker)
DEFAULT_CALIBRATION_IMAGES = 128


def calibration_sample(paths: Sequence[str], train_rows: np.ndarray, *, seed: int,
                       n: int = DEFAULT_CALIBRATION_IMAGES) -> tuple[str, ...]:
    """``n`` training images drawn with ``seed`` (sorted by row): the same sample, so the
    same quantized network, in every worker and on every engine."""
    rows = np.asarray(train_rows, dtype=np.int64)
    if len(rows) == 0:
        raise InvalidParameterError(
            "precision 'int8' (CLI: --precision int8) calibrates on the dataset's training "
            "images, and the split has none: give --split or --per-class-train.",
            param="precision")
    rng = np.random.default_rng([seed, 0x1B8])  # its own stream, apart from the split's
    pick = np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))
    return tuple(str(paths[int(r)]) for r in pick)


def calibration_attrs(backend: str, sample: Sequence[str], *, seed: int,
                      batch_size: int) -> dict[str, Any]:
    """What the store records about an int8 prefix (part of its identity)."""
    if backend == "openvino":
        from .openvino_backend import INT8_METHOD
    else:
        from .onnxruntime_backend import INT8_METHOD
    return {"precision": "int8", "backend": backend, "method": INT8_METHOD,
            "images": len(sample), "seed": seed, "split": "train", "batch_size": batch_size,
            "views": "center"}


def calibration_batches(runner: Any, paths: Sequence[str], storage_options: Any = None,
                        max_bytes: int | None = None, source: Any = None) -> list[np.ndarray]:
    """The sample's center views, preprocessed as featurize does, in batches of the runner's
    static size (a last partial batch is filled with the sample's first images again).
    ``source``: the store's ``deeptransfer.sources.Source``, whose reader turns a ref into
    bytes where the refs are not files (None: they are)."""
    from ..featurization import DEFAULT_MAX_IMAGE_BYTES, load_image, preprocess_batch, ref_reader

    limit = max_bytes or DEFAULT_MAX_IMAGE_BYTES
    images = []
    with ref_reader(source, storage_options, limit) as reader:
        read = reader.read if reader is not None else None
        for p in paths:
            try:
                images.append(load_image(str(p), runner.pp.resize, storage_options,
                                         max_bytes=limit, read=read))
            except Exception:  # noqa: BLE001 - a bad file is skipped here as in featurize
                continue
    if not images:
        raise InvalidParameterError("precision 'int8': none of the calibration images could "
                                    "be read", param="precision")
    b = runner.batch_size
    k = len(images)
    images += [images[i % k] for i in range(-k % b)]
    batches = []
    for i in range(0, len(images), b):
        preprocess_batch(runner, images[i:i + b])
        batches.append(runner.buffer.copy())
    return batches


def runner_backend(runner: Any, spec: Any) -> Any:
    """The backend of a featurize runner (``featurization._Runner``): the job's prepared
    network read from its store (``spec.artifact``), else built from the runner's torch
    module (torch's is the module itself; OpenVINO's / ONNX Runtime's are compiled here)."""
    from . import build_backend

    if getattr(spec, "artifact", ()):  # the job's network, prepared once (backends.prepared)
        from .prepared import load_network

        return load_network(spec)
    calibration: list[np.ndarray] = []
    if spec.precision == "int8":
        calibration = calibration_batches(runner, spec.calibration, spec.options,
                                          spec.max_image_bytes)
    return build_backend(spec.backend, runner.module, batch_size=runner.batch_size,
                         crop=runner.pp.crop, threads=spec.threads, precision=spec.precision,
                         calibration=calibration)
