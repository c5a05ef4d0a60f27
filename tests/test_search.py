"""Head search: stacked trials are the heads train_head trains alone, the space, halving, the
search end to end (results table, best model retrained into a model directory), its refusals."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from deeptransfer import jsonutil
from deeptransfer.errors import InvalidParameterError, StoreError
from deeptransfer.selection import halving
from deeptransfer.selection.search import RESULTS_CSV, RESULTS_JSON, run_search
from deeptransfer.selection.single import SingleTask, train_single
from deeptransfer.selection.space import DEFAULT_SPACE, SearchSpace, trial_train_config
from deeptransfer.selection.vectorized import GroupTask, TrialSpec, train_group
from deeptransfer.store import open_store
from deeptransfer.training import (HeadConfig, OptimizerConfig, TrainConfig, head_from_params,
                                   train_head)
from deeptransfer.training import shards
from deeptransfer.training.shards import store_key
from test_train import SerialExecutor, ShuffledExecutor, make_store


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("search_blobs") / "features.zarr")


@pytest.fixture(autouse=True)
def _fresh_caches():
    shards.clear_caches()
    yield




def _trials(heads, opts, smoothing, *, epochs, stop=None, start=0, seed=3):
    return tuple(TrialSpec(i, h, o, ls, seed=seed, epochs=epochs, start_epoch=start,
                           stop_epoch=epochs if stop is None else stop)
                 for i, (h, o, ls) in enumerate(zip(heads, opts, smoothing)))


def _alone(url, t, out, *, batch=8):
    """The trial trained by the project's trainer: one worker, one averaging round an epoch."""
    cfg = TrainConfig(head=t.head, optimizer=t.optimizer, workers=1, batch_size_per_worker=batch,
                      averaging_frequency=1000, epochs=t.epochs, seed=t.seed, patience=None,
                      label_smoothing=t.label_smoothing)
    return train_head(SerialExecutor(1), url, cfg, str(out), progress=False, plot=False)


