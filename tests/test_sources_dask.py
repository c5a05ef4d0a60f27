"""The shipped source checks on a Dask LocalCluster (2 worker processes): every layout
gives the folder's store row for row there too, and the same features as the local engine."""
from __future__ import annotations

import pytest

pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

from deeptransfer.adapters.dask import DaskExecutor  # noqa: E402
from deeptransfer.adapters.local import LocalExecutor  # noqa: E402
from deeptransfer.testing import source_checks  # noqa: E402

pytestmark = pytest.mark.dask


@pytest.fixture(scope="module")
def executor():
    with DaskExecutor(2, dashboard=False) as ex:
        yield ex


def test_every_source_on_dask_gives_the_local_engines_store(executor, tmp_path):
    tables = source_checks.check_same_features(executor, tmp_path / "dask")
    # one thread, as each Dask worker: equal thread counts give bitwise-equal features
    with LocalExecutor(0, threads_per_worker=1) as local:
        rep = source_checks._featurize(local, str(tmp_path / "dask" / "data" / "folder"),
                                       str(tmp_path / "local.zarr"))
    assert rep.featurized == sum(source_checks.CLASSES.values())
    ref = source_checks._table(str(tmp_path / "local.zarr"))
    for kind, t in tables.items():
        assert t["features"].tobytes() == ref["features"].tobytes(), kind
        assert t["labels"] == ref["labels"] and (t["split"] == ref["split"]).all(), kind


def test_bad_rows_skipped_with_their_reason_on_dask(executor, tmp_path):
    source_checks.check_bad_rows(executor, tmp_path)
