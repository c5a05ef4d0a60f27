"""Training as a run object (``TrainRun``), its one model-directory writer on any fsspec URL,
and the one per-process worker cache (``worker_state``)."""
from __future__ import annotations

import json
import uuid

import fsspec
import pytest

import deeptransfer as dt
from deeptransfer import worker_state
from deeptransfer.store import cached_store, forget_cached_stores
from deeptransfer.training import HeadConfig, OptimizerConfig, TrainRun, load_checkpoint, train_head
from deeptransfer.training import shards
from deeptransfer.training.averaging import combine, fit_shard
from test_model_dir_safety import model_store
from test_train import Killed, SerialExecutor, assert_params_equal, cfg, kill_after

#: 2 workers, 2 epochs of a few rounds each, Adam (optimizer state travels and is averaged)
RUN = dict(workers=2, epochs=2, batch_size_per_worker=8, averaging_frequency=2,
           optimizer=OptimizerConfig("adam", lr=0.01))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return model_store(tmp_path_factory.mktemp("trainrun") / "features.zarr")


@pytest.fixture(autouse=True)
def _fresh_caches():
    worker_state.forget()
    yield


def _solo(store, out, config):
    return train_head(SerialExecutor(2), store, config, str(out), progress=False, plot=False)


def _timeless(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if "seconds" not in k and k != "start_time"}


