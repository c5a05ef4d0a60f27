"""The source protocol's parts: detection from the argument, brace patterns, the CLI flags,
the store's identity, readers' caps, DataFrames, and open_features (numpy, dask.array,
Spark)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import deeptransfer as dt  # noqa: E402
from deeptransfer.adapters.local import LocalExecutor  # noqa: E402
from deeptransfer.errors import InvalidParameterError, StoreError  # noqa: E402
from deeptransfer.fs import FileRefusedError  # noqa: E402
from deeptransfer.sources import (FolderSource, ManifestSource, ParquetSource,  # noqa: E402
                                  WebDatasetSource, as_source, detect_kind)
from deeptransfer.sources.webdataset import expand_braces  # noqa: E402
from deeptransfer.store import open_store  # noqa: E402
from deeptransfer.testing.source_checks import FEATURIZE, write_sources  # noqa: E402


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="module")
def parquet_store(layouts, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("pq") / "p.zarr")
    with LocalExecutor(0) as ex:
        dt.featurize(layouts["parquet"], store, engine=ex, **FEATURIZE)
    return store


def test_the_source_is_told_by_the_argument(layouts):
    want = {"folder": "folder", "csv": "manifest", "jsonl": "manifest",
            "manifest_parquet": "manifest", "parquet": "parquet", "webdataset": "webdataset",
            "imagefolder": "imagefolder"}
    assert {k: detect_kind(u) for k, u in layouts.items()} == want
    assert isinstance(as_source(layouts["csv"]), ManifestSource)
    assert isinstance(as_source(layouts["parquet"] + "/part-00000.parquet"), ParquetSource)
    shards = layouts["webdataset"].rsplit("/", 1)[0]
    assert detect_kind(shards) == "webdataset"  # a folder of shards
    assert isinstance(as_source(layouts["folder"], "folder"), FolderSource)
    with pytest.raises(InvalidParameterError, match="--image-column does not apply"):
        as_source(layouts["csv"], image_column="content")
    with pytest.raises(InvalidParameterError, match="the sources are"):
        as_source(layouts["csv"], "lmdb")


def test_brace_patterns_expand_in_order_with_their_padding():
    assert expand_braces("s-{0000..0002}.tar") == ["s-0000.tar", "s-0001.tar", "s-0002.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_refs_of_parquet_rows_and_tar_members_name_their_place(layouts, parquet_store):
    st = open_store(parquet_store)
    refs = [str(p) for p in st["paths"][:]]
    assert refs[0].endswith("part-00000.parquet#0/0") and refs[3].endswith("#1/0")
    listing = WebDatasetSource(layouts["webdataset"]).list()
    assert listing.refs[0].endswith("shard-0000.tar#000000.jpg@512+" +
                                    listing.refs[0].rsplit("+", 1)[1])
    # a worker's reader returns a member's bytes where its header says, capped
    src = WebDatasetSource(layouts["webdataset"])
    with src.reader() as r:
        assert r.read(listing.refs[0])[:2] == b"\xff\xd8"  # a JPEG
    with src.reader(max_bytes=100) as r:
        with pytest.raises(FileRefusedError, match="too large"):
            r.read(listing.refs[0])
    with ParquetSource(layouts["parquet"]).reader(max_bytes=100) as r:
        with pytest.raises(FileRefusedError, match="too large"):
            r.read(refs[0])


def test_a_store_is_resumed_only_from_the_same_source(layouts, parquet_store, tmp_path):
    with LocalExecutor(0) as ex:
        rep = dt.featurize(layouts["parquet"], parquet_store, engine=ex, **FEATURIZE)
        assert rep.reused and rep.computed_now == 0
        # other column names are another source: refused, not mixed in
        with pytest.raises(StoreError, match="source"):
            dt.featurize(layouts["parquet"], parquet_store, engine=ex,
                         image_column="content", **FEATURIZE)
    st = open_store(parquet_store)
    assert st.attrs["source"] == {"kind": "parquet", "url": layouts["parquet"],
                                  "image_column": None, "label_column": None,
                                  "split_column": None}
    # a folder's store keeps the identity it had before sources existed
    with LocalExecutor(0) as ex:
        dt.featurize(layouts["folder"], str(tmp_path / "f.zarr"), engine=ex, **FEATURIZE)
    assert "source" not in open_store(str(tmp_path / "f.zarr")).attrs


def test_a_split_column_is_kept_and_other_column_names_are_flags(tmp_path, layouts):
    rows = [json.loads(line) for line in open(layouts["jsonl"])]
    man = tmp_path / "m.csv"
    with open(man, "w") as f:
        f.write("file,cls,part\n")
        for i, r in enumerate(rows):
            f.write(f"{r['path']},{r['label']},{['train', 'validation', 'test'][i % 3]}\n")
    with pytest.raises(InvalidParameterError, match="--uri-column"):
        as_source(str(man)).list()
    m = dt.dataset.load_dataset(as_source(str(man), uri_column="file", label_column="cls",
                                          split_column="part"))
    assert m.presplit and list(m.split[:3]) == [0, 1, 2]  # validation is the val split
    assert len(m) == len(rows) and m.classes == ["a", "b", "c2", "c10"]


def test_cli_featurizes_a_manifest_with_column_flags(tmp_path, layouts):
    rows = [json.loads(line) for line in open(layouts["jsonl"])]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"img": r["path"], "y": r["label"]}) + "\n"
                           for r in rows))
    out = subprocess.run(
        [sys.executable, "-m", "deeptransfer", "featurize", str(man), str(tmp_path / "s.zarr"),
         "--uri-column", "img", "--label-column", "y", "--chunk-rows", "8", "--workers", "0",
         "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["featurized"] == len(rows) - 1 and len(rep["skipped"]) == 1
    bad = subprocess.run(
        [sys.executable, "-m", "deeptransfer", "featurize", str(man), str(tmp_path / "t.zarr"),
         "--uri-column", "img", "--label-column", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--label-column" in bad.stderr


def test_a_pandas_dataframe_of_paths_is_a_source(tmp_path, layouts):
    pd = pytest.importorskip("pandas")
    rows = [json.loads(line) for line in open(layouts["jsonl"])]
    df = pd.DataFrame({"path": [r["path"] for r in rows], "label": [r["label"] for r in rows]})
    with LocalExecutor(0) as ex:
        a = dt.featurize(source=df, store=str(tmp_path / "df.zarr"), engine=ex, **FEATURIZE)
        b = dt.featurize(layouts["folder"], str(tmp_path / "f.zarr"), engine=ex, **FEATURIZE)
    assert a.featurized == b.featurized
    x, y = open_store(str(tmp_path / "df.zarr")), open_store(str(tmp_path / "f.zarr"))
    assert x["features"][:].tobytes() == y["features"][:].tobytes()
    with pytest.raises(InvalidParameterError, match="write it as Parquet"):
        dt.featurize(source=pd.DataFrame({"content": [b"x"], "label": ["a"]}),
                     store=str(tmp_path / "bytes.zarr"))


def test_open_features_gives_the_valid_rows_as_numpy_and_dask(parquet_store):
    st = open_store(parquet_store)
    ok = st["ok"][:]
    f = dt.open_features(parquet_store)
    assert len(f) == int(ok.sum()) == 14
    assert np.array_equal(f.numpy(), st["features"][:][ok])
    assert list(f.labels) == list(st["labels"][:][ok])
    assert f.refs == [str(p) for p in st["paths"][:][ok]]
    train = dt.open_features(parquet_store, split="train")
    assert set(train.splits) == {"train"} and len(train) == len(st.split_rows("train"))
    pytest.importorskip("dask")
    x = train.to_dask()
    assert x.shape == (len(train), st.feature_dim)
    assert np.array_equal(x.compute(), train.numpy())


def test_a_dask_dataframe_of_paths_is_a_source(tmp_path, layouts):
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    rows = [json.loads(line) for line in open(layouts["jsonl"])]
    df = dd.from_pandas(pd.DataFrame({"uri": [r["path"] for r in rows],
                                      "y": [r["label"] for r in rows]}), npartitions=3)
    m = dt.dataset.load_dataset(as_source(df, label_column="y"))
    assert m.paths == [r["path"] for r in rows]
    assert [m.classes[i] for i in m.labels] == [r["label"] for r in rows]


def test_a_missing_parquet_reader_is_one_line_naming_the_extra(layouts, monkeypatch):
    from deeptransfer.errors import EngineUnavailableError

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if absent
    with pytest.raises(EngineUnavailableError, match=r"deeptransfer\[parquet\]"):
        ParquetSource(layouts["parquet"]).list()


def test_augmented_views_read_through_the_source_match_the_folders(tmp_path, layouts):
    with LocalExecutor(0) as ex:
        for kind in ("folder", "webdataset"):
            dt.featurize(layouts[kind], str(tmp_path / f"{kind}.zarr"), engine=ex,
                         train_views=2, **FEATURIZE)
    a, b = open_store(str(tmp_path / "folder.zarr")), open_store(str(tmp_path / "webdataset.zarr"))
    assert b.n_rows > b.n_images and np.array_equal(a["view"][:], b["view"][:])
    assert a["features"][:].tobytes() == b["features"][:].tobytes()
    assert b["ok"][:].sum() == a["ok"][:].sum()


def test_a_task_reads_only_the_row_groups_of_its_rows(tmp_path, layouts, monkeypatch):
    import pyarrow.parquet as pq

    from deeptransfer.featurization import featurize_chunk

    calls = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *a, **kw):
        calls.append((i, tuple(kw.get("columns") or ())))
        return real(self, i, *a, **kw)

    store = str(tmp_path / "p.zarr")
    with LocalExecutor(0, threads_per_worker=1) as ex:  # the spec below: one thread too
        dt.featurize(layouts["parquet"], store, engine=ex, **FEATURIZE)
    st = open_store(store)
    # rows 4..7: rows 1-2 of row group 1 and row 0 of group 2 of the first file (7 rows in
    # groups of 3), row 0 of group 0 of the second
    refs = st.chunk_paths(1)
    assert [(p.rsplit("#", 1)[0].rsplit("/", 1)[-1], p.rsplit("#", 1)[1]) for p in refs] == [
        ("part-00000.parquet", "1/1"), ("part-00000.parquet", "1/2"),
        ("part-00000.parquet", "2/0"), ("part-00001.parquet", "0/0")]
    # featurize chunk 1 again, alone, and watch what it reads
    from deeptransfer.featurization import FeaturizeSpec
    from deeptransfer.models import ModelSpec
    from deeptransfer.sources import ParquetSource

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    spec = FeaturizeSpec(store_url=store, model=ModelSpec.from_dict(st.attrs["model"]),
                         batch_size=4, source=ParquetSource(layouts["parquet"]),
                         backend=st.attrs.get("backend", "torch"))  # the store's backend
    before = st["features"][4:8]
    res = featurize_chunk(1, spec)
    assert res.n_ok == int(st["ok"][4:8].sum()) == 3  # row 4 is the file that is not an image
    # each of its row groups read once, the image column only, and no other row group
    assert calls == [(1, ("content",)), (2, ("content",)), (0, ("content",))]
    assert open_store(store)["features"][4:8].tobytes() == before.tobytes()
