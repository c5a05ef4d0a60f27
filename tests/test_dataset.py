"""Dataset scan and splits."""
import numpy as np
import pytest

from deeptransfer.dataset import (SPLITS, assign_fractions, assign_per_class, load_dataset,
                                  parse_fractions, scan)
from deeptransfer.errors import DatasetNotFoundError, InvalidParameterError


def _tree(root, spec):
    for cls, n in spec.items():
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"img_{i}.jpg").write_bytes(b"x")
    return root


def test_scan_orders_classes_and_files_naturally(tmp_path):
    _tree(tmp_path, {"b": 3, "a": 12})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"")
    (tmp_path / "loose.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    m = scan(str(tmp_path))
    assert m.classes == ["a", "b"]
    names = [p.rsplit("/", 1)[-1] for p in m.paths[:12]]
    assert names == [f"img_{i}.jpg" for i in range(12)]  # img_2 before img_10
    assert list(m.labels) == [0] * 12 + [1] * 3
    assert not any(".DS_Store" in p for p in m.paths)
    assert any("loose.txt" in w for w in m.warnings)
    assert any("'empty'" in w for w in m.warnings)


def test_scan_fsspec_memory_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    for c in ("x", "y"):
        for i in range(3):
            fs.pipe(f"/mds/{c}/{i}.png", b"data")
    m = scan("memory://mds")
    assert m.classes == ["x", "y"] and len(m) == 6
    assert all(p.startswith("memory://") for p in m.paths)


def test_presplit_tree_keeps_its_splits(tmp_path):
    _tree(tmp_path / "train", {"ants": 4, "bees": 5})
    _tree(tmp_path / "val", {"ants": 2, "bees": 1})
    m = load_dataset(str(tmp_path))
    assert m.presplit and m.classes == ["ants", "bees"]
    assert m.split_counts() == {"train": 9, "val": 3, "test": 0}


def test_fraction_split_is_stratified_seeded_and_complete(tmp_path):
    _tree(tmp_path, {"a": 50, "b": 20, "c": 10})
    m = scan(str(tmp_path))
    s1 = assign_fractions(m, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    s2 = assign_fractions(m, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=3)
    s3 = assign_fractions(m, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=4)
    assert np.array_equal(s1.split, s2.split) and not np.array_equal(s1.split, s3.split)
    assert (s1.split >= 0).all()
    for c, n in enumerate([50, 20, 10]):
        sel = s1.split[s1.labels == c]
        assert (sel == 0).sum() == round(0.7 * n)
        assert (sel == 2).sum() == n - round(0.7 * n) - round(0.1 * n) or abs(
            (sel == 2).sum() - 0.2 * n) <= 1


def test_excluding_a_class_leaves_other_splits_unchanged(tmp_path):
    _tree(tmp_path, {"a": 30, "b": 30, "BACKGROUND_Google": 30})
    full = load_dataset(str(tmp_path), per_class_train=10, seed=1)
    excl = load_dataset(str(tmp_path), per_class_train=10, seed=1,
                        exclude_classes=["BACKGROUND_Google"])
    assert excl.classes == ["a", "b"]
    keep = [p for p in full.paths if "BACKGROUND" not in p]
    by_path = dict(zip(full.paths, full.split))
    assert [by_path[p] for p in keep] == list(excl.split)


def test_per_class_counts(tmp_path):
    _tree(tmp_path, {"a": 40, "b": 8})
    m = assign_per_class(scan(str(tmp_path)), train=5, val=2, seed=0)
    for c in (0, 1):
        sel = m.split[m.labels == c]
        assert (sel == SPLITS.index("train")).sum() == 5
        assert (sel == SPLITS.index("val")).sum() == 2
    short = assign_per_class(scan(str(tmp_path)), train=8, seed=0)
    assert any("'b'" in w for w in short.warnings)


@pytest.mark.parametrize("text", ["train=0.7,val=0.2", "train=1.2,test=-0.2", "tran=1",
                                  "train=abc,test=1"])
def test_bad_fractions(text):
    with pytest.raises(InvalidParameterError, match="sum to 1"):
        parse_fractions(text)


def test_missing_dataset_and_empty_dataset(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not a folder"):
        scan(str(tmp_path / "nope"))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        scan(str(tmp_path))


def test_unknown_excluded_class(tmp_path):
    _tree(tmp_path, {"a": 2})
    with pytest.raises(InvalidParameterError, match="names no class"):
        scan(str(tmp_path), exclude_classes=["zzz"])


def test_a_store_inside_the_dataset_is_not_a_class(tmp_path):
    _tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "features.zarr" / "features").mkdir(parents=True)
    (tmp_path / "features.zarr" / "zarr.json").write_text("{}")
    (tmp_path / "features.zarr" / "features" / "c0").write_bytes(b"x")
    m = scan(str(tmp_path))
    assert m.classes == ["a", "b"] and len(m) == 4
    assert any("Zarr store" in w for w in m.warnings)
