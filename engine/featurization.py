"""The featurize step: images -> frozen truncated CNN -> rows of the Zarr feature store.

``featurize_chunk`` is the one task every engine runs; ``run_featurize`` is the driver,
which only plans (scan, split, create the store, list unfinished chunks) and counts.
Images and features never pass through the driver.
"""
from __future__ import annotations

import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

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
    train_views: Any = None  # deeptransfer.augment.TrainViews of the store's view rows
    seed: int = 0  # the store's seed: with the image row and view index, a view's randomness
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # a larger file is skipped, never read
    #: the deeptransfer.sources.Source of the rows (a small spec, not its listing): a
    #: worker reads each ref's bytes through it; None: refs are file paths or URLs
    source: Any = None
    # the inference backend of the frozen prefix (deeptransfer.backends), resolved by the
    # driver; with precision "int8", the calibration sample's image paths (seeded, train split)
    backend: str = "torch"
    calibration: tuple = ()
    #: the job's prepared network in the store (``backends.prepared.spec_artifact``: file,
    #: sha256, size): the workers compile it; empty: they build the backend themselves
    artifact: tuple = ()

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
        if spec.artifact:  # the job's prepared network (backends.prepared): no torch model
            from .models import get_model_info

            info = get_model_info(spec.model.name)
            self.backbone = None
            self.pp, self.feature_dim = info.preprocess, info.layers[spec.model.layer]
        else:
            self.backbone = create_backbone(spec.model, pooled=not spec.keep_maps)
            self.pp = self.backbone.preprocess
            self.feature_dim = self.backbone.feature_dim
        #: the shape of one image's features: (D,), or (C, H, W) for a kept map
        self.feature_shape: tuple[int, ...] = (self.feature_dim,)
        if spec.keep_maps:
            from .models import map_shape

            self.feature_shape = map_shape(spec.model, spec.model.layer)
        self.batch_size = spec.batch_size
        module: Any = None
        if self.backbone is not None:
            module = self.backbone.to(self.device).to(memory_format=torch.channels_last)
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
        from .backends.calibration import runner_backend

        #: the compiled prefix (deeptransfer.backends): built here, once per worker process
        self.backend = runner_backend(self, spec)
        if self.backend.name != "torch":  # the compiled network holds its own weights
            self.module = self.backbone = None

    def forward(self, n: int, views: str = "center") -> np.ndarray:
        """Features of the first ``n`` images in the buffer (the rest is padding), averaged
        over ``views`` (see ``view_features``)."""
        import torch

        if self.backend.name != "torch":  # OpenVINO / ONNX Runtime: the NHWC buffer as it is
            return self.backend.features(self.buffer, views)[:n]
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
             spec.precision, spec.backend, spec.calibration, spec.artifact,
             # a compiled backend's threads are fixed when it is built (torch's are set per task)
             spec.threads if spec.backend != "torch" else None)
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
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
               read: Callable[[str], bytes] | None = None) -> np.ndarray:
    """Read and decode one image; raises ImageDecodeError or OSError with a reason.
    ``read``: a source reader's ``read`` for refs that are not files (``ref_reader``)."""
    from .kernels import decode_image

    data = read(path) if read is not None else read_bytes(path, storage_options,
                                                          max_bytes=max_bytes)
    return decode_image(data, target_short_side=target_short_side)


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


#: Stores whose model declares a filter other than bicubic carry this in their
#: ``preprocess``: before it, the kernel resized with bicubic whatever the model declared
#: (torchvision's VGG16 / ResNet-50 weights want bilinear), so such an older store has other
#: features and must not be resumed by this version (its identity differs).
RESAMPLE_KERNEL = "pillow-filters/1"


def mark_resample_kernel(preprocess: dict[str, Any]) -> None:
    """Add ``kernel`` to a store's ``preprocess`` attribute where a (part's) filter is not
    bicubic; bicubic stores are unchanged by the fix and keep their identity."""
    parts = preprocess.get("parts") or [preprocess]
    if any(p.get("interpolation", "bicubic") != "bicubic" for p in parts):
        preprocess["kernel"] = RESAMPLE_KERNEL


