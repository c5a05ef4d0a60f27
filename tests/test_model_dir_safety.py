"""Model directories: train never touches a user's files, every file keeps the umask, read-only
commands write nothing, and damage, divergence, a full disk or a changed setting are one line.

Training runs in this process (the serial executor of the training tests) on synthetic
feature stores; the read-only checks use one real featurized store and model.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from deeptransfer import jsonutil
import deeptransfer as dt
from deeptransfer.cli import main
from deeptransfer.dataset import Manifest
from deeptransfer.errors import InvalidParameterError, StoreError
from deeptransfer.models import ModelSpec, Preprocess
from deeptransfer.store import create_store
from deeptransfer.training import HeadConfig, OptimizerConfig, load_checkpoint, train_head
from deeptransfer.training import loop as loop_mod
from deeptransfer.training import run as run_mod
from deeptransfer.training import shards
from test_train import SerialExecutor, assert_params_equal, cfg  # the training tests' tools

PRE = Preprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).to_dict()


def model_store(path, *, n_train=96, n_val=32, n_test=32, n_classes=3, dim=8, seed=0) -> str:
    """A complete store of separable Gaussian blobs, with the attributes a saved model needs."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    labels = rng.integers(0, n_classes, n).astype(np.int32)
    split = np.array([0] * n_train + [1] * n_val + [2] * n_test, dtype=np.int8)
    rng.shuffle(split)
    centers = rng.normal(0, 2.0, (n_classes, dim))
    x = (centers[labels] + rng.normal(0, 1, (n, dim))).astype(np.float32)
    m = Manifest(str(path), [f"c{labels[i]}/img{i}.jpg" for i in range(n)], labels, split,
                 [f"class{c}" for c in range(n_classes)])
    st = create_store(str(path), m, feature_dim=dim, chunk_rows=64,
                      attrs={"model": ModelSpec().to_dict(), "preprocess": PRE})
    for i in range(st.n_chunks):
        a, b = st.chunk_bounds(i)
        st.write_chunk(i, x[a:b], np.ones(b - a, bool), [""] * (b - a))
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return model_store(tmp_path_factory.mktemp("blobs") / "features.zarr")


@pytest.fixture(autouse=True)
def _fresh_caches():
    shards.clear_caches()
    yield


def train(store_url, out, config=None, **kw):
    kw.setdefault("progress", False)
    return dt.train(store_url, str(out), engine=SerialExecutor(1), config=config or cfg(), **kw)


def snapshot(*roots) -> dict[str, tuple]:
    """Every entry under the roots: kind, size, mtime_ns and content digest (folders too: a
    file made and removed again changes its folder's mtime)."""
    out: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        for p in [root, *sorted(root.rglob("*"))]:
            s = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p)] = (stat.S_IFMT(s.st_mode), s.st_size, s.st_mtime_ns, digest)
    return out


