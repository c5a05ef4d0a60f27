"""open_features(...).to_spark: the valid rows of a store as a Spark DataFrame (features as
an array column, label, label_name, split, ref), each partition reading its store chunks."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyspark")
pytest.importorskip("pyarrow")
pytest.importorskip("pandas")

import deeptransfer as dt  # noqa: E402
from deeptransfer.adapters.local import LocalExecutor  # noqa: E402
from deeptransfer.adapters.spark import SparkExecutor  # noqa: E402
from deeptransfer.store import open_store  # noqa: E402
from deeptransfer.testing.source_checks import FEATURIZE, write_sources  # noqa: E402

pytestmark = pytest.mark.spark


def test_to_spark_gives_the_valid_rows_of_a_split(tmp_path):
    layouts = write_sources(tmp_path / "data")
    store = str(tmp_path / "w.zarr")
    with LocalExecutor(0) as ex:
        dt.featurize(layouts["webdataset"], store, engine=ex, **FEATURIZE)
    st = open_store(store)
    f = dt.open_features(store, split="test")
    with SparkExecutor(2) as ex:
        df = f.to_spark(ex.session)
        assert df.columns == ["features", "label", "label_name", "split", "ref"]
        rows = sorted(df.collect(), key=lambda r: r["ref"])
    order = np.argsort(f.refs)
    assert [r["ref"] for r in rows] == [f.refs[i] for i in order]
    assert np.array_equal(np.array([r["features"] for r in rows], np.float32),
                          f.numpy()[order])
    assert [r["label_name"] for r in rows] == [f.label_names[i] for i in order]
    assert {r["split"] for r in rows} == {"test"} and len(rows) == len(st.split_rows("test"))


def test_a_spark_dataframe_of_paths_is_a_source(tmp_path):
    layouts = write_sources(tmp_path / "data")
    from deeptransfer.sources import FolderSource

    listing = FolderSource(layouts["folder"]).list()
    with SparkExecutor(1) as ex:
        df = ex.session.createDataFrame(list(zip(listing.refs, listing.labels)),
                                        "path string, label string")
        with LocalExecutor(0) as local:
            a = dt.featurize(source=df, store=str(tmp_path / "s.zarr"), engine=local,
                             **FEATURIZE)
            b = dt.featurize(layouts["folder"], str(tmp_path / "f.zarr"), engine=local,
                             **FEATURIZE)
    assert a.featurized == b.featurized == 14
    assert open_store(str(tmp_path / "s.zarr"))["features"][:].tobytes() == \
        open_store(str(tmp_path / "f.zarr"))["features"][:].tobytes()


def test_every_source_on_spark_gives_the_local_engines_store(tmp_path):
    from deeptransfer.testing import source_checks

    with SparkExecutor(2) as ex:
        tables = source_checks.check_same_features(ex, tmp_path / "spark")
    # one thread, as each Spark task: equal thread counts give bitwise-equal features
    with LocalExecutor(0, threads_per_worker=1) as local:
        source_checks._featurize(local, str(tmp_path / "spark" / "data" / "folder"),
                                 str(tmp_path / "local.zarr"))
    ref = source_checks._table(str(tmp_path / "local.zarr"))
    for kind, t in tables.items():
        assert t["features"].tobytes() == ref["features"].tobytes(), kind
