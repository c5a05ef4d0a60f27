"""Learning curves: seeded nested subsets, repeats trained as one stack (each on its own rows),
the summary with spread, its files, and its refusals."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from deeptransfer import jsonutil
from deeptransfer.cli import main
from deeptransfer.errors import InvalidParameterError
from deeptransfer.selection.curve import run_curve, subsets
from deeptransfer.selection.vectorized import GroupTask, TrialSpec, train_group
from deeptransfer.store import open_store
from deeptransfer.training import HeadConfig, OptimizerConfig, TrainConfig
from deeptransfer.training import shards
from deeptransfer.training.shards import store_key
from test_train import SerialExecutor, make_store


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("curve_blobs") / "features.zarr")


@pytest.fixture(autouse=True)
def _fresh_caches():
    shards.clear_caches()
    yield


def test_subsets_are_stratified_seeded_and_nested():
    labels = np.array([0] * 10 + [1] * 6 + [2] * 3)
    plan = subsets(labels, 3, sizes=[2, 5], fractions=None, repeats=3, seed=7)
    (_, ks_small, small), (_, ks_big, big) = plan
    assert ks_small == [2, 2, 2] and ks_big == [5, 5, 3]  # class 2 has only 3
    for r in range(3):
        assert np.bincount(labels[small[r]], minlength=3).tolist() == [2, 2, 2]
        assert set(small[r]) <= set(big[r])  # a larger size only adds images
    assert not all(np.array_equal(small[0], small[r]) for r in (1, 2))  # repeats differ
    again = subsets(labels, 3, sizes=[2, 5], fractions=None, repeats=3, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(again[1][2], big))
    frac = subsets(labels, 3, sizes=None, fractions=[0.5, 1.0], repeats=1, seed=0)
    assert frac[0][1] == [5, 3, 2] and frac[1][1] == [10, 6, 3]


def test_a_repeat_in_the_stack_is_the_repeat_trained_alone(blobs):
    """Repeats train side by side, each on its own minibatches (a (T, B, D) gather)."""
    st = open_store(blobs)
    labels = np.asarray(st["labels"][:])[st.split_rows("train")]
    (_, _, subs), = subsets(labels, 4, sizes=[10], fractions=None, repeats=3, seed=0)
    head = HeadConfig("mlp", hidden=(8,), dropout=0.3, batch_norm=True)
    opt = OptimizerConfig("nesterov", lr=0.05)
    trials = tuple(TrialSpec(r, head, opt, 0.0, seed=r, epochs=3, start_epoch=0, stop_epoch=3)
                   for r in range(3))
    key = store_key(st.attrs)
    stacked = train_group(GroupTask(blobs, {}, key, trials, batch_size=8, subsets=tuple(subs),
                                    eval_splits=("val", "test"), eval_train=True))
    for r in range(3):
        alone = train_group(GroupTask(blobs, {}, key, (trials[r],), batch_size=8,
                                      subsets=(subs[r],), eval_splits=("val", "test"),
                                      eval_train=True))
        for k, v in alone.states[0][0].items():
            np.testing.assert_allclose(stacked.states[r][0][k], v, atol=1e-5, err_msg=k)
        assert alone.scores[0]["test"] == pytest.approx(stacked.scores[r]["test"])
    assert len({json.dumps(s["train"]) for s in stacked.scores}) > 1 or \
        len({json.dumps(s["test"]) for s in stacked.scores}) > 1


def test_the_curve_grows_and_writes_its_files(blobs, tmp_path):
    out = tmp_path / "curve"
    base = TrainConfig(epochs=8, batch_size_per_worker=8,
                       optimizer=OptimizerConfig("adam", lr=0.01))
    res = run_curve(SerialExecutor(2), blobs, str(out), sizes=[1, 4, 30], repeats=3, base=base,
                    progress=False)
    assert [p["per_class"] for p in res.points] == [1, 4, 30]
    assert [p["n_train"] for p in res.points] == [4, 16, 120]
    assert len(res.runs) == 9 and {r["repeat"] for r in res.runs} == {0, 1, 2}
    test = [p["test_top1_mean"] for p in res.points]
    assert test[2] > test[0] and test[2] > 0.8  # more labelled images, better heads
    for p in res.points:
        runs = [r["test_top1"] for r in res.runs if r["size"] == p["size"]]
        assert p["test_top1_mean"] == pytest.approx(np.mean(runs))
        assert p["test_top1_std"] == pytest.approx(np.std(runs))
    data = jsonutil.loads((out / "curve.json").read_text())
    assert data["format"] == "deeptransfer.curve/1" and len(data["points"]) == 3
    lines = (out / "curve.csv").read_text().splitlines()
    assert len(lines) == 4 and "test_top1_std" in lines[0]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an earlier curve's folder is ours to write again
    run_curve(SerialExecutor(1), blobs, str(out), fractions=[0.5, 1.0], repeats=1, base=base,
              progress=False, plot=False)
    assert json.loads((out / "curve.json").read_text())["sizes_are"] == "fraction"


def test_curve_refusals(blobs, tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(InvalidParameterError, match="folder of other files"):
        run_curve(SerialExecutor(1), blobs, str(tmp_path), sizes=[2], progress=False)
    assert os.listdir(tmp_path) == ["mine.txt"]
    with pytest.raises(InvalidParameterError, match="one of the two"):
        run_curve(SerialExecutor(1), blobs, str(tmp_path / "o"), sizes=[2], fractions=[0.5])
    with pytest.raises(InvalidParameterError, match="fractions"):
        run_curve(SerialExecutor(1), blobs, str(tmp_path / "o"), fractions=[1.5])


def test_curve_cli(blobs, tmp_path, capsys):
    out = str(tmp_path / "c")
    assert main(["curve", blobs, out, "--sizes", "2,8", "--repeats", "2", "--epochs", "2",
                 "--workers", "0", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [p["per_class"] for p in got["points"]] == [2, 8]
    assert main(["curve", blobs, str(tmp_path / "d"), "--sizes", "2,x"]) == 2
    err = capsys.readouterr().err
    assert "--sizes takes integers" in err and len(err.strip().splitlines()) == 1