CASES = {
    # linear heads with batch norm and dropout on the features, Nesterov: lr, weight decay,
    # label smoothing and dropout differ per trial
    "linear-bn-dropout-nesterov": (
        [HeadConfig("softmax", batch_norm=True, input_dropout=p) for p in (0.0, 0.3, 0.5)],
        [OptimizerConfig("nesterov", lr=lr, weight_decay=wd)
         for lr, wd in ((0.05, 0.0), (0.01, 1e-3), (0.1, 1e-4))], (0.0, 0.1, 0.2)),
    "mlp-dropout-adam": (
        [HeadConfig("mlp", hidden=(8,), dropout=p, input_dropout=q)
         for p, q in ((0.0, 0.0), (0.3, 0.1), (0.5, 0.0))],
        [OptimizerConfig("adam", lr=lr, weight_decay=wd)
         for lr, wd in ((0.01, 0.0), (0.001, 1e-3), (0.003, 1e-4))], (0.0, 0.1, 0.0)),
    "mlp-bn-sgd-momentum": (
        [HeadConfig("mlp", hidden=(8,), batch_norm=True, dropout=0.2)] * 3,
        [OptimizerConfig("sgd", lr=0.05, momentum=0.0), OptimizerConfig("sgd", lr=0.02, momentum=0.5),
         OptimizerConfig("nesterov", lr=0.01, momentum=0.9)], (0.0, 0.0, 0.1)),
    "linear-adam-cosine": (
        [HeadConfig("softmax")] * 2,
        [OptimizerConfig("adam", lr=0.01, schedule="cosine"),
         OptimizerConfig("adam", lr=0.003, weight_decay=1e-2)], (0.1, 0.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_trial_in_a_stack_is_the_head_train_head_trains_alone(blobs, tmp_path, case):
    heads, opts, ls = CASES[case]
    trials = _trials(heads, opts, ls, epochs=3)
    key = store_key(open_store(blobs).attrs)
    res = train_group(GroupTask(blobs, {}, key, trials, batch_size=8))
    for i, t in enumerate(trials):
        ref = _alone(blobs, t, tmp_path / f"alone{i}")
        params, _ = res.states[i]
        assert list(params) == list(ref.last_params)
        for k in params:
            np.testing.assert_allclose(params[k], ref.last_params[k], rtol=0, atol=1e-5,
                                       err_msg=f"trial {i} {k}")
    # different hyper-parameters gave different heads (the stack did not mix them up)
    w = [res.states[i][0][list(res.states[i][0])[-2]] for i in range(len(trials))]
    assert not np.allclose(w[0], w[1])


def test_a_trial_continued_from_its_state_ends_where_an_unbroken_one_does(blobs):
    """The rungs of halving: 1 epoch, then the state travels and training goes on."""
    heads, opts, ls = CASES["mlp-dropout-adam"]
    key = store_key(open_store(blobs).attrs)
    whole = train_group(GroupTask(blobs, {}, key, _trials(heads, opts, ls, epochs=3),
                                  batch_size=8))
    first = train_group(GroupTask(blobs, {}, key, _trials(heads, opts, ls, epochs=3, stop=1),
                                  batch_size=8))
    rest = train_group(GroupTask(blobs, {}, key, _trials(heads, opts, ls, epochs=3, start=1),
                                 batch_size=8, states=tuple(first.states)))
    for a, b in zip(whole.states, rest.states):
        for k in a[0]:
            np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)
    assert [s["val"] for s in whole.scores] == [s["val"] for s in rest.scores]


def test_trials_at_different_epochs_in_one_stack(blobs):
    """Trials whose budgets differ stop at their own epoch; the others go on, unaffected."""
    h, o = HeadConfig("softmax", batch_norm=True), OptimizerConfig("adam", lr=0.01)
    key = store_key(open_store(blobs).attrs)
    both = (TrialSpec(0, h, o, 0.0, seed=3, epochs=1, start_epoch=0, stop_epoch=1),
            TrialSpec(1, h, o, 0.0, seed=3, epochs=3, start_epoch=0, stop_epoch=3))
    res = train_group(GroupTask(blobs, {}, key, both, batch_size=8))
    for i, t in enumerate(both):
        alone = train_group(GroupTask(blobs, {}, key, (replace(t, trial=0),), batch_size=8))
        for k, v in alone.states[0][0].items():
            np.testing.assert_allclose(res.states[i][0][k], v, atol=1e-6, err_msg=k)


def test_mlp_batch_norm_with_adam_predicts_as_train_head(blobs, tmp_path):
    """A hidden layer's bias that BatchNorm follows has a zero gradient up to float rounding,
    which Adam scales to full steps: the bias (and the running mean that absorbs it) then
    differ from a lone run's by rounding noise, the head's function hardly."""
    head, opt = HeadConfig("mlp", hidden=(8,), batch_norm=True), OptimizerConfig("adam", lr=0.01)
    t = TrialSpec(0, head, opt, 0.0, seed=3, epochs=3, start_epoch=0, stop_epoch=3)
    res = train_group(GroupTask(blobs, {}, store_key(open_store(blobs).attrs), (t,), batch_size=8))
    ref = _alone(blobs, t, tmp_path)
    st = open_store(blobs)
    x = torch.from_numpy(st.read_rows(st.split_rows("val"))[0])
    a = head_from_params(head, res.states[0][0], in_dim=16, n_classes=4)(x)
    b = head_from_params(head, ref.last_params, in_dim=16, n_classes=4)(x)
    assert float((a - b).abs().max().detach()) < 0.05
    for k in ("fc0.weight", "bn0.weight", "bn0.bias", "out.weight", "out.bias"):
        np.testing.assert_allclose(res.states[0][0][k], ref.last_params[k], atol=1e-5)


def test_the_single_trial_task_is_the_stacked_trial(blobs):
    """The per-trial path (fit_shard, for fine-tuned suffixes) and the stack agree on a head."""
    heads, opts, ls = CASES["linear-bn-dropout-nesterov"]
    trials = _trials(heads, opts, ls, epochs=2)
    key = store_key(open_store(blobs).attrs)
    stacked = train_group(GroupTask(blobs, {}, key, trials, batch_size=8))
    for i, t in enumerate(trials):
        one = train_single(SingleTask(blobs, {}, key, t, None, batch_size=8))
        for k, v in one.states[0][0].items():
            np.testing.assert_allclose(stacked.states[i][0][k], v, atol=1e-5, err_msg=k)
        got, want = one.scores[0]["val"], stacked.scores[i]["val"]
        assert {k: got[k] for k in ("top1", "mean_per_class")} == pytest.approx(
            {k: want[k] for k in ("top1", "mean_per_class")}, abs=1e-9)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)  # float rounding only


def test_a_group_task_run_twice_gives_the_same_result(blobs):
    heads, opts, ls = CASES["mlp-dropout-adam"]
    task = GroupTask(blobs, {}, store_key(open_store(blobs).attrs),
                     _trials(heads, opts, ls, epochs=2), batch_size=8)
    a, b = train_group(task), train_group(task)
    assert a.scores == b.scores
    for (pa, sa), (pb, sb) in zip(a.states, b.states):
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k])
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k])


