"""The featurize step: images -> frozen truncated CNN -> rows of the Zarr feature store.

``featurize_chunk`` is the one task every engine runs; ``run_featurize`` is the driver,
which only plans (scan, split, create the store, list unfinished chunks) and counts.
Images and features never pass through the driver.
"""
from __future__ import annotations

import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import worker_state
from .dataset import Manifest
from .errors import DeeptransferError, StoreError, check_choice, check_int
from .executor import Executor
from .fs import DEFAULT_MAX_IMAGE_BYTES, FileRefusedError, read_local, read_url
from .store import cached_store, create_store, forget_cached_stores, store_nbytes
from .storesafety import StoreLock, check_store_target


@dataclass(frozen=True)
class FeaturizeSpec:
    """Everything a worker needs for any chunk of one job: broadcast once, never a model."""

    store_url: str
    model: Any  # deeptransfer.models.ModelSpec, layer resolved
    storage_options: tuple = ()  # sorted (key, value) pairs: hashable
    batch_size: int = 16
    compile: bool = False
    device: str = "cpu"
    precision: str = "auto"  # "auto" | "float32" | "bfloat16" | "float16"
    # torch intra-op threads per task. CPU convolutions give bitwise-equal features for equal
    # thread counts, and every engine defaults to one single-threaded worker per core, so
    # the same images give the same store on every engine.
    threads: int = 1
    views: str = "center"  # "center", or "center+flip": mean features of the image and its mirror
    keep_maps: bool = False  # store the cut's (C, H, W) map, not its global average
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # a larger file is skipped, never read

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.storage_options)


@dataclass
class ChunkResult:
    """What a chunk task reports back: counts and timings, no features."""

    chunk: int
    n_ok: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    read_seconds: float = 0.0
    preprocess_seconds: float = 0.0
    forward_seconds: float = 0.0
    seconds: float = 0.0


# -- per worker process: the model is built once from its spec and reused -------------------
class _Runner:
    """A frozen backbone with its preprocessing and a reused input buffer."""

    def __init__(self, spec: FeaturizeSpec):
        import torch

        from .models import create_backbone

        self.device = torch.device(spec.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            from .errors import EngineUnavailableError

            raise EngineUnavailableError(
                "device='cuda' was asked for but torch sees no CUDA GPU on this worker. "
                "Run on a GPU machine, or use device='cpu'.")
        self.backbone = create_backbone(spec.model, pooled=not spec.keep_maps)
        self.pp = self.backbone.preprocess
        self.feature_dim = self.backbone.feature_dim
        #: the shape of one image's features: (D,), or (C, H, W) for a kept map
        self.feature_shape: tuple[int, ...] = (self.feature_dim,)
        if spec.keep_maps:
            from .models import map_shape

            self.feature_shape = map_shape(spec.model, spec.model.layer)
        self.batch_size = spec.batch_size
        module: Any = self.backbone.to(self.device).to(memory_format=torch.channels_last)
        self.dtype = torch.float32
        if self.device.type == "cuda":
            self.dtype = {"float16": torch.float16, "float32": torch.float32}.get(
                spec.precision, torch.bfloat16)
        if spec.compile:
            # static shapes: every batch is padded to batch_size so this compiles once
            module = torch.compile(module, dynamic=False)
        self.module = module
        crop = self.pp.crop
        # one input buffer per process, reused for every batch: no fresh large allocations
        # (and page faults) per batch; NHWC, which is channels_last NCHW after a permute
        shape = (self.batch_size, crop, crop, 3)
        if self.device.type == "cuda":
            # the kernels write straight into page-locked memory, copied to the GPU without
            # a staging copy; reusing it is safe because forward() ends with a synchronizing
            # .cpu() on the same stream
            self.pinned = torch.zeros(shape, dtype=torch.float32, pin_memory=True)
            self.buffer = self.pinned.numpy()
        else:
            self.buffer = np.zeros(shape, np.float32)
        self.lock = threading.Lock()

    def forward(self, n: int, views: str = "center") -> np.ndarray:
        """Features of the first ``n`` images in the buffer (the rest is padding), averaged
        over ``views`` (see ``view_features``)."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(self.buffer).permute(0, 3, 1, 2)
            if self.device.type == "cuda":
                x = self.pinned.permute(0, 3, 1, 2).to(self.device, non_blocking=True)
                with torch.autocast("cuda", dtype=self.dtype,
                                    enabled=self.dtype != torch.float32):
                    out = view_features(self.module, x, views)
            else:
                out = view_features(self.module, x, views)
            return out[:n].float().cpu().numpy()


#: kind of the backbone runners in the one worker cache (``worker_state``)
RUNNERS = "runner"


def get_runner(spec: FeaturizeSpec) -> _Runner:
    """The process's runner for a spec (built on first use; any store's tasks share it)."""
    from .models.composite import is_composite

    if is_composite(spec.model):  # several backbones: one runner per part (multi_runner.py)
        from .multi_runner import get_multi_runner

        return get_multi_runner(spec)  # type: ignore[return-value]
    parts = (spec.model, spec.keep_maps, spec.batch_size, spec.compile, spec.device,
             spec.precision)
    return worker_state.get(RUNNERS, parts, lambda: _Runner(spec))


def _set_threads(n: int) -> None:
    import torch

    if n >= 1 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


VIEWS = ("center", "center+flip")


def view_features(module: Any, x: Any, views: str) -> Any:
    """The features of an NCHW batch ``x`` averaged over ``views``: the one definition of a
    view, used by featurize (``_Runner.forward``) and the exported pipeline (artifact.py).

    Flipping a center crop left-right is a view the network was trained to see; averaging
    the two feature vectors is the cheapest test-time augmentation (2x the forward cost).
    The mirror image is made where the batch is (on the GPU under dask-cuda), not copied in.
    A map (B, C, H, W) of the mirror is flipped back before the average, so that the two
    maps line up; a global average is unchanged by that, so pooled features are as before.
    """
    import torch

    out = module(x)
    if views == "center+flip":
        mirror = module(torch.flip(x, dims=[3]))
        if mirror.dim() == 4:
            mirror = torch.flip(mirror, dims=[3])
        out = (out + mirror) * 0.5
    return out


def read_bytes(path: str, storage_options: Mapping | None = None, *,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of one regular file, local or any fsspec URL, at most ``max_bytes`` long;
    anything else raises FileRefusedError (an OSError) with its reason (see deeptransfer.fs)."""
    if "://" not in path or path.startswith("file://"):
        return read_local(path.removeprefix("file://"), max_bytes)
    return read_url(path, storage_options, max_bytes)


