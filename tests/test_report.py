"""`deeptransfer report`: the numbers and galleries it computes, and the page it writes."""
from __future__ import annotations

import base64
import html
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

import deeptransfer as dt
from deeptransfer.cli import main
from deeptransfer.engines import get_executor
from deeptransfer.evaluation import metrics
from deeptransfer.report import ReportOptions, collect, render
from deeptransfer.report.data import confident_errors, confused_pairs, softmax
from deeptransfer.report.synthetic import make_synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("rep"), classes=6, per_class=30, dim=32,
                          flip=4, hard=8, noise=0.6, epochs=8)


@pytest.fixture(scope="module")
def page(syn, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("page") / "report.html")
    assert main(["report", syn.model_dir, syn.store, "--out", out, "--workers", "0",
                 "--gallery", "10", "--json"]) == 0
    with open(out, encoding="utf-8") as f:
        return out, f.read()


@pytest.fixture(scope="module")
def data(syn):
    ex = get_executor("local", {"n_workers": 0})
    try:
        return collect(ex, syn.model_dir, syn.store, ReportOptions(gallery=10))
    finally:
        ex.close()


def test_headline_and_per_class_are_evaluate_s(syn, data):
    m = dt.evaluate(syn.model_dir, syn.store, split="test", workers=0)
    assert data.split == "test"
    assert data.per_class == m["per_class"]
    for k in ("n", "top1", "top5", "mean_per_class", "macro_f1"):
        assert data.headline[k] == pytest.approx(m[k]), k
    assert data.headline["loss"] == pytest.approx(m["loss"], rel=1e-5)


def test_galleries_are_ranked_and_capped(syn, data):
    assert len(data.low_margin) == 10 and len(data.top_losses) == len(syn.hard_rows) == 8
    # the hard rows are the mistakes: mistaken for the next class, which the pairs say
    assert {it["row"] for it in data.top_losses} == set(syn.hard_rows)
    c = len(syn.classes)
    assert data.pairs and all(p["pred"] == (p["true"] + 1) % c for p in data.pairs)
    assert sum(p["count"] for p in data.pairs) == 8
    counts = [p["count"] for p in data.pairs]
    assert counts == sorted(counts, reverse=True)
    assert all(it["pred"] != it["label"] for it in data.top_losses)
    losses = [it["loss"] for it in data.top_losses]
    assert losses == sorted(losses, reverse=True)
    margins = [it["margin"] for it in data.low_margin]
    assert margins == sorted(margins)
    # every shown image has a thumbnail: a JPEG no larger than thumb_px
    assert set(data.gallery_rows()) == set(data.thumbs)
    uri = next(iter(data.thumbs.values()))
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert im.format == "JPEG" and max(im.size) <= 96


def test_confused_pairs_count_the_confusion_matrix():
    rng = np.random.default_rng(1)
    c, n = 7, 400
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + np.eye(c)[y] * 1.0
    prob = softmax(logits)
    cm = np.asarray(metrics(y, prob, [str(i) for i in range(c)])["confusion"])
    off = [(int(cm[t, p]), t, p) for t in range(c) for p in range(c) if t != p and cm[t, p]]
    off.sort(key=lambda v: (-v[0], v[1], v[2]))
    got = confused_pairs(y, prob, 5, 3)
    assert [(cnt, t, p) for t, p, cnt, _ in got] == off[:5]
    for t, p, _, members in got:
        assert all(y[m] == t and prob[m].argmax() == p for m in members)
        assert [prob[m, p] for m in members] == sorted((prob[m, p] for m in members),
                                                       reverse=True)


def test_confident_errors_by_hand():
    # thresholds: class 0 mean p0 over rows labelled 0 = (0.9+0.8+0.2)/3 = 0.633...,
    # class 1: (0.7+0.6)/2 = 0.65
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
    suspects, t = confident_errors(y, p)
    assert t == pytest.approx([1.9 / 3, 0.65])
    assert list(suspects) == [2]  # p1 = 0.8 >= 0.65 for a row labelled 0
    # a row labelled 1 whose p0 clears class 0's threshold more than p1 clears its own
    y2 = np.array([0, 0, 1, 1, 1])
    p2 = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.1, 0.9], [0.85, 0.15]])
    s2, _ = confident_errors(y2, p2)
    assert list(s2) == [4]


def test_planted_label_errors_are_suspected(syn, data):
    found = [it["row"] for it in data.label_errors]
    assert data.label_error_count >= len(syn.flipped_rows)
    assert set(syn.flipped_rows) <= set(found)
    assert len(found) == data.label_error_count  # the gallery (10) holds them all here
    assert data.label_error_rows == found
    # out-of-fold: a flipped row's given label is unlikely, its true class (label - 1) likely
    for it in data.label_errors:
        if it["row"] in syn.flipped_rows:
            assert it["pred"] == (it["label"] - 1) % len(syn.classes)
    assert 0.8 < data.oof_accuracy <= 1.0