def test_a_diverging_trial_is_marked_and_does_not_disturb_the_others(blobs):
    h = HeadConfig("softmax")
    trials = (TrialSpec(0, h, OptimizerConfig("sgd", lr=1e38, momentum=0.0), 0.0, seed=3,
                        epochs=2, start_epoch=0, stop_epoch=2),
              TrialSpec(1, h, OptimizerConfig("sgd", lr=0.05, momentum=0.0), 0.0, seed=3,
                        epochs=2, start_epoch=0, stop_epoch=2))
    key = store_key(open_store(blobs).attrs)
    res = train_group(GroupTask(blobs, {}, key, trials, batch_size=8))
    assert res.diverged == [True, False]
    assert "val" not in res.scores[0] and res.scores[1]["val"]["top1"] > 0.5
    alone = train_group(GroupTask(blobs, {}, key, (replace(trials[1], trial=0),), batch_size=8))
    for k, v in alone.states[0][0].items():
        np.testing.assert_allclose(res.states[1][0][k], v, atol=1e-6)


# -- the space ---------------------------------------------------------------------------------

def test_random_sampling_is_seeded_and_covers_the_options():
    sp = SearchSpace.from_dict(None)
    a, b = sp.sample(20, seed=4), sp.sample(20, seed=4)
    assert a == b and a != sp.sample(20, seed=5)
    assert {t["head"] for t in a} == {"linear", "mlp"}
    assert all(1e-4 <= t["lr"] <= 0.1 for t in a)
    assert all(t["hidden"] is None for t in a if t["head"] == "linear")
    for t in a:  # every trial is a valid TrainConfig
        cfg = trial_train_config(t)
        assert cfg.head.kind == ("softmax" if t["head"] == "linear" else "mlp")
        assert cfg.optimizer.lr == t["lr"] and cfg.epochs == DEFAULT_SPACE["epochs"]


def test_grid_enumerates_the_choices_once():
    sp = SearchSpace.from_dict({"head": ["linear", "mlp"], "hidden": [8, 16], "lr": [0.1, 0.01],
                                "dropout": 0.0, "batch_norm": False, "optimizer": "adam",
                                "weight_decay": 0.0, "label_smoothing": 0.0})
    grid = sp.sample(None, method="grid")
    # linear: 2 learning rates (the hidden width is not its option); mlp: 2 x 2
    assert len(grid) == 6
    assert sum(t["head"] == "linear" for t in grid) == 2
    some = sp.sample(3, seed=1, method="grid")
    assert len(some) == 3 and all(t in grid for t in some)


def test_space_files_json_and_yaml(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"lr": {"log_uniform": [0.001, 0.01]},
                                                 "head": "mlp"}))
    sp = SearchSpace.from_file(str(tmp_path / "s.json"))
    assert sp.options["head"] == "mlp" and sp.options["epochs"] == DEFAULT_SPACE["epochs"]
    assert all(0.001 <= t["lr"] <= 0.01 for t in sp.sample(10))
    pytest.importorskip("yaml")
    (tmp_path / "s.yaml").write_text("head: [linear]\nlr: [0.5]\nepochs: 3\n")
    sp = SearchSpace.from_file(str(tmp_path / "s.yaml"))
    assert all(t["head"] == "linear" and t["lr"] == 0.5 and t["epochs"] == 3
               for t in sp.sample(5))


@pytest.mark.parametrize("space,words", [
    ({"neurons": [1]}, "Unknown search option 'neurons'"),
    ({"lr": {"normal": [0, 1]}}, "a distribution is one of"),
    ({"lr": {"log_uniform": [0, 1]}}, "low > 0"),
    ({"head": ["cnn"]}, "'linear' or 'mlp'"),
    ({"dropout": []}, "empty list"),
])
def test_bad_spaces_are_one_line_errors(space, words):
    with pytest.raises(InvalidParameterError, match=words) as exc:
        SearchSpace.from_dict(space)
    assert "\n" not in str(exc.value)


def test_grid_refuses_distributions():
    with pytest.raises(InvalidParameterError, match="lr is a distribution"):
        SearchSpace.from_dict(None).sample(None, method="grid")


# -- halving -----------------------------------------------------------------------------------

def test_halving_rungs_and_promotions():
    assert halving.n_rungs(64, 3) == 4 and halving.n_rungs(9, 3) == 3 and halving.n_rungs(1, 3) == 1
    assert halving.rung_epochs(10, 3, 3) == [2, 4, 10]
    assert halving.rung_epochs(10, 3, 1) == [10]
    assert halving.rung_epochs(1, 3, 3) == [1, 1, 1]
    scores = {0: 0.5, 1: 0.9, 2: None, 3: 0.9, 4: 0.1, 5: 0.7}
    assert halving.promote(scores, 3) == [1, 3]
    assert halving.promote(scores, 2) == [1, 3, 5]
    r = halving.ranks([(0, 0, 0.9), (1, 1, 0.5), (2, 1, None), (3, 1, 0.6)])
    assert r == {3: 1, 1: 2, 0: 3, 2: 4}


