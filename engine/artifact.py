"""The saved model: one directory that rebuilds the whole image -> class pipeline.

    model/
      config.json        format, backbone spec (model, the store's cut, weights),
                         preprocessing, feature width and shape, whether the store held maps,
                         the tuned suffix's spec (null: a head on pooled vectors), classes,
                         head config, training options, metrics (training's validation
                         record; evaluate writes nothing here)
      head.safetensors   the trained module's parameters ("suffix.*", then the head's; no
                         pickle)
      rounds.jsonl, val_metrics.json, training.png, checkpoint.safetensors  (training)

A model runs in three parts: the frozen prefix (the backbone up to the store's cut, pooled
or, for a store of maps, the (C, H, W) map), the tuned suffix (the stages after the cut, up
to the pooled layer; none for a pooled store) and the head. Prediction goes through exactly
the featurize path (the same decode, kernels, backbone runner), and its features are rounded
to the store's dtype, so the trained part sees what it was trained (and evaluated) on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from . import jsonutil
from .errors import DeeptransferError, InvalidParameterError, StoreError, check_int
from .files import atomic_write, make_dirs
from .modeldir import CONFIG, HEAD, MODEL_FORMAT as FORMAT

if TYPE_CHECKING:
    from .training.trainable import SuffixSpec


def model_files(*, params: Mapping[str, np.ndarray], head_config: Mapping[str, Any],
                store_attrs: Mapping[str, Any], classes: Sequence[str],
                training: Mapping[str, Any] | None = None,
                metrics: Mapping[str, Any] | None = None,
                suffix: "SuffixSpec | Mapping[str, Any] | None" = None) -> dict[str, bytes]:
    """The bytes of ``head.safetensors`` and ``config.json``, in the order they are written.

    ``params``: the trainable module's state_dict (``suffix.*``, then the head's);
    ``suffix``: its ``SuffixSpec`` (or its ``to_dict()``), None for a store of pooled vectors.
    """
    from safetensors.numpy import save

    head = save({k: np.require(v, dtype=np.float32, requirements="C")
                 for k, v in params.items()}, metadata={"format": FORMAT})
    dim = int(store_attrs["feature_dim"])
    config = {
        "format": FORMAT,
        "backbone": dict(store_attrs["model"]),
        "preprocess": dict(store_attrs["preprocess"]),
        "feature_dim": dim,
        "maps": bool(store_attrs.get("maps", False)),
        "feature_shape": [int(x) for x in store_attrs.get("feature_shape") or (dim,)],
        "feature_dtype": str(store_attrs.get("dtype") or "float32"),
        "suffix": _suffix_dict(suffix),
        "classes": list(classes),
        "head": dict(head_config),
        "param_order": list(params),
        "training": dict(training or {}),
        "metrics": dict(metrics or {}),
        "features_store": store_attrs.get("store_url"),
        "versions": store_attrs.get("versions", {}),
        # the inference backend that made the training features: predict runs the same
        "backend": store_attrs.get("backend") or "torch",
        "quantization": store_attrs.get("quantization"),
    }
    return {HEAD: head,
            CONFIG: jsonutil.dumps(config, indent=2, default=_jsonable).encode("utf-8")}


def save_model(model_dir: str | os.PathLike, *, params: Mapping[str, np.ndarray],
               head_config: Mapping[str, Any], store_attrs: Mapping[str, Any],
               classes: Sequence[str], training: Mapping[str, Any] | None = None,
               metrics: Mapping[str, Any] | None = None,
               suffix: "SuffixSpec | Mapping[str, Any] | None" = None) -> Path:
    """Write ``config.json`` and ``head.safetensors`` (atomically, file by file, umask modes);
    the arguments are ``model_files``'."""
    d = Path(model_dir)
    make_dirs(d)
    # safetensors' own save_file writes 0600; the bytes go through our writer instead
    for name, data in model_files(params=params, head_config=head_config,
                                  store_attrs=store_attrs, classes=classes, training=training,
                                  metrics=metrics, suffix=suffix).items():
        atomic_write(d / name, data)
    return d


def _suffix_dict(suffix: "SuffixSpec | Mapping[str, Any] | None") -> dict[str, Any] | None:
    if suffix is None:
        return None
    return suffix.to_dict() if hasattr(suffix, "to_dict") else dict(suffix)


def saved_model_matches(model_dir: str | os.PathLike, params: Mapping[str, np.ndarray],
                        training: Mapping[str, Any]) -> bool:
    """Whether ``model_dir`` already holds exactly this head, trained with these options
    (a rerun of a finished run then writes nothing)."""
    try:
        m = TransferModel(model_dir)
    except DeeptransferError:
        return False
    if json.loads(json.dumps(dict(training), default=_jsonable)) != m.config.get("training") \
            or list(m.params) != list(params):
        return False
    return all(np.array_equal(m.params[k], np.asarray(v, np.float32)) for k, v in params.items())


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _damaged(path: Path, what: str) -> StoreError:
    return StoreError(f"{path} {what}: the model directory is damaged. Train it again "
                      f"(`deeptransfer train STORE {path.parent}` rewrites the model from its "
                      f"checkpoint, if there is one), or copy the folder back from a backup.")


