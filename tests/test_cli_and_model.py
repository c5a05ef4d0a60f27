"""The CLI end to end (featurize -> info -> train -> evaluate -> predict -> export) and the saved model."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import deeptransfer as dt
from deeptransfer.cli import main
from photos import make_photo_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One featurize + train through the CLI, shared by the checks below."""
    base = tmp_path_factory.mktemp("cli")
    data = base / "photos"
    make_photo_dataset(data)
    store, model = str(base / "f.zarr"), str(base / "model")
    assert main(["featurize", str(data), store, "--split", "train=0.6,val=0.2,test=0.2",
                 "--workers", "0", "--chunk-rows", "16", "--json"]) == 0
    assert main(["train", store, model, "--workers", "2", "--epochs", "15", "--optimizer", "adam",
                 "--lr", "0.01", "--averaging-frequency", "2", "--batch-size-per-worker", "4",
                 "--json"]) == 0
    return data, store, model


def test_featurize_summary_and_info(run, capsys):
    data, store, _ = run
    assert main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 29 and info["featurized"] == 24 and info["skipped"] == 5
    assert info["feature_dim"] == 1280 and info["classes"] == 3
    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "truncated.jpg" in out and "bomb" in out


def test_train_writes_the_model_directory(run):
    _, _, model = run
    cfg = json.loads(open(f"{model}/config.json").read())
    assert cfg["format"] == "deeptransfer.model/1"
    assert cfg["backbone"]["name"] == "efficientnet_lite0" and cfg["classes"] == ["cat", "coffee", "scene"]
    assert cfg["training"]["optimizer"]["name"] == "adam" and cfg["training"]["workers"] == 2
    lines = open(f"{model}/rounds.jsonl").read().splitlines()
    assert len(lines) == cfg["metrics"]["rounds"] >= 2  # one line per averaging round
    assert {"loss", "compute_seconds", "overhead_seconds"} <= set(json.loads(lines[0]))
    assert open(f"{model}/training.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_json(run, capsys, tmp_path):
    _, store, model = run
    assert main(["evaluate", model, store, "--split", "test", "--json", "--workers", "0",
                 "--report", str(tmp_path / "rep")]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {"top1", "top3", "top_k", "mean_per_class", "n"} <= set(m)  # 3 classes: top3
    assert m["n"] == dt.info(store)["splits"]["test"] > 0 and 0 <= m["top1"] <= m["top3"] <= 1
    assert (tmp_path / "rep" / "confusion.png").exists()
    assert "mean_per_class" in (tmp_path / "rep" / "metrics.json").read_text()


def test_a_batch_norm_head_saves_and_loads(run, tmp_path):
    """Every head kind round-trips through the model directory: batch norm's 0-d
    ``num_batches_tracked`` must stay 0-d (a (1,) copy made the directory unloadable)."""
    data, store, _ = run
    model = str(tmp_path / "bn")
    assert main(["train", store, model, "--workers", "1", "--epochs", "2", "--head", "mlp",
                 "--hidden", "16", "--batch-norm", "--json"]) == 0
    loaded = dt.load(model)
    counters = [k for k in loaded.params if k.endswith("num_batches_tracked")]
    assert counters and all(loaded.params[k].shape == () for k in counters), \
        {k: loaded.params[k].shape for k in counters}
    preds = [p for p in loaded.predict(sorted(str(p) for p in (data / "cat").iterdir()))
             if p.error is None]  # the folder holds bad files too
    assert preds and all(p.label in loaded.classes for p in preds)
    assert 0 <= dt.evaluate(model, store, split="test", workers=0)["top1"] <= 1


def test_predict_real_photos_and_bad_files(run, capsys):
    data, _, model = run
    m = dt.load(model)
    preds = m.predict([str(data / "coffee" / "coffee_0.jpg"), str(data / "cat" / "cat_0.jpg"),
                       str(data / "cat" / "truncated.jpg")], top_k=2)
    assert preds[0].label == "coffee" and preds[1].label == "cat"
    assert len(preds[0].top_k) == 2 and preds[0].score > 0.5
    assert preds[2].label is None and "JPEG" in preds[2].error
    assert main(["predict", model, str(data / "coffee" / "coffee_0.jpg"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] == "coffee"


def test_predict_matches_the_stored_features(run):
    """Prediction goes through the featurize path: same features as the store's row."""
    _, store, model = run
    m = dt.load(model)
    from deeptransfer.store import open_store

    st = open_store(store)
    row = int(np.flatnonzero(st["ok"][:])[0])
    x, _ = st.read_rows(np.array([row]))
    expected = m.predict_proba_features(x)[0]
    got = dict(m.predict([str(st["paths"][row])], top_k=3)[0].top_k)
    for c, p in got.items():
        assert p == pytest.approx(expected[m.classes.index(c)], abs=1e-5)


def test_torchscript_export_matches_the_pipeline(run, tmp_path):
    _, _, model = run
    m = dt.load(model)
    path = m.export(tmp_path / "model.pt")
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), m.pipeline_module()(x).numpy(), atol=1e-5)
    meta = json.loads((tmp_path / "model.pt.json").read_text())
    assert meta["classes"] == m.classes and meta["preprocess"]["crop"] == 224



def test_exported_pipeline_sees_the_views_predict_sees(run, tmp_path):
    # a center+flip model exported for serving must average the same two views as
    # TransferModel.predict (one definition of a view: featurization.view_features)
    from PIL import Image

    from deeptransfer.kernels import reference_preprocess
    from model_dirs import copy_with_views

    data, _, model = run
    flip = dt.load(copy_with_views(model, tmp_path / "flip-model", "center+flip"))
    center = dt.load(model)
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    preds = [p for p in flip.predict(paths, top_k=3) if p.error is None][:3]
    pp = flip.preprocess
    x = np.stack([reference_preprocess(np.asarray(Image.open(p.path).convert("RGB")),
                                       resize=pp.resize, crop=pp.crop, mean=pp.mean, std=pp.std)
                  for p in preds])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    loaded = torch.jit.load(str(flip.export(tmp_path / "flip.pt")))
    with torch.inference_mode():
        served, center_probs = loaded(x).numpy(), center.pipeline_module()(x).numpy()
    # in log space: the head is confident, so the views move the small probabilities
    # (predict preprocesses with the numba kernels, this check with PIL: ~1e-3 apart)
    for i, p in enumerate(preds):
        for c, prob in p.top_k:
            assert np.log(served[i, flip.classes.index(c)]) == pytest.approx(np.log(prob), abs=5e-3)
    assert np.abs(np.log(served) - np.log(center_probs)).max() > 2e-2, \
        "views must matter for this check"

def test_user_errors_are_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deeptransfer", "featurize", str(tmp_path / "nope"),
                        str(tmp_path / "s.zarr")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a folder" in r.stderr
    r = subprocess.run([sys.executable, "-m", "deeptransfer", "evaluate", str(tmp_path),
                        str(tmp_path / "s.zarr")], capture_output=True, text=True)
    assert r.returncode == 2 and "not a deeptransfer model directory" in r.stderr
    r = subprocess.run([sys.executable, "-m", "deeptransfer", "featurize", str(tmp_path),
                        str(tmp_path / "s.zarr"), "--engine", "nosuch"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Unknown engine" in r.stderr


def test_unknown_training_option_is_refused():
    with pytest.raises(dt.InvalidParameterError, match="Unknown training option 'learning_rate'"):
        dt.train_config(learning_rate=0.1)
    cfg = dt.train_config(head="mlp", hidden=[64], optimizer="sgd", lr=0.5, epochs=3)
    assert cfg.head.hidden == (64,) and cfg.optimizer.lr == 0.5 and cfg.epochs == 3


def test_models_and_spark_entry(capsys):
    assert main(["models", "vgg*"]) == 0
    assert "fc2:4096" in capsys.readouterr().out
    assert main(["spark-entry"]) == 0
    assert capsys.readouterr().out.strip().endswith("spark_submit.py")


def test_api_functions_survive_importing_the_core_modules():
    import deeptransfer.evaluation  # noqa: F401
    import deeptransfer.featurization  # noqa: F401
    import deeptransfer.training.loop  # noqa: F401

    assert callable(dt.train) and callable(dt.evaluate) and callable(dt.featurize)
    assert dt.train.__module__ == "deeptransfer.api"