def preprocess_batch(runner: _Runner, images: list[np.ndarray]) -> list[int]:
    """Fill the runner's buffer with ``images``; returns indices of images that failed."""
    from .kernels import resize_crop_normalize

    pp = runner.pp
    k = len(images)
    kw = dict(pp.kernel_args(), layout="nhwc")
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
                      read: Callable[[str], bytes] | None = None,
                      ) -> tuple[np.ndarray, list[str]]:
    """Features of each image source, and for each the reason it has none ("" if it has).

    The one read -> batch -> preprocess -> forward loop, used by ``featurize_chunk``,
    ``TransferModel.predict`` and the Spark ML transformers. A source is a path or fsspec URL,
    or the encoded bytes of an image (bytes-like); None is skipped with a reason. Images go
    through the runner's buffer ``runner.batch_size`` at a time; an unreadable or
    undecodable file, a degenerate image or non-finite features get a reason and a zero row,
    never a failed batch; only regular files of at most ``max_image_bytes`` are read.
    ``timings`` accumulates read, preprocess and forward seconds. ``read``: how a ref (a str
    source) becomes bytes (a source's ``RefReader.read``; default: read it as a file).
    """
    from .kernels import decode_image
    from .multi_runner import MultiRunner

    if isinstance(runner, MultiRunner):  # several backbones: each part runs this loop
        return runner.featurize_sources(sources, views=views, storage_options=storage_options,
                                        timings=timings, max_image_bytes=max_image_bytes,
                                        read=read)
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
                                             max_bytes=max_image_bytes, read=read))
                rows.append(r)
            except Exception as exc:  # noqa: BLE001 - every bad file is skipped with its reason
                reasons[r] = _reason(exc)
            t.read_seconds += time.perf_counter() - t0
            if len(images) == runner.batch_size:
                flush()
        if images:
            flush()
    _drop_non_finite(feats, reasons)
    return feats, reasons


def _drop_non_finite(feats: np.ndarray, reasons: list[str]) -> None:
    """Rows with a NaN or an infinity become zeros with a reason (any row shape; n may be 0)."""
    finite = np.isfinite(feats).reshape(len(feats), -1).all(axis=1) if len(feats) else []
    for r in np.flatnonzero(~np.asarray(finite, dtype=bool)):
        feats[r] = 0.0
        if not reasons[r]:
            reasons[r] = "non-finite features"