@dataclass
class Prediction:
    """One image's prediction: its top classes with probabilities, or why it failed."""

    path: str
    label: str | None
    score: float | None
    top_k: list[tuple[str, float]]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "label": self.label, "score": self.score,
                "top_k": [[c, p] for c, p in self.top_k], "error": self.error}


class TransferModel:
    """A loaded model directory: backbone spec + preprocessing + the trained module.

    ``trainable`` is the module trained on the store's features: the tuned suffix (for a
    store of maps) and the head; ``predict`` runs the frozen prefix (``spec``, cut at the
    store's layer, un-pooled when ``maps``) then ``trainable``.
    """

    def __init__(self, model_dir: str | os.PathLike):
        from safetensors.numpy import load_file

        from .models import ModelSpec, Preprocess, composite
        from .training.heads import HeadConfig
        from .training.trainable import SuffixSpec, trainable_from_params

        self.dir = Path(model_dir)
        cfg_path = self.dir / CONFIG
        if not cfg_path.is_file():
            raise StoreError(f"{str(model_dir)!r} is not a deeptransfer model directory (no "
                             f"config.json). Train one with `deeptransfer train STORE MODEL_DIR`.")
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # not JSON, not UTF-8, unreadable
            raise _damaged(cfg_path, f"cannot be read as JSON ({exc})") from None
        if not isinstance(self.config, dict) or self.config.get("format") != FORMAT:
            fmt = self.config.get("format") if isinstance(self.config, dict) else None
            raise StoreError(f"{cfg_path} has format {fmt!r}, expected {FORMAT!r}: it is not a "
                             f"deeptransfer model (or one of another version).")
        try:
            self.classes: list[str] = list(self.config["classes"])
            self.spec = ModelSpec.from_dict(self.config["backbone"])
            pp = dict(self.config["preprocess"])
            self.views: str = pp.pop("views", "center")
            pp.pop("kernel", None)  # featurization.RESAMPLE_KERNEL: the store's, not a setting
            #: several backbones (models/composite.py): each part's preprocessing (and
            #: ``preprocess`` None), else None
            self.part_preprocess = composite.part_preprocess(pp) if "parts" in pp else None
            self.preprocess = Preprocess.from_dict(pp) if self.part_preprocess is None else None
            self.feature_dim = int(self.config["feature_dim"])
            self.head_config = HeadConfig.from_dict(self.config["head"])
            # models saved before maps and suffixes have none of these keys: pooled vectors
            self.maps = bool(self.config.get("maps", False))
            self.feature_shape: tuple[int, ...] = tuple(
                int(x) for x in self.config.get("feature_shape") or (self.feature_dim,))
            self.feature_dtype = str(self.config.get("feature_dtype") or "float32")
            self.suffix = SuffixSpec.from_dict(self.config.get("suffix"))
            #: the backend of the store it was trained on (models saved before: torch)
            self.backend = str(self.config.get("backend") or "torch")
            self._check_shapes(cfg_path)
        except DeeptransferError:
            raise
        except KeyError as exc:
            raise _damaged(cfg_path, f"has no {exc.args[0]!r} entry") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise _damaged(cfg_path, f"has a bad entry ({exc})") from None
        head_path = self.dir / HEAD
        try:
            raw = load_file(str(head_path))
            self.params = {k: raw[k] for k in self.config.get("param_order", list(raw))}
            self.trainable = trainable_from_params(self.suffix, self.head_config, self.params,
                                                   in_dim=self.feature_dim,
                                                   n_classes=len(self.classes))
        except DeeptransferError:
            raise
        except FileNotFoundError:
            raise _damaged(head_path, "is missing") from None
        except KeyError as exc:
            raise _damaged(head_path, f"has no tensor {exc.args[0]!r}") from None
        except Exception as exc:  # noqa: BLE001 - SafetensorError, torch's shape errors
            raise _damaged(head_path, f"cannot be loaded ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''})") from None

    def _check_shapes(self, cfg_path: Path) -> None:
        """The config's feature entries agree (a hand-edited or half-written one does not)."""
        if self.feature_dtype not in ("float32", "float16"):
            raise _damaged(cfg_path, f"has a bad feature_dtype {self.feature_dtype!r}")
        if self.maps != (len(self.feature_shape) == 3) or self.feature_shape[0] != self.feature_dim:
            raise _damaged(cfg_path, f"has feature_shape {list(self.feature_shape)} that does "
                                     f"not fit maps={self.maps} and feature_dim={self.feature_dim}")
        if self.maps != (self.suffix is not None) or (
                self.suffix is not None and (tuple(self.suffix.in_shape) != self.feature_shape
                                             or self.suffix.cut != self.spec.layer)):
            raise _damaged(cfg_path, f"has a suffix {self.config.get('suffix')!r} that does not "
                                     f"fit its features ({self.spec.layer} "
                                     f"{'maps' if self.maps else 'vectors'} "
                                     f"{list(self.feature_shape)})")

    @property
    def head(self) -> Any:
        """The module from stored features to logits (``trainable``; its older name)."""
        return self.trainable

    def __repr__(self) -> str:
        tuned = f" -> {self.suffix.train_from}.. tuned" if self.suffix and self.suffix.train_from \
            else ""
        return (f"TransferModel({self.spec.name}@{self.spec.layer}{tuned} -> "
                f"{self.head_config.kind} head, {len(self.classes)} classes)")

    # -- features -> probabilities -------------------------------------------------------------
    #: rows the trainable module runs on at once (a suffix's activations are ~6x a map's)
    ROWS_PER_PASS = 256

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities for rows of stored features: (n, D) vectors or (n, C, H, W)
        maps, ``feature_shape`` after the first axis. Rounded to the store's dtype first
        (a no-op on rows read from the store), so images and stored rows go the same way."""
        import torch

        x = np.asarray(features, np.float32)
        if x.shape[1:] != self.feature_shape:
            shape = ", ".join(map(str, self.feature_shape))
            raise InvalidParameterError(
                f"This model takes features of shape (n, {shape}) "
                f"({self.spec.name} {self.spec.layer} {'maps' if self.maps else 'vectors'}); "
                f"got {x.shape}.")
        if self.feature_dtype == "float16":
            x = x.astype(np.float16).astype(np.float32)
        out = np.empty((len(x), len(self.classes)), np.float32)
        with torch.inference_mode():
            for i in range(0, len(x), self.ROWS_PER_PASS):
                logits = self.trainable(torch.from_numpy(x[i:i + self.ROWS_PER_PASS]))
                out[i:i + len(logits)] = torch.softmax(logits, dim=1).numpy()
        return out

    # -- images -> probabilities ---------------------------------------------------------------
    def runner(self, batch_size: int = 16, backend: str | None = None) -> Any:
        """The process's featurize runner for this model's prefix (the one worker cache).

        ``backend``: None runs the prefix on the backend of the store the model was trained
        on (float32 even for an int8 store: its calibration sample is the store's, not
        here), torch if that one is not installed here."""
        from .backends import backend_available, check_backend
        from .featurization import FeaturizeSpec, get_runner

        if backend is None:
            backend = self.backend if backend_available(self.backend) else "torch"
        check_backend(backend)
        return get_runner(FeaturizeSpec(store_url="", model=self.spec, batch_size=batch_size,
                                        keep_maps=self.maps, backend=backend))

    def predict_proba_sources(self, sources: Sequence[Any], *, batch_size: int = 16,
                              storage_options: Mapping | None = None,
                              backend: str | None = None
                              ) -> tuple[np.ndarray, list[str]]:
        """Class probabilities of image sources (paths, fsspec URLs or encoded bytes, as
        ``featurization.featurize_sources`` takes them) and, for each, why it has none ("" if
        it has; its row is then zeros). The one images -> prefix -> suffix -> head path of
        ``predict`` and the Spark ML transformers; ``ROWS_PER_PASS`` images at a time, so
        the memory stays bounded however many there are."""
        from .featurization import featurize_sources

        runner = self.runner(batch_size, backend)
        probs = np.zeros((len(sources), len(self.classes)), np.float32)
        reasons: list[str] = []
        step = max(self.ROWS_PER_PASS, batch_size)
        for i in range(0, len(sources), step):
            feats, why = featurize_sources(runner, list(sources[i:i + step]), views=self.views,
                                           storage_options=storage_options)
            ok = np.array([not r for r in why], dtype=bool)
            if ok.any():
                probs[i + np.flatnonzero(ok)] = self.predict_proba_features(feats[ok])
            reasons += why
        return probs, reasons

    def predict(self, paths: Sequence[str] | str, *, top_k: int = 5, batch_size: int = 16,
                storage_options: Mapping | None = None,
                backend: str | None = None) -> list[Prediction]:
        """Classify image files (paths or fsspec URLs); bad files get an ``error``, not a crash.
        ``backend``: the prefix's inference backend (None: the training store's)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [str(paths)]
        check_int("top_k", top_k, low=1, where="predict")
        k = min(top_k, len(self.classes))
        probs, reasons = self.predict_proba_sources([str(p) for p in paths],
                                                    batch_size=batch_size,
                                                    storage_options=storage_options,
                                                    backend=backend)
        out: list[Prediction] = []
        for i, p in enumerate(paths):
            if reasons[i]:
                out.append(Prediction(str(p), None, None, [], reasons[i]))
                continue
            order = np.argsort(-probs[i], kind="stable")[:k]
            top = [(self.classes[c], float(probs[i, c])) for c in order]
            out.append(Prediction(str(p), top[0][0], top[0][1], top))
        return out

    # -- export -------------------------------------------------------------------------------
    def pipeline_module(self):
        """prefix + trainable (tuned suffix + head) + softmax as one torch module on
        preprocessed NCHW input."""
        import torch

        from .featurization import view_features
        from .models import create_backbone

        if self.part_preprocess is not None:  # several backbones: multi_export.py
            from .multi_export import pipeline_module

            return pipeline_module(self)
        prefix = create_backbone(self.spec, pooled=not self.maps)

        class Pipeline(torch.nn.Module):
            def __init__(self, backbone: torch.nn.Module, trainable: torch.nn.Module,
                         views: str, half: bool):
                super().__init__()
                self.backbone = backbone
                self.trainable = trainable
                self.views = views
                self.half = half

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                # the same views the features were made with, computed the same way, and
                # rounded as the store rounded them
                f = view_features(self.backbone, x, self.views)
                if self.half:
                    f = f.half().float()
                return torch.softmax(self.trainable(f), dim=1)

        return Pipeline(prefix, self.trainable, self.views,
                        self.feature_dtype == "float16").eval()

    def export(self, path: str | os.PathLike, *, format: str = "torchscript") -> Path:  # noqa: A002
        """Export the whole pipeline (prefix, tuned suffix, head, softmax) for serving
        (input: preprocessed NCHW float32 images, ``crop x crop``, any batch size; output:
        class probabilities).

        The preprocessing (resize, crop, mean, std) and the class names are written beside it
        as ``<path>.json``. An existing file is replaced only if it is an earlier export, and
        nothing is written into the model directory.
        """
        import torch

        from .models.export import (check_export_target, export_onnx, export_torchscript,
                                    write_sidecar)

        if format not in ("torchscript", "onnx"):
            raise InvalidParameterError(
                f"The 'format' parameter must be one of 'torchscript', 'onnx'. Got {format!r}.")
        path = Path(path)
        check_export_target(path, protected=self.dir)
        if self.part_preprocess is not None:  # several backbones: one input per part
            from .multi_export import export as export_composite

            return export_composite(self, path, format)
        module = self.pipeline_module()
        crop = self.preprocess.crop
        example = torch.zeros(1, 3, crop, crop)
        if format == "torchscript":
            export_torchscript(module, example, path)
        else:
            export_onnx(module, example, path, input_name="image", output_name="probabilities")
        write_sidecar(path, {
            "model": self.spec.to_dict(), "views": self.views,
            "suffix": self.suffix.to_dict() if self.suffix else None,
            "preprocess": self.preprocess.to_dict(), "classes": self.classes,
            "input": f"float32 NCHW, 3 x {crop} x {crop}, normalized", "output": "probabilities"})
        return path


