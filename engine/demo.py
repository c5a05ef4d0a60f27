"""``deeptransfer demo``: the whole recipe on a real dataset that needs no network.

scikit-learn ships 1,797 handwritten digits (8x8 scans, UCI optdigits). They are written
out as greyscale PNG files, one folder per class, then featurized with the bundled
EfficientNet-Lite0, a softmax head is trained with parameter averaging on 2 workers, and
the held-out test split is evaluated.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_digits_dataset(root: str | os.PathLike, *, size: int = 32) -> Path:
    """Write scikit-learn's digits as ``root/<digit>/digit_NNNN.png``; returns ``root``.

    Dark ink on a light background, upsampled to ``size`` pixels with bicubic
    interpolation. Idempotent: an existing complete folder is reused.
    """
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is in the dev extra, which `make demo` installs
        from .errors import EngineUnavailableError

        raise EngineUnavailableError("The demo needs scikit-learn: pip install scikit-learn") from exc
    root = Path(root)
    digits = load_digits()
    done = root / ".complete"
    if done.exists():
        return root
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        d = root / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        pixels = (255 - img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).save(
            d / f"digit_{i:04d}.png")
    done.write_text(str(len(digits.images)))
    return root


def run_demo(out_dir: str | os.PathLike = "runs/demo", *, engine: str = "local",
             workers: int = 2, epochs: int = 30, progress: bool = True,
             log: Any = print) -> dict[str, Any]:
    """Build the digits dataset, featurize, train with parameter averaging, evaluate."""
    from .api import engine_scope

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = make_digits_dataset(out / "digits")
    log(f"[1/4] dataset: 1,797 handwritten digits from scikit-learn -> {data}")
    # one engine for the three jobs, as a user's session would keep its cluster
    with engine_scope(engine, workers, None) as ex:
        return _run_jobs(ex, out, data, workers, epochs, progress, log, t0)


def _run_jobs(ex: Any, out: Path, data: Path, workers: int, epochs: int, progress: bool,
              log: Any, t0: float) -> dict[str, Any]:
    from .api import evaluate, featurize, train

    engine = ex
    rep = featurize(str(data), str(out / "features.zarr"), split="train=0.6,val=0.2,test=0.2",
                    seed=0, engine=engine, workers=workers, progress=progress)
    log(f"[2/4] featurized {rep.featurized} images with {rep.model['name']} "
        f"({rep.feature_dim}-d) at {rep.images_per_second:.0f} images/s -> {rep.store}")
    result = train(str(out / "features.zarr"), str(out / "model"), engine=engine,
                   workers=workers, epochs=epochs, progress=progress)
    best = result.best or {}
    log(f"[3/4] trained a {result.head.kind} head with parameter averaging on {workers} workers "
        f"({result.rounds} averaging rounds): best validation accuracy "
        f"{best.get('val_top1', float('nan')):.4f} at epoch {best.get('epoch')} (counted from 0)")
    metrics = evaluate(str(out / "model"), str(out / "features.zarr"), split="test",
                       engine=engine, workers=workers, report_dir=str(out / "report"))
    seconds = time.perf_counter() - t0
    log(f"[4/4] test accuracy {metrics['top1']:.4f} (mean per-class {metrics['mean_per_class']:.4f}, "
        f"n={metrics['n']}) in {seconds:.0f} s")
    log(f"model:  {out / 'model'}   (deeptransfer predict {out / 'model'} IMAGE...)")
    log(f"report: {out / 'report'}   training curve: {out / 'model' / 'training.png'}")
    return {"metrics": metrics, "model_dir": str(out / "model"), "report_dir": str(out / "report"),
            "seconds": seconds}