def featurize_views(runner: _Runner, paths: Sequence[str], image_rows: np.ndarray,
                    views: np.ndarray, train_views: Any, *, seed: int,
                    storage_options: Mapping | None = None,
                    timings: "ChunkResult | None" = None,
                    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                    read: Callable[[str], bytes] | None = None,
                    ) -> tuple[np.ndarray, list[str]]:
    """Features of augmented views (``views[r]`` >= 1 of the image of row ``image_rows[r]``,
    read from ``paths[r]``), and for each the reason it has none, as ``featurize_sources``.

    Consecutive rows of one image (its K views, the store's layout) decode it once; the box
    and flip of a view come from (seed, image row, view) only (``augment.draw_view``), chosen
    on the decoded image, then cropped, resized to the model's crop and normalized by the
    same kernel as the center view (``kernels.resized_crop_normalize``)."""
    from .augment import draw_view
    from .kernels import resized_crop_normalize

    pp = runner.pp
    n = len(paths)
    feats = np.zeros((n, *runner.feature_shape), np.float32)
    reasons = [""] * n
    t = timings if timings is not None else ChunkResult(chunk=-1, n_ok=0)
    queue: list[tuple[int, np.ndarray, tuple[int, int, int, int], bool]] = []
    kw = dict(pp.kernel_args(), layout="nhwc", parallel=False)
    del kw["resize"]  # a view's box is resized to the crop itself

    def flush() -> None:
        t0 = time.perf_counter()
        k = len(queue)
        try:
            resized_crop_normalize([q[1] for q in queue], [q[2] for q in queue],
                                   runner.buffer[:k], flips=[q[3] for q in queue], **kw)
        except Exception:  # noqa: BLE001 - one bad view loses itself, not the batch
            for j, (r, img, box, flip) in enumerate(queue):
                try:
                    resized_crop_normalize([img], [box], runner.buffer[j:j + 1],
                                           flips=[flip], **kw)
                except Exception:  # noqa: BLE001
                    reasons[r] = "view could not be resized (degenerate size)"
        if k < runner.batch_size:
            runner.buffer[k:] = 0.0
        t1 = time.perf_counter()
        out = runner.forward(k, "center")  # an augmented view is one view, flipped or not
        t.preprocess_seconds += t1 - t0
        t.forward_seconds += time.perf_counter() - t1
        for j, (r, *_rest) in enumerate(queue):
            if not reasons[r]:
                feats[r] = out[j]
        queue.clear()

    with runner.lock:
        r = 0
        while r < n:
            stop = r + 1
            while stop < n and image_rows[stop] == image_rows[r]:
                stop += 1
            t0 = time.perf_counter()
            try:  # one decode for the image's views in this chunk
                img = load_image(str(paths[r]), pp.resize, storage_options,
                                 max_bytes=max_image_bytes, read=read)
            except Exception as exc:  # noqa: BLE001 - as its image: skipped with the reason
                for q in range(r, stop):
                    reasons[q] = _reason(exc)
                img = None
            t.read_seconds += time.perf_counter() - t0
            for q in range(r, stop) if img is not None else ():
                box, flip = draw_view(img.shape[0], img.shape[1], train_views, seed=seed,
                                      image_row=int(image_rows[q]), view=int(views[q]))
                queue.append((q, img, box, flip))
                if len(queue) == runner.batch_size:
                    flush()
            r = stop
        if queue:
            flush()
    _drop_non_finite(feats, reasons)
    return feats, reasons


@contextmanager
def ref_reader(source: Any, storage_options: Mapping | None,
               max_bytes: int) -> Iterator[Any]:
    """A reader of ``source``'s refs, closed afterwards (None: refs are files, read by
    path): what a chunk, or the int8 calibration sample, reads its images through."""
    if source is None or source.reads_files:
        yield None
        return
    reader = source.reader(storage_options, max_bytes)
    try:
        yield reader
    finally:
        reader.close()


