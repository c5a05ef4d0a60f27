"""Sources benchmark: the cost of listing at scale, and of each source's reads.

    python benchmarks/sources.py ../shared/datasets/caltech101 [--images N] [--refs N] [--json]

Prints, from one run:
- *scale*: a synthetic manifest of ``--refs`` (1,000,000) refs of 1,000 classes (CSV,
  written to /tmp) scanned into a Manifest, split 0.7/0.1/0.2, and planned (the store
  created with its row arrays, the pending chunks listed), each step timed; and the size
  of the store's row table (labels, split, paths, ok, reasons, done: what is written
  before any feature);
- *throughput*: ``--images`` Caltech-101 images (a seeded per-class subsample) converted
  under /tmp into each format (the folder tree, a CSV manifest, a Parquet table of
  ``content`` bytes with row groups of one chunk, WebDataset shards of 256 samples) and
  featurized by the local engine (1 worker, its model built before the first run), the
  folder before and after each source: each source's images/s and its ratio to the mean
  of the two folder runs around it.

The last line of stdout is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np


def _du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(d, f))
    return total


def scale(n_refs: int, tmp: str, classes: int = 1000) -> dict:
    """List, split and plan a synthetic manifest of ``n_refs`` refs."""
    from deeptransfer.dataset import DEFAULT_FRACTIONS, assign_fractions
    from deeptransfer.sources import ManifestSource
    from deeptransfer.store import create_store

    man = os.path.join(tmp, "manifest_1m.csv")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n_refs)
    t0 = time.perf_counter()
    with open(man, "w") as f:
        f.write("uri,label\n")
        f.writelines(f"s3://bucket/images/class_{y:04d}/img_{i:08d}.jpg,class_{y:04d}\n"
                     for i, y in enumerate(labels))
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = ManifestSource(man).manifest()
    scan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = assign_fractions(m, DEFAULT_FRACTIONS, seed=0)
    split_s = time.perf_counter() - t0
    store = os.path.join(tmp, "scale.zarr")
    t0 = time.perf_counter()
    st = create_store(store, m, feature_dim=1280, attrs={"model": {"name": "x"}},
                      chunk_rows=256)
    pending = st.pending_chunks()
    plan_s = time.perf_counter() - t0
    row_arrays = ("labels", "split", "paths", "ok", "reasons", "done")
    table = {a: _du(os.path.join(store, a)) for a in row_arrays}
    return {"refs": len(m), "classes": len(m.classes), "write_csv_s": round(write_s, 2),
            "csv_bytes": os.path.getsize(man), "scan_s": round(scan_s, 2),
            "split_s": round(split_s, 2), "plan_s": round(plan_s, 2),
            "total_s": round(scan_s + split_s + plan_s, 2), "chunks": len(pending),
            "row_table_bytes": sum(table.values()), "row_table_by_array": table,
            "store_bytes": _du(store)}


def subsample(root: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(path, class) of ``n`` images drawn per class in equal shares, in class order."""
    classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c))
                     and c != "BACKGROUND_Google")
    per = max(1, n // len(classes))
    rng = np.random.default_rng(seed)
    out = []
    for c in classes:
        files = sorted(os.listdir(os.path.join(root, c)))
        pick = sorted(rng.permutation(len(files))[:per])
        out += [(os.path.join(root, c, files[i]), c) for i in pick]
    return out[:n]


def write_formats(rows: list[tuple[str, str]], tmp: str) -> dict:
    """The rows as a folder tree, a CSV manifest, Parquet (content), WebDataset shards and
    (with the ``datasets`` package) a saved Hugging Face Dataset, each in the folder tree's
    row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deeptransfer.sources import FolderSource

    folder = os.path.join(tmp, "folder")
    for path, c in rows:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        shutil.copyfile(path, os.path.join(folder, c, os.path.basename(path)))
    listing = FolderSource(folder).list()
    ordered = list(zip(listing.refs, listing.labels))
    man = os.path.join(tmp, "manifest.csv")
    with open(man, "w") as f:
        f.write("uri,label\n" + "".join(f"{p},{c}\n" for p, c in ordered))
    data = [open(p, "rb").read() for p, _ in ordered]
    pdir = os.path.join(tmp, "table.parquet")
    os.makedirs(pdir, exist_ok=True)
    pq.write_table(pa.table({"path": [p for p, _ in ordered],
                             "content": pa.array(data, pa.binary()),
                             "label": [c for _, c in ordered]}),
                   os.path.join(pdir, "part-00000.parquet"), row_group_size=256)
    wds = os.path.join(tmp, "shards")
    os.makedirs(wds, exist_ok=True)
    n_shards = -(-len(ordered) // 256)
    for s in range(n_shards):
        with tarfile.open(os.path.join(wds, f"shard-{s:04d}.tar"), "w") as tar:
            for j in range(s * 256, min(len(ordered), (s + 1) * 256)):
                for name, payload in ((f"{j:08d}.jpg", data[j]),
                                      (f"{j:08d}.cls", ordered[j][1].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    out = {"folder": folder, "manifest": man, "parquet": pdir,
           "webdataset": os.path.join(wds, f"shard-{{0000..{n_shards - 1:04d}}}.tar")}
    from deeptransfer.testing.source_checks import saved_hf_dataset

    hf = saved_hf_dataset(folder, os.path.join(tmp, "hf_dataset"))  # with `datasets` only
    if hf is not None:
        out["hf_dataset"] = hf
    return out


def read_cost(urls: dict, chunk_rows: int = 256, repeats: int = 3) -> dict:
    """Seconds per image to read every ref's bytes through its source's reader, a reader
    per chunk as featurize_chunk does (best of ``repeats``): the part of featurize that
    differs between sources, measured apart from the network, whose cost swamps it and
    whose speed drifts with the machine's load."""
    from deeptransfer.sources import as_source

    out = {}
    for kind, url in urls.items():
        src = as_source(url)
        refs = src.list().refs
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            n_bytes = 0
            for a in range(0, len(refs), chunk_rows):
                with src.reader() as r:
                    for ref in refs[a:a + chunk_rows]:
                        n_bytes += len(r.read(ref))
            best = min(best, time.perf_counter() - t0)
        out[kind] = {"us_per_image": round(best / len(refs) * 1e6, 1), "bytes": n_bytes}
    return out


def throughput(urls: dict, tmp: str, workers: int) -> dict:
    import deeptransfer as dt
    from deeptransfer.adapters.local import LocalExecutor

    runs = []
    # the folder between every two sources: each source is compared with the folder runs
    # just before and after it (this machine is shared; its speed drifts within minutes)
    # twice, A B A B
    others = [k for k in urls if k != "folder"]
    order = ["folder"] + [x for k in others for x in (k, "folder")] * 2
    with LocalExecutor(workers) as ex:
        # warm the workers first, so no source pays the model build or an import (pyarrow,
        # which the Parquet and Hugging Face readers need and the folder does not)
        dt.featurize(urls["parquet"], os.path.join(tmp, "warm.zarr"), engine=ex,
                     progress=False)
        for i, kind in enumerate(order):
            store = os.path.join(tmp, f"{kind}_{i}.zarr")
            t0 = time.perf_counter()
            rep = dt.featurize(urls[kind], store, engine=ex, progress=False)
            runs.append({"source": kind, "images": rep.images, "featurized": rep.featurized,
                         "seconds": round(time.perf_counter() - t0, 2),
                         "images_per_second": round(rep.images / (time.perf_counter() - t0), 2),
                         "store": store})
    ref = [r["images_per_second"] for r in runs if r["source"] == "folder"]
    folder_ips = sum(ref) / len(ref)
    out: dict = {}
    for i in range(1, len(runs) - 1, 2):
        r = runs[i]
        around = (runs[i - 1]["images_per_second"] + runs[i + 1]["images_per_second"]) / 2
        o = out.setdefault(r["source"], {"images": r["images"], "featurized": r["featurized"],
                                         "images_per_second": [], "folder_around": [],
                                         "ratios": []})
        o["images_per_second"].append(r["images_per_second"])
        o["folder_around"].append(round(around, 2))
        o["ratios"].append(round(r["images_per_second"] / around, 3))
    for o in out.values():
        o["ratio_to_folder"] = round(sum(o["ratios"]) / len(o["ratios"]), 3)
    # the same features whatever the source
    from deeptransfer.store import open_store

    base = open_store(runs[0]["store"])["features"][:].tobytes()
    same = {r["source"]: open_store(r["store"])["features"][:].tobytes() == base for r in runs}
    return {"folder_images_per_second": [round(x, 2) for x in ref],
            "folder_mean": round(folder_ips, 2), "sources": out, "bitwise_equal": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", nargs="?", default="../shared/datasets/caltech101")
    ap.add_argument("--images", type=int, default=1010)
    ap.add_argument("--refs", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-featurize", action="store_true",
                    help="measure the readers' cost only, not featurize's throughput")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="dt-sources-")
    result: dict = {}
    try:
        if not args.skip_scale:
            result["scale"] = s = scale(args.refs, tmp)
            print(f"scale: {s['refs']} refs, {s['classes']} classes: scan {s['scan_s']} s, "
                  f"split {s['split_s']} s, plan {s['plan_s']} s (total {s['total_s']} s); "
                  f"row table {s['row_table_bytes'] / 2**20:.1f} MiB "
                  f"({ {k: round(v / 2**20, 1) for k, v in s['row_table_by_array'].items()} })")
        if not args.skip_throughput:
            rows = subsample(args.dataset, args.images)
            urls = write_formats(rows, tmp)
            result["read_cost"] = rc = read_cost(urls)
            print("read cost per image (bytes through the source's reader): " +
                  ", ".join(f"{k} {v['us_per_image']} us" for k, v in rc.items()))
            if args.skip_featurize:
                print(json.dumps(result))
                return
            result["throughput"] = t = throughput(urls, tmp, args.workers)
            print(f"throughput ({len(rows)} images, local engine, {args.workers} worker): "
                  f"folder {t['folder_images_per_second']} img/s")
            for k, v in t["sources"].items():
                print(f"  {k:10s} {v['images_per_second']} img/s  {v['ratios']} x the folder "
                      f"runs around them (mean {v['ratio_to_folder']:.3f}x)")
            print(f"  bitwise equal features: {t['bitwise_equal']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