def load_image(path: str, target_short_side: int,
               storage_options: Mapping | None = None, *,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> np.ndarray:
    """Read and decode one image; raises ImageDecodeError or OSError with a reason."""
    from .kernels import decode_image

    return decode_image(read_bytes(path, storage_options, max_bytes=max_bytes),
                        target_short_side=target_short_side)


def _reason(exc: BaseException) -> str:
    """Why a source has no features, in a few words, as UTF-8 text (it is stored in Zarr and
    printed: a message quoting a path that is not UTF-8 has its odd bytes escaped)."""
    text = _reason_text(exc)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _reason_text(exc: BaseException) -> str:
    from .kernels import ImageDecodeError

    if isinstance(exc, (ImageDecodeError, FileRefusedError)):
        return exc.reason
    if isinstance(exc, PermissionError):
        return "unreadable file: permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found (removed after the scan?)"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, DeeptransferError):  # e.g. an fsspec backend missing on this worker
        return str(exc)
    if isinstance(exc, OSError):
        return f"unreadable file: {exc.strerror or exc}"
    return f"{exc.__class__.__name__}: {exc}"


def preprocess_batch(runner: _Runner, images: list[np.ndarray]) -> list[int]:
    """Fill the runner's buffer with ``images``; returns indices of images that failed."""
    from .kernels import resize_crop_normalize

    pp = runner.pp
    k = len(images)
    kw = dict(resize=pp.resize, crop=pp.crop, mean=pp.mean, std=pp.std, layout="nhwc")
    try:
        # serial kernel: the engine already runs one process per core
        resize_crop_normalize(images, runner.buffer[:k], parallel=False, **kw)
        failed: list[int] = []
    except Exception:
        # find the one bad image instead of losing the batch
        failed = []
        for j, img in enumerate(images):
            try:
                resize_crop_normalize([img], runner.buffer[j:j + 1], parallel=False, **kw)
            except Exception:
                failed.append(j)
    if k < runner.batch_size:
        runner.buffer[k:] = 0.0
    return failed