def featurize_chunk(chunk: int, spec: FeaturizeSpec) -> ChunkResult:
    """Featurize the rows of one chunk and write them, then the chunk's done-marker.

    Image rows get their center view (``spec.views``); view rows (a store with train
    views) their augmented view (``featurize_views``)."""
    t_start = time.perf_counter()
    store = cached_store(spec.store_url, spec.options, mode="r+")
    runner = get_runner(spec)
    _set_threads(spec.threads)
    paths = store.chunk_paths(chunk)
    res = ChunkResult(chunk=chunk, n_ok=0)
    image_rows, views = store.chunk_views(chunk)
    center = np.flatnonzero(views == 0)
    # the source's reader: it keeps its file open
    with ref_reader(spec.source, spec.options, spec.max_image_bytes) as reader:
        read = reader.read if reader is not None else None
        feats, reasons = featurize_sources(runner, [paths[i] for i in center],
                                           views=spec.views, storage_options=spec.options,
                                           timings=res, max_image_bytes=spec.max_image_bytes,
                                           read=read)
        if len(center) < len(paths):
            aug = np.flatnonzero(views != 0)
            fa, ra = featurize_views(runner, [paths[i] for i in aug], image_rows[aug],
                                     views[aug], spec.train_views, seed=spec.seed,
                                     storage_options=spec.options, timings=res,
                                     max_image_bytes=spec.max_image_bytes, read=read)
    if len(center) < len(paths):
        all_feats = np.zeros((len(paths), *runner.feature_shape), np.float32)
        all_reasons = [""] * len(paths)
        all_feats[center], all_feats[aug] = feats, fa
        for i, r in zip(center, reasons):
            all_reasons[i] = r
        for i, r in zip(aug, ra):
            all_reasons[i] = r
        feats, reasons = all_feats, all_reasons
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
    #: one row's features: [D], or [C, H, W] for a store of maps
    feature_shape: list[int] = field(default_factory=list)
    #: augmented views per training image, and the rows they take after the images
    train_views: int = 0
    view_rows: int = 0
    #: the frozen prefix's inference backend, and its int8 calibration (None: float)
    backend: str = "torch"
    quantization: dict | None = None
    #: the backend's network prepared once for the job (None: torch, or nothing computed):
    #: built now or reused from the store, its build seconds and file sizes
    backend_network: dict | None = None

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
                  batch_size: int = 16, dtype: str | None = None, chunk_rows: int = 256,
                  compile: bool = False, device: str | None = None, precision: str = "auto",
                  views: str = "center", seed: int = 0, split_config: Mapping[str, Any] | None = None,
                  storage_options: Mapping | None = None,
                  max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, overwrite: bool = False,
                  keep_maps: bool = False, train_views: int = 0, backend: str | None = None,
                  calibration_images: int | None = None,
                  progress: bool | Callable[[ChunkResult], None] = True) -> FeaturizeReport:
    """Create (or resume) the store for ``manifest`` and featurize its unfinished chunks.

    ``device``: where the network runs; None is the engine's default (``cuda`` on
    dask-cuda, else ``cpu``). ``keep_maps``: store the (C, H, W) map of a map layer, not its
    global average. ``dtype``: None is float16 for maps (half the bytes; the maps feed a
    trained suffix, not a linear head), float32 for vectors. ``train_views``: K seeded
    augmented views of every training image as extra rows (see deeptransfer.augment).
    ``backend``: the frozen prefix's inference backend (deeptransfer.backends); None resumes
    a store with its own, else the measured default (torch if that one is not installed).
    ``precision="int8"`` (openvino / onnxruntime) quantizes the prefix, calibrated on
    ``calibration_images`` seeded training images (recorded in the store's attrs).
    """
    device = device or executor.default_device
    from .augment import TrainViews
    from .models import (ModelSpec, check_map_layer, composite, get_model_info, map_shape,
                         resolve_layer)

    check_int("batch_size", batch_size, low=1, where="featurize")
    check_int("chunk_rows", chunk_rows, low=1, where="featurize")
    check_int("max_image_bytes", max_image_bytes, low=1, where="featurize")
    check_choice("precision", precision, ("auto", "float32", "bfloat16", "float16", "int8"),
                 where="featurize")
    check_choice("views", views, VIEWS, where="featurize")
    check_int("train_views", train_views, low=0, high=127, where="featurize")  # int8 view index
    dtype = dtype or ("float16" if keep_maps else "float32")
    check_choice("dtype", dtype, ("float32", "float16"), where="featurize")
    if store_url.startswith("memory://") and executor.n_workers > 0:
        raise StoreError(
            "An in-memory store (memory://) cannot be written by worker processes: each has "
            "its own memory. Give a path or a shared fsspec URL (s3://, gs://, ...).")
    spec_in = model if isinstance(model, ModelSpec) else ModelSpec(name=str(model))
    composite.check_options(spec_in.name, keep_maps=keep_maps, train_views=train_views)
    info = get_model_info(spec_in.name)
    layer = resolve_layer(info, spec_in.layer)  # default, aliases; unknown -> UnknownModelError
    mspec = ModelSpec(name=spec_in.name, layer=layer, weights=spec_in.weights)
    feature_shape: tuple[int, ...] = (info.layers[layer],)
    if keep_maps:
        check_map_layer(info, layer, "keep_maps (CLI: --keep-maps, with --layer)")
        feature_shape = map_shape(mspec, layer)
    tv = TrainViews(k=train_views)
    # views change the features, so they are part of the preprocessing a resume must match
    preprocess = {**info.preprocess.to_dict(), "views": views}
    attrs = {
        "model": mspec.to_dict(), "layer": layer, "preprocess": preprocess,
        "seed": seed, "split_config": dict(split_config or {}), "versions": library_versions(),
        "batch_size": batch_size, "max_image_bytes": max_image_bytes,
    }
    from .models.composite import store_attrs

    attrs.update(store_attrs(mspec, views))  # several backbones: each part's preprocessing
    mark_resample_kernel(attrs["preprocess"])
    backend_attrs, calibration, warning = _backend_choice(
        backend, store_url, storage_options, manifest, resume=not overwrite,
        device=device, precision=precision,
        compile=compile, seed=seed, batch_size=batch_size, n_calibration=calibration_images)
    attrs.update(backend_attrs)
    t0 = time.perf_counter()
    # refused before anything is written: a file, a foreign folder, the dataset itself
    check_store_target(store_url, dataset=manifest.root, overwrite=overwrite,
                       storage_options=storage_options)
    with StoreLock(store_url, storage_options):  # one writer per store, released on any exit
        return _featurize_locked(executor, manifest, store_url, mspec, info.layers[layer],
                                 attrs, t0, batch_size=batch_size, dtype=dtype,
                                 chunk_rows=chunk_rows, compile=compile, device=device,
                                 precision=precision, views=views,
                                 max_image_bytes=max_image_bytes, seed=seed,
                                 feature_shape=feature_shape, train_views=tv,
                                 storage_options=storage_options, overwrite=overwrite,
                                 backend=backend_attrs["backend"], calibration=calibration,
                                 backend_warning=warning, progress=progress)


