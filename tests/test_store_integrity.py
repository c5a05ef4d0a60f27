"""A store knows it is whole (issue 11, item 10): a missing or corrupt chunk file is one
line naming the rows and the fix for every reader, and featurize recomputes exactly those."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import deeptransfer as dt
from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.cli import main
from deeptransfer.dataset import Manifest
from deeptransfer.errors import StoreError
from deeptransfer.store import FORMAT, create_store, open_store
from photos import make_photo_dataset

SPLIT = "train=0.5,val=0.25,test=0.25"
KW = dict(chunk_rows=8, batch_size=4, split=SPLIT, progress=False)
ARRAYS = ("features", "labels", "split", "paths", "ok", "reasons")


def _key(name: str, chunk: int) -> str:
    return f"{name}/c/{chunk}/0" if name == "features" else f"{name}/c/{chunk}"


def _manifest(n=12):
    labels = np.array([0] * 8 + [1] * (n - 8), np.int32)  # chunk 0 and 1 all class 0
    split = np.zeros(n, np.int8)  # all train: a chunk of split codes equal to the fill value
    return Manifest("root", [f"root/{i}.jpg" for i in range(n)], labels, split, ["a", "b"])


def _filled(tmp_path, name="s.zarr"):
    """A complete store whose chunk 0 is all skipped (zero features, no ok row)."""
    url = str(tmp_path / name)
    st = create_store(url, _manifest(), feature_dim=3, attrs={"model": {"name": "m"}},
                      chunk_rows=4)
    for c in range(st.n_chunks):
        a, b = st.chunk_bounds(c)
        ok = np.full(b - a, c != 0)
        feats = np.zeros((b - a, 3)) if c == 0 else np.arange(a, b)[:, None] + np.ones((1, 3))
        st.write_chunk(c, feats, ok, ["" if o else "truncated JPEG" for o in ok])
    return url


def _flip_byte(path: str, at: int = 0) -> None:
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_every_chunk_file_is_written_even_one_equal_to_the_fill_value(tmp_path):
    url = _filled(tmp_path)
    for name in ARRAYS + ("done",):
        for c in range(3):
            assert os.path.isfile(os.path.join(url, _key(name, c))), (name, c)
    st = open_store(url)
    assert st.attrs["chunk_files"] == "all"
    assert type(st["features"].metadata.codecs[-1]).__name__ == "Crc32cCodec"


@pytest.mark.parametrize("name", ARRAYS)
def test_a_missing_chunk_file_is_one_line_for_readers_and_repaired(tmp_path, name):
    url = _filled(tmp_path)
    clean = open_store(url)
    before = {a: clean[a][:] for a in ARRAYS}
    os.remove(os.path.join(url, _key(name, 1)))
    msg = rf"damaged: .*rows 4-7 \({name}\)\. Run featurize again .*recomputes only those chunks"
    with pytest.raises(StoreError, match=msg) as ei:
        open_store(url)
    assert len(str(ei.value).splitlines()) == 1
    with pytest.raises(StoreError, match=msg):
        dt.info(url)
    st = open_store(url, mode="r+")  # the writer's handle, as featurize opens it
    assert st.repair(_manifest()) == [1]
    if name in ("labels", "split", "paths"):  # rewritten from the manifest: nothing to compute
        assert st.pending_chunks() == []
        for a in ARRAYS:
            assert np.array_equal(open_store(url)[a][:], before[a]), a
    else:
        assert st.pending_chunks() == [1]
        assert 5 not in st.split_rows("train")  # rows of an unfinished chunk are not read


@pytest.mark.parametrize("name", ARRAYS)
def test_a_corrupt_chunk_is_one_line_when_read_and_repaired(tmp_path, name):
    url = _filled(tmp_path)
    _flip_byte(os.path.join(url, _key(name, 0)), at=1)
    st = open_store(url)  # the cheap check lists keys only: found when read
    msg = rf"damaged: .*rows 0-3 \({name}\)\. Run featurize again"
    with pytest.raises(StoreError, match=msg) as ei:
        st.read_rows(np.arange(12))
        st.split_rows("train")
        st.skipped()
        st.chunk_paths(0)
    assert len(str(ei.value).splitlines()) == 1
    assert open_store(url, mode="r+").repair(_manifest()) == [0]


def test_a_truncated_chunk_and_a_torn_done_marker_are_found(tmp_path):
    url = _filled(tmp_path)
    path = os.path.join(url, _key("features", 1))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _flip_byte(os.path.join(url, "done/c/2"))
    # zarr's temp file of a write whose process was killed: removed, never trusted
    temp = os.path.join(url, "features/c/1/0." + "ab" * 16 + ".partial")
    open(temp, "wb").write(b"half")
    with pytest.raises(StoreError, match=r"rows 8-11 \(done\)"):
        open_store(url)
    st = open_store(url, mode="r+")
    assert st.repair(_manifest()) == [1, 2] and st.pending_chunks() == [1, 2]
    assert not os.path.exists(temp)


def _legacy(tmp_path):
    """A store as the code before chunk_files wrote it: zarr's defaults skip chunks equal to
    the fill value, and there are no checksums."""
    import zarr

    url = str(tmp_path / "old.zarr")
    m = _manifest()
    g = zarr.open_group(url, mode="w")
    g.create_array("features", shape=(12, 3), dtype="float32", chunks=(4, 3), fill_value=0)
    g.create_array("labels", shape=(12,), dtype="int32", chunks=(4,))[:] = m.labels
    g.create_array("split", shape=(12,), dtype="int8", chunks=(4,))[:] = m.split
    g.create_array("paths", shape=(12,), dtype=str, chunks=(4,))[:] = np.array(m.paths)
    g.create_array("ok", shape=(12,), dtype=bool, chunks=(4,), fill_value=False)
    g.create_array("reasons", shape=(12,), dtype=str, chunks=(4,))
    g.create_array("done", shape=(3,), dtype=bool, chunks=(1,), fill_value=False)
    g["features"][4:] = np.ones((8, 3))
    g["ok"][4:] = True
    g["reasons"][:4] = np.array(["bad"] * 4)
    g["done"][:] = True
    g.attrs.put({"format": FORMAT, "classes": ["a", "b"], "feature_dim": 3, "chunk_rows": 4})
    return url


def test_an_older_store_is_checked_for_what_its_files_can_say(tmp_path):
    url = _legacy(tmp_path)
    # skipped by zarr, legitimately: labels and split of class 0 / train, chunk 0's features,
    # ok flags, and the reasons of chunks with every row featurized
    for key in ("labels/c/0", "split/c/0", "features/c/0/0", "ok/c/0", "reasons/c/1"):
        assert not os.path.exists(os.path.join(url, key)), key
    open_store(url).read_rows(np.arange(12))
    os.remove(os.path.join(url, _key("features", 1)))  # rows 4-7 are ok: features must exist
    with pytest.raises(StoreError, match=r"rows 4-7 \(features\)"):
        open_store(url)
    url = _legacy(tmp_path / "b")
    os.remove(os.path.join(url, "reasons/c/0"))  # chunk 0 has no ok row: each has a reason
    with pytest.raises(StoreError, match=r"rows 0-3 \(reasons\)"):
        open_store(url)
    url = _legacy(tmp_path / "c")
    _flip_byte(os.path.join(url, _key("features", 2)), at=3)
    with pytest.raises(StoreError, match=r"rows 8-11 \(features\)"):
        open_store(url).read_rows(np.arange(12))


# -- end to end: evaluate, train, info, featurize again -----------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    make_photo_dataset(root)
    work = tmp_path_factory.mktemp("w")
    store, model = str(work / "f.zarr"), str(work / "model")
    with LocalExecutor(0) as ex:
        dt.featurize(str(root), store, engine=ex, **KW)
        dt.train(store, model, engine=ex, workers=1, epochs=1, progress=False)
        metrics = dt.evaluate(model, store, split="train", engine=ex)
    return str(root), store, model, metrics


def _readers_refuse(capsys, store, model, msg, info_reads_it=True):
    with LocalExecutor(0) as ex:
        with pytest.raises(StoreError, match=msg):
            dt.evaluate(model, store, split="train", engine=ex)
        with pytest.raises(StoreError, match=msg):
            dt.train(store, model + "-2", engine=ex, workers=1, epochs=1, progress=False)
    # info reads no features: their checksums are verified on request (or by featurize)
    with pytest.raises(StoreError, match=msg):
        dt.info(store, verify=True)
    reads = [["info", store]] if info_reads_it else []
    for argv in reads + [["evaluate", model, store, "--split", "train", "--workers", "0"]]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "run featurize again" in err.lower(), err


@pytest.mark.parametrize("damage", ["delete features", "delete labels", "corrupt features",
                                    "corrupt ok"])
def test_a_damaged_store_is_refused_and_featurize_recomputes_only_those_chunks(
        trained, tmp_path, capsys, damage):
    root, clean, model, metrics = trained
    store = str(tmp_path / "f.zarr")
    shutil.copytree(clean, store)
    how, name = damage.split()
    key = os.path.join(store, _key(name, 1))
    if how == "delete":
        os.remove(key)
    else:
        _flip_byte(key, at=2)
    _readers_refuse(capsys, store, model, r"damaged: .*rows 8-15 \(" + name,
                    info_reads_it=damage != "corrupt features")
    with LocalExecutor(0) as ex:
        rep = dt.featurize(root, store, engine=ex, **KW)
        assert rep.repaired_chunks == [1] and not rep.reused
        assert rep.computed_now == (0 if name == "labels" else 8)
        assert dt.evaluate(model, store, split="train", engine=ex) == metrics
    a, b = open_store(clean), open_store(store)
    for arr in ARRAYS + ("done",):
        assert np.array_equal(a[arr][:], b[arr][:]), arr