def featurize_sources(runner: _Runner, sources: Sequence[Any], *, views: str = "center",
                      storage_options: Mapping | None = None,
                      timings: "ChunkResult | None" = None,
                      max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                      ) -> tuple[np.ndarray, list[str]]:
    """Features of each image source, and for each the reason it has none ("" if it has).

    The one read -> batch -> preprocess -> forward loop, used by ``featurize_chunk``,
    ``TransferModel.predict`` and the Spark ML transformers. A source is a path or fsspec URL,
    or the encoded bytes of an image (bytes-like); None is skipped with a reason. Images go
    through the runner's buffer ``runner.batch_size`` at a time; an unreadable or
    undecodable file, a degenerate image or non-finite features get a reason and a zero row,
    never a failed batch; only regular files of at most ``max_image_bytes`` are read.
    ``timings`` accumulates read, preprocess and forward seconds.
    """
    from .kernels import decode_image
    from .multi_runner import MultiRunner

    if isinstance(runner, MultiRunner):  # several backbones: each part runs this loop
        return runner.featurize_sources(sources, views=views, storage_options=storage_options,
                                        timings=timings, max_image_bytes=max_image_bytes)
    n = len(sources)
    feats = np.zeros((n, *runner.feature_shape), np.float32)
    reasons = [""] * n
    rows: list[int] = []
    images: list[np.ndarray] = []
    t = timings if timings is not None else ChunkResult(chunk=-1, n_ok=0)

    def flush() -> None:
        t0 = time.perf_counter()
        failed = preprocess_batch(runner, images)
        for j in failed:
            reasons[rows[j]] = "image could not be resized (degenerate size)"
        t1 = time.perf_counter()
        out = runner.forward(len(images), views)
        t.preprocess_seconds += t1 - t0
        t.forward_seconds += time.perf_counter() - t1
        good = [j for j in range(len(images)) if j not in failed]
        feats[np.array([rows[j] for j in good], dtype=np.int64)] = out[good]
        rows.clear()
        images.clear()

    side = runner.pp.resize
    with runner.lock:  # a worker with several threads shares one buffer per model
        for r, src in enumerate(sources):
            t0 = time.perf_counter()
            try:
                if src is None:
                    raise ValueError("no image (null value)")
                if isinstance(src, (bytes, bytearray, memoryview)):
                    images.append(decode_image(bytes(src), target_short_side=side))
                else:
                    images.append(load_image(str(src), side, storage_options,
                                             max_bytes=max_image_bytes))
                rows.append(r)
            except Exception as exc:  # noqa: BLE001 - every bad file is skipped with its reason
                reasons[r] = _reason(exc)
            t.read_seconds += time.perf_counter() - t0
            if len(images) == runner.batch_size:
                flush()
        if images:
            flush()
    for r in np.flatnonzero(~np.isfinite(feats.reshape(n, -1)).all(axis=1)):
        feats[r] = 0.0
        if not reasons[r]:
            reasons[r] = "non-finite features"
    return feats, reasons


def featurize_chunk(chunk: int, spec: FeaturizeSpec) -> ChunkResult:
    """Featurize the rows of one chunk and write them, then the chunk's done-marker."""
    t_start = time.perf_counter()
    store = cached_store(spec.store_url, spec.options, mode="r+")
    runner = get_runner(spec)
    _set_threads(spec.threads)
    paths = store.chunk_paths(chunk)
    res = ChunkResult(chunk=chunk, n_ok=0)
    feats, reasons = featurize_sources(runner, paths, views=spec.views,
                                       storage_options=spec.options, timings=res,
                                       max_image_bytes=spec.max_image_bytes)
    ok = np.array([not r for r in reasons], dtype=bool)
    store.write_chunk(chunk, feats, ok, reasons)
    res.n_ok = int(ok.sum())
    res.skipped = [(paths[r], reasons[r]) for r in range(len(paths)) if not ok[r]]
    res.seconds = time.perf_counter() - t_start
    return res


