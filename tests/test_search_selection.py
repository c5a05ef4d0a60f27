"""The search's selection rule: the incumbent (trial 0, the head `train` would train) reaches
the last rung whatever its early scores, and a finalist replaces it only when it beats it by
more than the noise of the validation split (one standard error of the paired difference)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deeptransfer import jsonutil
from deeptransfer.errors import InvalidParameterError
from deeptransfer.selection import halving
from deeptransfer.selection.paired import choose, metric_value, paired_difference
from deeptransfer.selection.search import RESULTS_CSV, RESULTS_JSON, run_search
from deeptransfer.store import open_store
from deeptransfer.training import OptimizerConfig, TrainConfig
from deeptransfer.training import shards
from deeptransfer.training.shards import split_rows, store_key
from test_train import SerialExecutor, make_store

# trials that learn (Adam, a sensible lr); the incumbent is the base's own head and options
SPACE = {"head": ["linear"], "epochs": 3, "optimizer": ["adam"], "batch_norm": [False],
         "dropout": [0.0], "label_smoothing": [0.0], "weight_decay": [0.0],
         "lr": {"log_uniform": [0.01, 0.1]}}
#: a default made bad on purpose: Nesterov at lr 1e-6 barely moves from its initialization
BAD_DEFAULT = TrainConfig(batch_size_per_worker=8, patience=None,
                          optimizer=OptimizerConfig("nesterov", lr=1e-6))


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("sel_blobs") / "features.zarr", n_val=96,
                      spread=1.0)


@pytest.fixture(autouse=True)
def _fresh_caches():
    shards.clear_caches()
    yield




def _val_labels(url):
    st = open_store(url)
    rows = split_rows(url, "val", {}, store_key(st.attrs))
    return np.asarray(st.group["labels"][:], np.int64)[np.asarray(rows)], len(st.classes)


def _search(url, out, **kw):
    kw = {"trials": 12, "space": SPACE, "seed": 1, "base": BAD_DEFAULT, "progress": False,
          "retrain": False, **kw}
    return run_search(SerialExecutor(2), url, str(out), **kw)


def test_promote_keeps_the_incumbent():
    scores = {0: 0.1, 1: 0.9, 2: 0.8, 3: 0.7, 4: None}
    assert halving.promote(scores, 3) == [1, 2]
    assert halving.promote(scores, 3, keep=(0,)) == [0, 1, 2]
    assert halving.promote(scores, 3, keep=(1,)) == [1, 2]  # already in: nothing added
    assert halving.promote(scores, 3, keep=(4,)) == [1, 2]  # a diverged incumbent stops


def test_the_incumbent_reaches_the_last_rung_though_worst_and_a_clearly_better_trial_wins(
        blobs, tmp_path):
    res = _search(blobs, tmp_path / "s")
    rows = {r["trial"]: r for r in res.results}
    assert res.rungs == 3
    # trial 0 is the worst at the first rung, yet trained to the whole budget
    assert rows[0]["rung0_val_score"] == min(r["rung0_val_score"] for r in res.results)
    assert rows[0]["rung_reached"] == 2 and rows[0]["epochs_trained"] == 3
    reached = [r["rung_reached"] for r in res.results]
    assert [reached.count(k) for k in range(3)] == [7, 2, 3]  # 12 -> 4 + 1 -> 2 + 1
    # it stays bad; the best finalist beats it by far more than the noise, and is chosen
    sel = res.summary["selection"]
    assert sel["incumbent"] == 0 and sel["rule"] == "one-se"
    lead = next(f for f in sel["finalists"] if f["trial"] == sel["leader"])
    assert lead["trial"] != 0 and lead["diff_vs_incumbent"] > 5 * lead["diff_se"] > 0
    assert res.best["trial"] == sel["winner"] == sel["leader"]
    assert "beats the incumbent" in res.best["reason"]
    assert rows[sel["leader"]]["selected"] and not rows[0]["selected"]
    assert sum(r["selected"] for r in res.results) == 1


def test_a_finalist_within_the_noise_is_not_selected():
    y = np.repeat(np.arange(4), 25)  # 100 validation images, 4 classes of 25
    inc = y.copy()
    inc[::5] = (y[::5] + 1) % 4  # the incumbent: 20 wrong
    lead = inc.copy()
    lead[[0, 25, 50, 75]] = y[[0, 25, 50, 75]]  # four images more right,
    lead[[1, 26, 51]] = (y[[1, 26, 51]] + 1) % 4  # three more wrong: net +1 image, +1 point,
    # against a standard error of the paired difference of ~2.6 points
    other = inc.copy()
    scores = {0: metric_value(inc, y, 4, "mean_per_class"),
              3: metric_value(lead, y, 4, "mean_per_class"),
              5: metric_value(other, y, 4, "mean_per_class")}
    assert scores[3] > scores[0]
    got = choose([0, 3, 5], scores, {0: inc, 3: lead, 5: other}, y, 4,
                 metric="mean_per_class", incumbent=0)
    assert got["leader"] == 3 and got["winner"] == 0
    assert "within 1 standard error" in got["reason"]
    f3 = next(f for f in got["finalists"] if f["trial"] == 3)
    assert f3["diff_vs_incumbent"] == pytest.approx(0.01)
    assert 2 * f3["diff_vs_incumbent"] < f3["diff_se"] == pytest.approx(0.0264, rel=0.1)
    # `best` takes the leader; a lower threshold lets it through
    assert choose([0, 3, 5], scores, {0: inc, 3: lead, 5: other}, y, 4, metric="mean_per_class",
                  incumbent=0, rule="best")["winner"] == 3
    assert choose([0, 3, 5], scores, {0: inc, 3: lead, 5: other}, y, 4, metric="mean_per_class",
                  incumbent=0, threshold=0.0)["winner"] == 3


def test_the_search_keeps_the_incumbent_when_the_threshold_says_noise(blobs, tmp_path):
    """End to end: the same search with a threshold no finalist can pass keeps trial 0, and
    ``selection="best"`` takes the best validation score."""
    strict = _search(blobs, tmp_path / "strict", selection_threshold=1e6)
    assert strict.best["trial"] == 0 and "the incumbent is kept" in strict.best["reason"]
    best = _search(blobs, tmp_path / "best", selection="best")
    assert best.best["trial"] == best.summary["selection"]["leader"] != 0
    assert [r["rank"] for r in strict.results] == [r["rank"] for r in best.results]


def test_the_recorded_differences_are_the_direct_computation(blobs, tmp_path):
    res = _search(blobs, tmp_path / "s", metric="mean_per_class")
    data = jsonutil.loads((tmp_path / "s" / RESULTS_JSON).read_text())
    y, n_classes = _val_labels(blobs)
    fin = {f["trial"]: f for f in data["selection"]["finalists"]}
    rows = {r["trial"]: r for r in data["results"]}
    assert sorted(fin) == sorted(t for t, r in rows.items() if r["rung_reached"] == 2)
    inc = np.asarray(fin[0]["val_predictions"])
    assert metric_value(inc, y, n_classes, "mean_per_class") == pytest.approx(
        rows[0]["val_mean_per_class"], abs=1e-12)
    for t, f in fin.items():
        if t == 0:
            assert f["diff_vs_incumbent"] == 0.0
            continue
        p = np.asarray(f["val_predictions"])
        assert metric_value(p, y, n_classes, "mean_per_class") == pytest.approx(
            rows[t]["val_mean_per_class"], abs=1e-12)
        # the difference: of the two trials' recorded scores on the same images
        assert f["diff_vs_incumbent"] == pytest.approx(
            rows[t]["val_mean_per_class"] - rows[0]["val_mean_per_class"], abs=1e-12)
        assert rows[t]["val_diff_vs_incumbent"] == pytest.approx(f["diff_vs_incumbent"])
        # its standard error: the stratified bootstrap converges to the exact one, per class
        # var(mean of d within the class) / C^2 summed (d: right(trial) - right(incumbent))
        d = (p == y).astype(float) - (inc == y)
        exact = np.sqrt(sum(d[y == c].var() / (y == c).sum() for c in np.unique(y))) / len(
            np.unique(y))
        assert f["diff_se"] == pytest.approx(exact, rel=0.1)
        assert rows[t]["val_diff_se"] == pytest.approx(f["diff_se"])
        # and the seeded bootstrap itself is reproducible
        assert paired_difference(p, inc, y, n_classes, "mean_per_class", seed=1) == (
            pytest.approx(f["diff_vs_incumbent"]), pytest.approx(f["diff_se"]))
    # rows that did not reach the last rung have no comparison; the CSV has the columns
    assert all(r["val_diff_se"] is None for r in rows.values() if r["rung_reached"] < 2)
    header = (tmp_path / "s" / RESULTS_CSV).read_text().splitlines()[0].split(",")
    assert {"selected", "val_diff_vs_incumbent", "val_diff_se", "val_loss"} <= set(header)
    assert data["best"]["trial"] == res.best["trial"] and data["best"]["reason"]


def test_without_an_incumbent_the_best_score_wins(blobs, tmp_path):
    res = _search(blobs, tmp_path / "s", baseline=False)
    sel = res.summary["selection"]
    assert sel["incumbent"] is None and sel["winner"] == sel["leader"] == res.best["trial"]
    assert "no incumbent" in sel["reason"]
    assert all(f["diff_vs_incumbent"] is None for f in sel["finalists"])


def test_promotion_by_validation_loss(blobs, tmp_path):
    res = _search(blobs, tmp_path / "s", promote_by="loss")
    rows = sorted(res.results, key=lambda r: r["trial"])
    first = [r for r in rows if r["trial"] != 0]
    survivors = [r for r in first if r["rung_reached"] >= 1]
    stopped = [r for r in first if r["rung_reached"] == 0]
    assert survivors and stopped and rows[0]["rung_reached"] == 2
    # promoted on the rung's validation loss (lower is better), not its accuracy
    loss0 = {r["trial"]: r for r in first}
    assert max(r["rung0_val_loss"] for r in survivors) <= min(
        r["rung0_val_loss"] for r in stopped)
    assert res.summary["promote_by"] == "loss" and loss0


@pytest.mark.parametrize("kw, param", [({"selection": "lucky"}, "selection"),
                                       ({"selection_threshold": -1.0}, "selection_threshold"),
                                       ({"promote_by": "speed"}, "promote_by")])
def test_bad_selection_options_are_refused(blobs, tmp_path, kw, param):
    with pytest.raises(InvalidParameterError) as info:
        _search(blobs, tmp_path / "s", **kw)
    assert info.value.param == param and "\n" not in str(info.value)


@pytest.mark.dask
def test_the_selection_is_the_same_on_dask(blobs, tmp_path):
    pytest.importorskip("distributed")
    from deeptransfer.adapters.dask import DaskExecutor

    ref = _search(blobs, tmp_path / "ref")
    with DaskExecutor(2) as ex:
        got = run_search(ex, blobs, str(tmp_path / "dask"), trials=12, space=SPACE, seed=1,
                         base=BAD_DEFAULT, progress=False, retrain=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731
    assert strip(got.results) == strip(ref.results)
    assert got.summary["selection"] == ref.summary["selection"]


def test_the_cli_flags(blobs, tmp_path, capsys):
    from deeptransfer.cli import main

    out = tmp_path / "cli"
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    argv = ["search", blobs, str(out), "--trials", "6", "--space", str(space), "--workers", "0",
            "--batch-size-per-worker", "8", "--json"]
    assert main(argv + ["--selection", "best", "--promote-by", "loss"]) == 0
    summary = json.loads(capsys.readouterr().out)
    data = jsonutil.loads((out / RESULTS_JSON).read_text())
    assert data["selection"]["rule"] == "best" and data["promote_by"] == "loss"
    assert summary["best_trial"] == data["selection"]["leader"]
    assert summary["selection_reason"].startswith("best validation score")
    assert main(argv + ["--selection-threshold", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "selection_threshold" in err or "selection-threshold" in err
    assert len(err.splitlines()) == 1
