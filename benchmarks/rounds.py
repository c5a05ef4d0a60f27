"""Averaging-round overhead per engine for a given head shape (default 1280 x 257).

    python benchmarks/rounds.py [--dim 1280] [--classes 257] [--engines local,dask,spark]
        [--rows-per-class 40] [--epochs 4] [--suffix] [--json]

Issue 4's target is stated for the 257-class head of 1280-d features (Caltech-256 with
efficientnet_lite0), which benchmarks/engines.py does not train (its data has 101 classes).
This script makes a feature store of that shape with class-dependent Gaussian features (the
overhead does not depend on the values), trains the default head (softmax, Adam, 2 workers x
32 rows, averaging every 5 minibatches) on each engine in turn, A B C A B C, and prints the
median per-round figures of each run's rounds:

- compute: the slowest worker's ``fit_shard`` time;
- engine: the round's ``map_reduce`` + averaging wall time minus compute (broadcast,
  scheduling, the reduction and the driver's averaging);
- driver: the rest of the driver's time between one round's start and the next's (planning
  the round, the log line, handing the checkpoint to its writer and waiting for the previous
  one to finish);
- total: from one round's start to the next's, minus compute: everything but the workers'
  compute, the figure issue 4's target is about (engine + driver), median and 90th
  percentile;
- checkpoint: how long the writer thread took for a round's checkpoint (it runs while the
  next round does, so it is in "total" only through the wait and the CPU it takes).

``--suffix`` trains what fine-tuning trains instead: blocks.6 + conv_head of
efficientnet_lite0 on a synthetic store of blocks.5 maps (192 x 7 x 7, float16), with the
head (1.0M + 1280 x classes parameters and their Adam state travelling every round).

Rounds of the first epoch (shards loaded) and each epoch's last round (followed by
validation) are left out. Engine start-up is not in any figure. Each run is a fresh Python
process, so no run shares its driver with an earlier engine's leftovers (Spark's JVM stays
up for the life of the process that started it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from deeptransfer import jsonutil

# Spark binds to loopback and its Python workers run this interpreter
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def make_store(url: str, dim: int, classes: int, rows_per_class: int, seed: int = 0,
               maps: tuple[int, int, int] | None = None) -> str:
    """A complete feature store: ``classes x rows_per_class`` rows, 80/20 train/val; with
    ``maps`` (C, H, W) a store of float16 maps of efficientnet_lite0's blocks.5 (as
    ``featurize --layer blocks.5 --keep-maps`` makes) for fine-tuning its suffix."""
    from deeptransfer.dataset import Manifest, split_code
    from deeptransfer.store import create_store

    rng = np.random.default_rng(seed)
    n = classes * rows_per_class
    labels = np.repeat(np.arange(classes, dtype=np.int32), rows_per_class)
    split = np.where(rng.random(n) < 0.8, split_code("train"), split_code("val")).astype(np.int8)
    m = Manifest("synthetic", [f"c{y}/{i}.jpg" for i, y in enumerate(labels)], labels, split,
                 [f"class{c}" for c in range(classes)])
    if maps is None:
        st = create_store(url, m, feature_dim=dim, attrs={"model": "synthetic"}, chunk_rows=256)
        shape: tuple[int, ...] = (dim,)
    else:
        attrs = {"model": {"name": "efficientnet_lite0", "layer": "blocks.5", "weights": None},
                 "layer": "blocks.5"}
        st = create_store(url, m, feature_dim=maps[0], feature_shape=maps, attrs=attrs,
                          dtype="float16", chunk_rows=256)
        shape = maps
    centers = rng.normal(size=(classes, *shape)).astype(np.float32)
    for i in range(st.n_chunks):
        a, b = st.chunk_bounds(i)
        x = centers[labels[a:b]] + rng.normal(size=(b - a, *shape)).astype(np.float32) * 2
        st.write_chunk(i, x.astype(st.group["features"].dtype), np.ones(b - a, bool),
                       [""] * (b - a))
    return url


def one_run(engine: str, store: str, epochs: int, workers: int, suffix: bool = False) -> dict:
    import deeptransfer as dt
    from deeptransfer.diagnostics import start_workers
    from deeptransfer.engines import get_executor
    from deeptransfer.training import train_head

    cfg = dt.train_config(workers=workers, epochs=epochs, batch_size_per_worker=32,
                          averaging_frequency=5, optimizer="adam", lr=1e-3, seed=0,
                          train_from="blocks.6" if suffix else None)
    recs: list[dict] = []  # the rounds' records, with their checkpoint time (the callback's)
    out = tempfile.mkdtemp(prefix=f"dt-rounds-{engine}-")
    try:
        with get_executor(engine, {"n_workers": workers}) as ex:
            start_workers(ex)
            t0 = time.perf_counter()
            res = train_head(ex, store, cfg, out, progress=False, plot=False,
                             callback=recs.append)
            wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # rounds followed by another of the same epoch, after the first epoch
    pairs = [(a, b) for a, b in zip(recs, recs[1:]) if a["epoch"] == b["epoch"] >= 1]

    def med(f) -> float:
        return 1e3 * statistics.median(f(a, b) for a, b in pairs)

    def p90(f) -> float:
        return 1e3 * float(np.percentile([f(a, b) for a, b in pairs], 90))

    def beyond(a: dict, b: dict) -> float:
        return b["start_time"] - a["start_time"] - a["compute_seconds"]

    return {"rounds": res.rounds, "wall_seconds": wall,
            "compute_ms": med(lambda a, b: a["compute_seconds"]),
            "overhead_ms": med(lambda a, b: a["overhead_seconds"]),
            "driver_ms": med(lambda a, b: b["start_time"] - a["start_time"] - a["round_seconds"]),
            "total_ms": med(beyond), "total_p90_ms": p90(beyond),
            "checkpoint_ms": med(lambda a, b: a["checkpoint_seconds"]),
            "checkpoint_wait_ms": med(lambda a, b: a["checkpoint_wait_seconds"])}


def run_child(engine: str, store: str, epochs: int, workers: int, timeout: float = 900,
              suffix: bool = False) -> dict:
    """``one_run`` in a fresh Python process (its process group is killed on timeout)."""
    from engines import run_group

    env = dict(os.environ)
    if engine == "local-pipe":  # the local engine with its shared-memory transport off
        engine, env["DEEPTRANSFER_SHM_MIN_BYTES"] = "local", str(1 << 62)
    cmd = [sys.executable, os.path.abspath(__file__), "--_run", engine, store, str(epochs),
           str(workers), str(int(suffix))]
    proc = run_group(cmd, env, timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"rounds.py run on {engine} failed (rc={proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dt_head():
    from deeptransfer.training import HeadConfig

    return HeadConfig()


def main(argv: list[str] | None = None) -> dict:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_run":  # a child: one run
        engine, store, epochs, workers, suffix = sys.argv[2:7]
        print(jsonutil.dumps(one_run(engine, store, int(epochs), int(workers), suffix == "1")))
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=257)
    ap.add_argument("--rows-per-class", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engines", default="local,dask,spark",
                    help="comma-separated; local-pipe: the local engine sending large values "
                         "through its pipes instead of shared memory")
    ap.add_argument("--suffix", action="store_true",
                    help="fine-tune efficientnet_lite0's blocks.6 + conv_head on blocks.5 maps "
                         "(192 x 7 x 7): its parameters and optimizer state travel each round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]

    work = tempfile.mkdtemp(prefix="dt-rounds-")
    store = make_store(os.path.join(work, "f.zarr"), args.dim, args.classes,
                       args.rows_per_class, maps=(192, 7, 7) if args.suffix else None)
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    try:
        for rep in range(args.repeats):
            for e in engines:
                r = run_child(e, store, args.epochs, args.workers, suffix=args.suffix)
                runs[e].append(r)
                print(f"[{rep + 1}/{args.repeats}] {e:6s} round compute {r['compute_ms']:6.1f} "
                      f"ms, beyond it {r['total_ms']:6.1f} ms (p90 {r['total_p90_ms']:.1f}; engine {r['overhead_ms']:.1f} + "
                      f"driver {r['driver_ms']:.1f}; checkpoint written in "
                      f"{r['checkpoint_ms']:.1f} ms alongside), {r['rounds']} rounds",
                      file=sys.stderr if args.json else sys.stdout, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = ("compute_ms", "total_ms", "total_p90_ms", "overhead_ms", "driver_ms", "checkpoint_ms",
            "checkpoint_wait_ms")
    summary = {e: {k: statistics.median(r[k] for r in rs) for k in keys}
               for e, rs in runs.items()}
    params = (args.dim + 1) * args.classes
    what = f"head {args.dim} x {args.classes}"
    if args.suffix:  # blocks.6 + conv_head (folded) + a 1280 x classes head
        from deeptransfer.training.trainable import SuffixSpec, build_trainable

        module = build_trainable(SuffixSpec("efficientnet_lite0", None, "blocks.5", (192, 7, 7),
                                            "blocks.6"), dt_head(), 192, args.classes)
        params = sum(p.numel() for p in module.parameters())
        what = f"suffix blocks.6 + conv_head + head 1280 x {args.classes}"
    out = {"dim": args.dim, "classes": args.classes, "workers": args.workers,
           "suffix": args.suffix, "params": params, "results": summary, "runs": runs}
    print(f"\n{what} ({params:,} parameters), {args.workers} workers: median per round, ms")
    print(f"  {'engine':6s} {'compute':>8s} {'beyond':>8s} {'(p90)':>7s} {'(engine':>8s} "
          f"{'+ driver)':>9s} {'checkpoint write':>17s}")
    for e, s in summary.items():
        print(f"  {e:6s} {s['compute_ms']:8.1f} {s['total_ms']:8.1f} {s['total_p90_ms']:7.1f} "
              f"{s['overhead_ms']:8.1f} {s['driver_ms']:9.1f} {s['checkpoint_ms']:17.1f}")
    if args.json:
        print(jsonutil.dumps(out))
    return out


if __name__ == "__main__":
    main()