def _featurize_locked(executor: Executor, manifest: Manifest, store_url: str, mspec: Any,
                      feature_dim: int, attrs: Mapping[str, Any], t0: float, *, batch_size: int,
                      dtype: str, chunk_rows: int, compile: bool, device: str, precision: str,
                      views: str, max_image_bytes: int, storage_options: Mapping | None,
                      overwrite: bool, seed: int, feature_shape: tuple[int, ...],
                      train_views: Any, backend: str = "torch", calibration: tuple = (),
                      backend_warning: str | None = None,
                      progress: bool | Callable[[ChunkResult], None]) -> FeaturizeReport:
    """``run_featurize`` once it holds the store's lock."""
    keep_maps = len(feature_shape) > 1
    # a map's feature_dim is its channels (what the pooled cut would give)
    store = create_store(store_url, manifest, feature_dim=feature_dim, attrs=attrs,
                         dtype=dtype, chunk_rows=chunk_rows, feature_shape=feature_shape,
                         train_views=train_views.to_attrs() if train_views.k else None,
                         storage_options=storage_options, overwrite=overwrite)
    forget_cached_stores()  # a handle cached in this process may predate an overwrite
    # a reused store is verified chunk by chunk: damaged chunks are computed again
    repaired = store.repair(manifest) if store.reused else []
    warnings = list(manifest.warnings) + ([backend_warning] if backend_warning else [])
    if repaired:
        warnings.append(f"{len(repaired)} damaged chunk(s) of the store were found and are "
                        f"computed again: {repaired[:10]}")
    pending = store.pending_chunks()
    artifact, prepared, batch_size = _prepared_network(
        executor, store, store_url, mspec, backend=backend, precision=precision,
        keep_maps=keep_maps, batch_size=batch_size, calibration=calibration,
        storage_options=storage_options, source=manifest.source,
        max_image_bytes=max_image_bytes, pending=bool(pending), warnings=warnings)
    spec = FeaturizeSpec(store_url=store_url, model=mspec,
                         storage_options=tuple(sorted(dict(storage_options or {}).items())),
                         batch_size=batch_size, compile=compile, device=device,
                         precision=precision, views=views, max_image_bytes=max_image_bytes,
                         threads=executor.threads_per_worker, keep_maps=keep_maps,
                         train_views=train_views, seed=seed, source=manifest.source,
                         backend=backend, calibration=() if artifact else calibration,
                         artifact=artifact)
    todo_rows = sum(store.chunk_bounds(c)[1] - store.chunk_bounds(c)[0] for c in pending)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=store.n_rows, initial=store.n_rows - todo_rows, unit="row",
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
    refused = store.skipped()
    skipped = list(manifest.skipped) + refused  # left out while listing, then by the workers
    return FeaturizeReport(
        store=store_url, images=len(manifest) + len(manifest.skipped),
        featurized=len(manifest) - len(refused),
        skipped=skipped, computed_now=todo_rows, seconds=seconds,
        images_per_second=todo_rows / seconds if seconds > 0 else 0.0,
        store_bytes=store_nbytes(store_url, storage_options), engine=executor.name,
        model=mspec.to_dict(), feature_dim=feature_dim, warnings=warnings,
        reused=store.reused and todo_rows == 0 and not repaired, repaired_chunks=repaired,
        feature_shape=list(feature_shape), train_views=train_views.k,
        view_rows=store.n_rows - store.n_images, backend=backend,
        quantization=store.attrs.get("quantization"), backend_network=prepared)


