"""Featurize benchmark: forward-only compute limit vs end-to-end local featurize, in one run.

    python benchmarks/featurize.py ../shared/datasets/caltech101 [--limit N] [--json]
        [--backend NAME|best] [--precision int8] [--ray]

Per inference backend (torch, openvino, onnxruntime; deeptransfer.backends) it prints the
forward-only limit (one process, every core, ready tensors, the best batch size) and the
end-to-end throughput of `deeptransfer featurize --backend NAME` on the same images, each as a
ratio to torch's forward-only limit. ``--backend best`` (default) runs every installed
backend end to end and reports the fastest; ``--precision int8`` adds each compiled
backend's int8 forward-only limit and the int8 prefix end to end (the default backend's,
and any other's whose int8 limit beats its float32 one), with the LogisticRegression probe
accuracy of every store's features (train/test halves of the images, the same for all)
against torch's, and for int8 and torch the accuracy under the 30-per-class protocol of
benchmarks/accuracy.py (its code: 30 train / 5 val per class, the rest the test); it prints
where a worker's time goes per image (read + decode, resize + normalize, forward) and the
ceiling that gives. ``--ray`` runs the Ray Data peer (benchmarks/peers.py) on the same
images and prints the ratio to it.

Prints, from one run on the same images:
- the forward-only throughput of the model on ready tensors (the compute limit): eager and
  torch.compile, channels_last, batch sizes 8..64, the fastest taken;
- the end-to-end throughput of `deeptransfer featurize` on the local engine (worker start-up,
  model build, read, decode, preprocess, forward, Zarr writes), and its ratio to the limit;
- the fused numba kernel against PIL resize + NumPy normalize on the same decoded images;
- peak RSS of the whole process tree (driver + workers).
This machine drifts ~20% within minutes, so the best forward configuration is measured
again right before and after the end-to-end run and the median of the three is the limit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from deeptransfer.workerenv import MALLOC_TUNABLES as TUNABLES
from deeptransfer import jsonutil


def _reexec_with_tunables() -> None:
    # glibc reads GLIBC_TUNABLES at start-up only: the forward limit is measured with the same
    # allocator settings the local engine gives its workers.
    if "GLIBC_TUNABLES" not in os.environ and not os.environ.get("DT_BENCH_NO_TUNABLES"):
        os.environ["GLIBC_TUNABLES"] = TUNABLES
        os.execv(sys.executable, [sys.executable, *sys.argv])


class PeakRSS:
    """Polls the summed RSS of a process and its children (the engine's workers).

    ``pid`` is the root of the tree to watch (default: this process); call ``watch(pid)`` to
    switch to a subprocess once it is started.
    """

    def __init__(self, interval: float = 0.1, pid: int | None = None):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def watch(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)

    def __enter__(self) -> "PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def subset(manifest, limit: int | None, seed: int = 0):
    """A deterministic, class-mixed subset of ``limit`` rows (all rows when None)."""
    from deeptransfer.dataset import Manifest

    if limit is None or limit >= len(manifest):
        return manifest
    rows = np.sort(np.random.default_rng(seed).permutation(len(manifest))[:limit])
    return Manifest(manifest.root, [manifest.paths[i] for i in rows], manifest.labels[rows],
                    manifest.split[rows], manifest.classes, list(manifest.warnings))


def link_subset(manifest, root: str) -> str:
    """A class-folder tree of symlinks to the manifest's files (the same bytes, fewer images)."""
    for path, label in zip(manifest.paths, manifest.labels):
        d = os.path.join(root, manifest.classes[label])
        os.makedirs(d, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(d, os.path.basename(path)))
    return root


def decoded_images(paths: list[str], target: int) -> list[np.ndarray]:
    from deeptransfer.featurization import load_image

    out = []
    for p in paths:
        try:
            out.append(load_image(p, target))
        except Exception:
            pass
    return out


def bench_kernel(images: list[np.ndarray], pp, repeats: int = 3) -> dict:
    """Fused numba kernel vs PIL resize + NumPy normalize, one thread, same images."""
    from deeptransfer.kernels import reference_preprocess, resize_crop_normalize

    kw = dict(resize=pp.resize, crop=pp.crop, mean=pp.mean, std=pp.std)
    buf = np.zeros((len(images), pp.crop, pp.crop, 3), np.float32)
    resize_crop_normalize(images[:2], buf[:2], parallel=False, **kw)  # compile / load cache
    t_fused, t_ref = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        resize_crop_normalize(images, buf, parallel=False, **kw)
        t_fused.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for img in images:
            reference_preprocess(img, **kw)
        t_ref.append(time.perf_counter() - t0)
    f, r = min(t_fused), min(t_ref)
    return {"kernel_ms_per_image": 1e3 * f / len(images),
            "reference_ms_per_image": 1e3 * r / len(images), "kernel_speedup": r / f}


def forward_ips(module, batch: np.ndarray, seconds: float = 4.0) -> float:
    """Images/s of ``module`` on a ready NHWC batch, warmed up, timed for ``seconds``."""
    import torch

    x = torch.from_numpy(batch).permute(0, 3, 1, 2)  # channels_last view
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            module(x)
            n += batch.shape[0]
        return n / (time.perf_counter() - t0)


def make_module(model: str, layer: str | None, compiled: bool):
    import torch

    from deeptransfer.models import ModelSpec, create_backbone

    bb = create_backbone(ModelSpec(model, layer))  # already channels_last
    return (torch.compile(bb, dynamic=False) if compiled else bb), bb.preprocess


def backend_forward_ips(backend: str, model: str, layer: str | None, batch: np.ndarray,
                        seconds: float, threads: int, precision: str = "auto",
                        calibration=()) -> float:
    """Images/s of a compiled backend (deeptransfer.backends) on a ready NHWC batch."""
    from deeptransfer.backends import build_backend

    module, pp = make_module(model, layer, False)
    be = build_backend(backend, module, batch_size=batch.shape[0], crop=pp.crop,
                       threads=threads, precision=precision, calibration=calibration)
    for _ in range(3):
        be.run(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        be.run(batch)
        n += batch.shape[0]
    return n / (time.perf_counter() - t0)


def probe_accuracy(store: str, seed: int = 0) -> float | None:
    """Test accuracy of a LogisticRegression on the store's train rows (None: no sklearn)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return None
    from deeptransfer.store import open_store

    st = open_store(store)
    xs, ys = {}, {}
    for split in ("train", "test"):
        rows = st.split_rows(split)
        xs[split], ys[split] = st.read_rows(rows)
    scaler = StandardScaler().fit(xs["train"])
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    clf.fit(scaler.transform(xs["train"]), ys["train"])
    return float((clf.predict(scaler.transform(xs["test"])) == ys["test"]).mean())


class ProtocolSplit:
    """A store's features under the 30-per-class protocol (benchmarks/accuracy.py): N
    training and M validation images per class drawn as ``load_dataset(per_class_train=N)``
    draws them, the rest the test; the store's own split is ignored. What
    ``accuracy.reference_logreg`` reads, so the protocol's code is reused, not copied."""

    def __init__(self, store, codes: np.ndarray):
        self.store, self.codes, self.classes = store, codes, store.classes
        self.ok = np.asarray(store["ok"][:], bool)

    def split_rows(self, split: str) -> np.ndarray:
        from deeptransfer.dataset import split_code

        return np.flatnonzero((self.codes == split_code(split)) & self.ok)


def protocol_split_codes(store, dataset: str, exclude: list[str], per_class_train: int = 30,
                         per_class_val: int = 5, seed: int = 0) -> np.ndarray:
    """Each store row's split code under the per-class protocol (matched by path)."""
    from deeptransfer.dataset import load_dataset

    m = load_dataset(dataset, per_class_train=per_class_train, per_class_val=per_class_val,
                     seed=seed, exclude_classes=exclude)
    code = {os.path.realpath(p): int(c) for p, c in zip(m.paths, m.split)}
    return np.array([code[os.path.realpath(str(p))] for p in store["paths"][:]], np.int8)


def protocol_accuracy(store_url: str, codes: np.ndarray, seed: int = 0) -> dict | None:
    """Mean per-class and top-1 test accuracy of benchmarks/accuracy.py's LogisticRegression
    reference (C chosen on the validation images) on the store's features (None: no sklearn)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return None
    from accuracy import reference_logreg  # benchmarks/accuracy.py

    from deeptransfer.dataset import split_code
    from deeptransfer.store import open_store

    st = open_store(store_url)
    if any((codes == split_code(k)).sum() == 0 for k in ("train", "val", "test")):
        return None  # a subset too small for the protocol (--limit): no validation images
    r = reference_logreg(ProtocolSplit(st, codes), seed, read=lambda v, rows: st.read_rows(rows))
    return {"mean_per_class": r["mean_per_class"], "top1": r["top1"], "C": r["C"]}


def decode_ms(paths: list[str], target: int) -> float:
    """Milliseconds per image to read and decode (one thread), as a worker does."""
    from deeptransfer.featurization import load_image

    t0 = time.perf_counter()
    for p in paths:
        load_image(p, target)
    return 1e3 * (time.perf_counter() - t0) / len(paths)


def run_cli_featurize(data: str, store: str, args, backend: str, precision: str = "auto",
                      batch_size: int | None = None) -> tuple[dict, int]:
    """`deeptransfer featurize` in a fresh process, as a user runs it; (report, peak RSS)."""
    cmd = [sys.executable, "-m", "deeptransfer", "featurize", data, store, "--model",
           args.model, "--json", "--backend", backend, "--split", "train=0.5,test=0.5"]
    cmd += ["--precision", precision] if precision != "auto" else []
    cmd += ["--batch-size", str(batch_size)] if batch_size else []
    cmd += ["--layer", args.layer] if args.layer else []
    cmd += ["--workers", str(args.workers)] if args.workers else []
    for c in args.exclude_class if data == args.dataset else ():  # a subset has no such folder
        cmd += ["--exclude-class", c]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(pid=proc.pid) as rss:  # the featurize job's tree only, not this process
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"featurize --backend {backend} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), rss.peak


def _acc(a: float | None) -> str:
    return "n/a" if a is None else f"{a:.4f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--limit", type=int, default=None, help="images to featurize (default all)")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--layer", default=None)
    ap.add_argument("--workers", type=int, default=None, help="local engine processes (default: cores)")
    ap.add_argument("--batch-sizes", default="8,16,32,64")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates")
    ap.add_argument("--seconds", type=float, default=4.0, help="timing window per forward config")
    ap.add_argument("--backend", default="best",
                    help="torch, openvino, onnxruntime, or best: every installed one")
    ap.add_argument("--precision", default="float32", choices=["float32", "int8"],
                    help="int8: also each compiled backend's int8 prefix, forward-only and "
                         "end to end, with its accuracy under the 30-per-class protocol")
    ap.add_argument("--ray", action="store_true", help="also the Ray Data peer (peers.py)")
    ap.add_argument("--exclude-class", action="append", default=[])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from deeptransfer.backends import BACKENDS, backend_available
    from deeptransfer.dataset import load_dataset

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    full = load_dataset(args.dataset, exclude_classes=args.exclude_class)
    args.full_n = len(full)
    manifest = subset(full, args.limit)
    n = len(manifest)
    _, pp = make_module(args.model, args.layer, False)
    sample = decoded_images(manifest.paths[: min(256, n)], pp.resize)
    out: dict = {"model": args.model, "images": n, "cores": cores,
                 "malloc_tunables": os.environ.get("GLIBC_TUNABLES") == TUNABLES}
    backends = [b for b in BACKENDS if backend_available(b)] if args.backend == "best" \
        else ["torch"] + ([args.backend] if args.backend != "torch" else [])

    # 1. kernels
    out.update(bench_kernel(sample[:128], pp))
    print(f"kernel: {out['kernel_ms_per_image']:.3f} ms/img fused vs "
          f"{out['reference_ms_per_image']:.3f} ms/img PIL+NumPy -> {out['kernel_speedup']:.2f}x",
          flush=True)

    # 2. forward-only limits: every candidate of every backend, the fastest of each taken
    from deeptransfer.kernels import resize_crop_normalize

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    ready = np.zeros((max(sizes), pp.crop, pp.crop, 3), np.float32)
    imgs = (sample * (max(sizes) // len(sample) + 1))[: max(sizes)]
    resize_crop_normalize(imgs, ready, resize=pp.resize, crop=pp.crop, mean=pp.mean, std=pp.std)
    candidates: dict[tuple[str, int], float] = {}
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    compiled_modules: dict[str, object] = {}
    for mode in modes:
        t0 = time.perf_counter()
        module, _ = make_module(args.model, args.layer, mode == "compiled")
        compiled_modules[mode] = module
        for b in sizes:
            ips = forward_ips(module, ready[:b], args.seconds)
            candidates[(mode, b)] = ips
            print(f"forward torch {mode:8s} batch {b:3d}: {ips:7.1f} img/s", flush=True)
        if mode == "compiled":
            out["compile_and_measure_seconds"] = time.perf_counter() - t0
    (best_mode, best_b), best = max(candidates.items(), key=lambda kv: kv[1])
    out["forward_candidates"] = {f"torch/{m}/{b}": round(v, 1) for (m, b), v in candidates.items()}
    other_best: dict[str, tuple[int, float]] = {}
    for name in [b for b in backends if b != "torch"]:
        per = {}
        for b in sizes:
            per[b] = backend_forward_ips(name, args.model, args.layer, ready[:b], args.seconds,
                                         cores)
            out["forward_candidates"][f"{name}/{b}"] = round(per[b], 1)
            print(f"forward {name:14s} batch {b:3d}: {per[b]:7.1f} img/s", flush=True)
        bb = max(per, key=per.get)
        other_best[name] = (bb, per[bb])
    int8 = [b for b in backends if b != "torch"] if args.precision == "int8" else []
    for name in int8:  # calibrated on the ready batch: a timing, not an accuracy
        per = {}
        for b in sizes:
            per[b] = backend_forward_ips(name, args.model, args.layer, ready[:b], args.seconds,
                                         cores, precision="int8", calibration=[ready[:b]])
            out["forward_candidates"][f"{name}-int8/{b}"] = round(per[b], 1)
            print(f"forward {name + '-int8':14s} batch {b:3d}: {per[b]:7.1f} img/s", flush=True)
        bb = max(per, key=per.get)
        other_best[f"{name}-int8"] = (bb, per[bb])

    # where a worker's time goes, per image on one core: read + decode, resize + normalize
    # (the fused kernel), the forward pass of each backend at its best batch (its limit
    # measured on every core, times the cores): the end-to-end ceiling is cores / their sum
    stage = {"decode_ms": decode_ms(manifest.paths[: min(256, n)], pp.resize),
             "preprocess_ms": out["kernel_ms_per_image"]}

    # 3. end-to-end per backend, bracketed by torch's best forward configuration again. The
    # run is the real CLI in a fresh process (its peak RSS is then the job's, not this
    # benchmark's), on the same images: a folder of links to them when --limit picks a subset.
    before = forward_ips(compiled_modules[best_mode], ready[:best_b], args.seconds)
    work = tempfile.mkdtemp(prefix="dt-bench-")
    data = link_subset(manifest, os.path.join(work, "data")) if n < args.full_n else args.dataset
    # int8 end to end for the default backend, and another where it pays (its forward-only
    # limit beats the same backend's float32)
    from deeptransfer.backends import DEFAULT_BACKEND

    paying = [b for b in int8 if b == DEFAULT_BACKEND
              or other_best[f"{b}-int8"][1] > other_best[b][1]]
    out["int8_not_run_end_to_end"] = sorted(set(int8) - set(paying))
    runs = [(b, "auto") for b in backends] + [(b, "int8") for b in paying]
    codes = None
    e2e: dict[str, dict] = {}
    for name, precision in runs:
        key = name if precision == "auto" else f"{name}-int8"
        store = os.path.join(work, f"{key}.zarr")
        # each backend at the batch size of its forward-only limit
        batch = best_b if name == "torch" else other_best[key][0]
        rep, peak = run_cli_featurize(data, store, args, name, precision, batch)
        e2e[key] = {"end_to_end_ips": n / rep["seconds"], "end_to_end_seconds": rep["seconds"],
                    "batch_size": batch,
                    "featurized": rep["featurized"], "skipped": len(rep["skipped"]),
                    "peak_rss_mb": peak / 2**20, "store_bytes": rep["store_bytes"],
                    "backend_network": rep.get("backend_network"),
                    "probe_accuracy": probe_accuracy(store)}
        if int8 and (name == "torch" or precision == "int8"):
            # the accuracy cost of int8 under the 30-per-class protocol (accuracy.py)
            from deeptransfer.store import open_store

            if codes is None:
                codes = protocol_split_codes(open_store(store), data, [])
            e2e[key]["protocol_30"] = protocol_accuracy(store, codes)
        print(f"end-to-end featurize --backend {key}: {e2e[key]['end_to_end_ips']:.1f} img/s "
              f"({rep['seconds']:.1f} s, batch {batch}, peak RSS "
              f"{e2e[key]['peak_rss_mb']:.0f} MB, probe accuracy {e2e[key]['probe_accuracy']}"
              + (f", 30-per-class mean per-class {e2e[key]['protocol_30']['mean_per_class']:.4f}"
                 if e2e[key].get("protocol_30") else "") + ")", flush=True)
    after = forward_ips(compiled_modules[best_mode], ready[:best_b], args.seconds)
    limit = statistics.median([best, before, after])
    limits = {"torch": limit, **{k: v[1] for k, v in other_best.items()}}
    for rec in e2e.values():
        rec["ratio"] = rec["end_to_end_ips"] / limit
    if "torch" in e2e and e2e["torch"]["probe_accuracy"] is not None:
        for rec in e2e.values():
            rec["probe_delta_points_vs_torch"] = 100 * (rec["probe_accuracy"]
                                                       - e2e["torch"]["probe_accuracy"])
    ref30 = e2e.get("torch", {}).get("protocol_30")
    for rec in e2e.values():
        if ref30 and rec.get("protocol_30"):
            rec["protocol_30_delta_points_vs_torch"] = 100 * (
                rec["protocol_30"]["mean_per_class"] - ref30["mean_per_class"])
    for key in e2e:
        fwd = limit if key == "torch" else limits[key]
        stage[f"forward_ms_{key}"] = 1e3 * cores / fwd
        total = stage["decode_ms"] + stage["preprocess_ms"] + stage[f"forward_ms_{key}"]
        stage[f"ceiling_ips_{key}"] = 1e3 * cores / total
    out["stages_ms_per_image_per_core"] = stage
    int8_runs = {k: v for k, v in e2e.items() if k.endswith("-int8")}
    if int8_runs:
        best8 = max(int8_runs, key=lambda k: int8_runs[k]["end_to_end_ips"])
        out["int8"] = {"backend": best8, "end_to_end_ips": int8_runs[best8]["end_to_end_ips"],
                       "ratio": int8_runs[best8]["end_to_end_ips"] / limit,
                       "protocol_30_delta_points_vs_torch":
                           int8_runs[best8].get("protocol_30_delta_points_vs_torch")}
    fp32 = {k: v for k, v in e2e.items() if not k.endswith("-int8")}
    chosen = max(fp32, key=lambda k: fp32[k]["end_to_end_ips"]) if args.backend == "best" \
        else args.backend
    out.update({
        "backend": chosen,
        "end_to_end_ips": e2e[chosen]["end_to_end_ips"],
        "torch_forward_limit_ips": limit,
        "torch_forward_best_config": f"{best_mode}/batch {best_b}",
        "torch_forward_limit_samples_ips": [best, before, after],
        "forward_limit_ips": limits,
        "forward_best_batch": {"torch": best_b, **{k: v[0] for k, v in other_best.items()}},
        "ratio": e2e[chosen]["end_to_end_ips"] / limit,
        "per_backend": e2e,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in e2e.values()),
    })
    if args.ray:
        import peers

        startup = peers.start_ray(args.workers or cores)
        try:
            r = peers.featurize_ray(manifest.paths, os.path.join(work, "ray.parquet"),
                                    model=args.model, workers=args.workers or cores)
        finally:
            import ray

            ray.shutdown()
        out["ray_data"] = {"startup_seconds": startup, "seconds": r["seconds"],
                           "images": r["images"], "ips": r["images"] / r["seconds"],
                           "ratio_best_to_ray": out["end_to_end_ips"] / (r["images"] / r["seconds"])}
        print(f"Ray Data peer (read_binary_files + map_batches on {args.workers or cores} "
              f"actors): {out['ray_data']['ips']:.1f} img/s ({r['seconds']:.1f} s; ray.init "
              f"{startup:.1f} s apart); best backend / Ray: {out['ray_data']['ratio_best_to_ray']:.2f}x")
    print(f"torch forward-only limit ({out['torch_forward_best_config']}): {limit:.1f} img/s "
          f"(samples {', '.join(f'{v:.1f}' for v in out['torch_forward_limit_samples_ips'])})")
    for name, ips in limits.items():
        print(f"forward-only limit {name:12s}: {ips:7.1f} img/s ({ips / limit:.2f}x torch's)")
    for key, rec in e2e.items():
        delta = rec.get("probe_delta_points_vs_torch")
        print(f"end-to-end {key:16s}: {rec['end_to_end_ips']:7.1f} img/s = {rec['ratio']:.2f}x "
              f"torch's forward limit; probe accuracy {_acc(rec['probe_accuracy'])}"
              + (f" ({delta:+.2f} points vs torch)" if delta is not None else ""))
    for key, rec in e2e.items():
        if rec.get("protocol_30"):
            d = rec.get("protocol_30_delta_points_vs_torch")
            print(f"30-per-class protocol {key:16s}: mean per-class "
                  f"{rec['protocol_30']['mean_per_class']:.4f}, top-1 "
                  f"{rec['protocol_30']['top1']:.4f}"
                  + (f" ({d:+.2f} points vs torch)" if d is not None else ""))
    print(f"per image on one core: read+decode {stage['decode_ms']:.2f} ms, resize+normalize "
          f"{stage['preprocess_ms']:.2f} ms, forward "
          + ", ".join(f"{k} {stage[f'forward_ms_{k}']:.2f} ms (ceiling "
                      f"{stage[f'ceiling_ips_{k}']:.0f} img/s)" for k in e2e))
    print(f"best: --backend {chosen}, ratio end-to-end / torch forward limit: {out['ratio']:.3f}")
    if "int8" in out:
        d = out["int8"]["protocol_30_delta_points_vs_torch"]
        print(f"best int8: --backend {out['int8']['backend'].removesuffix('-int8')} --precision "
              f"int8, ratio end-to-end / torch forward limit: {out['int8']['ratio']:.3f}"
              + (f", 30-per-class accuracy {d:+.2f} points vs torch" if d is not None else ""))
    print(f"kernel speed-up vs PIL + NumPy: {out['kernel_speedup']:.2f}x")
    print(f"peak RSS of a featurize job (driver + workers): {out['peak_rss_mb']:.0f} MB")
    if args.json:
        print(jsonutil.dumps(out))
    return out


if __name__ == "__main__":
    _reexec_with_tunables()
    main()
