"""Every path argument of the API takes a pathlib.Path as well as a str (as open(), numpy and
torch do): featurize into a Path store once failed with a TypeError deep in the store checks."""
from __future__ import annotations

import json
from pathlib import Path

import deeptransfer as dt
from deeptransfer.pathargs import accepts_paths, fspath
from deeptransfer.testing.source_checks import make_images


def test_fspath_and_the_decorator():
    assert fspath(Path("/a/b")) == "/a/b" and fspath("s3://x/y") == "s3://x/y"
    assert fspath([Path("a"), "b"]) == ["a", "b"] and fspath(None) is None

    @accepts_paths("x")
    def f(x, *, y=None):
        return x, y

    assert f(Path("p"), y=Path("q")) == ("p", Path("q"))  # only the named arguments


def test_jobs_take_path_objects(tmp_path: Path):
    photos = Path(make_images(tmp_path / "photos"))
    store, model, report = tmp_path / "f.zarr", tmp_path / "model", tmp_path / "eval"
    rep = dt.featurize(photos, store, chunk_rows=8, batch_size=4, progress=False,
                       split="train=0.5,val=0.25,test=0.25", engine="local", workers=0,
                       backend="torch")
    assert rep.featurized == 14
    assert dt.info(store)["rows"] == 15
    dt.train(store, model, workers=1, epochs=2, progress=False)
    m = dt.evaluate(model, store, split="test", workers=1, report_dir=report)
    assert json.loads((report / "metrics.json").read_text())["n"] == m["n"]
    preds = dt.load(model).predict([photos / "a" / "img_0.jpg"])
    assert preds[0].error is None and preds[0].label in ("a", "b", "c2", "c10")
    x, y = dt.open_features(store, split="train").numpy()[:2]
    assert len(x) == len(y) > 0