def _prepared_network(executor: Executor, store: Any, store_url: str, mspec: Any, *,
                      backend: str, precision: str, keep_maps: bool, batch_size: int,
                      calibration: tuple, storage_options: Mapping | None, source: Any,
                      max_image_bytes: int, pending: bool, warnings: list[str]
                      ) -> tuple[tuple, dict | None, int]:
    """The job's compiled backend, built once (deeptransfer.backends.prepared): the workers'
    ``FeaturizeSpec.artifact``, what the report says of it, and the batch size the workers
    run (a resume keeps the one the store's network was built for). Torch, several
    backbones (each part's runner builds its own) and a complete store need none."""
    from .models.composite import is_composite

    if backend == "torch" or is_composite(mspec) or not pending:
        return (), None, batch_size
    from .backends.prepared import PrepareSpec, prepare_network, spec_artifact

    pspec = PrepareSpec(store_url=store_url, model=mspec, backend=backend,
                        precision=precision, keep_maps=keep_maps, batch_size=batch_size,
                        threads=executor.threads_per_worker, calibration=calibration,
                        storage_options=tuple(sorted(dict(storage_options or {}).items())),
                        source=source, max_image_bytes=max_image_bytes)
    record, built = prepare_network(executor, store, pspec)
    if int(record["batch_size"]) != batch_size:
        warnings.append(f"the store's {backend} network was built for batch size "
                        f"{record['batch_size']}: this resume runs that one, not {batch_size}")
        batch_size = int(record["batch_size"])
    report = {"built_now": built, "seconds": record.get("seconds"),
              "files": {k: v["size"] for k, v in record["files"].items()}}
    return spec_artifact(record), report, batch_size


def _backend_choice(backend: str | None, store_url: str, storage_options: Mapping | None,
                    manifest: Manifest, *, resume: bool, device: str, precision: str,
                    compile: bool,
                    seed: int, batch_size: int, n_calibration: int | None
                    ) -> tuple[dict[str, Any], tuple, str | None]:
    """The backend's store attrs (its identity: ``backend``, ``quantization``), the int8
    calibration sample's paths, and a fallback warning. ``backend=None`` resumes an existing
    store with the backend that made it (older stores: torch), else takes the default."""
    from .backends import resolve_backend
    from .backends.calibration import (DEFAULT_CALIBRATION_IMAGES, calibration_attrs,
                                       calibration_sample)
    from .store import stored_backend

    if backend is None and resume:
        backend = stored_backend(store_url, storage_options)
    name, warning = resolve_backend(backend, device=device, precision=precision,
                                    compile=compile)
    if precision == "int8" and name == "torch":
        resolve_backend("torch", precision=precision)  # the one-line refusal
    quant, sample = None, ()
    if precision == "int8":
        n = DEFAULT_CALIBRATION_IMAGES if n_calibration is None else n_calibration
        check_int("calibration_images", n, low=1, where="featurize")
        sample = calibration_sample(manifest.paths, manifest.rows("train"), seed=seed, n=n)
        quant = calibration_attrs(name, sample, seed=seed, batch_size=batch_size)
    return {"backend": name, "quantization": quant}, sample, warning
