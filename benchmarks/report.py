"""The report of a 257-class model: how long it takes to build, how large the page is, and
how long Chromium takes to render it.

    python benchmarks/report.py [--classes 257] [--per-class 30] [--dim 1280] [--json]

Issue 15's target: the report of a 257-class model renders in the browser in < 3 s and
stays under 20 MB. The model is trained on a synthetic store of that shape
(``deeptransfer.report.synthetic``: class-coloured JPEGs, class-dependent Gaussian features,
a few planted label errors and hard test rows), then ``deeptransfer report`` builds the page
with its defaults (20 confused pairs x 4 thumbnails, 36 images per gallery, 5 out-of-fold
refits), and headless Chromium (Debian's /usr/bin/chromium via Playwright) loads it from
disk. Figures: the page's bytes, the thumbnails on it, the build time split (the report
call in all; the out-of-fold refits' share is printed by a second build with --folds 0),
and the browser's times: ``goto`` to the load event (wall, median of 5 fresh pages) and the
page's own navigation timing (domContentLoaded, load), plus the time for the first click
sort of the per-class table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser_times(path: str, repeats: int = 5) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    walls, dcl, load, sort = [], [], [], []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        try:
            for _ in range(repeats):
                page = b.new_page(viewport={"width": 1200, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                        else None)
                t0 = time.perf_counter()
                page.goto("file://" + os.path.abspath(path), wait_until="load")
                walls.append(time.perf_counter() - t0)
                nav = page.evaluate("() => { const n = performance.getEntriesByType("
                                    "'navigation')[0]; return [n.domContentLoadedEventEnd,"
                                    " n.loadEventEnd]; }")
                dcl.append(nav[0] / 1000)
                load.append(nav[1] / 1000)
                t0 = time.perf_counter()
                page.locator("#per-class th", has_text="recall").click()
                page.wait_for_function("document.querySelector('#per-class th[aria-sort]')")
                sort.append(time.perf_counter() - t0)
                if errors:
                    raise SystemExit(f"console errors: {errors[:3]}")
                page.close()
        finally:
            b.close()
    med = statistics.median
    return {"goto_load_s": med(walls), "dom_content_loaded_s": med(dcl), "load_event_s": med(load),
            "sort_click_s": med(sort)}


def _planted(store: str) -> set[int]:
    """The planted label errors: rows whose label is not their image folder's class."""
    import numpy as np

    from deeptransfer.store import open_store

    st = open_store(store)
    paths, labels = np.asarray(st["paths"][:]), np.asarray(st["labels"][:])
    truth = np.array([int(os.path.basename(os.path.dirname(str(p)))[1:]) for p in paths])
    return {int(r) for r in np.flatnonzero(truth != labels)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=257)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--workdir", default=None,
                    help="where the store, model and pages go; a model already there is reused")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import deeptransfer as dt
    from deeptransfer.report.synthetic import make_synthetic

    work = args.workdir or tempfile.mkdtemp(prefix="report-bench-")
    t0 = time.perf_counter()
    model_dir, store = os.path.join(work, "model"), os.path.join(work, "f.zarr")
    setup_s = None
    if not os.path.exists(os.path.join(model_dir, "config.json")):  # else: an earlier run's
        make_synthetic(work, classes=args.classes, per_class=args.per_class, dim=args.dim,
                       flip=args.classes // 8, hard=args.classes // 2, noise=1.0,
                       epochs=args.epochs, px=160)
        setup_s = time.perf_counter() - t0
    planted = _planted(store)
    out = os.path.join(work, "report.html")
    timings = {}
    for label, folds in (("build_s", 5), ("build_no_folds_s", 0)):
        target = out if folds else os.path.join(work, "report-no-folds.html")
        t0 = time.perf_counter()
        data = dt.report(model_dir, store, target, workers=0, folds=folds)
        timings[label] = time.perf_counter() - t0
        if folds:
            timings["suspected_label_errors"] = data.label_error_count
            timings["planted_found"] = len(planted & set(data.label_error_rows))
            timings["planted"] = len(planted)
            timings["test_top1"] = data.headline["top1"]
    with open(out, encoding="utf-8") as f:
        text = f.read()
    res = {"classes": args.classes, "images": args.classes * args.per_class, "dim": args.dim,
           "page_bytes": os.path.getsize(out), "page_mb": os.path.getsize(out) / 2**20,
           "thumbnails": text.count("data:image/jpeg;base64,"),
           "setup_s": setup_s, **timings, **browser_times(out)}
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:22s} {v:.3f}" if isinstance(v, float) else f"{k:22s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
