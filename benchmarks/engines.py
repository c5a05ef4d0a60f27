"""Engine benchmark: local vs Dask vs Spark vs what users write without deeptransfer, one run.

    python benchmarks/engines.py ../shared/datasets/caltech101 --limit 1600 \
        --exclude-class BACKGROUND_Google [--engines local,dask,spark] [--workers 2] \
        [--backend openvino] [--precision int8] [--repeats 2] [--out runs/engines] [--json]
        [--quick]

On the same images (a seeded, class-mixed subset of ``--limit`` images) and the same model:

1. every engine, started and closed here so that its start-up is timed on its own
   (``diagnostics.start_workers``: processes up, the core imported there): featurize
   images/s after start-up (model build, read, decode, preprocess, forward, Zarr writes),
   then head training with parameter averaging: seconds per epoch, each averaging round split
   into the slowest worker's compute and the rest (``rounds.jsonl``), seconds to a target
   validation accuracy, and the peak RSS of the driver, of each worker and of the rest of
   the process tree (Dask nannies, the Spark JVM);
2. the peers, each also as a ratio to the local engine: (a) the plain PyTorch loop
   (PIL + NumPy Dataset, ``DataLoader(num_workers=2)``, the model as a user loads it --
   the reference implementation where its weights package names one -- eager, batch 32,
   then a single-process head on the features), (a') the same loop on deeptransfer's
   backbone (``pytorch_dt``), (b) Spark's ``predict_batch_udf`` over a ``binaryFile``
   DataFrame, (c) Ray Data's ``read_binary_files`` + ``map_batches`` on an actor pool of
   one actor per worker (``ray.init`` reported apart as its start-up; the ``benchmarks``
   extra), (d) the forward-only compute limit of torch (featurize.py's measurement, best
   of eager batch 8/16); see peers.py. The engines featurize with ``--backend`` (default:
   deeptransfer's default backend) and ``--precision``, the same for all of them, shown in
   the table's backend column; the ratios the targets name (Dask and Spark to local, local
   to Ray Data, to the PyTorch loop and to ``predict_batch_udf``) are printed together;
3. how cost grows: the local engine with 1 and 2 workers featurizes and trains on 1/4, 1/2
   and all of the images; a table, a log-log plot and the fitted slope of log(time) against
   log(images) (1.0 is linear).

``--cost-inputs vgg16`` also measures what docs/scaling.md's cost model needs beyond the
engine runs (vgg16's forward speed with random weights, the round compute and result size of
1280/4096-d heads for 257/1000 classes) and adds the model's table; the table can be redone
from a saved run with ``python benchmarks/engines.py --cost-model runs/engines/results.json``.

Every measurement runs in a fresh Python process (so one run's driver memory, JVM or cached
model does not leak into the next), in turns A B C ... A B C ... (``--repeats``), and the
medians are reported, so that this machine's drift shows in the per-repeat samples.
Outputs under ``--out``: ``results.md`` (the tables), ``engines.png``, ``scaling.png``,
``results.json``, ``runs.log`` (the children's stderr); with ``--json`` the last line of stdout
is the results as one JSON object. ``--quick`` (at most 200 images, one repeat, 3 epochs, short
forward timing) checks the whole pipeline in a few minutes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pickle
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from featurize import TUNABLES, PeakRSS, link_subset, subset  # noqa: E402

from deeptransfer import jsonutil

# Spark binds to loopback and its Python workers run this interpreter (environment.md)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

ENGINES = ("local", "dask", "spark")
PEERS = ("pytorch", "pytorch_dt", "spark_udf", "ray_data", "forward_limit")
LABELS = {
    "local": "deeptransfer local", "dask": "deeptransfer dask", "spark": "deeptransfer spark",
    "pytorch": "plain PyTorch loop", "pytorch_dt": "PyTorch loop, our backbone",
    "spark_udf": "Spark predict_batch_udf",
    "ray_data": "Ray Data map_batches",
    "forward_limit": "forward-only limit",
}
#: the fields every result has in the JSON (None where a peer has no such step)
FIELDS = ("featurize_ips", "train_epoch_seconds", "round_overhead_ms", "peak_rss_mb",
          "startup_seconds")
#: ratios to the local engine reported for these
RATIO_FIELDS = FIELDS + ("time_to_target_seconds",)
RESULT_TAG = "DT_BENCH_RESULT "
MB = 2 ** 20


# =============================================================================================
# memory: peak RSS of the driver, of each worker and of the rest of the process tree
# =============================================================================================

class TreeRSS(PeakRSS):
    """featurize.py's PeakRSS (the summed RSS of this process tree), split by role.

    ``workers`` returns the worker processes' pids; it is called again every ``refresh_s``
    (Spark forks its Python workers on demand). Everything else below the driver (Dask
    nannies, the Spark JVM and its daemon, DataLoader workers when not listed) is "other".
    """

    def __init__(self, workers: Callable[[], Sequence[int]] | None = None,
                 interval: float = 0.2, refresh_s: float = 1.0):
        super().__init__(interval)
        self._workers_fn = workers
        self._refresh_s = refresh_s
        self.driver_peak = 0
        self.other_peak = 0
        self.worker_peaks: dict[int, int] = {}

    def _run(self) -> None:
        import psutil

        workers: set[int] = set()
        last = -1e9
        while not self._stop.is_set():
            now = time.monotonic()
            if self._workers_fn is not None and now - last >= self._refresh_s:
                try:
                    workers = set(self._workers_fn())
                except Exception:  # noqa: BLE001 - a lookup racing a process exit
                    pass
                last = now
            total = driver = other = 0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                procs = [self.proc]
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if p.pid == self.proc.pid:
                    driver = rss
                elif p.pid in workers:
                    self.worker_peaks[p.pid] = max(self.worker_peaks.get(p.pid, 0), rss)
                else:
                    other += rss
            self.peak = max(self.peak, total)
            self.driver_peak = max(self.driver_peak, driver)
            self.other_peak = max(self.other_peak, other)
            self._stop.wait(self.interval)

    def summary(self) -> dict[str, Any]:
        w = sorted(self.worker_peaks.values(), reverse=True)
        return {"peak_rss_mb": self.peak / MB, "driver_peak_rss_mb": self.driver_peak / MB,
                "worker_peak_rss_mb": [v / MB for v in w], "other_peak_rss_mb": self.other_peak / MB}


def merge_rss(*parts: dict[str, Any]) -> dict[str, Any]:
    """The larger of each peak over phases (workers matched by rank)."""
    out: dict[str, Any] = {"peak_rss_mb": 0.0, "driver_peak_rss_mb": 0.0, "other_peak_rss_mb": 0.0,
                           "worker_peak_rss_mb": []}
    for p in parts:
        for k in ("peak_rss_mb", "driver_peak_rss_mb", "other_peak_rss_mb"):
            out[k] = max(out[k], p[k])
        w = out["worker_peak_rss_mb"]
        for i, v in enumerate(p["worker_peak_rss_mb"]):
            if i < len(w):
                w[i] = max(w[i], v)
            else:
                w.append(v)
    return out


# =============================================================================================
# the children: one measurement each, in a fresh process
# =============================================================================================

def _load_manifest(path: str):
    with open(path, "rb") as f:
        return pickle.load(f)


def make_executor(engine: str, workers: int):
    if engine == "local":
        from deeptransfer.adapters.local import LocalExecutor

        return LocalExecutor(workers)
    if engine == "dask":
        from deeptransfer.adapters.dask import DaskExecutor

        return DaskExecutor(workers)
    if engine == "spark":
        from deeptransfer.adapters.spark import SparkExecutor

        return SparkExecutor(workers)
    raise ValueError(f"unknown engine {engine!r}")


def train_config(spec: dict[str, Any], workers: int):
    import deeptransfer as dt

    return dt.train_config(optimizer="adam", lr=1e-3, weight_decay=1e-4, schedule="cosine",
                           input_dropout=0.2, epochs=spec["epochs"], workers=workers,
                           batch_size_per_worker=32, averaging_frequency=5, patience=None,
                           seed=spec.get("seed", 0))


def featurize_on(ex: Any, manifest: Any, store: str, spec: dict[str, Any]) -> dict[str, Any]:
    """run_featurize on an open executor; throughput and the workers' time split."""
    from deeptransfer.featurization import run_featurize
    from deeptransfer.models import ModelSpec

    parts = {"read": 0.0, "preprocess": 0.0, "forward": 0.0, "task": 0.0, "tasks": 0}

    def on_chunk(res: Any) -> None:
        parts["read"] += res.read_seconds
        parts["preprocess"] += res.preprocess_seconds
        parts["forward"] += res.forward_seconds
        parts["task"] += res.seconds
        parts["tasks"] += 1

    rep = run_featurize(ex, manifest, store, model=ModelSpec(spec["model"]),
                        batch_size=spec["batch_size"], chunk_rows=spec["chunk_rows"],
                        backend=spec.get("backend"), precision=spec.get("precision", "auto"),
                        progress=on_chunk, overwrite=True)
    n = max(rep.computed_now, 1)
    return {"images": rep.images, "featurized": rep.featurized, "skipped": len(rep.skipped),
            "backend": rep.backend + ("-int8" if rep.quantization else ""),
            "backend_network": rep.backend_network,
            "featurize_seconds": rep.seconds,
            "featurize_ips": rep.computed_now / rep.seconds if rep.seconds > 0 else 0.0,
            "tasks": parts["tasks"],
            # worker-time not spent inside tasks (scheduling, transfers, idle tail), per task
            "per_task_overhead_ms": 1e3 * max(rep.seconds * max(int(ex.n_workers), 1) - parts["task"],
                                              0.0) / max(parts["tasks"], 1),
            "worker_ms_per_image": {k: 1e3 * parts[k] / n for k in ("read", "preprocess", "forward", "task")}}


