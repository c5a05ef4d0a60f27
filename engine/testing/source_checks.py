"""The source checks: the same images as every source give the same store, row for row.

``write_sources(root)`` writes one small image set (``make_images``) as each source's
layout, every one in the folder tree's row order: the folder tree, manifests (CSV with
relative uris, JSONL with absolute ones, Parquet), a Parquet table of image bytes (Spark's
``content`` column, row groups smaller than a chunk), WebDataset shards (``.cls`` labels in
one half, ``.json`` in the other, a brace pattern), a Hugging Face imagefolder, and (with
the ``datasets`` package) a saved and reloaded Hugging Face Dataset. The checks featurize
each on an engine and compare them with the folder's store:

- ``check_same_features``: features bitwise equal row for row, the same labels (by class
  name), splits and skipped rows (a file that is not an image is in every layout);
- ``check_bad_rows``: rows a source cannot use are skipped with their reason -- a missing
  uri, a null or unknown label and unreadable bytes in a manifest and a Parquet table, a
  truncated shard -- and the good rows are featurized.

A test module runs them with an ``executor`` fixture::

    from deeptransfer.testing.source_checks import SourceChecks

    class TestSourcesOnMyEngine(SourceChecks):
        pass

Each ``check_*`` is also a plain function taking the executor and a scratch folder.
Needs pyarrow (the Parquet layouts) and Pillow.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

#: class -> images of it in the set; one file of class "b" is not an image (a skipped row)
CLASSES = {"a": 4, "b": 4, "c2": 3, "c10": 3}
BROKEN = "b/broken.jpg"
FEATURIZE = dict(model="efficientnet_lite0", chunk_rows=4, batch_size=4,
                 split="train=0.5,val=0.25,test=0.25", seed=3, progress=False)


def _image(cls: str, k: int, size: tuple[int, int]) -> np.ndarray:
    """A deterministic picture: a colour gradient per class with a moving disc per image."""
    h, w = size
    rng = np.random.default_rng([sum(map(ord, cls)), k])
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(40, 200, 3)
    img = np.stack([(base[c] + (xx * (c + 1) + yy * (3 - c)) * 0.3) % 256 for c in range(3)],
                   axis=-1)
    cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), h // 5
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return img.astype(np.uint8)


def make_images(root: str | os.PathLike) -> str:
    """A folder tree ``root/<class>/<image>`` of JPEG and PNG files of several sizes, and
    one file that is not an image (``BROKEN``). Returns ``root``."""
    from PIL import Image

    root = Path(root)
    for cls, n in CLASSES.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            im = Image.fromarray(_image(cls, k, (96 + 16 * k, 128 - 8 * k)))
            if k % 2:
                im.save(root / cls / f"img_{k}.png")
            else:
                im.save(root / cls / f"img_{k}.jpg", quality=90)
    (root / BROKEN).write_bytes(b"this is not an image, only text with a .jpg name\n" * 4)
    return str(root)


def _pa() -> Any:
    import pytest

    return pytest.importorskip("pyarrow")


def write_sources(root: str | os.PathLike) -> dict[str, str]:
    """The same images in every layout (see the module docstring): kind -> dataset URL.
    Rows are in the folder source's order; labels are the class names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..sources import FolderSource

    root = Path(root)
    folder = make_images(root / "folder")
    listing = FolderSource(folder).list()
    rows = list(zip(listing.refs, listing.labels))
    out = {"folder": folder}
    # manifests: CSV with uris relative to the manifest, JSONL with absolute paths, Parquet
    man = root / "manifests"
    man.mkdir(exist_ok=True)
    rel = [os.path.relpath(p, man) for p, _ in rows]
    with open(man / "images.csv", "w") as f:
        f.write("uri,label\n" + "".join(f"{u},{lab}\n" for u, (_, lab) in zip(rel, rows)))
    with open(man / "images.jsonl", "w") as f:
        f.writelines(json.dumps({"path": p, "label": lab}) + "\n" for p, lab in rows)
    pq.write_table(pa.table({"uri": [p for p, _ in rows], "label": [lab for _, lab in rows]}),
                   man / "images_manifest.parquet")
    out.update(csv=str(man / "images.csv"), jsonl=str(man / "images.jsonl"),
               manifest_parquet=str(man / "images_manifest.parquet"))
    # a Parquet table of bytes, as Spark's binaryFile + a label writes it: 2 files, row
    # groups of 3 rows (smaller than a chunk: tasks read several, some read the same)
    data = [Path(p).read_bytes() for p, _ in rows]
    pdir = root / "table.parquet"
    pdir.mkdir(exist_ok=True)
    half = len(rows) // 2
    for i, (a, b) in enumerate(((0, half), (half, len(rows)))):
        t = pa.table({"path": [f"file:{p}" for p, _ in rows[a:b]],
                      "length": [len(d) for d in data[a:b]],
                      "content": pa.array(data[a:b], pa.binary()),
                      "label": [lab for _, lab in rows[a:b]]})
        pq.write_table(t, pdir / f"part-{i:05d}.parquet", row_group_size=3)
    (pdir / "_SUCCESS").write_bytes(b"")
    out["parquet"] = str(pdir)
    # WebDataset shards of 5 samples: .cls labels in the first shards, .json in the last
    wds = root / "shards"
    wds.mkdir(exist_ok=True)
    n_shards = -(-len(rows) // 5)
    for s in range(n_shards):
        with tarfile.open(wds / f"shard-{s:04d}.tar", "w") as tar:
            for j in range(s * 5, min(len(rows), s * 5 + 5)):
                path, lab = rows[j]
                ext = path.rsplit(".", 1)[-1]
                label = (lab.encode() if s < n_shards - 1 else
                         json.dumps({"label": lab, "source": "check"}).encode())
                for name, payload in ((f"{j:06d}.{ext}", data[j]),
                                      (f"{j:06d}.{'cls' if s < n_shards - 1 else 'json'}",
                                       label)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    out["webdataset"] = str(wds / f"shard-{{0000..{n_shards - 1:04d}}}.tar")
    # a Hugging Face imagefolder: the files at the top, a metadata.csv naming their labels
    hf = root / "imagefolder"
    hf.mkdir(exist_ok=True)
    names = []
    for j, (path, lab) in enumerate(rows):
        name = f"{j:04d}_{os.path.basename(path)}"
        (hf / name).write_bytes(data[j])
        names.append((name, lab))
    with open(hf / "metadata.csv", "w") as f:
        f.write("file_name,label\n" + "".join(f"{n},{lab}\n" for n, lab in names))
    out["imagefolder"] = str(hf)
    return out


def saved_hf_dataset(folder: str, path: str | os.PathLike) -> Any:
    """The folder's images as a Hugging Face Dataset (``Image()`` bytes, ``ClassLabel``
    labels) saved to ``path`` and loaded back memory-mapped, in the folder's row order; None
    without the ``datasets`` package."""
    try:
        import datasets
    except ImportError:
        return None
    from ..sources import FolderSource

    listing = FolderSource(folder).list()
    classes = sorted(set(listing.labels))
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=classes)})
    ds = datasets.Dataset.from_dict(
        {"image": list(listing.refs), "label": [classes.index(c) for c in listing.labels]},
        features=feats)
    ds.save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