def load(model_dir: str | os.PathLike,
         storage_options: Mapping | None = None) -> TransferModel:
    """Load a saved model directory: ``deeptransfer.load("model/").predict(["a.jpg"])``.

    A directory on an fsspec URL (``s3://bucket/model``) is read through fsspec: its two
    files (config.json, head.safetensors) are copied into a private temporary folder that
    lives as long as the returned model."""
    url = str(model_dir)
    if "://" not in url or url.startswith("file://"):
        return TransferModel(url.removeprefix("file://") if isinstance(model_dir, str)
                             else model_dir)
    import tempfile

    from .fs import url_to_fs

    fs, root = url_to_fs(url, storage_options)
    tmp = tempfile.TemporaryDirectory(prefix="deeptransfer-model-")
    for name in (CONFIG, HEAD):
        src = f"{root.rstrip('/')}/{name}"
        try:
            data = fs.cat_file(src)
        except FileNotFoundError:
            if name == CONFIG:
                tmp.cleanup()
                raise StoreError(f"{url!r} is not a deeptransfer model directory (no "
                                 f"config.json). Train one with `deeptransfer train STORE "
                                 f"MODEL_DIR`.") from None
            continue  # TransferModel names the missing head itself
        with open(os.path.join(tmp.name, name), "wb") as f:
            f.write(data)
    model = TransferModel(tmp.name)
    model._tmp = tmp  # type: ignore[attr-defined]  # removed with the model
    model.url = url  # type: ignore[attr-defined]
    return model
