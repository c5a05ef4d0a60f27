"""benchmarks/featurize.py --precision int8: the accuracy cost is measured under the
per-class protocol of benchmarks/accuracy.py (N train / M val per class, the rest the test;
its reference_logreg, not a copy), on the store featurize made with its own split."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import featurize as bench  # noqa: E402  (benchmarks/featurize.py)
from test_backends import featurize, photos  # noqa: E402,F401 - the photos fixture

from deeptransfer.dataset import load_dataset, split_code  # noqa: E402
from deeptransfer.store import open_store  # noqa: E402

pytest.importorskip("sklearn")


def test_protocol_split_reassigns_the_stores_rows_per_class(photos, tmp_path):
    store = tmp_path / "s.zarr"
    featurize(photos, store, backend="torch")
    st = open_store(str(store))
    codes = bench.protocol_split_codes(st, photos, [], per_class_train=3, per_class_val=1)
    m = load_dataset(photos, per_class_train=3, per_class_val=1, seed=0)
    labels = st["labels"][:]
    for c in range(len(m.classes)):
        assert ((codes == split_code("train")) & (labels == c)).sum() == 3
        assert ((codes == split_code("val")) & (labels == c)).sum() == 1
    # the store's own split (halves) is not the protocol's
    assert not np.array_equal(codes, st["split"][:])
    acc = bench.protocol_accuracy(str(store), codes)
    assert 0.0 <= acc["mean_per_class"] <= 1.0 and 0.0 <= acc["top1"] <= 1.0
    assert acc["C"] in (0.01, 0.03, 0.1, 0.3, 1.0)
    # no validation images (a subset too small for the protocol): no figure, not a crash
    assert bench.protocol_accuracy(str(store), np.where(codes == split_code("val"),
                                                        split_code("test"), codes)) is None
