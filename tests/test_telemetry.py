"""train --log tensorboard=DIR / --log mlflow: the sinks get rounds.jsonl's records."""
from __future__ import annotations

import json
import math
from functools import reduce

import numpy as np
import pytest

import deeptransfer as dt
from deeptransfer.cli import main
from deeptransfer.engines import get_executor
from deeptransfer.report.synthetic import make_synthetic
from deeptransfer.training import telemetry
from deeptransfer.training.averaging import average, combine, fit_shard, round_stats
from deeptransfer.training.run import TrainRun


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("tel"), classes=4, per_class=15, dim=16,
                          flip=0, train=False).store


@pytest.fixture
def executor():
    ex = get_executor("local", {"n_workers": 0})
    yield ex
    ex.close()


def _config(**kw):
    opts = dict(workers=2, epochs=3, optimizer="adam", lr=0.01, seed=1,
                batch_size_per_worker=8, averaging_frequency=2)
    return dt.train_config(**{**opts, **kw})


def _rounds(model_dir):
    with open(f"{model_dir}/rounds.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_round_stats_against_the_workers_own_parameters(store, tmp_path):
    run = TrainRun(store, _config(head="mlp", hidden=(8,)), str(tmp_path / "m"), workers=2,
                   plot=False)
    try:
        plan = run.plan_round()
        parts = [fit_shard(t, plan.shared) for t in plan.tasks]
        res = reduce(combine, parts)
        new, _ = average(res)
        stats = round_stats(plan.shared.params, new, res)
    finally:
        run.close()
    floats = [k for k, v in new.items() if v.dtype.kind == "f"]
    assert sorted(stats["update_ratio"]) == sorted(stats["divergence"]) == sorted(floats)
    for k in floats:
        old = np.asarray(plan.shared.params[k], np.float64)
        want = np.abs(new[k].astype(np.float64) - old).mean() / np.abs(old).mean() \
            if np.abs(old).mean() > 0 else 0.0
        assert stats["update_ratio"][k] == pytest.approx(want, rel=1e-6), k
        w = np.stack([np.asarray(p.params[k], np.float64) for p in parts])
        mean = w.mean(axis=0)
        spread = np.mean([np.square(x - mean).sum() for x in w])
        assert stats["divergence"][k] == pytest.approx(
            math.sqrt(spread) / np.linalg.norm(mean), rel=1e-5, abs=1e-9), k
    assert max(stats["divergence"].values()) > 0  # two workers on different rows differ
    one = round_stats(plan.shared.params, parts[0].params, parts[0])
    assert all(v == 0 for v in one["divergence"].values())  # one worker: no divergence


def test_tensorboard_event_file_holds_rounds_jsonl(store, executor, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, tb = str(tmp_path / "m"), str(tmp_path / "tb")
    res = dt.train(store, model, engine=executor, config=_config(), progress=False,
                   log=[f"tensorboard={tb}"])
    recs = _rounds(model)
    ea = EventAccumulator(tb, size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for field, tag in telemetry.ROUND_SCALARS.items():
        ev = ea.Scalars(tag)
        assert [e.step for e in ev] == [r["iteration"] for r in recs], tag
        assert [e.value for e in ev] == pytest.approx([r[field] for r in recs], rel=1e-6), tag
    params = json.load(open(f"{model}/config.json"))["param_order"]
    for p in params:
        assert f"update_ratio/{p}" in tags and f"divergence/{p}" in tags
        assert len(ea.Scalars(f"divergence/{p}")) == len(recs)
    val = ea.Scalars("val/top1")
    assert [e.step for e in val] == [h["iteration"] for h in res.history]
    assert [e.value for e in val] == pytest.approx([h["val_top1"] for h in res.history])
    assert len(res.history) == 3


def test_mlflow_file_store_holds_params_metrics_and_the_model(store, executor, tmp_path,
                                                              monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default: a file store in ./mlruns
    model = str(tmp_path / "m")
    res = dt.train(store, model, engine=executor, config=_config(), progress=False,
                   log=["mlflow"])
    recs = _rounds(model)
    client = MlflowClient(tracking_uri=f"file://{tmp_path / 'mlruns'}")
    exp = client.get_experiment_by_name("deeptransfer")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "m"
    p = run.data.params
    assert p["optimizer.name"] == "adam" and float(p["optimizer.lr"]) == 0.01
    assert p["epochs"] == "3" and p["head.kind"] == "softmax"
    for field, tag in telemetry.ROUND_SCALARS.items():
        hist = sorted(client.get_metric_history(run.info.run_id, tag.replace("/", ".")),
                      key=lambda m: m.step)
        assert [m.step for m in hist] == [r["global_round"] for r in recs]
        assert [m.value for m in hist] == [r[field] for r in recs], tag  # float64: exact
    for field in ("val_top1", "val_loss", "train_loss"):
        tag = telemetry.EPOCH_SCALARS[field].replace("/", ".")
        hist = sorted(client.get_metric_history(run.info.run_id, tag), key=lambda m: m.step)
        assert [m.step for m in hist] == [0, 1, 2]
        assert [m.value for m in hist] == [h[field] for h in res.history]
    names = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"config.json", "head.safetensors", "rounds.jsonl"} <= names
    assert "checkpoint.safetensors" not in names


def test_both_sinks_at_once_and_a_resumed_run_sends_only_new_epochs(store, executor, tmp_path,
                                                                    monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow import MlflowClient

    uri = f"file://{tmp_path / 'ml'}"
    model = str(tmp_path / "m")
    dt.train(store, model, engine=executor, config=_config(), progress=False,
             log=[f"tensorboard={tmp_path / 'tb'}", f"mlflow={uri}"])
    res = dt.train(store, model, engine=executor, config=_config(epochs=5), progress=False,
                   log=[f"mlflow={uri}"])
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("deeptransfer")
    first, second = sorted(client.search_runs([exp.experiment_id]),
                           key=lambda r: r.info.start_time)
    h2 = client.get_metric_history(second.info.run_id, "val.top1")
    assert sorted(m.step for m in h2) == [3, 4]  # the resumed run's own epochs
    assert sorted(m.value for m in h2) == sorted(h["val_top1"] for h in res.history[3:])
    assert len(client.get_metric_history(first.info.run_id, "val.top1")) == 3


def test_log_errors_are_one_line_before_training(store, tmp_path, capsys, monkeypatch):
    model = tmp_path / "m"
    assert main(["train", store, str(model), "--log", "wandb", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--log" in err
    assert main(["train", store, str(model), "--log", "tensorboard", "--workers", "1"]) == 2
    assert "tensorboard=DIR" in capsys.readouterr().err
    monkeypatch.setattr(telemetry, "_importable", lambda name: False)
    assert main(["train", store, str(model), "--log", "mlflow", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'deeptransfer[mlflow]'" in err and len(err.strip().splitlines()) == 1
    assert not (model / "rounds.jsonl").exists()
