"""A loaded Hugging Face Dataset / DatasetDict as a source: the folder's features row for
row, its splits kept, bad rows skipped with their reason, workers that read the Arrow files
themselves (no ``datasets`` needed there, no images through the driver)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

from deeptransfer import featurize  # noqa: E402
from deeptransfer.adapters.local import LocalExecutor  # noqa: E402
from deeptransfer.errors import InvalidParameterError  # noqa: E402
from deeptransfer.sources import FolderSource, as_source  # noqa: E402
from deeptransfer.sources.hfdataset import HFDatasetSource  # noqa: E402
from deeptransfer.store import open_store  # noqa: E402
from deeptransfer.testing.source_checks import (BROKEN, FEATURIZE, make_images,  # noqa: E402
                                                 saved_hf_dataset)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture(scope="module")
def executor():
    with LocalExecutor(2) as ex:  # two worker processes: the refs are read there
        yield ex


@pytest.fixture
def folder(tmp_path):
    root = make_images(tmp_path / "folder")
    listing = FolderSource(root).list()
    return root, listing


def _store(path) -> dict:
    st = open_store(str(path))
    return {"features": st["features"][:], "ok": st["ok"][:], "split": st["split"][:],
            "labels": [st.classes[i] for i in st["labels"][:]], "classes": st.classes,
            "reasons": [str(r) for r in st["reasons"][:]]}


def test_saved_dataset_gives_the_folder_store_row_for_row(executor, folder, tmp_path):
    root, listing = folder
    ds = saved_hf_dataset(root, tmp_path / "saved")
    featurize(root, tmp_path / "folder.zarr", engine=executor, **FEATURIZE)
    rep = featurize(ds, tmp_path / "hf.zarr", engine=executor, **FEATURIZE)
    assert rep.images == len(listing.refs) and len(rep.skipped) == 1  # the broken file
    assert BROKEN.split("/")[1] not in rep.skipped[0][0]  # the ref is the Arrow row now
    a, b = _store(tmp_path / "folder.zarr"), _store(tmp_path / "hf.zarr")
    assert b["classes"] == a["classes"] and b["labels"] == a["labels"]
    assert np.array_equal(a["ok"], b["ok"]) and np.array_equal(a["split"], b["split"])
    assert a["features"].tobytes() == b["features"].tobytes()
    refs = [str(p) for p in open_store(str(tmp_path / "hf.zarr"))["paths"][:]]
    assert all(r.rsplit("#", 1)[0].endswith(".arrow") for r in refs)


def test_loaded_imagefolder_with_paths_and_its_splits(executor, folder, tmp_path):
    # load_dataset("imagefolder") keeps local files as paths (no bytes in the Arrow file);
    # train_test_split leaves an indices mapping over the same file
    root, listing = folder
    ds = datasets.load_dataset("imagefolder", data_dir=root, split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds[0]["image"] is not None  # the images are there
    parts = ds.train_test_split(test_size=0.25, seed=0)
    assert parts["train"]._indices is not None
    rep = featurize(parts, tmp_path / "hf.zarr", engine=executor,
                    **{**FEATURIZE, "split": None})
    featurize(root, tmp_path / "folder.zarr", engine=executor, **FEATURIZE)
    st, ref = open_store(str(tmp_path / "hf.zarr")), open_store(str(tmp_path / "folder.zarr"))
    # the DatasetDict's keys are the store's splits, row for row
    n_train, n_test = len(parts["train"]), len(parts["test"])
    assert rep.images == n_train + n_test
    assert len(st.split_rows("train")) + len(st.split_rows("test")) + \
        int((~st["ok"][:]).sum()) == n_train + n_test
    assert len(st.split_rows("val")) == 0
    # each row's features are the folder store's features of the same file
    by_name = {os.path.realpath(str(p)): i for i, p in enumerate(ref["paths"][:])}
    fref, fst, ok = ref["features"][:], st["features"][:], st["ok"][:]
    names = [os.path.realpath(x["path"]) for part in ("train", "test")
             for x in parts[part].cast_column("image", datasets.Image(decode=False))["image"]]
    assert len(names) == len(ok)
    for i, name in enumerate(names):
        j = by_name[name]
        assert ok[i] == ref["ok"][j], name
        if ok[i]:
            assert fst[i].tobytes() == fref[j].tobytes(), name
            assert st.classes[st["labels"][i]] == ref.classes[ref["labels"][j]]


def test_bad_rows_are_skipped_with_their_reason(executor, folder, tmp_path):
    root, _ = folder
    good = [os.path.join(root, "a", "img_0.jpg"), os.path.join(root, "b", "img_1.png")]
    data = [Path(p).read_bytes() for p in good]
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=["ants", "bees"])})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": data[0], "path": None}, None,
                   {"bytes": b"\x89PNG broken", "path": None},
                   {"bytes": data[1], "path": None}, {"bytes": data[1], "path": None}],
         "label": [0, 1, 1, -1, 1]}, features=feats)
    ds.save_to_disk(str(tmp_path / "bad"))
    ds = datasets.load_from_disk(str(tmp_path / "bad"))
    rep = featurize(ds, tmp_path / "bad.zarr", engine=executor, **{**FEATURIZE, "split": None})
    why = sorted(r.lower() for _, r in rep.skipped)
    assert rep.featurized == 2, rep.skipped
    assert any("no label" in r for r in why), why  # -1: Hugging Face's missing label
    assert any("no image bytes" in r for r in why), why
    assert len(why) == 3, why  # + the bytes that are not an image
    assert open_store(str(tmp_path / "bad.zarr")).classes == ["ants", "bees"]


def test_in_memory_dataset_is_refused_with_the_way_out(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [b"x"], "label": ["a"]})
    with pytest.raises(InvalidParameterError) as e:
        featurize(ds, tmp_path / "m.zarr")
    msg = str(e.value)
    assert "save_to_disk" in msg and "\n" not in msg
    assert not (tmp_path / "m.zarr").exists()


def test_workers_get_no_rows_and_options_are_checked(folder, tmp_path):
    root, listing = folder
    ds = saved_hf_dataset(root, tmp_path / "saved").select(range(3))
    src = as_source(ds)
    assert isinstance(src, HFDatasetSource) and len(src.list().refs) == 3
    back = pickle.loads(pickle.dumps(src))  # what a worker gets with the featurize spec
    assert back.listing is None and back.image_column == "image"
    with back.reader() as r:  # pyarrow only
        assert r.read(src.list().refs[0]) == Path(listing.refs[0]).read_bytes()
    with pytest.raises(InvalidParameterError, match="uri_column"):
        as_source(ds, uri_column="uri")
    with pytest.raises(InvalidParameterError, match="image_column 'pixels'"):
        as_source(ds, image_column="pixels")