def _rounds(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_run_driven_step_by_step_is_train_head_bitwise(store, tmp_path):
    whole = _solo(store, tmp_path / "whole", cfg(**RUN))
    ex = SerialExecutor(2)
    with TrainRun(store, cfg(**RUN), str(tmp_path / "steps"), workers=2, plot=False) as run:
        while not run.done:
            plan = run.plan_round()
            if plan is None:
                run.end_epoch(ex)
                continue
            assert plan.affinity == [t.part for t in plan.tasks] and len(plan.tasks) == 2
            res = ex.map_reduce(fit_shard, plan.tasks, combine, shared=plan.shared,
                                affinity=plan.affinity)
            run.apply_round(plan, res, started=0.0, round_s=0.0)
        mine = run.finish()
    assert mine.rounds == whole.rounds == 2 * run.rounds_per_epoch
    assert_params_equal(mine.params, whole.params)
    assert_params_equal(mine.last_params, whole.last_params)
    assert [_timeless(h) for h in mine.history] == [_timeless(h) for h in whole.history]
    a = _rounds((tmp_path / "steps" / "rounds.jsonl").read_text())
    b = _rounds((tmp_path / "whole" / "rounds.jsonl").read_text())
    assert [set(r) for r in a] == [set(r) for r in b]
    assert [_timeless(r) for r in a] == [_timeless(r) for r in b]
    assert run.state.done and run.state.epoch == 2 and run.state.global_round == mine.rounds


def test_two_runs_interleaved_on_one_executor_each_end_as_alone(store, tmp_path):
    ca = cfg(**RUN)
    cb = cfg(**{**RUN, "workers": 3}, seed=7, head=HeadConfig("mlp", hidden=(8,), dropout=0.2))
    alone = [_solo(store, tmp_path / "a1", ca), _solo(store, tmp_path / "b1", cb)]
    ex = SerialExecutor(2)
    runs = [TrainRun(store, ca, str(tmp_path / "a2"), workers=2, plot=False),
            TrainRun(store, cb, str(tmp_path / "b2"), workers=2, plot=False)]
    steps = []
    while not all(r.done for r in runs):
        for i, r in enumerate(runs):  # a round (or epoch end) of A, then of B, ...
            if not r.done:
                steps.append((i, r.step(ex)[0]))
    both = [r.finish() for r in runs]
    assert steps[:4] == [(0, "round"), (1, "round"), (0, "round"), (1, "round")]
    assert runs[1].config.workers == 3  # its own option, not the executor's
    for mine, solo in zip(both, alone):
        assert_params_equal(mine.params, solo.params)
        assert_params_equal(mine.last_params, solo.last_params)
        assert mine.rounds == solo.rounds
    assert list(both[0].params) != list(both[1].params)  # two different heads


def test_train_head_alone_leaves_a_loadable_model_dir(store, tmp_path):
    res = _solo(store, tmp_path / "m", cfg(**RUN))
    model = dt.load(str(tmp_path / "m"))
    assert model.classes == res.classes and model.feature_dim == res.feature_dim
    assert_params_equal(model.params, res.params)
    assert model.config["training"] == json.loads(json.dumps(res.config.to_dict()))
    assert model.config["metrics"]["rounds"] == res.rounds


def test_a_checkpoint_on_a_memory_url_resumes_to_the_unbroken_head(store, tmp_path):
    whole = _solo(store, tmp_path / "whole", cfg(**RUN))
    url = f"memory://trainrun-{uuid.uuid4().hex}/model"
    fs = fsspec.filesystem("memory")
    try:
        with pytest.raises(Killed):
            train_head(SerialExecutor(2), store, cfg(**RUN), url, progress=False, plot=False,
                       callback=kill_after(3))
        assert fs.exists(url + "/checkpoint.safetensors") and not fs.exists(url + "/config.json")
        res = train_head(SerialExecutor(2), store, cfg(**RUN), url, progress=False)
        assert not res.reused and res.rounds == whole.rounds
        assert_params_equal(res.params, whole.params)
        assert [_timeless(r) for r in _rounds(fs.cat_file(url + "/rounds.jsonl").decode())] == \
            [_timeless(r) for r in _rounds((tmp_path / "whole" / "rounds.jsonl").read_text())]
        # the model files are those train_head writes locally; the chart is there too
        local = tmp_path / "whole"
        assert fs.cat_file(url + "/head.safetensors") == (local / "head.safetensors").read_bytes()
        assert json.loads(fs.cat_file(url + "/config.json"))["param_order"] == list(res.params)
        assert fs.exists(url + "/training.png")
        with fs.open(url + "/checkpoint.safetensors", "rb") as f, \
                open(tmp_path / "ck.safetensors", "wb") as g:
            g.write(f.read())
        assert load_checkpoint(str(tmp_path / "ck.safetensors"))[0]["done"]
        again = train_head(SerialExecutor(2), store, cfg(**RUN), url, progress=False)
        assert again.reused and again.rounds == res.rounds
    finally:
        fs.rm(url.split("/model")[0], recursive=True)


# -- the worker cache -------------------------------------------------------------------------

def test_one_key_scheme_built_from_the_spec():
    assert worker_state.key("store", "u", {"b": 1, "a": 2}, "r") == \
        worker_state.key("store", "u", {"a": 2, "b": 1}, "r") == ("store", "u", '{"a": 2, "b": 1}', "r")
    built = []
    for so in ({"x": 1, "y": 2}, {"y": 2, "x": 1}):
        worker_state.get("demo", ("u", so), lambda: built.append(1) or len(built))
    assert built == [1]  # equal specs, one entry


def test_the_store_handles_are_in_the_one_cache_and_forget_drops_them(store):
    a = cached_store(store)
    assert cached_store(store, {}) is a  # no options and empty options: one key
    assert worker_state.stats("store").entries == 1
    worker_state.get("other", ("k",), lambda: "v")
    forget_cached_stores()  # what featurize does after an overwrite
    assert worker_state.stats("store").entries == 0 and cached_store(store) is not a
    assert worker_state.peek("other", ("k",)) == "v"  # other kinds are kept
    worker_state.forget()
    assert worker_state.peek("other", ("k",)) is None


def test_features_stay_within_the_byte_cap(store):
    train = cached_store(store).split_rows("train")
    row = 8 * 4 + 8  # 8 float32 features and an int64 label
    cap = 40 * row
    assert len(train) == 96
    for part in range(3):  # three blocks of 32 rows: only one fits at a time
        rows = train[part * 32:(part + 1) * 32]
        x, y = shards.read_cached(("block", store, part), store, None, rows, cap)
        assert len(x) == 32 and worker_state.stats(shards.FEATURES).nbytes <= cap
        assert worker_state.stats(shards.FEATURES).entries == 1
    big = shards.read_cached(("block", store, "all"), store, None, train, cap)[0]
    assert len(big) == len(train) and worker_state.stats(shards.FEATURES).nbytes <= cap
    assert worker_state.peek(shards.FEATURES, ("block", store, "all")) is None  # too big to keep
