"""The Zarr feature store: layout, chunk ownership, resume identity."""
import numpy as np
import pytest
import zarr

from deeptransfer.dataset import Manifest
from deeptransfer.errors import StoreError
from deeptransfer.store import create_store, open_store


def _manifest(n=10, classes=("a", "b")):
    labels = np.arange(n, dtype=np.int32) % len(classes)
    split = (np.arange(n) % 3).astype(np.int8)
    return Manifest("root", [f"root/{classes[l]}/{i}.jpg" for i, l in enumerate(labels)],
                    labels, split, list(classes))


def test_layout_and_rows(tmp_path):
    url = str(tmp_path / "s.zarr")
    st = create_store(url, _manifest(), feature_dim=4, attrs={"model": {"name": "m"}},
                      chunk_rows=4)
    assert st.n_chunks == 3 and st.pending_chunks() == [0, 1, 2]
    for c in range(3):
        a, b = st.chunk_bounds(c)
        ok = np.ones(b - a, bool)
        ok[0] = c != 1  # row 4 is skipped
        st.write_chunk(c, np.arange(a, b)[:, None] * np.ones((1, 4)), ok,
                       ["" if o else "truncated JPEG" for o in ok])
    st = open_store(url)
    assert st.is_complete() and st.pending_chunks() == []
    assert st.skipped() == [("root/a/4.jpg", "truncated JPEG")]
    train = st.split_rows("train")
    assert list(train) == [0, 3, 6, 9]  # split code 0, row 4 is skipped anyway
    x, y = st.read_rows(np.array([9, 0, 5]))
    assert x[:, 0].tolist() == [9, 0, 5] and y.tolist() == [1, 0, 1]
    # opens with plain zarr and dask
    g = zarr.open_group(url, mode="r")
    assert g["features"].shape == (10, 4) and g["features"].chunks == (4, 4)
    import dask.array as da

    assert da.from_zarr(url, component="features").sum().compute() == pytest.approx(
        4 * sum(range(10)))


def test_resume_reuses_and_mismatch_refuses(tmp_path):
    url = str(tmp_path / "s.zarr")
    m = _manifest()
    st = create_store(url, m, feature_dim=4, attrs={"model": {"name": "m"}}, chunk_rows=4)
    st.write_chunk(0, np.ones((4, 4)), np.ones(4, bool), [""] * 4)
    again = create_store(url, m, feature_dim=4, attrs={"model": {"name": "m"}}, chunk_rows=4)
    assert again.pending_chunks() == [1, 2]
    with pytest.raises(StoreError, match="model"):
        create_store(url, m, feature_dim=4, attrs={"model": {"name": "other"}}, chunk_rows=4)
    with pytest.raises(StoreError, match="manifest_digest"):
        create_store(url, _manifest(12), feature_dim=4, attrs={"model": {"name": "m"}},
                     chunk_rows=4)
    fresh = create_store(url, m, feature_dim=4, attrs={"model": {"name": "m"}}, chunk_rows=4,
                         overwrite=True)
    assert fresh.pending_chunks() == [0, 1, 2]


def test_wrong_shape_write_is_refused(tmp_path):
    st = create_store(str(tmp_path / "s.zarr"), _manifest(), feature_dim=4, attrs={},
                      chunk_rows=4)
    with pytest.raises(StoreError, match="expects 4 rows"):
        st.write_chunk(0, np.ones((3, 4)), np.ones(3, bool), [""] * 3)


def test_open_missing_and_unwritable(tmp_path):
    with pytest.raises(StoreError, match="No feature store|not a deeptransfer"):
        open_store(str(tmp_path / "missing.zarr"))
    # a path below a regular file cannot be created, whoever runs the test (root included)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="Cannot"):
        create_store(str(blocker / "s.zarr"), _manifest(), feature_dim=4, attrs={})


def test_float16_store(tmp_path):
    st = create_store(str(tmp_path / "s.zarr"), _manifest(4), feature_dim=3, attrs={},
                      dtype="float16", chunk_rows=4)
    st.write_chunk(0, np.full((4, 3), 0.1), np.ones(4, bool), [""] * 4)
    x, _ = st.read_rows(np.arange(4))
    assert x.dtype == np.float32 and np.allclose(x, 0.1, atol=1e-3)
    assert st["features"].dtype == np.float16