def read_rounds(out_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(out_dir, "rounds.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def train_on(ex: Any, store: str, spec: dict[str, Any], workers: int, out_dir: str) -> dict[str, Any]:
    """train_head on an open executor; per-epoch and per-round times."""
    from deeptransfer.training import train_head

    t0 = time.perf_counter()
    res = train_head(ex, store, train_config(spec, workers), out_dir, progress=False, plot=False,
                     resume=False)
    wall = time.perf_counter() - t0
    rounds = read_rounds(out_dir)
    epoch_s = [h["seconds"] for h in res.history]
    # rounds after the first epoch: the first also reads each worker's shard from the store
    steady_rounds = [r for r in rounds if r["epoch"] > 0] or rounds
    round_s = [r["round_seconds"] for r in steady_rounds]
    compute = [r["compute_seconds"] for r in steady_rounds]
    over = [r["overhead_seconds"] for r in steady_rounds]
    by_epoch: dict[int, float] = {}
    for r in rounds:
        by_epoch[r["epoch"]] = by_epoch.get(r["epoch"], 0.0) + r["round_seconds"]
    # what an epoch costs beyond its rounds: validation, checkpoints, the driver's bookkeeping
    rest = [h["seconds"] - by_epoch.get(h["epoch"], 0.0) for h in res.history]
    steady = epoch_s[1:] or epoch_s  # the first epoch also loads the shards into the workers
    return {
        "train_seconds": wall, "epochs": len(res.history), "rounds": res.rounds,
        "rounds_per_epoch": res.rounds_per_epoch,
        "train_epoch_seconds": statistics.median(steady),
        "first_epoch_seconds": epoch_s[0],
        "epoch_seconds": epoch_s,
        "round_ms": 1e3 * statistics.median(round_s),
        "round_compute_ms": 1e3 * statistics.median(compute),
        "round_overhead_ms": 1e3 * statistics.median(over),
        "round_overhead_p90_ms": 1e3 * float(np.percentile(over, 90)),
        "epoch_rest_ms": 1e3 * statistics.median(rest[1:] or rest),
        "history": [{"epoch": h["epoch"], "seconds": h["seconds"], "val_top1": h.get("val_top1")}
                    for h in res.history],
        "best_val_top1": max((h.get("val_top1") or 0.0) for h in res.history),
    }


def engine_overheads(ex: Any, payload_bytes: int, rounds: int = 15) -> dict[str, Any]:
    """What the engine costs with no work: trivial tasks, empty rounds, rounds that carry data.

    - ``trivial_task_ms``: one ``map_unordered`` job of 50 tasks per worker that do nothing
      (``diagnostics.probe``), worker-time per task (workers x wall / tasks);
    - ``empty_round_ms``: a ``map_reduce`` round of one no-op task per worker, pinned like a
      training round (``affinity``), nothing broadcast: the engine's fixed cost per round;
    - ``payload_round_ms``: the same with ``payload_bytes`` broadcast and sent back by every
      worker (the size of the head's parameters + Adam state): the data-dependent part.
    """
    from deeptransfer.diagnostics import add_values, probe

    w = max(1, int(ex.n_workers))
    n = 50 * w
    t0 = time.perf_counter()
    for _ in ex.map_unordered(probe, list(range(n))):
        pass
    t_map = time.perf_counter() - t0
    payload = np.zeros(max(1, payload_bytes // 4), np.float32)
    out = {"trivial_task_ms": 1e3 * t_map * w / n, "trivial_tasks_per_second": n / t_map,
           "payload_bytes": int(payload.nbytes)}
    for key, shared in (("empty_round_ms", None), ("payload_round_ms", payload)):
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ex.map_reduce(probe, list(range(w)), add_values, shared=shared, affinity=list(range(w)))
            times.append(time.perf_counter() - t0)
        out[key] = 1e3 * statistics.median(times[2:] or times)
    return out


def child_engine(spec: dict[str, Any]) -> dict[str, Any]:
    from deeptransfer.diagnostics import start_workers

    manifest = _load_manifest(spec["manifest"])
    work = spec["work"]
    t0 = time.perf_counter()
    with TreeRSS() as rss_start:
        ex = make_executor(spec["engine"], spec["workers"])
        startup = time.perf_counter() - t0
        startup += start_workers(ex)
    try:
        if spec["engine"] == "spark":
            pids: Callable[[], Sequence[int]] = ex.worker_pids
        else:
            fixed = list(ex.worker_pids())
            pids = lambda: fixed  # noqa: E731
        store = os.path.join(work, "features.zarr")
        with TreeRSS(pids) as rss_f:
            feat = featurize_on(ex, manifest, store, spec)
        with TreeRSS(pids) as rss_t:
            train = train_on(ex, store, spec, spec["workers"], os.path.join(work, "head"))
        from deeptransfer.store import open_store

        st = open_store(store)
        n_classes, dim = len(st.classes), st.feature_dim
        # parameters + Adam's two moments of the benchmark's head, float32
        over = engine_overheads(ex, 3 * 4 * (dim * n_classes + n_classes))
    finally:
        t1 = time.perf_counter()
        ex.close()
        close_s = time.perf_counter() - t1
    return {"kind": "engine", "name": spec["engine"], "workers": spec["workers"],
            "startup_seconds": startup, "close_seconds": close_s, **feat, **train, **over,
            "rss": {"startup": rss_start.summary(), "featurize": rss_f.summary(),
                    "train": rss_t.summary()},
            **merge_rss(rss_f.summary(), rss_t.summary())}


def child_pytorch(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch  # noqa: F401  - start-up: the libraries a user's script imports

    import peers
    if spec["kind"] == "pytorch" and spec["model"] in peers.REFERENCE_NAMES:
        import efficientnet_lite_pytorch  # noqa: F401
    else:
        from deeptransfer.models import create_backbone  # noqa: F401
    startup = time.perf_counter() - t0
    manifest = _load_manifest(spec["manifest"])

    def loader_workers() -> list[int]:  # DataLoader worker processes (children of the driver)
        import psutil

        return [p.pid for p in psutil.Process().children()]

    with TreeRSS(loader_workers, refresh_s=0.5) as rss_f:
        out = peers.featurize_pytorch(manifest.paths, manifest.labels, spec["model"],
                                      batch_size=32, num_workers=spec["workers"],
                                      out_path=os.path.join(spec["work"], "features.npy"),
                                      backbone="deeptransfer" if spec["kind"] == "pytorch_dt"
                                      else "reference")
    feats = out["features"]
    from deeptransfer.dataset import split_code

    tr = manifest.split == split_code("train")
    va = manifest.split == split_code("val")
    with TreeRSS() as rss_t:
        t1 = time.perf_counter()
        hist = peers.train_plain_head(feats[tr], manifest.labels[tr], feats[va], manifest.labels[va],
                                      len(manifest.classes), epochs=spec["epochs"],
                                      seed=spec.get("seed", 0))
        train_s = time.perf_counter() - t1
    epoch_s = [h["seconds"] for h in hist]
    return {"kind": "peer", "name": spec["kind"], "workers": spec["workers"],
            "startup_seconds": startup, "images": len(manifest),
            "featurized": len(feats), "featurize_seconds": out["seconds"],
            "featurize_ips": len(manifest) / out["seconds"],
            "model_build_seconds": out["model_build_seconds"],
            "train_seconds": train_s, "epochs": len(hist),
            "train_epoch_seconds": statistics.median(epoch_s[1:] or epoch_s),
            "first_epoch_seconds": epoch_s[0], "epoch_seconds": epoch_s,
            "round_overhead_ms": None, "history": hist,
            "best_val_top1": max((h.get("val_top1") or 0.0) for h in hist),
            "rss": {"featurize": rss_f.summary(), "train": rss_t.summary()},
            **merge_rss(rss_f.summary(), rss_t.summary())}


def child_spark_udf(spec: dict[str, Any]) -> dict[str, Any]:
    import peers
    from deeptransfer.adapters.spark import _python_workers  # Spark's Python workers in /proc

    def spark_workers() -> list[int]:
        from pyspark import SparkContext

        proc = getattr(SparkContext._gateway, "proc", None)
        return _python_workers(proc.pid) if proc is not None else []

    with TreeRSS(spark_workers) as rss_s:
        spark, startup = peers.start_spark_peer(spec["workers"])
    try:
        threads = max(1, (os.cpu_count() or 1) // spec["workers"])
        with TreeRSS(spark_workers) as rss_f:
            out = peers.featurize_spark_udf(spark, spec["data_dir"], os.path.join(spec["work"], "f.parquet"),
                                            model=spec["model"], batch_size=32, threads=threads)
    finally:
        spark.stop()
    return {"kind": "peer", "name": "spark_udf", "workers": spec["workers"],
            "startup_seconds": startup, "images": spec["images"], "featurized": out["images"],
            "featurize_seconds": out["seconds"], "featurize_ips": spec["images"] / out["seconds"],
            "torch_threads_per_worker": threads,
            "train_epoch_seconds": None, "round_overhead_ms": None,
            "rss": {"startup": rss_s.summary(), "featurize": rss_f.summary()},
            **merge_rss(rss_f.summary())}


def child_ray(spec: dict[str, Any]) -> dict[str, Any]:
    """Ray Data's batch inference (peers.featurize_ray): ``ray.init`` timed as start-up,
    then read_binary_files + map_batches on one actor per worker, same images and model."""
    import peers

    def ray_workers() -> list[int]:  # Ray's worker processes (actors, read/write tasks)
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True)
                if "ray::" in " ".join(p.cmdline()[:1])]

    manifest = _load_manifest(spec["manifest"])
    with TreeRSS(ray_workers) as rss_s:
        startup = peers.start_ray(spec["workers"])
    try:
        with TreeRSS(ray_workers) as rss_f:
            out = peers.featurize_ray(manifest.paths, os.path.join(spec["work"], "ray.parquet"),
                                      model=spec["model"], workers=spec["workers"])
    finally:
        import ray

        ray.shutdown()
    return {"kind": "peer", "name": "ray_data", "workers": spec["workers"],
            "startup_seconds": startup, "images": len(manifest), "featurized": out["images"],
            "featurize_seconds": out["seconds"], "featurize_ips": len(manifest) / out["seconds"],
            "train_epoch_seconds": None, "round_overhead_ms": None,
            "rss": {"startup": rss_s.summary(), "featurize": rss_f.summary()},
            **merge_rss(rss_f.summary())}


def child_forward_limit(spec: dict[str, Any]) -> dict[str, Any]:
    import peers

    manifest = _load_manifest(spec["manifest"])
    with TreeRSS() as rss:
        out = peers.forward_limit(manifest.paths, spec["model"], batch_sizes=(8, 16),
                                  seconds=spec["forward_seconds"])
    return {"kind": "peer", "name": "forward_limit", "workers": 1,
            "featurize_ips": out["forward_ips"], "best_batch": out["best_batch"],
            "per_batch_ips": out["per_batch_ips"], "threads": out["threads"],
            "malloc_tunables": os.environ.get("GLIBC_TUNABLES") == TUNABLES,
            "startup_seconds": None, "train_epoch_seconds": None, "round_overhead_ms": None,
            "rss": {"forward": rss.summary()}, **merge_rss(rss.summary())}


def child_scaling(spec: dict[str, Any]) -> dict[str, Any]:
    """Local engine with ``workers`` processes: featurize + train on nested subsets."""
    from deeptransfer.adapters.local import LocalExecutor
    from deeptransfer.diagnostics import start_workers

    w = spec["workers"]
    points = []
    with LocalExecutor(w) as ex:
        startup = start_workers(ex)
        # un-timed warm-up: every worker builds its model and runs a training step once, so
        # each point below is the per-job cost on warm workers (the model build is in the
        # engine runs, not here)
        warm = _load_manifest(spec["warmup_manifest"])
        featurize_on(ex, warm, os.path.join(spec["work"], "warm.zarr"), spec)
        train_on(ex, os.path.join(spec["work"], "warm.zarr"), {**spec, "epochs": 1}, w,
                 os.path.join(spec["work"], "warm-head"))
        for k, path in enumerate(spec["manifests"]):
            m = _load_manifest(path)
            store = os.path.join(spec["work"], f"f{k}.zarr")
            feat = featurize_on(ex, m, store, spec)
            train = train_on(ex, store, spec, w, os.path.join(spec["work"], f"head{k}"))
            points.append({"workers": w, "images": len(m), **feat,
                           **{k2: train[k2] for k2 in ("train_seconds", "train_epoch_seconds",
                                                       "first_epoch_seconds", "rounds_per_epoch",
                                                       "round_ms", "round_compute_ms",
                                                       "round_overhead_ms", "epochs")},
                           "train_rows": int((m.split == 0).sum())})
    return {"kind": "scaling", "workers": w, "startup_seconds": startup, "points": points}


def child_cost_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """Inputs of docs/scaling.md's cost model that the engine runs do not give directly.

    - the forward-only throughput of other backbones (random weights: speed only), measured
      like the forward limit (eager, channels_last, all cores, best of batch 8/16);
    - one averaging round's worker compute for other head shapes (in_dim x classes): 5 Adam
      steps on minibatches of 32 in one torch thread, then the float32 copy of parameters and
      optimizer state and its pickle, which is what ``fit_shard`` does and sends; and the
      pickled size of that result.
    """
    import pickle as pk

    import torch

    from deeptransfer.kernels import resize_crop_normalize
    from deeptransfer.models import ModelSpec, create_backbone
    from featurize import decoded_images, forward_ips

    manifest = _load_manifest(spec["manifest"])
    out: dict[str, Any] = {"kind": "cost_inputs", "forward_ips": {}, "head_round": []}
    torch.set_num_threads(os.cpu_count() or 1)
    for name in spec["extra_models"]:
        t0 = time.perf_counter()
        bb = create_backbone(ModelSpec(name), pretrained=False)
        pp = bb.preprocess
        sample = decoded_images(list(manifest.paths[:16]), pp.resize)
        imgs = (sample * (16 // len(sample) + 1))[:16]
        ready = np.zeros((16, pp.crop, pp.crop, 3), np.float32)
        resize_crop_normalize(imgs, ready, **pp.kernel_args())
        per = {b: forward_ips(bb, ready[:b], spec["forward_seconds"]) for b in (8, 16)}
        out["forward_ips"][name] = {"ips": max(per.values()), "per_batch_ips": per,
                                    "feature_dim": bb.feature_dim,
                                    "build_seconds": time.perf_counter() - t0}
        del bb
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for d, c in spec["head_shapes"]:
        head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(d, c))
        opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
        x = torch.randn(160, d, generator=g)
        y = torch.randint(0, c, (160,), generator=g)
        steps, exports = [], []
        nbytes = 0
        for _ in range(7):
            t0 = time.perf_counter()
            for k in range(0, 160, 32):
                loss = torch.nn.functional.cross_entropy(head(x[k:k + 32]), y[k:k + 32])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            t1 = time.perf_counter()
            arrays = [p.detach().numpy().copy() for p in head.parameters()]
            for st in opt.state.values():
                arrays += [v.detach().numpy().copy() for v in st.values() if v.ndim]
            blob = pk.dumps(arrays, protocol=5)
            t2 = time.perf_counter()
            nbytes = len(blob)
            steps.append(t1 - t0)
            exports.append(t2 - t1)
        params = d * c + c
        out["head_round"].append({
            "in_dim": d, "classes": c, "params": params, "param_bytes_f32": 4 * params,
            "result_bytes": nbytes, "steps_ms": 1e3 * statistics.median(steps[2:]),
            "export_ms": 1e3 * statistics.median(exports[2:])})
    return out


CHILDREN = {"engine": child_engine, "pytorch": child_pytorch, "pytorch_dt": child_pytorch,
            "spark_udf": child_spark_udf, "ray_data": child_ray,
            "forward_limit": child_forward_limit, "scaling": child_scaling,
            "cost_inputs": child_cost_inputs}


def child_main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    os.makedirs(spec["work"], exist_ok=True)
    out = CHILDREN[spec["kind"]](spec)
    print(RESULT_TAG + jsonutil.dumps(out), flush=True)


# =============================================================================================
# the driver: plan, run the children in turns, aggregate, report
# =============================================================================================

def run_child(spec: dict[str, Any], work: str, log: Any, timeout: float) -> dict[str, Any]:
    os.makedirs(spec["work"], exist_ok=True)
    path = os.path.join(spec["work"], "spec.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    # the forward limit and the other models' forward speed (cost inputs) are measured as
    # featurize.py measures the limit: with the workers' malloc settings
    if spec["kind"] in ("forward_limit", "cost_inputs") and "GLIBC_TUNABLES" not in env \
            and not env.get("DT_BENCH_NO_TUNABLES"):
        env["GLIBC_TUNABLES"] = TUNABLES  # the limit is measured as featurize.py measures it
    t0 = time.perf_counter()
    proc = run_group([sys.executable, os.path.abspath(__file__), "--_child", path], env, timeout)
    log.write(f"===== {spec['kind']} {spec.get('engine', '')} {spec.get('label', '')} "
              f"rc={proc.returncode} {time.perf_counter() - t0:.1f}s\n{proc.stderr}\n")
    log.flush()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {spec['kind']} {spec.get('engine', '')} failed "
                           f"(rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][len(RESULT_TAG):])
    out["wall_seconds"] = time.perf_counter() - t0
    shutil.rmtree(spec["work"], ignore_errors=True)  # stores, Parquet, features: not kept
    return out


def run_group(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (the engine's
    workers, nannies, the Spark JVM), not just the child, then raise TimeoutExpired."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # the timeout, or Ctrl-C in the benchmark driver
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _median(values: Sequence[Any]) -> Any:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def time_to(history: Sequence[dict[str, Any]], target: float) -> float | None:
    """Training seconds until the validation top-1 first reached ``target``."""
    total = 0.0
    for h in history:
        total += h["seconds"]
        if (h.get("val_top1") if h.get("val_top1") is not None else -1.0) >= target - 1e-12:
            return total
    return None


def aggregate(runs: list[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """Medians over repeats of one engine's or peer's runs."""
    scalar = ("featurize_ips", "featurize_seconds", "train_epoch_seconds", "first_epoch_seconds",
              "train_seconds", "round_ms", "round_compute_ms", "round_overhead_ms",
              "round_overhead_p90_ms", "epoch_rest_ms", "peak_rss_mb", "driver_peak_rss_mb",
              "other_peak_rss_mb", "startup_seconds", "close_seconds", "best_val_top1",
              "rounds_per_epoch", "wall_seconds", "per_task_overhead_ms", "tasks", "images",
              "trivial_task_ms", "trivial_tasks_per_second", "empty_round_ms", "payload_round_ms",
              "payload_bytes",
              "featurized")
    out: dict[str, Any] = {"kind": runs[0]["kind"], "label": LABELS[runs[0]["name"]],
                           "repeats": len(runs)}
    for k in scalar:
        if any(k in r for r in runs):
            out[k] = _median([r.get(k) for r in runs])
    workers = [r.get("worker_peak_rss_mb") or [] for r in runs]
    n_w = max((len(w) for w in workers), default=0)
    out["worker_peak_rss_mb"] = [_median([w[i] for w in workers if i < len(w)]) for i in range(n_w)]
    if runs[0].get("history") and target is not None:
        out["time_to_target_seconds"] = _median([time_to(r["history"], target) for r in runs])
    else:
        out["time_to_target_seconds"] = None
    out["samples"] = {k: [r.get(k) for r in runs]
                      for k in ("featurize_ips", "train_epoch_seconds", "round_overhead_ms",
                                "peak_rss_mb", "startup_seconds")}
    for k in ("worker_ms_per_image", "per_batch_ips", "best_batch", "threads",
              "torch_threads_per_worker", "malloc_tunables", "backend"):
        if k in runs[0]:
            out[k] = runs[0][k] if not isinstance(runs[0][k], dict) else {
                kk: _median([r[k].get(kk) for r in runs]) for kk in runs[0][k]}
    for k in FIELDS:
        out.setdefault(k, None)
    return out


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    base = results.get("local")
    for r in results.values():
        r["ratio_to_local"] = {}
        for k in RATIO_FIELDS:
            a, b = r.get(k), (base or {}).get(k)
            r["ratio_to_local"][k] = (a / b) if (a is not None and b) else None


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of log(y) against log(x), least squares (None with fewer than 2 points)."""
    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """(fixed seconds, seconds per image) of y = a + b x."""
    if len(set(xs)) < 2:
        return None
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def scaling_summary(children: list[dict[str, Any]]) -> dict[str, Any]:
    points = [p for c in children for p in c["points"]]
    fits = {}
    for c in children:
        w = c["workers"]
        ps = c["points"]
        n = [p["images"] for p in ps]
        ntr = [p["train_rows"] for p in ps]
        fs = [p["featurize_seconds"] for p in ps]
        ts = [p["train_seconds"] for p in ps]
        es = [p["train_epoch_seconds"] for p in ps]
        lf = fit_line(n, fs)
        le = fit_line(ntr, es)
        fits[str(w)] = {
            "featurize_slope": fit_slope(n, fs), "train_slope": fit_slope(ntr, ts),
            "train_epoch_slope": fit_slope(ntr, es),
            "featurize_fixed_seconds": lf[0] if lf else None,
            "featurize_ms_per_image": 1e3 * lf[1] if lf else None,
            "train_epoch_fixed_seconds": le[0] if le else None,
            "train_epoch_ms_per_row": 1e3 * le[1] if le else None,
            "startup_seconds": c["startup_seconds"],
        }
    # speed-up of 2 workers over 1 at each size
    by = {(p["workers"], p["images"]): p for p in points}
    speedup = {}
    for (w, n), p in by.items():
        if w != 1 and (1, n) in by:
            speedup[f"{w}x@{n}"] = by[(1, n)]["featurize_seconds"] / p["featurize_seconds"]
    return {"points": points, "fits": fits, "featurize_speedup": speedup}


# -- the report -------------------------------------------------------------------------------

def _f(v: Any, fmt: str = "{:.1f}", none: str = "n/a") -> str:
    return none if v is None else fmt.format(v)


def markdown(out: dict[str, Any]) -> str:
    res = out["results"]
    lines = [
        f"# Engine benchmark: {out['images']} images of `{out['dataset']}`, {out['model']}",
        "",
        f"- command: `{out['command']}`",
        f"- date: {out['date']}; machine: {out['machine']}",
        f"- {out['workers']} workers per engine; {out['repeats']} repeat(s) in turns; medians; "
        f"featurize batch {out['batch_size']}, chunk {out['chunk_rows']} rows; "
        f"training {out['epochs']} epochs (Adam 1e-3, cosine, batch 32 per worker, averaging "
        f"every 5 minibatches); target validation top-1 {_f(out['target_val_top1'], '{:.3f}')}",
        "",
        "| | backend | start-up s | featurize img/s | x local | epoch s | x local | "
        "round compute ms | round overhead ms (p90) | s to target | "
        "peak RSS MB: total / driver / workers | x local |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        q = r["ratio_to_local"]
        workers = " + ".join(f"{v:.0f}" for v in r.get("worker_peak_rss_mb") or []) or "-"
        lines.append(
            f"| {r['label']} | {r.get('backend') or 'torch'} | {_f(r['startup_seconds'])} | "
            f"{_f(r['featurize_ips'])} | "
            f"{_f(q['featurize_ips'], '{:.2f}')} | {_f(r['train_epoch_seconds'], '{:.3f}')} | "
            f"{_f(q['train_epoch_seconds'], '{:.2f}')} | {_f(r.get('round_compute_ms'))} | "
            f"{_f(r['round_overhead_ms'])} ({_f(r.get('round_overhead_p90_ms'))}) | "
            f"{_f(r.get('time_to_target_seconds'))} | {_f(r['peak_rss_mb'], '{:.0f}')} / "
            f"{_f(r.get('driver_peak_rss_mb'), '{:.0f}')} / {workers} | "
            f"{_f(q['peak_rss_mb'], '{:.2f}')} |")
    ratios = featurize_ratios(res)
    if ratios:
        lines += ["", "Featurize throughput ratios, same run, same images (targets of issue 13: "
                  "Dask >= 0.9x and Spark >= 0.85x local with the same backend; local >= 3x "
                  "Ray Data, >= 6x the plain PyTorch loop and Spark's predict_batch_udf):", ""]
        lines += [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    eng = {k: r for k, r in res.items() if r["kind"] == "engine"}
    if eng:
        lines += ["", "Where the engines' time goes (medians). Worker ms per image: inside the "
                  "featurize tasks; idle ms per task: (workers x wall - task time) / tasks, "
                  "which includes the last wave's idle worker; trivial task: a no-op "
                  "`map_unordered` task; empty round: a no-op `map_reduce` round pinned like "
                  "a training round; payload round: the same carrying the head's parameters "
                  "and Adam state out and back.", "",
                  "| engine | read+decode ms/img | preprocess ms/img | forward ms/img | "
                  "featurize idle ms/task | trivial task ms | empty round ms | payload round ms | "
                  "epoch s beyond rounds (validation, checkpoints) |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in eng.items():
            wm = r.get("worker_ms_per_image") or {}
            lines.append(
                f"| {name} | {_f(wm.get('read'), '{:.2f}')} | {_f(wm.get('preprocess'), '{:.2f}')} | "
                f"{_f(wm.get('forward'), '{:.2f}')} | {_f(r.get('per_task_overhead_ms'))} | "
                f"{_f(r.get('trivial_task_ms'))} | {_f(r.get('empty_round_ms'))} | "
                f"{_f(r.get('payload_round_ms'))} ({_f((r.get('payload_bytes') or 0) / MB, '{:.1f}')} MB) | "
                f"{_f((r.get('epoch_rest_ms') or 0) / 1e3, '{:.3f}')} |")
    lines += ["", "Per-repeat samples (drift): featurize img/s and epoch seconds", ""]
    for name, r in res.items():
        s = r["samples"]
        lines.append(f"- {r['label']}: img/s {', '.join(_f(v) for v in s['featurize_ips'])}; "
                     f"epoch s {', '.join(_f(v, '{:.3f}') for v in s['train_epoch_seconds'])}; "
                     f"start-up s {', '.join(_f(v) for v in s['startup_seconds'])}")
    sc = out.get("scaling")
    if sc:
        lines += ["", "## How cost grows (local engine, warm workers)", "",
                  "| workers | images | featurize s | img/s | train rows | rounds/epoch | epoch s | "
                  "train s |", "|---|---|---|---|---|---|---|---|"]
        for p in sorted(sc["points"], key=lambda p: (p["workers"], p["images"])):
            lines.append(f"| {p['workers']} | {p['images']} | {p['featurize_seconds']:.2f} | "
                         f"{p['featurize_ips']:.1f} | {p['train_rows']} | {p['rounds_per_epoch']} | "
                         f"{p['train_epoch_seconds']:.3f} | {p['train_seconds']:.2f} |")
        lines += ["", "| workers | featurize slope | fixed s + ms/image | train slope | "
                      "epoch: fixed s + ms/row |", "|---|---|---|---|---|"]
        for w, f in sc["fits"].items():
            lines.append(f"| {w} | {_f(f['featurize_slope'], '{:.3f}')} | "
                         f"{_f(f['featurize_fixed_seconds'], '{:.2f}')} + "
                         f"{_f(f['featurize_ms_per_image'], '{:.2f}')} | "
                         f"{_f(f['train_slope'], '{:.3f}')} | "
                         f"{_f(f['train_epoch_fixed_seconds'], '{:.3f}')} + "
                         f"{_f(f['train_epoch_ms_per_row'], '{:.4f}')} |")
        if sc["featurize_speedup"]:
            lines += ["", "Featurize speed-up of 2 workers over 1: " + ", ".join(
                f"{k}: {v:.2f}x" for k, v in sorted(sc["featurize_speedup"].items()))]
    if out.get("cost_model"):
        lines += ["", "## Cost model at 10-1,000 workers (docs/scaling.md)", "",
                  cost_model_markdown(out["cost_model"])]
    return "\n".join(lines) + "\n"


def featurize_ratios(res: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The engines against local, and local against each user-written peer (featurize)."""
    local = (res.get("local") or {}).get("featurize_ips")
    out: dict[str, float] = {}
    if not local:
        return out
    for name in ("dask", "spark"):
        v = (res.get(name) or {}).get("featurize_ips")
        if v:
            out[f"{name} / local"] = v / local
    for name in ("ray_data", "pytorch", "spark_udf", "pytorch_dt", "forward_limit"):
        v = (res.get(name) or {}).get("featurize_ips")
        if v:
            out[f"local / {LABELS[name]}"] = local / v
    return out


def plots(out: dict[str, Any], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    res = out["results"]
    names = list(res)
    labels = [res[n]["label"].replace("deeptransfer ", "dt ") for n in names]
    fig, ax = plt.subplots(2, 2, figsize=(13, 8.5))
    a = ax[0][0]
    v = [res[n]["featurize_ips"] or 0 for n in names]
    a.barh(labels, v, color=["C0" if res[n]["kind"] == "engine" else "C1" for n in names])
    a.set_xlabel("featurize images/s (after start-up)")
    a.invert_yaxis()
    a = ax[0][1]
    tn = [n for n in names if res[n].get("train_epoch_seconds") is not None]
    a.barh([labels[names.index(n)] for n in tn], [res[n]["train_epoch_seconds"] for n in tn], color="C2")
    a.set_xlabel("head training: seconds per epoch (median, after the first)")
    a.invert_yaxis()
    a = ax[1][0]
    rn = [n for n in names if res[n].get("round_overhead_ms") is not None]
    lab = [labels[names.index(n)] for n in rn]
    comp = [res[n].get("round_compute_ms") or 0 for n in rn]
    over = [res[n]["round_overhead_ms"] for n in rn]
    a.barh(lab, comp, label="compute (slowest worker)", color="C0")
    a.barh(lab, over, left=comp, label="overhead", color="C3")
    a.set_xlabel("averaging round, ms (median)")
    a.legend(loc="lower right")
    a.invert_yaxis()
    a = ax[1][1]
    drv = [res[n].get("driver_peak_rss_mb") or 0 for n in names]
    wrk = [sum(res[n].get("worker_peak_rss_mb") or []) for n in names]
    tot = [res[n]["peak_rss_mb"] or 0 for n in names]
    oth = [max(t - d - w, 0) for t, d, w in zip(tot, drv, wrk)]
    a.barh(labels, drv, label="driver", color="C0")
    a.barh(labels, wrk, left=drv, label="workers (sum of peaks)", color="C1")
    a.barh(labels, oth, left=[d + w for d, w in zip(drv, wrk)], label="other (JVM, nannies)",
           color="C7")
    a.set_xlabel("peak RSS, MB")
    a.legend(loc="lower right")
    a.invert_yaxis()
    fig.suptitle(f"{out['images']} images, {out['model']}, {out['workers']} workers, "
                 f"{out['machine']}")
    fig.tight_layout()
    p = os.path.join(out_dir, "engines.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    sc = out.get("scaling")
    if sc and sc["points"]:
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.8))
        for w in sorted({p["workers"] for p in sc["points"]}):
            ps = sorted((p for p in sc["points"] if p["workers"] == w), key=lambda p: p["images"])
            f = sc["fits"][str(w)]
            ax[0].loglog([p["images"] for p in ps], [p["featurize_seconds"] for p in ps], "o-",
                         label=f"{w} worker(s), slope {_f(f['featurize_slope'], '{:.2f}')}")
            ax[1].loglog([p["train_rows"] for p in ps], [p["train_seconds"] for p in ps], "o-",
                         label=f"{w} worker(s), slope {_f(f['train_slope'], '{:.2f}')}")
        for a, key, xk, title in ((ax[0], "featurize_seconds", "images", "featurize"),
                                  (ax[1], "train_seconds", "train_rows", "train (fixed epochs)")):
            ps = sorted(sc["points"], key=lambda p: p[xk])
            x0, x1 = ps[0][xk], ps[-1][xk]
            y0 = min(p[key] for p in ps if p[xk] == x0)
            a.loglog([x0, x1], [y0, y0 * x1 / x0], "k:", label="linear (slope 1)")
            a.set_xlabel("train rows" if xk == "train_rows" else "images")
            a.set_ylabel("seconds")
            a.set_title(f"local engine: {title}")
            a.legend()
        fig.tight_layout()
        p = os.path.join(out_dir, "scaling.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)
    return files


# =============================================================================================
# the cost model of docs/scaling.md, from a results.json of this benchmark
# =============================================================================================

#: datasets of the model: (images featurized, training rows, classes)
SCALE_DATASETS = {"Caltech-256": (30_607, 24_486, 257), "ImageNet": (1_281_167, 1_281_167, 1000)}
#: backbones of the model: feature width
SCALE_MODELS = {"efficientnet_lite0": 1280, "vgg16": 4096}
SCALE_WORKERS = (10, 100, 1000)


def cost_model(out: dict[str, Any], *, bandwidth: float = 1.25e9, hop_ms: float = 0.5,
               serialize_bps: float = 2e9, chunk_rows: int = 256,
               rows_per_round: int = 160) -> dict[str, Any]:
    """Featurize and per-epoch training time at 10-1,000 workers from measured figures.

    Measured (``out``, a results.json with ``cost_inputs``): per-image worker time (read,
    decode+preprocess, forward) of the local engine; each engine's per-task and per-round
    overhead; the round compute of the benchmark's head, and the relative compute and result
    size of other head shapes; the forward speed of vgg16 against efficientnet_lite0.
    Assumed (arguments): network ``bandwidth`` per node (bytes/s, 10 GbE), ``hop_ms`` latency
    per tree level, pickling speed, 256-row featurize tasks, 160 rows per worker per round
    (batch 32 x averaging every 5).
    """
    res = out["results"]
    ci = out.get("cost_inputs") or {}
    local = res["local"]
    w_ms = local["worker_ms_per_image"]
    io_ms = w_ms["read"] + w_ms["preprocess"]
    fwd_ms = {"efficientnet_lite0": w_ms["forward"]}
    lim = res.get("forward_limit", {}).get("featurize_ips")
    vgg = (ci.get("forward_ips") or {}).get("vgg16")
    if lim and vgg:
        fwd_ms["vgg16"] = w_ms["forward"] * lim / vgg["ips"]
    heads = {(h["in_dim"], h["classes"]): h for h in ci.get("head_round", [])}
    bench = heads.get((1280, out["classes"]))
    calib = local["round_compute_ms"] / (bench["steps_ms"] + bench["export_ms"]) if bench else 1.0
    engines = {e: res[e] for e in ("dask", "spark") if e in res}
    rows = []
    for model, dim in SCALE_MODELS.items():
        if model not in fwd_ms:
            continue
        c_img = io_ms + fwd_ms[model]  # ms per image on one worker core
        for ds, (n_img, n_train, classes) in SCALE_DATASETS.items():
            h = heads.get((dim, classes))
            if h is None:
                continue
            steps_full, export = calib * h["steps_ms"], calib * h["export_ms"]  # 5 x 32 rows
            s_b = 3 * h["param_bytes_f32"]  # parameters + Adam's two moments, float32
            s_r = h["result_bytes"]  # a worker's float32 parameters + moments, pickled
            s_sum = 2 * s_r  # a partial sum above the tree's first level is float64
            for eng, r in engines.items():
                # no-work costs where measured (the model adds the tail and the data itself)
                o_task = r.get("trivial_task_ms") or r.get("per_task_overhead_ms") or 0.0
                o_round = r.get("empty_round_ms") or r["round_overhead_ms"]
                for w in SCALE_WORKERS:
                    tasks = -(-n_img // chunk_rows)
                    waves = -(-tasks // w)
                    feat_s = waves * (chunk_rows * c_img + o_task) / 1e3
                    adaptive = max(1, -(-n_img // w))  # one task per worker
                    feat_adapt_s = (adaptive * c_img + o_task) / 1e3
                    per_worker = n_train / w
                    rounds = max(1, math.ceil(per_worker / rows_per_round))
                    steps = min(5, math.ceil(min(per_worker, rows_per_round) / 32))
                    compute = steps_full * steps / 5 + export  # the result is sent once
                    depth = max(1, math.ceil(math.log2(w)))
                    hop = hop_ms / 1e3
                    bcast = depth * (s_b / bandwidth + hop)
                    ser = s_r / serialize_bps
                    ser_sum = s_sum / serialize_bps
                    if eng == "dask":
                        if w <= 32:  # gathered and combined on the driver
                            reduce = w * (s_r / bandwidth + ser) + hop
                        else:  # a pairwise tree of combine tasks: leaves, then sums
                            reduce = (s_r / bandwidth + 2 * ser + hop) + (depth - 1) * (
                                s_sum / bandwidth + 2 * ser_sum + hop)
                    else:  # Spark treeAggregate(depth=2) as adapters/spark.py builds it
                        scale = 2 ** max(1, math.ceil(math.log2(max(w, 2)) / 2))
                        n_parts, fan = w, []
                        while n_parts > scale + n_parts / scale:
                            fan.append(scale)
                            n_parts = -(-n_parts // scale)
                        fan.append(n_parts)  # the driver merges the last partials
                        # the first level receives the workers' results, later ones sums
                        reduce = sum(f * ((s_r / bandwidth + ser) if k == 0 else
                                          (s_sum / bandwidth + ser_sum)) + hop
                                     for k, f in enumerate(fan))
                    comm_ms = 1e3 * (bcast + reduce)
                    round_ms = compute + o_round + comm_ms
                    epoch_s = (rounds * round_ms + o_round) / 1e3  # + the validation job
                    rows.append({
                        "model": model, "dataset": ds, "engine": eng, "workers": w,
                        "featurize_s": feat_s, "featurize_busy_workers": min(w, tasks),
                        "featurize_adaptive_s": feat_adapt_s,
                        "rounds_per_epoch": rounds, "round_compute_ms": compute,
                        "round_overhead_ms": o_round, "round_comm_ms": comm_ms,
                        "epoch_s": epoch_s,
                        "overhead_share": (o_round + comm_ms) / round_ms,
                    })
    return {"inputs": {"io_ms_per_image": io_ms, "forward_ms_per_image": fwd_ms,
                       "round_compute_calibration": calib,
                       "task_overhead_ms": {e: r.get("trivial_task_ms") or r.get("per_task_overhead_ms")
                                            for e, r in engines.items()},
                       "round_fixed_ms": {e: r.get("empty_round_ms") or r["round_overhead_ms"]
                                          for e, r in engines.items()},
                       "startup_seconds": {e: r["startup_seconds"] for e, r in engines.items()},
                       "heads": list(heads.values()),
                       "assumed": {"bandwidth_bytes_per_s": bandwidth, "hop_ms": hop_ms,
                                   "serialize_bytes_per_s": serialize_bps, "chunk_rows": chunk_rows,
                                   "rows_per_worker_per_round": rows_per_round}},
            "rows": rows}


def cost_model_markdown(cm: dict[str, Any]) -> str:
    lines = ["| model | dataset | engine | workers | featurize s (256-row tasks: busy workers) | "
             "featurize s, 1 task/worker | rounds/epoch | round ms: compute + engine + comm | "
             "epoch s | overhead share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in cm["rows"]:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['engine']} | {r['workers']} | "
            f"{r['featurize_s']:.1f} ({r['featurize_busy_workers']}) | {r['featurize_adaptive_s']:.1f} | "
            f"{r['rounds_per_epoch']} | {r['round_compute_ms']:.0f} + {r['round_overhead_ms']:.0f} + "
            f"{r['round_comm_ms']:.0f} | {r['epoch_s']:.2f} | {100 * r['overhead_share']:.0f}% |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    import psutil

    mem = psutil.virtual_memory().total / 2 ** 30
    return f"{os.cpu_count()} cores, {mem:.0f} GiB, CPU only ({platform.machine()}, {platform.system()})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--limit", type=int, default=None, help="images (a seeded, class-mixed subset)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--peers", default=",".join(PEERS), help="peers to run ('' for none)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="turns over everything (default 2; 1 with --quick)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 20; 3 with --quick)")
    ap.add_argument("--target", type=float, default=None,
                    help="validation top-1 to time (default 0.95 x the lowest best of all runs)")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=16, help="featurize batch (the project default)")
    ap.add_argument("--backend", default=None, choices=["torch", "openvino", "onnxruntime"],
                    help="the engines' featurize backend (default: deeptransfer's default, "
                         "deeptransfer.backends.DEFAULT_BACKEND, torch if not installed)")
    ap.add_argument("--precision", default="auto", choices=["auto", "int8"],
                    help="int8: the engines featurize with the backend's int8 prefix")
    ap.add_argument("--chunk-rows", type=int, default=64,
                    help="images per featurize task (default 64: every size here splits into "
                         "enough tasks for both workers)")
    ap.add_argument("--split", default="train=0.7,val=0.1,test=0.2")
    ap.add_argument("--exclude-class", action="append", default=[])
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--cost-inputs", default=None, metavar="MODELS",
                    help="also measure the cost model's inputs (docs/scaling.md): the forward "
                         "speed of these backbones with random weights (e.g. vgg16) and the "
                         "round compute of 1280/4096-d heads for 257/1000 classes")
    ap.add_argument("--scaling-workers", default="1,2")
    ap.add_argument("--out", default=os.path.join("runs", "engines"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child run")
    args = ap.parse_args(argv)
    if args.quick:
        args.limit = min(args.limit or 200, 200)
    repeats = args.repeats or (1 if args.quick else 2)
    epochs = args.epochs or (3 if args.quick else 20)
    engines = [e for e in args.engines.split(",") if e]
    peer_list = [p for p in args.peers.split(",") if p]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r}: choose from {', '.join(ENGINES)}")
    for p in peer_list:
        if p not in PEERS:
            raise SystemExit(f"unknown peer {p!r}: choose from {', '.join(PEERS)}")

    from deeptransfer.dataset import assign_fractions, parse_fractions, scan

    t_all = time.perf_counter()
    full = scan(args.dataset, exclude_classes=args.exclude_class)
    # split the whole dataset first (stratified, seeded), then take the subset: the subsets
    # below are nested and every row keeps the split it has in the full dataset
    full = assign_fractions(full, parse_fractions(args.split), args.seed)
    manifest = subset(full, args.limit, seed=args.seed)
    n = len(manifest)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dt-engines-")
    man_path = os.path.join(work, "manifest.pkl")
    with open(man_path, "wb") as f:
        pickle.dump(manifest, f)
    data_dir = link_subset(manifest, os.path.join(work, "data"))  # the binaryFile peer's input
    from deeptransfer.backends import resolve_backend

    backend, _ = resolve_backend(args.backend, precision=args.precision)
    base = {"manifest": man_path, "model": args.model, "batch_size": args.batch_size,
            "backend": backend, "precision": args.precision,
            "chunk_rows": args.chunk_rows, "epochs": epochs, "seed": args.seed,
            "workers": args.workers, "images": n, "data_dir": data_dir,
            "forward_seconds": 0.5 if args.quick else 4.0}
    log = open(os.path.join(args.out, "runs.log"), "w", encoding="utf-8")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a: print(*a, flush=True))
    counts = manifest.split_counts()
    say(f"{n} images ({counts['train']} train / {counts['val']} val / {counts['test']} test), "
        f"{len(manifest.classes)} classes, {args.model}, backend {backend}"
        f"{' int8' if args.precision == 'int8' else ''}; engines {engines}, peers {peer_list}, "
        f"{repeats} repeat(s), {epochs} epochs")

    runs: dict[str, list[dict[str, Any]]] = {}
    k = 0
    try:
        for rep in range(repeats):
            for name in engines + peer_list:
                k += 1
                kind = "engine" if name in ENGINES else name
                spec = {**base, "kind": kind, "engine": name, "label": f"repeat {rep + 1}",
                        "work": os.path.join(work, f"run{k}")}
                r = run_child(spec, work, log, args.timeout)
                runs.setdefault(name, []).append(r)
                msg = f"[{rep + 1}/{repeats}] {LABELS[name]:26s} featurize {r['featurize_ips']:7.1f} img/s"
                if r.get("startup_seconds") is not None:
                    msg += f", start-up {r['startup_seconds']:5.1f} s"
                if r.get("train_epoch_seconds") is not None:
                    msg += f", epoch {r['train_epoch_seconds']:.3f} s"
                if r.get("round_overhead_ms") is not None:
                    msg += f", round {r['round_compute_ms']:.1f} + {r['round_overhead_ms']:.1f} ms"
                say(msg + f", peak RSS {r['peak_rss_mb']:.0f} MB ({r['wall_seconds']:.0f} s)")

        scaling_children = []
        if not args.no_scaling:
            sizes = sorted({max(1, n // 4), max(1, n // 2), n})
            paths = []
            for s in sizes:
                p = os.path.join(work, f"manifest-{s}.pkl")
                with open(p, "wb") as f:
                    pickle.dump(subset(manifest, s, seed=args.seed + 1), f)
                paths.append(p)
            warm = os.path.join(work, "manifest-warm.pkl")
            with open(warm, "wb") as f:
                pickle.dump(subset(manifest, min(n, 2 * args.chunk_rows), seed=args.seed + 2), f)
            for w in [int(x) for x in args.scaling_workers.split(",") if x]:
                k += 1
                spec = {**base, "kind": "scaling", "workers": w, "manifests": paths,
                        "warmup_manifest": warm, "label": f"{w} workers",
                        "work": os.path.join(work, f"run{k}")}
                c = run_child(spec, work, log, args.timeout)
                scaling_children.append(c)
                for p in c["points"]:
                    say(f"[scaling] local, {w} worker(s), {p['images']:5d} images: featurize "
                        f"{p['featurize_seconds']:6.2f} s ({p['featurize_ips']:.1f} img/s), train "
                        f"{p['train_seconds']:.2f} s ({p['train_epoch_seconds']:.3f} s/epoch)")
        cost = None
        if args.cost_inputs is not None:
            k += 1
            shapes = [[1280, len(manifest.classes)], [1280, 257], [1280, 1000], [4096, 257],
                      [4096, 1000]]
            spec = {**base, "kind": "cost_inputs", "head_shapes": shapes,
                    "extra_models": [m for m in args.cost_inputs.split(",") if m],
                    "work": os.path.join(work, f"run{k}")}
            cost = run_child(spec, work, log, args.timeout)
            for m, v in cost["forward_ips"].items():
                say(f"[cost inputs] {m} forward (random weights): {v['ips']:.1f} img/s")
            for h in cost["head_round"]:
                say(f"[cost inputs] head {h['in_dim']} x {h['classes']}: 5 Adam steps "
                    f"{h['steps_ms']:.1f} ms + float32 export/pickle {h['export_ms']:.1f} ms, "
                    f"result {h['result_bytes'] / MB:.1f} MB")
    finally:
        log.close()
        shutil.rmtree(work, ignore_errors=True)

    # target: a validation accuracy every training run reached
    bests = [r["best_val_top1"] for rs in runs.values() for r in rs
             if r.get("best_val_top1") is not None]
    target = args.target if args.target is not None else (0.95 * min(bests) if bests else None)
    results = {name: aggregate(rs, target) for name, rs in runs.items()}
    add_ratios(results)
    cmd = " ".join(["python", os.path.relpath(os.path.abspath(__file__))] +
                   [a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:])])
    out = {
        "dataset": args.dataset, "model": args.model, "images": n,
        "classes": len(manifest.classes), "split_counts": counts, "workers": args.workers,
        "repeats": repeats, "epochs": epochs, "batch_size": args.batch_size,
        "backend": backend, "precision": args.precision,
        "chunk_rows": args.chunk_rows, "target_val_top1": target,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "command": cmd, "quick": args.quick,
        "results": results, "featurize_ratios": featurize_ratios(results),
        "scaling": scaling_summary(scaling_children) if scaling_children else None,
        "cost_inputs": cost,
        "seconds": time.perf_counter() - t_all,
    }
    if cost is not None and "local" in results and any(e in results for e in ("dask", "spark")):
        out["cost_model"] = cost_model(out)
    md = markdown(out)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        jsonutil.dump(out, f, indent=1)
    out["plots"] = plots(out, args.out)
    say("")
    say(md)
    say(f"written: {os.path.join(args.out, 'results.md')}, {', '.join(out['plots'])} "
        f"({out['seconds']:.0f} s in all)")
    if args.json:
        print(jsonutil.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_child":
        child_main(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--cost-model":
        # python benchmarks/engines.py --cost-model runs/engines/results.json
        with open(sys.argv[2], encoding="utf-8") as f:
            cm = cost_model(json.load(f))
        print(jsonutil.dumps(cm["inputs"], indent=1))
        print(cost_model_markdown(cm))
    else:
        main()