def _featurize(executor: Any, dataset: Any, store: str, **kw: Any) -> Any:
    from ..api import featurize

    return featurize(dataset, store, engine=executor, **{**FEATURIZE, **kw})


def _table(store: str) -> dict[str, Any]:
    from ..store import open_store

    st = open_store(store)
    classes = st.classes
    return {"features": st["features"][:], "labels": [classes[i] for i in st["labels"][:]],
            "split": st["split"][:], "ok": st["ok"][:], "refs": [str(p) for p in st["paths"][:]],
            "reasons": [str(r) for r in st["reasons"][:]], "classes": classes}


def check_same_features(executor: Any, tmp: str | os.PathLike) -> dict[str, Any]:
    """Every layout of ``write_sources`` gives the folder's store, row for row: features
    bitwise equal, the same labels, splits, skipped rows and reasons. Returns the tables."""
    _pa()
    tmp = Path(tmp)
    urls: dict[str, Any] = dict(write_sources(tmp / "data"))
    hf = saved_hf_dataset(urls["folder"], tmp / "hf_dataset")
    if hf is not None:
        urls["hf_dataset"] = hf
    tables = {}
    for kind, url in urls.items():
        rep = _featurize(executor, url, str(tmp / f"{kind}.zarr"))
        assert rep.images == sum(CLASSES.values()) + 1, (kind, rep.images)
        assert len(rep.skipped) == 1, (kind, rep.skipped)
        tables[kind] = _table(str(tmp / f"{kind}.zarr"))
    ref = tables["folder"]
    assert ref["classes"] == ["a", "b", "c2", "c10"]  # natural order of the names
    assert int((~ref["ok"]).sum()) == 1 and ref["ok"].sum() == sum(CLASSES.values())
    for kind, t in tables.items():
        assert t["classes"] == ref["classes"], kind
        assert t["labels"] == ref["labels"], kind
        assert np.array_equal(t["split"], ref["split"]), kind
        assert np.array_equal(t["ok"], ref["ok"]), kind
        assert t["features"].tobytes() == ref["features"].tobytes(), \
            f"{kind}: features differ from the folder's"
        assert t["reasons"] == ref["reasons"], (kind, t["reasons"])
    return tables