# -- the search --------------------------------------------------------------------------------

SPACE = {"hidden": [8, 16], "epochs": 4, "lr": {"log_uniform": [1e-3, 0.1]}}


def test_search_halves_ranks_and_retrains_the_best(blobs, tmp_path):
    out = tmp_path / "search"
    res = run_search(SerialExecutor(2), blobs, str(out), trials=12, space=SPACE, seed=1,
                     base=TrainConfig(batch_size_per_worker=8, patience=None), progress=False,
                     selection="best")
    assert res.rungs == 3
    reached = [r["rung_reached"] for r in res.results]
    assert [reached.count(k) for k in range(3)] == [8, 2, 2]  # 12 -> 4 -> 2
    assert [r["rung2_epochs"] for r in res.results if r["rung_reached"] == 2] == [4, 4]
    # survivors were the best of their rung
    r0 = {r["trial"]: r["rung0_val_score"] for r in res.results}
    survivors = [r["trial"] for r in res.results if r["rung_reached"] >= 1]
    assert min(r0[t] for t in survivors) >= max(v for t, v in r0.items() if t not in survivors)
    best = [r for r in res.results if r["rank"] == 1][0]
    assert best["trial"] == res.best["trial"] and best["rung_reached"] == 2
    assert best["val_score"] == max(r["val_score"] for r in res.results if r["rung_reached"] == 2)
    # the results table, as CSV and as strict JSON
    data = jsonutil.loads((out / RESULTS_JSON).read_text())
    assert data["format"] == "deeptransfer.search/1" and len(data["results"]) == 12
    assert data["best"]["trial"] == res.best["trial"]
    lines = (out / RESULTS_CSV).read_text().splitlines()
    assert len(lines) == 13 and lines[0].startswith("trial,rank,baseline,selected,param_head")
    best_cfg = jsonutil.loads((out / "best_config.json").read_text())
    assert best_cfg["head"] == res.best["train_config"]["head"]
    # the best trial's configuration, trained again with parameter averaging on 2 workers
    tr = res.train_result
    assert tr.config.workers == 2 and tr.config.head == trial_train_config(
        res.best["params"], TrainConfig(batch_size_per_worker=8)).head
    assert (out / "checkpoint.safetensors").exists() and (out / "rounds.jsonl").exists()


def test_trial_0_is_the_head_train_would_train(blobs, tmp_path):
    base = TrainConfig(batch_size_per_worker=8)
    res = run_search(SerialExecutor(1), blobs, str(tmp_path / "s"), trials=4, space=SPACE,
                     base=base, progress=False, retrain=False, halving=False)
    rows = {r["trial"]: r for r in res.results}
    assert rows[0]["baseline"] and not any(rows[i]["baseline"] for i in (1, 2, 3))
    cfg = trial_train_config({k[6:]: v for k, v in rows[0].items() if k.startswith("param_")},
                             base)
    assert cfg.head == base.head and cfg.optimizer == base.optimizer
    assert cfg.epochs == SPACE["epochs"]  # the space's fixed budget applies to it too
    off = run_search(SerialExecutor(1), blobs, str(tmp_path / "t"), trials=4, space=SPACE,
                     base=base, progress=False, retrain=False, halving=False, baseline=False)
    assert not any(r["baseline"] for r in off.results)
    two = run_search(SerialExecutor(1), blobs, str(tmp_path / "u"), trials=9, space=SPACE,
                     base=base, progress=False, retrain=False, max_rungs=2)
    assert two.rungs == 2 and {r["rung0_epochs"] for r in two.results} == {2}
    assert off.results[0]["param_lr"] != rows[0]["param_lr"]


def test_search_results_do_not_depend_on_the_order_tasks_finish(blobs, tmp_path):
    kw = dict(trials=9, space=SPACE, seed=2, base=TrainConfig(batch_size_per_worker=8),
              progress=False, retrain=False)
    a = run_search(SerialExecutor(2), blobs, str(tmp_path / "a"), **kw)
    b = run_search(ShuffledExecutor(3, seed=5), blobs, str(tmp_path / "b"), **kw)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]  # noqa: E731
    assert strip(a.results) == strip(b.results)


def test_search_refuses_a_folder_that_is_not_ours(blobs, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="OUT .* is a folder of other files"):
        run_search(SerialExecutor(1), blobs, str(tmp_path), trials=2, progress=False)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_search_needs_validation_rows(tmp_path):
    url = make_store(tmp_path / "noval.zarr", n_val=0)
    with pytest.raises(StoreError, match="no validation rows"):
        run_search(SerialExecutor(1), url, str(tmp_path / "out"), trials=2, progress=False)
