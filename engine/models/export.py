"""Exporting a torch module to ONNX or TorchScript: one place for the exporter's choice, its
known-harmless warnings and its failures.

    export_onnx(module, example, "pipeline.onnx", input_name="image", output_name="probabilities")
    export_torchscript(module, example, "pipeline.pt")

``TransferModel.export`` uses these for prefix + tuned suffix + head + softmax; a bare
``Backbone`` (or a prefix of one) exports the same way. The example fixes every size but the batch: the
models' padding and cuts are decided from the input's height and width, so an exported file
takes ``crop x crop`` images only (ONNX declares it in the input's shape), any batch size.

ONNX: the TorchScript-based exporter (``dynamo=False``) first, the torch.export-based one
(``dynamo=True``) if it fails or is gone from a future torch. Measured here (torch 2.13,
onnxruntime 1.32, the 5 built-in models): both match eager to float rounding; the
TorchScript-based one exports in 1-2 s (vgg16 10 s), the torch.export-based one in 5-12 s,
and its graph before its own optimisation pass crashes onnxruntime's initializer.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .. import jsonutil
from ..errors import DeeptransferError, EngineUnavailableError, InvalidParameterError

__all__ = ["ExportError", "export_onnx", "export_prefix_onnx", "export_torchscript", "quiet_exporter",
           "check_export_target", "write_sidecar", "SIDECAR_FORMAT"]

SIDECAR_FORMAT = "deeptransfer.export/1"

# Messages torch prints while exporting that say nothing the user can act on. TracerWarning:
# the trace treats the input's height/width (and values derived from it, such as the TF
# "same" padding) as constants, which is what an export at a fixed crop size means.
_HARMLESS_WARNINGS = (
    r"You are using the legacy TorchScript-based ONNX export",   # chosen on purpose, see above
    r"The feature will be removed",                              # the same deprecation
    r"`torch\.jit\.trace(_method)?` is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",        # torch.export internals
    # a Slice of a negative step (a mirror) is kept as an op rather than folded: harmless
    r"Constant folding - Only steps=1 can be constant folded",
)
# "torchvision is not installed. Skipping torchvision::nms" and the exporter's progress lines
_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental")


class ExportError(DeeptransferError, RuntimeError):
    """The exporter could not translate the module (one line: the cause, not its traceback)."""


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporters' known-harmless warnings and log lines, and only those."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for pattern in _HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # the TorchScript-based exporter appends the graph that failed: "... [Caused by the value"
    text = lines[0].split("[Caused by")[0].strip() if lines else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` beside ``path``, then rename: a failed export leaves no partial file.

    The temporary file is created by the exporter with open(), so it keeps the user's umask.
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidParameterError(f"The export path {str(path)!r} is a folder: give a file "
                                    "name, e.g. model.onnx.")
    if not path.parent.is_dir():
        raise InvalidParameterError(f"The folder of the export path {str(path)!r} does not "
                                    "exist: create it first.")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_torchscript(module: nn.Module, example: torch.Tensor,
                       path: str | os.PathLike) -> Path:
    """Trace ``module`` on ``example`` and save it (``torch.jit.load`` reads it back)."""
    def write(tmp: str) -> None:
        try:
            with quiet_exporter(), torch.inference_mode():
                torch.jit.trace(module.eval(), example, check_trace=False).save(tmp)
        except Exception as exc:   # noqa: BLE001 -- any tracer failure: one line for the user
            raise ExportError(f"TorchScript export failed: {_first_line(exc)}") from exc

    return _write_atomically(path, write)


def _onnx_torchscript_based(module: nn.Module, example: torch.Tensor, path: str,
                            names: tuple[str, str], dynamic_batch: bool) -> None:
    axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    torch.onnx.export(module, (example,), path, input_names=[names[0]],
                      output_names=[names[1]], dynamic_axes=axes, dynamo=False)


def _onnx_torch_export_based(module: nn.Module, example: torch.Tensor, path: str,
                             names: tuple[str, str], dynamic_batch: bool) -> None:
    shapes = None
    if dynamic_batch:
        # torch.export specialises a dimension of size 1, so the example needs a batch of 2+
        if example.shape[0] < 2:
            example = example.expand(2, *example.shape[1:]).contiguous()
        shapes = ({0: torch.export.Dim("batch")},)
    torch.onnx.export(module, (example,), path, input_names=[names[0]],
                      output_names=[names[1]], dynamic_shapes=shapes, dynamo=True,
                      external_data=False, verbose=False)


# what each exporter imports (the TorchScript-based one reports a missing onnx as an
# OnnxExporterError, not an ImportError, so this is checked before it runs)
_NEEDS = {False: ("onnx",), True: ("onnx", "onnxscript")}
_NAMES = {False: "TorchScript-based exporter", True: "torch.export-based exporter"}


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                input_name: str = "input", output_name: str = "output",
                dynamic_batch: bool = True, dynamo: bool | None = None) -> Path:
    """Export ``module`` (one tensor in, one out) to one self-contained ONNX file.

    ``dynamo``: None tries the TorchScript-based exporter, then the torch.export-based one;
    False or True uses only that one. Failures raise one ExportError naming each cause;
    missing onnx/onnxscript packages raise EngineUnavailableError with the pip command.
    """
    order = [False, True] if dynamo is None else [bool(dynamo)]
    usable = [d for d in order if not _missing(_NEEDS[d])]
    if not usable:
        raise EngineUnavailableError(
            f"ONNX export needs the {' and '.join(_missing(_NEEDS[order[0]]))} package(s): "
            "pip install 'deeptransfer[onnx]'.")
    exporters = {False: _onnx_torchscript_based, True: _onnx_torch_export_based}
    names = (input_name, output_name)

    def write(tmp: str) -> None:
        causes = []
        for use_dynamo in usable:
            try:
                with quiet_exporter(), torch.inference_mode():
                    exporters[use_dynamo](module.eval(), example, tmp, names, dynamic_batch)
                return
            except Exception as exc:   # noqa: BLE001 -- SymbolicValueError, TorchExportError...
                causes.append(f"{_NAMES[use_dynamo]}: {_first_line(exc)}")
        causes += [f"the {_NAMES[d]} needs {' and '.join(_missing(_NEEDS[d]))} (pip install "
                   "'deeptransfer[onnx]')" for d in order if d not in usable]
        raise ExportError("ONNX export failed: " + "; ".join(causes))

    return _write_atomically(path, write)


# -- the json written beside an exported pipeline ----------------------------------------------
def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.json")


def _is_sidecar(meta_path: Path) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    # files from before SIDECAR_FORMAT had these keys only
    return isinstance(meta, dict) and (meta.get("format") == SIDECAR_FORMAT
                                       or {"preprocess", "classes", "output"} <= set(meta))


def check_export_target(path: str | os.PathLike, *, protected: str | os.PathLike) -> None:
    """Refuse a path inside ``protected`` (the model directory: export only reads it), and an
    existing file that is not an earlier export: export replaces only what it wrote."""
    path, meta = Path(path), sidecar_path(path)
    if path.resolve().is_relative_to(Path(protected).resolve()):
        raise InvalidParameterError(
            f"The export path {str(path)!r} is inside the model directory {str(protected)!r}, "
            "which export never writes into: choose a path outside it.")
    for p in (path, meta):
        if p.is_dir():
            raise InvalidParameterError(f"The export path {str(p)!r} is a folder: give a file "
                                        "name, e.g. model.onnx.")
        if p.exists() and not _is_sidecar(meta):
            raise InvalidParameterError(
                f"{str(p)!r} already exists and is not an earlier deeptransfer export (no "
                f"export json {meta.name!r} beside it): delete it or choose another path.")


def write_sidecar(path: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write ``<path>.json`` (atomically): what a server needs to feed the exported file."""
    body = jsonutil.dumps({"format": SIDECAR_FORMAT, **meta}, indent=2)
    return _write_atomically(sidecar_path(path), lambda tmp: Path(tmp).write_text(body))


# -- the frozen prefix for an inference backend (deeptransfer.backends) -----------------------
class NHWCInput(nn.Module):
    """A prefix that takes the featurize runner's NHWC buffer as it is: the permute to NCHW
    is the graph's first op, which OpenVINO and ONNX Runtime fold into the first convolution
    (no transposing copy per batch in Python)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def export_prefix_onnx(module: nn.Module, path: str | os.PathLike, *, batch_size: int,
                       crop: int) -> Path:
    """The frozen prefix as an ONNX file with a static (batch_size, crop, crop, 3) float32
    input named ``image`` and one output ``features``: ``export_onnx``, the same exporters
    and checks as ``deeptransfer export --format onnx``. Static, because the runner pads
    every batch to its size and both runtimes plan a fixed shape once (measured faster)."""
    example = torch.zeros(batch_size, crop, crop, 3)
    return export_onnx(NHWCInput(module).eval(), example, path, input_name="image",
                       output_name="features", dynamic_batch=False)