def write_bad_sources(root: str | os.PathLike) -> dict[str, str]:
    """Layouts with rows a source cannot use, next to good ones (see ``check_bad_rows``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    folder = make_images(root / "folder")
    good = [os.path.join(folder, "a", "img_0.jpg"), os.path.join(folder, "b", "img_1.png")]
    man = root / "bad.csv"
    man.write_text("uri,label,split\n"
                   f"{good[0]},a,train\n"
                   f",a,train\n"                      # missing uri
                   f"{good[1]},,test\n"               # null label
                   f"{folder}/{BROKEN},b,test\n"      # unreadable bytes
                   f"{folder}/a/gone.jpg,a,val\n"     # a file that is not there
                   f"{good[1]},b,holdout\n"           # an unknown split
                   f"{good[1]},b,test\n")
    data = [Path(p).read_bytes() for p in good]
    pq.write_table(pa.table({
        "content": pa.array([data[0], None, b"\x89PNG broken", data[1], data[0]], pa.binary()),
        "label": ["a", "a", "b", None, "b"]}), root / "bad.parquet")
    # Hugging Face: an integer ClassLabel with its names in the schema metadata; 7 is out
    # of range (an unknown label)
    hf = pa.table({"image": pa.array([{"bytes": data[0], "path": "x.jpg"},
                                      {"bytes": data[1], "path": "y.png"},
                                      {"bytes": data[1], "path": "z.png"}]),
                   "label": pa.array([0, 1, 7], pa.int64())})
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": ["ants", "bees"], "_type": "ClassLabel"}}}}
    hf = hf.replace_schema_metadata({"huggingface": json.dumps(meta)})
    pq.write_table(hf, root / "hf.parquet")
    # two shards, the second cut off in the middle of its second image
    for s in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for j, payload in enumerate(data):
                for name, b in ((f"s{s}_{j}.{'jpg' if j == 0 else 'png'}", payload),
                                (f"s{s}_{j}.cls", b"ab"[j:j + 1])):
                    info = tarfile.TarInfo(name)
                    info.size = len(b)
                    tar.addfile(info, io.BytesIO(b))
            info = tarfile.TarInfo(f"s{s}_nolabel.jpg")  # an image without a label
            info.size = len(data[0])
            tar.addfile(info, io.BytesIO(data[0]))
        raw = buf.getvalue()
        if s == 1:  # cut in the middle of the second image's bytes
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                m = tar.getmember("s1_1.png")
            raw = raw[:m.offset_data + m.size // 2]
        (root / f"bad-{s}.tar").write_bytes(raw)
    return {"csv": str(man), "parquet": str(root / "bad.parquet"),
            "hf_parquet": str(root / "hf.parquet"), "webdataset": str(root / "bad-{0..1}.tar")}


def check_bad_rows(executor: Any, tmp: str | os.PathLike) -> dict[str, Any]:
    """Rows a source cannot use are skipped with their reason; the others are featurized."""
    _pa()
    tmp = Path(tmp)
    urls = write_bad_sources(tmp / "bad")
    reports = {}
    for kind, url in urls.items():
        reports[kind] = _featurize(executor, url, str(tmp / f"bad_{kind}.zarr"), split=None)
    why = {k: [r.lower() for _, r in rep.skipped] for k, rep in reports.items()}

    def has(kind: str, word: str) -> bool:
        return any(word in r for r in why[kind])

    r = reports["csv"]
    assert r.featurized == 2 and r.images == 7, (r.featurized, r.skipped)
    for word in ("missing uri", "no label", "unknown split", "file not found"):
        assert has("csv", word), (word, why["csv"])
    assert len(why["csv"]) == 5, why["csv"]  # + the file that is not an image
    from ..api import info

    assert info(str(tmp / "bad_csv.zarr"))["skipped_at_listing"] == 3  # recorded in the store
    r = reports["parquet"]
    assert r.featurized == 2 and r.images == 5 and len(r.skipped) == 3, r.skipped
    assert has("parquet", "no image bytes") and has("parquet", "no label"), why["parquet"]
    r = reports["hf_parquet"]
    assert r.featurized == 2 and has("hf_parquet", "unknown label"), why["hf_parquet"]
    from ..store import open_store

    assert open_store(str(tmp / "bad_hf_parquet.zarr")).classes == ["ants", "bees"]
    r = reports["webdataset"]
    # shard 0: 2 good samples + one without a label; shard 1: 1 good, 1 cut short, the rest lost
    assert r.featurized == 3, (r.featurized, r.skipped)
    assert has("webdataset", "no label") and has("webdataset", "truncated"), why["webdataset"]
    assert any("truncated" in w for w in r.warnings) or has("webdataset", "truncated")
    return reports


class SourceChecks:
    """The source checks under pytest; needs an ``executor`` fixture."""

    def test_sources_give_the_folder_store_row_for_row(self, executor: Any,
                                                       tmp_path: Path) -> None:
        check_same_features(executor, tmp_path)

    def test_bad_rows_are_skipped_with_their_reason(self, executor: Any,
                                                    tmp_path: Path) -> None:
        check_bad_rows(executor, tmp_path)
