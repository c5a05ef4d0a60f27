"""The runner of a composite model (several backbones, ``models/composite.py``).

``featurization.get_runner`` returns a ``MultiRunner`` for a composite spec and
``featurization.featurize_sources`` hands it the sources, so featurize, ``predict`` and the
Spark ML transformers run every part without knowing there are several. It holds the
process's ``_Runner`` of each part (the same cached one a single-model job uses) and, per
group of ``batch_size`` sources, reads each file once and runs each part's own
decode -> preprocess -> forward on those bytes: the one loop of ``featurize_sources``, so a
part's columns are bitwise the features a store of that model alone holds. Decoding once
per part is deliberate: the decoder scales a JPEG to each part's short side, and resizing
one decode for every part would not give a single model's features.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from . import worker_state
from .fs import DEFAULT_MAX_IMAGE_BYTES

#: kind of the composite runners in the worker cache (their parts are cached as runners)
MULTI_RUNNERS = "multi_runner"


class MultiRunner:
    """One ``_Runner`` per part; features are the parts' side by side, in the order named."""

    def __init__(self, spec: Any):
        from .featurization import get_runner
        from .models.composite import check_options, parts_of

        m = spec.model
        check_options(m, layer=getattr(m, "layer", None), weights=getattr(m, "weights", None),
                      keep_maps=spec.keep_maps)
        self.parts = parts_of(spec.model)
        self.runners = [get_runner(replace(spec, model=p.spec)) for p in self.parts]
        self.feature_dim = sum(r.feature_dim for r in self.runners)
        self.feature_shape: tuple[int, ...] = (self.feature_dim,)
        self.batch_size = spec.batch_size
        self.lock = threading.Lock()

    def featurize_sources(self, sources: Sequence[Any], *, views: str = "center",
                          storage_options: Mapping | None = None, timings: Any = None,
                          max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                          read: Any = None,
                          ) -> tuple[np.ndarray, list[str]]:
        """``featurization.featurize_sources`` for several backbones: a source that any part
        cannot featurize gets that part's reason (the first part's first) and a zero row."""
        from .featurization import ChunkResult, _reason, featurize_sources, read_bytes

        n = len(sources)
        feats = np.zeros((n, self.feature_dim), np.float32)
        reasons = [""] * n
        t = timings if timings is not None else ChunkResult(chunk=-1, n_ok=0)
        with self.lock:
            # groups of batch_size sources: one forward per part per group, and the bytes of
            # a group only (not of a chunk) in memory at once
            for start in range(0, n, self.batch_size):
                rows, data = [], []
                t0 = time.perf_counter()
                for r in range(start, min(start + self.batch_size, n)):
                    src = sources[r]
                    try:
                        if src is None:
                            raise ValueError("no image (null value)")
                        if isinstance(src, (bytes, bytearray, memoryview)):
                            data.append(bytes(src))
                        elif read is not None:  # a source's reader (a Parquet row, ...)
                            data.append(read(str(src)))
                        else:
                            data.append(read_bytes(str(src), storage_options,
                                                   max_bytes=max_image_bytes))
                        rows.append(r)
                    except Exception as exc:  # noqa: BLE001 - skipped with its reason
                        reasons[r] = _reason(exc)
                t.read_seconds += time.perf_counter() - t0
                if not rows:
                    continue
                idx = np.array(rows, dtype=np.int64)
                col = 0
                for runner in self.runners:
                    f, why = featurize_sources(runner, data, views=views, timings=t)
                    feats[idx, col:col + runner.feature_dim] = f
                    for j, w in enumerate(why):
                        if w and not reasons[rows[j]]:
                            reasons[rows[j]] = w
                    col += runner.feature_dim
        for r, why in enumerate(reasons):
            if why:
                feats[r] = 0.0
        return feats, reasons


def get_multi_runner(spec: Any) -> MultiRunner:
    """The process's runner of a composite spec (its parts' runners shared with any job)."""
    parts = (spec.model, spec.keep_maps, spec.batch_size, spec.compile, spec.device,
             spec.precision)
    return worker_state.get(MULTI_RUNNERS, parts, lambda: MultiRunner(spec))
