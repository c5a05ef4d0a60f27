"""The backend's network built once per featurize job and kept in its feature store.

    record = prepare_network(executor, store, spec)      # the driver, before the chunks
    backend = load_network(spec)                         # each worker, from the store

Before this, every worker process exported the torch prefix to ONNX and, for int8, ran the
NNCF / ONNX Runtime calibration itself: a fixed cost paid once per worker, and nothing made
the workers' quantized networks the same. Now the *prepare* step builds the artifact once
-- OpenVINO's IR (``prefix.xml`` + ``prefix.bin``) or the ONNX file (quantized for int8) --
in ONE engine task (``map_unordered`` with a single task: the calibration images are read
where the images are, never on the driver unless the engine is the in-process local one),
writes it into the store's own ``_backend/`` folder (any fsspec URL) and returns its record,
which the driver puts in the store's attrs (``backend_artifact``: each file's sha256 and
size). The workers read the files, check their digests and compile them; no torch model is
built in a worker. A resumed job reuses the artifact (after checking it), so its new chunks
come from the very network its first ones did; ``--overwrite`` removes it with the store.

The calibration (sample, seed, method) is in the store's identity (``quantization``): the
same calibration resumes, and it resumes with the recorded artifact, not a rebuilt one.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import StoreError
from ..storesafety import BACKEND_FOLDER

#: the store-owned folder of the prepared network (removed with the store, see storesafety)
FOLDER = BACKEND_FOLDER
#: the store attribute that records it
ATTR = "backend_artifact"
FORMATS = {"openvino": "openvino-ir", "onnxruntime": "onnx"}


@dataclass(frozen=True)
class PrepareSpec:
    """What the one build task needs (broadcast like ``FeaturizeSpec``; no model in it)."""

    store_url: str
    model: Any  # ModelSpec, layer resolved
    backend: str
    precision: str = "auto"
    keep_maps: bool = False
    batch_size: int = 16
    threads: int = 1
    calibration: tuple = ()  # the int8 sample's refs (seeded training images)
    storage_options: tuple = ()
    source: Any = None  # deeptransfer.sources.Source of the refs, None: files
    max_image_bytes: int = 0

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.storage_options)


def _module(backend: str) -> Any:
    if backend == "openvino":
        from . import openvino_backend as m
    else:
        from . import onnxruntime_backend as m
    return m


def _place(store_url: str, storage_options: Mapping | None) -> Any:
    from ..storesafety import place

    return place(store_url, storage_options)


def _versions(backend: str) -> dict[str, str]:
    out = {}
    for name in (backend, "nncf" if backend == "openvino" else "onnx", "torch"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def build_network(task: int, spec: PrepareSpec) -> dict[str, Any]:
    """The prepare task: export (and quantize) the prefix, write it to ``_backend/``.

    Returns the record the driver stores (file digests, sizes, seconds, versions)."""
    import torch

    from ..models import create_backbone
    from .calibration import calibration_batches

    del task
    t0 = time.perf_counter()
    if spec.threads >= 1:
        torch.set_num_threads(spec.threads)
    backbone = create_backbone(spec.model, pooled=not spec.keep_maps)
    module = backbone.to(memory_format=torch.channels_last)
    pp = backbone.preprocess
    batches: list[np.ndarray] = []
    if spec.precision == "int8":
        batches = calibration_batches(_Shim(pp, spec.batch_size), spec.calibration,
                                      spec.options, spec.max_image_bytes or None,
                                      source=spec.source)
    p = _place(spec.store_url, spec.options)
    files: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="deeptransfer-prepare-") as d:
        paths = _module(spec.backend).save_network(
            module, Path(d), batch_size=spec.batch_size, crop=pp.crop,
            precision=spec.precision, calibration=batches)
        p.fs.makedirs(p.join(FOLDER), exist_ok=True)
        for path in paths:
            data = path.read_bytes()
            p.fs.pipe_file(p.join(f"{FOLDER}/{path.name}"), data)
            files[path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return {"folder": FOLDER, "backend": spec.backend, "format": FORMATS[spec.backend],
            "precision": "int8" if spec.precision == "int8" else "float32",
            "batch_size": spec.batch_size, "crop": pp.crop, "files": files,
            "seconds": round(time.perf_counter() - t0, 3), "versions": _versions(spec.backend)}


class _Shim:
    """What ``calibration_batches`` needs of a runner: preprocessing, batch size, buffer."""

    def __init__(self, pp: Any, batch_size: int) -> None:
        self.pp, self.batch_size = pp, batch_size
        self.buffer = np.zeros((batch_size, pp.crop, pp.crop, 3), np.float32)


def read_network(store_url: str, storage_options: Mapping | None,
                 record: Mapping[str, Any]) -> dict[str, bytes]:
    """The recorded files' bytes, each checked against its recorded size and sha256; a
    missing or changed file is one StoreError line (never compiled)."""
    p = _place(store_url, storage_options)
    out: dict[str, bytes] = {}
    for name, want in sorted(record["files"].items()):
        key = f"{record.get('folder', FOLDER)}/{name}"
        try:
            data = p.fs.cat_file(p.join(key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            data = None
        if data is None or len(data) != want["size"] or \
                hashlib.sha256(data).hexdigest() != want["sha256"]:
            what = "is missing" if data is None else "does not match its recorded sha256/size"
            raise StoreError(
                f"The prepared {record['backend']} network {key} of the store {store_url!r} "
                f"{what} (changed since featurize built it): it is not run. Featurize again "
                f"with --overwrite to rebuild the store and its network.")
        out[name] = data
    return out


def spec_artifact(record: Mapping[str, Any]) -> tuple:
    """The record as the hashable ``FeaturizeSpec.artifact`` the workers get."""
    return tuple(sorted((name, f["sha256"], int(f["size"]))
                        for name, f in record["files"].items()))


def record_of(spec_artifact: tuple, backend: str) -> dict[str, Any]:
    return {"backend": backend, "folder": FOLDER,
            "files": {n: {"sha256": h, "size": s} for n, h, s in spec_artifact}}


def load_network(spec: Any) -> Any:
    """A worker's backend compiled from the job's prepared network (``FeaturizeSpec``
    with ``artifact``): read from the store, digests checked, compiled with the worker's
    threads."""
    files = read_network(spec.store_url, spec.options, record_of(spec.artifact, spec.backend))
    cls = {"openvino": "OpenVINOBackend", "onnxruntime": "ONNXRuntimeBackend"}[spec.backend]
    return getattr(_module(spec.backend), cls).from_files(files, threads=spec.threads)


def prepare_network(executor: Any, store: Any, spec: PrepareSpec) -> tuple[dict[str, Any], bool]:
    """The store's prepared network: the recorded one, checked (a resume), or built now by
    one engine task and recorded in the store's attrs. Returns ``(record, built_now)``."""
    record = store.attrs.get(ATTR)
    if record:
        read_network(spec.store_url, spec.options, record)  # refused here, before any task
        return dict(record), False
    [(_, record)] = list(executor.map_unordered(build_network, [0], shared=spec))
    store.group.attrs.update({ATTR: record})  # after the files: a record means they are whole
    store.attrs[ATTR] = record
    return record, True
