"""`deeptransfer search` end to end on a featurized photo store: OUT is a model directory
that evaluate and predict accept, with the search results beside the model."""
from __future__ import annotations

import json

import pytest

import deeptransfer as dt
from deeptransfer.cli import main
from photos import make_photo_dataset


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tmp_path_factory.mktemp("search_cli")
    data = base / "photos"
    make_photo_dataset(data, bad=False)
    url = str(base / "f.zarr")
    assert main(["featurize", str(data), url, "--split", "train=0.6,val=0.2,test=0.2",
                 "--workers", "0", "--chunk-rows", "16", "--json"]) == 0
    return data, url


def test_search_cli_writes_a_model_directory_and_the_results(store, tmp_path, capsys):
    data, url = store
    out = tmp_path / "best"
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"hidden": [16, 32], "lr": {"log_uniform": [0.001, 0.05]}}))
    assert main(["search", url, str(out), "--trials", "6", "--epochs", "3", "--space", str(space),
                 "--batch-size-per-worker", "4", "--workers", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 6 and summary["rungs"] == 2
    results = json.loads((out / "search_results.json").read_text())
    best = [r for r in results["results"] if r["selected"]][0]
    assert best["trial"] == summary["best_trial"] and summary["selection_reason"]
    assert best["param_hidden"] in (16, 32, None)
    # a normal model directory: its config is the best trial's, evaluate and predict take it
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "deeptransfer.model/1"
    want = results["best"]["train_config"]
    assert cfg["training"]["head"] == want["head"]
    assert cfg["training"]["optimizer"]["lr"] == want["optimizer"]["lr"]
    m = dt.evaluate(str(out), url, split="test", workers=0)
    assert 0.0 <= m["top1"] <= 1.0 and m["n"] > 0
    img = next(p for p in sorted(data.rglob("*")) if p.is_file())
    pred = dt.load(str(out)).predict([str(img)])[0]
    assert pred.error is None and pred.label in cfg["classes"]
    # again into the same folder: it is ours now
    assert main(["search", url, str(out), "--trials", "2", "--epochs", "1", "--no-halving",
                 "--workers", "0", "--json"]) == 0
    assert len(json.loads((out / "search_results.json").read_text())["results"]) == 2


def test_search_cli_user_errors_are_one_line(store, tmp_path, capsys):
    _, url = store
    (tmp_path / "x.txt").write_text("not ours")
    bad_space = tmp_path / "bad.json"
    bad_space.write_text('{"lr": {"gauss": [1, 2]}}')
    for argv, words in [
        (["search", url, str(tmp_path), "--trials", "2"], "is a folder of other files"),
        (["search", url, str(tmp_path / "o"), "--space", str(bad_space)],
         "a distribution is one of"),
        (["search", url, str(tmp_path / "o"), "--sampler", "grid"], "lr is a distribution"),
        (["search", str(tmp_path / "o"), url], "the order is `deeptransfer search STORE OUT`"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "x.txt"]