# -- the driver ----------------------------------------------------------------------------
@dataclass
class FeaturizeReport:
    """The summary at the end of a featurize run."""

    store: str
    images: int
    featurized: int
    skipped: list[tuple[str, str]]
    computed_now: int
    seconds: float
    images_per_second: float
    store_bytes: int
    engine: str
    model: dict
    feature_dim: int
    warnings: list[str] = field(default_factory=list)
    #: the store was already complete: this run computed nothing (``computed_now == 0``)
    reused: bool = False
    #: chunks found damaged (missing or corrupt files) and computed or rewritten again
    repaired_chunks: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def library_versions() -> dict[str, str]:
    """Versions recorded in the store: what made these features."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("deeptransfer", "torch", "numpy", "numba", "zarr", "simplejpeg", "pillow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def run_featurize(executor: Executor, manifest: Manifest, store_url: str, *, model: Any,
                  batch_size: int = 16, dtype: str = "float32", chunk_rows: int = 256,
                  compile: bool = False, device: str | None = None, precision: str = "auto",
                  views: str = "center", seed: int = 0, split_config: Mapping[str, Any] | None = None,
                  storage_options: Mapping | None = None,
                  max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, overwrite: bool = False,
                  progress: bool | Callable[[ChunkResult], None] = True) -> FeaturizeReport:
    """Create (or resume) the store for ``manifest`` and featurize its unfinished chunks.

    ``device``: where the network runs; None is the engine's default (``cuda`` on
    dask-cuda, else ``cpu``).
    """
    device = device or executor.default_device
    from .models import ModelSpec, get_model_info, resolve_layer

    check_int("batch_size", batch_size, low=1, where="featurize")
    check_int("chunk_rows", chunk_rows, low=1, where="featurize")
    check_int("max_image_bytes", max_image_bytes, low=1, where="featurize")
    check_choice("precision", precision, ("auto", "float32", "bfloat16", "float16"), where="featurize")
    check_choice("views", views, VIEWS, where="featurize")
    if store_url.startswith("memory://") and executor.n_workers > 0:
        raise StoreError(
            "An in-memory store (memory://) cannot be written by worker processes: each has "
            "its own memory. Give a path or a shared fsspec URL (s3://, gs://, ...).")
    spec_in = model if isinstance(model, ModelSpec) else ModelSpec(name=str(model))
    info = get_model_info(spec_in.name)
    layer = resolve_layer(info, spec_in.layer)  # default, aliases; unknown -> UnknownModelError
    mspec = ModelSpec(name=spec_in.name, layer=layer, weights=spec_in.weights)
    # views change the features, so they are part of the preprocessing a resume must match
    preprocess = {**info.preprocess.to_dict(), "views": views}
    attrs = {
        "model": mspec.to_dict(), "layer": layer, "preprocess": preprocess,
        "seed": seed, "split_config": dict(split_config or {}), "versions": library_versions(),
        "batch_size": batch_size, "max_image_bytes": max_image_bytes,
    }
    from .models.composite import store_attrs

    attrs.update(store_attrs(mspec, views))  # several backbones: each part's preprocessing
    t0 = time.perf_counter()
    # refused before anything is written: a file, a foreign folder, the dataset itself
    check_store_target(store_url, dataset=manifest.root, overwrite=overwrite,
                       storage_options=storage_options)
    with StoreLock(store_url, storage_options):  # one writer per store, released on any exit
        return _featurize_locked(executor, manifest, store_url, mspec, info.layers[layer],
                                 attrs, t0, batch_size=batch_size, dtype=dtype,
                                 chunk_rows=chunk_rows, compile=compile, device=device,
                                 precision=precision, views=views,
                                 max_image_bytes=max_image_bytes,
                                 storage_options=storage_options, overwrite=overwrite,
                                 progress=progress)


def _featurize_locked(executor: Executor, manifest: Manifest, store_url: str, mspec: Any,
                      feature_dim: int, attrs: Mapping[str, Any], t0: float, *, batch_size: int,
                      dtype: str, chunk_rows: int, compile: bool, device: str, precision: str,
                      views: str, max_image_bytes: int, storage_options: Mapping | None,
                      overwrite: bool,
                      progress: bool | Callable[[ChunkResult], None]) -> FeaturizeReport:
    """``run_featurize`` once it holds the store's lock."""
    store = create_store(store_url, manifest, feature_dim=feature_dim, attrs=attrs,
                         dtype=dtype, chunk_rows=chunk_rows, storage_options=storage_options,
                         overwrite=overwrite)
    forget_cached_stores()  # a handle cached in this process may predate an overwrite
    # a reused store is verified chunk by chunk: damaged chunks are computed again
    repaired = store.repair(manifest) if store.reused else []
    warnings = list(manifest.warnings)
    if repaired:
        warnings.append(f"{len(repaired)} damaged chunk(s) of the store were found and are "
                        f"computed again: {repaired[:10]}")
    pending = store.pending_chunks()
    spec = FeaturizeSpec(store_url=store_url, model=mspec,
                         storage_options=tuple(sorted(dict(storage_options or {}).items())),
                         batch_size=batch_size, compile=compile, device=device,
                         precision=precision, views=views, max_image_bytes=max_image_bytes,
                         threads=executor.threads_per_worker)
    todo_rows = sum(store.chunk_bounds(c)[1] - store.chunk_bounds(c)[0] for c in pending)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(manifest), initial=len(manifest) - todo_rows, unit="img",
                   desc=f"featurize [{executor.name}]", dynamic_ncols=True)
    try:
        for _, res in executor.map_unordered(featurize_chunk, pending, shared=spec):
            if bar is not None:
                bar.update(store.chunk_bounds(res.chunk)[1] - store.chunk_bounds(res.chunk)[0])
            elif callable(progress):
                progress(res)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if not store.is_complete():  # pragma: no cover - an engine lost a task without an error
        raise StoreError(f"featurize finished with chunks missing: {store.pending_chunks()}")
    skipped = store.skipped()
    return FeaturizeReport(
        store=store_url, images=len(manifest), featurized=len(manifest) - len(skipped),
        skipped=skipped, computed_now=todo_rows, seconds=seconds,
        images_per_second=todo_rows / seconds if seconds > 0 else 0.0,
        store_bytes=store_nbytes(store_url, storage_options), engine=executor.name,
        model=mspec.to_dict(), feature_dim=feature_dim, warnings=warnings,
        reused=store.reused and todo_rows == 0 and not repaired, repaired_chunks=repaired)