def test_the_training_curve_is_rounds_jsonl(syn, data):
    with open(f"{syn.model_dir}/rounds.jsonl", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    assert [r["iteration"] for r in data.rounds] == [r["iteration"] for r in recs]
    assert [r["loss"] for r in data.rounds] == [r["loss"] for r in recs]
    assert len(data.epochs) == 8 and all("val_top1" in e for e in data.epochs)
    assert data.rounds[-1]["smoothed"] != data.rounds[-1]["loss"]


def test_the_page_is_self_contained(page, data):
    out, text = page
    assert text.startswith("<!DOCTYPE html>")
    # nothing is fetched: no external scripts, styles or images
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<svg" in text and 'id="training-curve"' in text
    assert text.count('<tr>') >= len(data.classes) + 1
    assert 'data:image/jpeg;base64,' in text
    # no optional files next to the model: no search or curve sections
    assert 'id="search-section"' not in text and 'id="curve-section"' not in text


def test_every_string_from_the_data_is_escaped(data):
    evil = '<script>alert("x")</script>'
    data = type(data)(**{**data.__dict__, "classes": [evil] + data.classes[1:],
                         "per_class": [{**data.per_class[0], "class": evil}]
                         + data.per_class[1:],
                         "model_dir": '"><img src=x onerror=alert(1)>'})
    data.top_losses = [{**it, "path": '"/><b>p</b>'} for it in data.top_losses]
    text = render(data)
    assert evil not in text and "onerror=alert(1)>" not in text and '"/><b>p</b>' not in text
    assert html.escape(evil) in text


def _search_file(path):
    trials = [{"trial": i, "params": {"head": "mlp" if i % 2 else "softmax", "lr": 10 ** -i,
                                      "hidden": [64] if i % 2 else []},
               "score": 0.5 + i / 20, "rung_scores": [0.4, 0.5 + i / 20], "seconds": 1.5}
              for i in range(5)]
    path.write_text(json.dumps({"results": trials, "best": {"head": "mlp", "lr": 1e-4}}))


def _curve_file(path):
    pts = [{"per_class": n, "train_mean": 1.0, "train_std": 0.0, "val_mean": 0.5 + n / 100,
            "val_std": 0.02, "repeats": 3} for n in (5, 10, 20)]
    path.write_text(json.dumps({"metric": "top1", "points": pts}))


def test_search_and_curve_sections_from_their_files(syn, tmp_path):
    _search_file(tmp_path / "s.json")
    _curve_file(tmp_path / "c.json")
    out = str(tmp_path / "r.html")
    assert main(["report", syn.model_dir, syn.store, "--out", out, "--workers", "0",
                 "--folds", "0", "--search", str(tmp_path / "s.json"),
                 "--curve", str(tmp_path / "c.json"), "--json"]) == 0
    text = open(out, encoding="utf-8").read()
    assert 'id="search-section"' in text and 'id="curve-section"' in text
    assert 'id="label-errors-section"' not in text  # --folds 0
    search = text.split('<table id="search"', 1)[1].split("</table>", 1)[0]
    assert search.count("<tr>") == 1 + 5
    # best score first; nested params flattened into columns
    assert 'scope="col">lr</th>' in search and 'scope="col">head</th>' in search
    scores = re.findall(r'<td class="n" data-v="([0-9.]+)">0\.[0-9]{3}</td>', search)
    assert scores and float(scores[0]) == pytest.approx(0.7)
    curve = text.split('<table id="curve"', 1)[1].split("</table>", 1)[0]
    assert curve.count("<tr>") == 1 + 3


def test_the_default_files_next_to_the_model_are_picked_up(syn, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(syn.model_dir, model)
    (model / "search").mkdir()
    (model / "curve").mkdir()
    _search_file(model / "search" / "results.json")
    _curve_file(model / "curve" / "curve.json")
    out = str(tmp_path / "r.html")
    assert main(["report", str(model), syn.store, "--out", out, "--workers", "0",
                 "--folds", "0", "--json"]) == 0
    text = open(out, encoding="utf-8").read()
    assert 'id="search-section"' in text and 'id="curve-section"' in text


def test_user_errors_are_one_line(syn, tmp_path, capsys):
    other = tmp_path / "notes.html"
    other.write_text("<p>mine</p>")
    assert main(["report", syn.model_dir, syn.store, "--out", str(other), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "never overwritten" in err
    assert other.read_text() == "<p>mine</p>"
    assert main(["report", syn.model_dir, syn.store, "--out", str(tmp_path / "r.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["report", syn.model_dir, syn.store, "--out", str(tmp_path / "r.html"),
                 "--search", str(tmp_path / "missing.json"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing.json" in err
    assert not (tmp_path / "r.html").exists()
    assert main(["report", syn.model_dir, syn.store, "--out", str(tmp_path / "r.html"),
                 "--folds", "1"]) == 2
    assert "--folds" in capsys.readouterr().err


def test_dt_report_is_the_api_even_once_the_package_is_imported(syn, tmp_path):
    import deeptransfer.report.data  # noqa: F401 - binds deeptransfer.report to the package

    out = tmp_path / "api.html"
    data = dt.report(syn.model_dir, syn.store, str(out), workers=0, folds=0, gallery=3)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert data.label_errors is None and len(data.low_margin) == 3
    with pytest.raises(dt.InvalidParameterError, match="Unknown report option 'galery'"):
        dt.report(syn.model_dir, syn.store, str(out), galery=3)


def test_a_report_is_rewritten_in_place(syn, page, tmp_path):
    out, _ = page
    assert main(["report", syn.model_dir, syn.store, "--out", out, "--workers", "0",
                 "--folds", "0", "--json"]) == 0


def test_the_fold_refits_are_engine_tasks_with_the_same_result_in_worker_processes(syn):
    """Out-of-fold refits in two spawned worker processes give the in-process probabilities
    (each refit is a function of its task: seed, fold, the store)."""
    from deeptransfer.report.data import out_of_fold

    head = {"kind": "softmax"}
    results = []
    for n in (0, 2):
        ex = get_executor("local", {"n_workers": n})
        try:
            results.append(out_of_fold(ex, syn.store, head, folds=3, epochs=5, lr=0.01, seed=2))
        finally:
            ex.close()
    (r0, y0, p0), (r2, y2, p2) = results
    assert np.array_equal(r0, r2) and np.array_equal(y0, y2)
    assert np.array_equal(p0, p2)
    assert p0.shape == (len(r0), 6) and np.allclose(p0.sum(axis=1), 1, atol=1e-5)
