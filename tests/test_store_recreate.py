"""A store recreated (overwrite) on a long-lived executor is written with its new layout: the
workers' cached store handles of the old store must not be used."""
from __future__ import annotations

import numpy as np

import deeptransfer as dt
from deeptransfer.engines import get_executor
from deeptransfer.store import open_store
from photos import make_photo_dataset


def test_overwrite_with_other_chunk_rows_on_the_same_workers(tmp_path):
    root = tmp_path / "data"
    make_photo_dataset(root, bad=False)
    store, fresh = str(tmp_path / "f.zarr"), str(tmp_path / "fresh.zarr")
    with get_executor("local", {"n_workers": 1}) as ex:
        dt.featurize(str(root), store, engine=ex, chunk_rows=5, progress=False)
        dt.featurize(str(root), store, engine=ex, chunk_rows=3, overwrite=True, progress=False)
    dt.featurize(str(root), fresh, engine="local", workers=0, chunk_rows=3, progress=False)
    a, b = open_store(store), open_store(fresh)
    assert a.attrs["chunk_rows"] == 3
    assert a.summary()["featurized"] == b.summary()["featurized"] > 0
    np.testing.assert_array_equal(a.group["features"][:], b.group["features"][:])
    np.testing.assert_array_equal(a.group["ok"][:], b.group["ok"][:])