def user_folder(path: Path) -> Path:
    """A folder of somebody's own files, one of them named like a file train writes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "holiday.jpg").write_bytes(b"\xff\xd8 not really a photo")
    (path / "rounds.jsonl").write_text("my own notes\n")
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("keep me")
    return path


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------
# item 1: train writes only into a new or empty folder or a model directory


@pytest.mark.parametrize("resume", [True, False])
def test_train_refuses_a_folder_of_other_files_and_leaves_it_alone(store, tmp_path, resume):
    d = user_folder(tmp_path / "mine")
    before = snapshot(d)
    with pytest.raises(StoreError, match="not a deeptransfer model directory.*another folder"):
        train(store, d, resume=resume)
    with pytest.raises(StoreError, match="not a deeptransfer model directory"):
        train_head(SerialExecutor(1), store, cfg(), str(d), resume=resume, progress=False)
    assert snapshot(d) == before


def test_cli_train_refuses_other_files_in_one_line_before_any_engine(store, tmp_path, capsys):
    d = user_folder(tmp_path / "mine")
    before = snapshot(d)
    err = one_line_error(capsys, ["train", store, str(d), "--no-resume", "--workers", "2"])
    assert "MODEL_DIR" in err and "holiday.jpg" in err and "dashboard" not in err
    assert snapshot(d) == before


def test_train_refuses_a_file_the_store_and_folders_around_it(store, tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("a file")
    with pytest.raises(InvalidParameterError, match="is an existing file"):
        train(store, f)
    assert f.read_text() == "a file"
    before = snapshot(store)
    for inside in (store, os.path.join(store, "features"), os.path.join(store, "new", "m")):
        with pytest.raises(InvalidParameterError, match="inside the feature store"):
            train(store, inside)
    assert snapshot(store) == before
    outer = tmp_path / "outer"
    inner = model_store(outer / "f.zarr", n_train=16, n_val=0, n_test=0)
    with pytest.raises(InvalidParameterError, match="store .* is inside MODEL_DIR"):
        train(inner, outer)
    assert sorted(os.listdir(outer)) == ["f.zarr"]


def test_a_run_folder_with_only_its_checkpoint_resumes(store, tmp_path):
    whole = train_head(SerialExecutor(1), store, cfg(), str(tmp_path / "whole"), progress=False,
                       plot=False)

    def kill(record):
        if record["global_round"] == 3:
            raise KeyboardInterrupt

    d = tmp_path / "half"
    with pytest.raises(KeyboardInterrupt):
        train_head(SerialExecutor(1), store, cfg(), str(d), progress=False, plot=False,
                   callback=kill)
    os.remove(d / "rounds.jsonl")  # the checkpoint alone marks the folder as a run of ours
    assert os.listdir(d) == ["checkpoint.safetensors"]
    res = train(store, d)
    assert_params_equal(res.params, whole.params)
    assert dt.load(str(d)).classes == whole.classes


def test_no_resume_removes_only_the_files_a_run_writes(store, tmp_path):
    d = tmp_path / "m"
    train(store, d)
    assert {"config.json", "head.safetensors", "checkpoint.safetensors", "rounds.jsonl",
            "val_metrics.json", "training.png"} <= set(os.listdir(d))
    (d / "my_notes.txt").write_text("mine")
    (d / "runs").mkdir()
    (d / "runs" / "old.jsonl").write_text("mine too")
    (d / "rounds.jsonl.bak").write_text("a copy I made")
    stale = d / f".checkpoint{'.tmp-'}999999-abcd1234.safetensors"  # a killed writer's temp file
    stale.write_bytes(b"half")
    mine = snapshot(d / "runs", d / "my_notes.txt", d / "rounds.jsonl.bak")
    res = train(store, d, config=cfg(seed=11, epochs=1), resume=False)
    assert not res.reused and not stale.exists()
    assert snapshot(d / "runs", d / "my_notes.txt", d / "rounds.jsonl.bak") == mine
    assert len((d / "rounds.jsonl").read_text().splitlines()) == res.rounds


def test_an_empty_folder_becomes_a_model_directory(store, tmp_path):
    (tmp_path / "empty").mkdir()
    train(store, tmp_path / "empty", config=cfg(epochs=1))
    assert dt.load(str(tmp_path / "empty")).feature_dim == 8


# ---------------------------------------------------------------------------------------------
# item 2: every file keeps the umask (the weights were 0600)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_written_file_has_the_umask_mode(store, tmp_path, umask):
    old = os.umask(umask)
    try:
        d, rep = tmp_path / "m", tmp_path / "report"
        train(store, d, config=cfg(epochs=1))
        dt.evaluate(str(d), store, split="test", engine=SerialExecutor(1), report_dir=str(rep))
        (tmp_path / "plain").write_text("x")
        plain = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    finally:
        os.umask(old)
    assert plain == 0o666 & ~umask
    files = sorted([*d.iterdir(), *rep.iterdir()])
    assert {"head.safetensors", "checkpoint.safetensors", "config.json", "confusion.png"} <= \
        {p.name for p in files}
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(plain)}, modes


# ---------------------------------------------------------------------------------------------
# item 14: evaluate, predict, info, export and load write nothing into a model or a store


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from photos import make_photo_dataset

    base = tmp_path_factory.mktemp("real")
    make_photo_dataset(base / "photos")
    store_url, model = str(base / "f.zarr"), str(base / "model")
    assert main(["featurize", str(base / "photos"), store_url, "--split",
                 "train=0.6,val=0.2,test=0.2", "--workers", "0", "--chunk-rows", "16",
                 "--json"]) == 0
    dt.train(store_url, model, engine=SerialExecutor(2), progress=False, epochs=2,
             optimizer="adam", lr=0.01, batch_size_per_worker=4, averaging_frequency=2)
    return base, store_url, model


def test_read_only_commands_write_nothing_into_the_model_or_the_store(real, tmp_path, capsys):
    base, store_url, model = real
    img = str(base / "photos" / "cat" / "cat_0.jpg")
    before = snapshot(model, store_url)
    for argv in (["evaluate", model, store_url, "--workers", "0", "--json"],
                 ["evaluate", model, store_url, "--workers", "0", "--split", "val",
                  "--report", str(tmp_path / "rep")],
                 ["predict", model, img, "--json"],
                 ["info", store_url, "--json"],
                 ["export", model, str(tmp_path / "m.pt")]):
        assert main(argv) == 0, argv
        assert snapshot(model, store_url) == before, argv
    capsys.readouterr()
    m = dt.load(model)
    assert m.predict([img])[0].error is None
    dt.evaluate(model, store_url, split="test", engine=SerialExecutor(1))
    assert snapshot(model, store_url) == before
    cfg_json = json.loads(Path(model, "config.json").read_text())
    assert set(cfg_json["metrics"]) == {"validation", "best", "rounds", "stopped_early"}
    assert (tmp_path / "rep" / "confusion.png").exists()


# ---------------------------------------------------------------------------------------------
# evaluate's --report folder


def test_report_folder_rules(store, tmp_path, capsys):
    d = tmp_path / "m"
    train(store, d, config=cfg(epochs=1))
    ev = dict(split="test", engine=SerialExecutor(1))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.txt").write_text("my thesis")
    with pytest.raises(InvalidParameterError, match=r"--report.*report.txt.*did not write"):
        dt.evaluate(str(d), store, report_dir=str(theirs), **ev)
    assert os.listdir(theirs) == ["report.txt"]
    assert (theirs / "report.txt").read_text() == "my thesis"
    for inside in (d, d / "rep", Path(store) / "rep"):
        with pytest.raises(InvalidParameterError, match="evaluate never writes there"):
            dt.evaluate(str(d), store, report_dir=str(inside), **ev)
    assert not (d / "rep").exists() and not (Path(store) / "rep").exists()
    # a new folder, then the same folder again (an earlier report is replaced), others kept
    rep = tmp_path / "rep"
    dt.evaluate(str(d), store, report_dir=str(rep), **ev)
    (rep / "keep.txt").write_text("mine")
    dt.evaluate(str(d), store, report_dir=str(rep), **{**ev, "split": "val"})
    assert json.loads((rep / "metrics.json").read_text())["n"] == 32
    assert (rep / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(rep)) == ["confusion.png", "keep.txt", "metrics.json", "report.txt"]


# ---------------------------------------------------------------------------------------------
# item 10 (model side): a damaged model or checkpoint is one line naming the file


@pytest.fixture()
def model_dir(store, tmp_path):
    d = tmp_path / "m"
    train(store, d, config=cfg(epochs=1))
    return d


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "head.safetensors").write_bytes((d / "head.safetensors").read_bytes()[:-40]),
     r"head.safetensors cannot be loaded"),
    (lambda d: os.remove(d / "head.safetensors"), r"head.safetensors is missing"),
    (lambda d: (d / "config.json").write_text('{"format": "deeptransfer.model/1", "classes": '),
     r"config.json cannot be read as JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "classes"})),
     r"config.json has no 'classes' entry"),
])
def test_a_damaged_model_is_one_line_naming_the_file(model_dir, capsys, damage, match):
    damage(model_dir)
    with pytest.raises(StoreError, match=match + r".*damaged.*deeptransfer train"):
        dt.load(str(model_dir))
    err = one_line_error(capsys, ["predict", str(model_dir), "x.jpg"])
    assert "deeptransfer predict: error:" in err


@pytest.mark.parametrize("damage", ["truncated", "garbage_header"])
def test_a_damaged_checkpoint_says_use_no_resume(store, model_dir, capsys, damage):
    ck = model_dir / "checkpoint.safetensors"
    raw = ck.read_bytes()
    ck.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x07" * 64 + raw[64:])
    with pytest.raises(StoreError, match=r"checkpoint.safetensors is damaged.*--no-resume"):
        train(store, model_dir, config=cfg(epochs=1))
    err = one_line_error(capsys, ["train", store, str(model_dir), "--workers", "1"])
    assert "--no-resume" in err
    res = train(store, model_dir, config=cfg(epochs=1), resume=False)
    assert res.rounds > 0 and load_checkpoint(str(ck))[0]["done"]


# ---------------------------------------------------------------------------------------------
# item 11 (training side): non-finite rounds stop training and are never saved




def _assert_last_good_checkpoint(d: Path, rounds: int) -> None:
    meta, params, opt, best = load_checkpoint(str(d / "checkpoint.safetensors"))
    assert meta["global_round"] == rounds and not meta["done"]
    for arrays in (params, opt or {}, best or {}):
        assert all(np.isfinite(v).all() for v in arrays.values())
    lines = (d / "rounds.jsonl").read_text().splitlines() if rounds else []
    assert [jsonutil.loads(ln)["global_round"] for ln in lines] == list(range(rounds))
    assert not (d / "head.safetensors").exists() and not (d / "config.json").exists()


def test_a_learning_rate_that_blows_up_stops_with_a_clear_error(store, tmp_path):
    d = tmp_path / "m"
    c = cfg(head=HeadConfig("mlp", hidden=(8,)),
            optimizer=OptimizerConfig("sgd", lr=1e3, momentum=0.9))
    msg = r"diverged in epoch 0, round \d+ .*4 rounds an epoch, 2 epochs.*NaN or infinite.*lower.*--lr 100\b"
    with pytest.raises(InvalidParameterError, match=msg) as e:
        train(store, d, config=c)
    good = load_checkpoint(str(d / "checkpoint.safetensors"))[0]["global_round"]
    assert f"({good} rounds)" in str(e.value)
    _assert_last_good_checkpoint(d, good)
    with pytest.raises(InvalidParameterError, match=msg):  # the checkpoint resumes (and diverges)
        train(store, d, config=c)
    _assert_last_good_checkpoint(d, good)
    res = train(store, d, config=cfg(head=HeadConfig("mlp", hidden=(8,))), resume=False)
    assert all(np.isfinite(v).all() for v in dt.load(str(d)).params.values()) and res.rounds == 8


def test_a_diverging_cli_run_is_one_line(store, tmp_path, capsys):
    d = tmp_path / "m"
    err = one_line_error(capsys, ["train", store, str(d), "--workers", "1", "--head", "mlp",
                                  "--hidden", "8", "--optimizer", "sgd", "--lr", "1000",
                                  "--momentum", "0.9", "--batch-size-per-worker", "8",
                                  "--averaging-frequency", "3", "--seed", "3", "--json"])
    assert "Training diverged in epoch" in err and "(--lr 100)" in err
    assert not (d / "head.safetensors").exists()


@pytest.mark.parametrize("where", ["params", "opt_state", "loss"])
def test_a_non_finite_round_is_never_saved(store, tmp_path, monkeypatch, where):
    real_average = run_mod.average
    calls = {"n": 0}

    def poisoned(res):
        calls["n"] += 1
        if calls["n"] == 3:  # the third round
            if where == "loss":
                res.loss_sum = float("inf")
            params, state = real_average(res)
            target = params if where == "params" else state
            if where != "loss":
                k = next(iter(target))
                target[k] = np.full_like(target[k], np.nan)
            return params, state
        return real_average(res)

    monkeypatch.setattr(run_mod, "average", poisoned)
    d = tmp_path / "m"
    c = cfg(optimizer=OptimizerConfig("sgd", lr=0.1, momentum=0.9))
    with pytest.raises(InvalidParameterError, match=r"diverged in epoch 0, round 2 \("):
        train(store, d, config=c)
    _assert_last_good_checkpoint(d, 2)


# ---------------------------------------------------------------------------------------------
# item 13 (training side): a full disk is one line naming the path, the checkpoint stays good


@pytest.fixture()
def disk_full(monkeypatch):
    """``fill(name, at)``: the ``at``-th write (from 1) to a file named ``name`` (or a temp file
    of it) writes half its bytes, and the next write to it fails with ENOSPC."""
    real_write = os.write
    state: dict = {}

    def fill(name: str, at: int) -> None:
        state.update(name=name, at=at, seen=0, full=False)

    def write(fd, data):
        if state:
            try:
                base = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                base = ""
            stem, ext = os.path.splitext(state["name"])
            if base == state["name"] or (base.startswith(f".{stem}.tmp-") and base.endswith(ext)):
                if state["full"]:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                state["seen"] += 1
                if state["seen"] == state["at"]:
                    state["full"] = True
                    return real_write(fd, bytes(data)[: max(len(data) // 2, 1)])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    yield fill
    state.clear()


@pytest.mark.parametrize("name,at", [("checkpoint.safetensors", 3), ("rounds.jsonl", 3),
                                     ("head.safetensors", 1), ("config.json", 1),
                                     ("val_metrics.json", 1)])
def test_a_full_disk_is_one_line_and_the_rerun_ends_as_an_unbroken_run(store, tmp_path, disk_full,
                                                                        name, at):
    whole = train(store, tmp_path / "whole")
    d = tmp_path / "m"
    disk_full(name, at)
    with pytest.raises(StoreError, match=rf"No space left to write {d}/{name} .*free some space"):
        train(store, d)
    disk_full("nothing", 1)
    assert not [n for n in os.listdir(d) if n.startswith(".")]  # no temporary files left
    load_checkpoint(str(d / "checkpoint.safetensors"))  # still a valid checkpoint
    if (d / "rounds.jsonl").exists():  # whole lines only (a rerun drops those ahead of it)
        assert (d / "rounds.jsonl").read_text().endswith("\n")
        [jsonutil.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines()]
    res = train(store, d)
    assert_params_equal(res.params, whole.params)
    assert_params_equal(dt.load(str(d)).params, dt.load(str(tmp_path / "whole")).params)
    assert _losses(d) == _losses(tmp_path / "whole")


def _losses(d: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (d / "rounds.jsonl").read_text().splitlines()]


def test_a_full_disk_in_the_cli_is_one_line(store, tmp_path, disk_full, capsys):
    disk_full("checkpoint.safetensors", 1)  # the driver writes it, not the engine's workers
    err = one_line_error(capsys, ["train", store, str(tmp_path / "m"), "--workers", "1",
                                  "--epochs", "1", "--json"])
    assert f"No space left to write {tmp_path / 'm' / 'checkpoint.safetensors'}" in err


# ---------------------------------------------------------------------------------------------
# item 7: resume says what changed, more epochs continue a run, a finished rerun says so


def test_a_refused_resume_names_old_and_new_values(store, tmp_path, capsys):
    d = tmp_path / "m"
    train(store, d, config=cfg(epochs=1))
    with pytest.raises(InvalidParameterError, match=r"cannot be resumed.*--no-resume") as e:
        train(store, d, config=cfg(epochs=1, batch_size_per_worker=16,
                                   head=HeadConfig("mlp", hidden=(4,)),
                                   optimizer=OptimizerConfig("sgd", lr=0.01, momentum=0.0)))
    for change in ("lr 0.1 -> 0.01", "batch-size-per-worker 8 -> 16", "head softmax -> mlp",
                   "hidden [] -> [4]"):
        assert change in str(e.value)
    assert "epochs" not in str(e.value) and "optimizer" not in str(e.value)
    before = snapshot(d)
    err = one_line_error(capsys, ["train", store, str(d), "--workers", "1", "--lr", "0.5",
                                  "--epochs", "1", "--optimizer", "sgd", "--momentum", "0",
                                  "--batch-size-per-worker", "8", "--averaging-frequency", "3",
                                  "--seed", "3", "--patience", "1"])
    assert "lr 0.1 -> 0.5" in err and "patience null -> 1" in err
    assert snapshot(d) == before


RUN = dict(head=HeadConfig("mlp", hidden=(8,), dropout=0.2, batch_norm=True),
           optimizer=OptimizerConfig("adam", lr=0.01, schedule="step", step_epochs=1, gamma=0.5,
                                     warmup_rounds=3), workers=2, batch_size_per_worker=8,
           averaging_frequency=2, patience=5)


def test_more_epochs_continue_a_finished_run_to_the_head_of_an_unbroken_one(store, tmp_path):
    whole = train_head(SerialExecutor(2), store, cfg(**RUN, epochs=4), str(tmp_path / "w"),
                       progress=False, plot=False)
    d = str(tmp_path / "m")
    first = train_head(SerialExecutor(2), store, cfg(**RUN, epochs=2), d, progress=False,
                       plot=False)
    assert first.rounds == 2 * whole.rounds_per_epoch
    ex = SerialExecutor(2)
    more = train_head(ex, store, cfg(**RUN, epochs=4), d, progress=False, plot=False)
    assert not more.reused and ex.reduce_calls == 2 * whole.rounds_per_epoch
    assert_params_equal(more.params, whole.params)
    assert_params_equal(more.last_params, whole.last_params)
    assert more.best == whole.best and more.rounds == whole.rounds
    assert _losses(Path(d)) == _losses(tmp_path / "w")
    lrs = [[json.loads(x)["lr"] for x in open(p / "rounds.jsonl")]
           for p in (Path(d), tmp_path / "w")]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) > 2  # warm-up and steps: lr does change
    with pytest.raises(InvalidParameterError, match=r"epochs 4 -> 3.*already trained 4 epochs"):
        train_head(SerialExecutor(2), store, cfg(**RUN, epochs=3), d, progress=False, plot=False)


def test_the_cosine_schedule_refuses_other_epochs_and_says_why(store, tmp_path):
    c = {**RUN, "optimizer": OptimizerConfig("adam", lr=0.01, schedule="cosine")}
    d = tmp_path / "m"
    train(store, d, config=cfg(**c, epochs=1))
    with pytest.raises(InvalidParameterError, match=r"epochs 1 -> 2.*cosine schedule"):
        train(store, d, config=cfg(**c, epochs=2))


def test_a_rerun_of_a_finished_run_reuses_it_and_writes_nothing(store, tmp_path):
    d = tmp_path / "m"
    assert not train(store, d).reused
    before = snapshot(d)
    ex = SerialExecutor(1)
    again = dt.train(store, str(d), engine=ex, config=cfg(), progress=False)
    assert again.reused and ex.reduce_calls == 0
    assert snapshot(d) == before
    # a model lost after its run finished is written again from the checkpoint
    os.remove(d / "head.safetensors")
    assert train(store, d).reused and (d / "head.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# item 8: no validation split is a warning, not a silence


def test_training_without_a_val_split_warns(tmp_path):
    url = model_store(tmp_path / "noval.zarr", n_train=48, n_val=0, n_test=16)
    with pytest.warns(loop_mod.TrainingWarning, match="no validation rows: early stopping"):
        res = train(url, tmp_path / "m", config=cfg(epochs=1, patience=2))
    assert res.warnings == [loop_mod.NO_VAL_WARNING] and "--patience" in res.warnings[0]
    assert train(model_store(tmp_path / "val.zarr"), tmp_path / "m2",
                 config=cfg(epochs=1)).warnings == []
