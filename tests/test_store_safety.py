"""featurize never destroys files: foreign folders, the dataset itself, overwrite's reach,
a full disk, two jobs on one store (issue 11, items 1, 13 and 15)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import deeptransfer as dt
from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.cli import main
from deeptransfer.dataset import Manifest, load_dataset
from deeptransfer.errors import StoreError
from deeptransfer.featurization import run_featurize
from deeptransfer.models import ModelSpec
from deeptransfer.store import create_store, open_store
from deeptransfer.storesafety import LOCK_NAME, StoreLock
from photos import make_photo_dataset

SPLIT = "train=0.5,val=0.25,test=0.25"
KW = dict(chunk_rows=8, batch_size=4, split=SPLIT, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    make_photo_dataset(root)
    return str(root)


@pytest.fixture(scope="module")
def clean(dataset, tmp_path_factory):
    """A complete store of the dataset, made once: tests copy or compare with it."""
    url = str(tmp_path_factory.mktemp("clean") / "clean.zarr")
    with LocalExecutor(0) as ex:
        dt.featurize(dataset, url, engine=ex, **KW)
    return url


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if featurize starts an engine: the checks must come first."""
    import deeptransfer.api as api

    def refuse(*a, **kw):
        raise AssertionError("the engine was started before the store path was checked")

    monkeypatch.setattr(api, "engine_scope", refuse)


def _tree(root) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = (b"-> " + os.readlink(p).encode()
                                             if os.path.islink(p) else open(p, "rb").read())
    return out


def _manifest(n=10):
    labels = (np.arange(n) % 2).astype(np.int32)
    return Manifest("root", [f"root/{i}.jpg" for i in range(n)], labels,
                    (np.arange(n) % 3).astype(np.int8), ["a", "b"])


def _cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


# -- item 1: a folder that is not a store, the dataset itself ------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_store_is_never_emptied(dataset, tmp_path, no_engine, capsys,
                                                       overwrite):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.csv").write_text("1,2")
    before = _tree(folder)
    with pytest.raises(StoreError, match="not a deeptransfer feature store.*--overwrite"):
        dt.featurize(dataset, str(folder), overwrite=overwrite, **KW)
    flags = ["--overwrite"] if overwrite else []
    rc, err = _cli(capsys, "featurize", dataset, str(folder), *flags)
    assert rc == 2 and len(err.splitlines()) == 1 and "thesis.txt" in err, err
    assert _tree(folder) == before
    # the core refuses it too, whoever calls it
    with pytest.raises(StoreError, match="not a deeptransfer feature store"):
        create_store(str(folder), _manifest(), feature_dim=4, attrs={}, overwrite=True)
    assert _tree(folder) == before


def test_a_foreign_zarr_group_and_a_file_are_refused(dataset, tmp_path, no_engine):
    import zarr

    other = str(tmp_path / "other.zarr")
    zarr.open_group(other, mode="w").create_array("x", shape=(3,), dtype="int8")[:] = 7
    before = _tree(other)
    with pytest.raises(StoreError, match="not a deeptransfer feature store"):
        dt.featurize(dataset, other, overwrite=True, **KW)
    assert _tree(other) == before
    a_file = tmp_path / "f.zarr"
    a_file.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        dt.featurize(dataset, str(a_file), overwrite=True, **KW)
    assert a_file.read_text() == "x"


def test_the_dataset_is_never_the_store(dataset, tmp_path, no_engine, capsys, monkeypatch):
    before = _tree(dataset)
    link = tmp_path / "link"
    link.symlink_to(dataset)
    monkeypatch.chdir(os.path.dirname(dataset))
    rel = os.path.basename(dataset)
    same = [dataset, dataset + "/", f"file://{dataset}", rel, f"./{rel}/", str(link)]
    for store in same:
        with pytest.raises(StoreError, match="is the dataset folder"):
            dt.featurize(dataset, store, overwrite=True, **KW)
    for store in (os.path.join(dataset, "feat.zarr"), os.path.join(dataset, "cat", "f.zarr"),
                  f"{link}/f.zarr"):
        with pytest.raises(StoreError, match="inside the dataset folder"):
            dt.featurize(dataset, store, **KW)
    with pytest.raises(StoreError, match="dataset .* is inside the store path"):
        dt.featurize(os.path.join(dataset, "cat"), dataset, overwrite=True, **KW)
    rc, err = _cli(capsys, "featurize", dataset, dataset, "--overwrite")
    assert rc == 2 and len(err.splitlines()) == 1 and dataset in err
    assert _tree(dataset) == before
    # the driver checks it too (API callers of run_featurize)
    m = load_dataset(dataset, split=SPLIT)
    with LocalExecutor(0) as ex, pytest.raises(StoreError, match="dataset folder"):
        run_featurize(ex, m, dataset, model=ModelSpec("efficientnet_lite0"), overwrite=True,
                      progress=False)
    assert _tree(dataset) == before


def test_remote_urls_compare_protocol_and_path(no_engine):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/ds/cat/a.jpg", b"x")
    with pytest.raises(StoreError, match="inside the dataset"):
        dt.featurize("memory://ds", "memory://ds/f.zarr", **KW)
    with pytest.raises(StoreError, match="is the dataset"):
        dt.featurize("memory://ds/", "memory:///ds", **KW)
    assert fs.cat("/ds/cat/a.jpg") == b"x"


def test_overwrite_removes_only_what_the_store_consists_of(tmp_path):
    url = str(tmp_path / "s.zarr")
    st = create_store(url, _manifest(), feature_dim=4, attrs={"model": {"name": "m"}},
                      chunk_rows=4)
    st.write_chunk(0, np.ones((4, 4)), np.ones(4, bool), [""] * 4)
    (tmp_path / "s.zarr" / "README.txt").write_text("mine")
    (tmp_path / "s.zarr" / "features" / "notes.txt").write_text("mine too")
    fresh = create_store(url, _manifest(12), feature_dim=4, attrs={"model": {"name": "m"}},
                         chunk_rows=4, overwrite=True)
    assert fresh.n_rows == 12 and fresh.pending_chunks() == [0, 1, 2]
    assert (tmp_path / "s.zarr" / "README.txt").read_text() == "mine"
    assert (tmp_path / "s.zarr" / "features" / "notes.txt").read_text() == "mine too"
    # a store whose create was interrupted (no format yet) is ours and redone, not refused
    import zarr

    zarr.open_group(url, mode="r+").attrs.put({"format_pending": "deeptransfer.features/1"})
    again = create_store(url, _manifest(), feature_dim=4, attrs={}, chunk_rows=4)
    assert again.n_rows == 10


def test_overwrite_never_follows_a_symlink_out_of_the_store(tmp_path):
    url = str(tmp_path / "s.zarr")
    create_store(url, _manifest(), feature_dim=4, attrs={}, chunk_rows=4)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "zarr.json").write_text("{}")
    (precious / "c").mkdir()
    (precious / "c" / "0").write_text("keep")
    os.symlink(precious, tmp_path / "s.zarr" / "extra")
    shutil.rmtree(tmp_path / "s.zarr" / "reasons")
    os.symlink(precious, tmp_path / "s.zarr" / "reasons")
    with pytest.raises(StoreError, match="symbolic link"):
        create_store(url, _manifest(), feature_dim=4, attrs={}, chunk_rows=4, overwrite=True)
    assert (precious / "c" / "0").read_text() == "keep" and (precious / "zarr.json").exists()


def test_a_store_path_that_is_a_symlink_to_a_store_is_overwritten_in_place(tmp_path):
    real = tmp_path / "disk" / "s.zarr"
    real.parent.mkdir()
    create_store(str(real), _manifest(), feature_dim=4, attrs={}, chunk_rows=4)
    link = tmp_path / "s.zarr"
    link.symlink_to(real)
    st = create_store(str(link), _manifest(12), feature_dim=4, attrs={}, chunk_rows=4,
                      overwrite=True)
    assert st.n_rows == 12 and link.is_symlink() and open_store(str(real)).n_rows == 12


def test_an_empty_folder_is_used(dataset, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with LocalExecutor(0) as ex:
        rep = dt.featurize(dataset, str(empty), engine=ex, **KW)
    assert open_store(str(empty)).is_complete() and rep.featurized > 0
    assert not (empty / LOCK_NAME).exists()
    # a rerun reuses the store, and says so
    with LocalExecutor(0) as ex:
        again = dt.featurize(dataset, str(empty), engine=ex, **KW)
    assert again.reused and again.computed_now == 0 and not rep.reused


# -- item 13: a full disk ------------------------------------------------------------------
def _enospc_after(monkeypatch, n_ok: int, which=lambda key: True):
    """Make the store's (LocalStore) writes fail with ENOSPC after ``n_ok`` matching ones."""
    from zarr.storage import LocalStore

    real = LocalStore.set
    count = {"n": 0}

    async def full(self, key, value):
        if which(key):
            count["n"] += 1
            if count["n"] > n_ok:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.root / key))
        return await real(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full)


@pytest.mark.parametrize("fail_on", ["features", "done"])
def test_disk_full_is_one_line_and_the_rerun_finishes_the_store(dataset, clean, tmp_path,
                                                                monkeypatch, fail_on):
    m = load_dataset(dataset, split=SPLIT)
    full = str(tmp_path / "full.zarr")
    kw = dict(model=ModelSpec("efficientnet_lite0"), chunk_rows=8, batch_size=4, progress=False)
    with LocalExecutor(0) as ex:
        with monkeypatch.context() as mp:
            # the second chunk's features (or done marker) find the disk full
            _enospc_after(mp, 1, lambda key: key.startswith(f"{fail_on}/c/"))
            with pytest.raises(StoreError, match="No space left on device at .*full.zarr") as ei:
                run_featurize(ex, m, full, **kw)
        assert len(str(ei.value).splitlines()) == 1 and "run featurize again" in str(ei.value)
        st = open_store(full)
        assert st.pending_chunks() == [1, 2, 3]  # the failed chunk's marker was never set
        assert not os.path.exists(os.path.join(full, LOCK_NAME))  # released on error
        assert not [f for f in _tree(full) if f.endswith(".partial")]
        rep = run_featurize(ex, m, full, **kw)
    assert rep.computed_now == len(m) - 8
    a, b = open_store(clean), open_store(full)
    for name in ("features", "ok", "reasons", "labels", "split", "paths", "done"):
        assert np.array_equal(a[name][:], b[name][:]), name


def test_disk_full_while_creating_the_store_is_one_line(dataset, tmp_path, monkeypatch, capsys):
    _enospc_after(monkeypatch, 3)
    rc, err = _cli(capsys, "featurize", dataset, str(tmp_path / "s.zarr"), "--workers", "0")
    assert rc == 2 and len(err.splitlines()) == 1 and "No space left on device" in err, err
    monkeypatch.undo()
    with LocalExecutor(0) as ex:  # the half-created store is ours: redone, not refused
        rep = dt.featurize(dataset, str(tmp_path / "s.zarr"), engine=ex, **KW)
    assert open_store(str(tmp_path / "s.zarr")).is_complete() and rep.computed_now == rep.images


def _raise_store_error(task, shared):
    raise StoreError(f"Cannot write the feature store 'x': no space left on the device at {task}.")


def test_a_store_error_in_a_worker_process_arrives_as_itself():
    with LocalExecutor(1) as ex, pytest.raises(StoreError) as ei:
        list(ex.map_unordered(_raise_store_error, ["/data/f.zarr/features/c/3/0"]))
    assert str(ei.value) == ("Cannot write the feature store 'x': no space left on the device "
                             "at /data/f.zarr/features/c/3/0.")


# -- item 15: two jobs on one store --------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys
    from deeptransfer.storesafety import StoreLock
    with StoreLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # held until the test closes our stdin
""")


def test_a_second_job_on_a_store_is_refused_while_the_first_writes(dataset, clean, tmp_path,
                                                                   capsys):
    url = str(tmp_path / "s.zarr")
    shutil.copytree(clean, url)
    before = _tree(url)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = os.path.join(url, LOCK_NAME)
        expected = rf"being written by another job \(pid {holder.pid} on host " \
                   rf"{socket.gethostname()} since .*\): wait .* or remove {lock} if"
        for overwrite in (False, True):
            with pytest.raises(StoreError, match=expected):
                dt.featurize(dataset, url, overwrite=overwrite, engine="local", workers=0, **KW)
        with LocalExecutor(0) as ex, pytest.raises(StoreError, match=expected):
            run_featurize(ex, load_dataset(dataset, split=SPLIT), url,
                          model=ModelSpec("efficientnet_lite0"), chunk_rows=8, progress=False)
        rc, err = _cli(capsys, "featurize", dataset, url, "--overwrite")
        assert rc == 2 and len(err.splitlines()) == 1 and f"pid {holder.pid}" in err
        with pytest.raises(StoreError, match=expected):  # readers wait for the writer too
            open_store(url)
        assert "being written by pid" in dt.info(url)["writer"]
        assert {k: v for k, v in _tree(url).items() if k != LOCK_NAME} == before
    finally:
        holder.stdin.close()
        holder.wait()
    assert not os.path.exists(os.path.join(url, LOCK_NAME))
    open_store(url).check_whole()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_lock_of_a_killed_job_is_taken_over(dataset, tmp_path):
    url = tmp_path / "s.zarr"
    url.mkdir()  # a job killed right after it took the lock: nothing else is in the folder
    (url / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                             "started": "2026-01-01T00:00:00Z", "token": "x"}))
    with LocalExecutor(0) as ex:
        rep = dt.featurize(dataset, str(url), engine=ex, **KW)
    assert rep.computed_now == rep.images and not (url / LOCK_NAME).exists()
    # a lock file cut short (killed while writing it) is stale too
    (url / LOCK_NAME).write_text('{"pid": 12')
    with pytest.raises(StoreError, match="being written"):  # it may be being written now
        StoreLock(str(url)).acquire()
    os.utime(url / LOCK_NAME, (1e9, 1e9))  # ... but not for a minute
    with LocalExecutor(0) as ex:
        assert dt.featurize(dataset, str(url), engine=ex, **KW).reused


def test_a_lock_from_another_host_is_respected(tmp_path):
    url = tmp_path / "s.zarr"
    url.mkdir()
    (url / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere-" + socket.gethostname(),
                                             "started": "T"}))
    with pytest.raises(StoreError, match="pid 1 on host elsewhere-"):
        StoreLock(str(url)).acquire()


def test_the_lock_is_released_on_interrupt(dataset, tmp_path):
    url = str(tmp_path / "s.zarr")

    def interrupt(res):
        raise KeyboardInterrupt

    with LocalExecutor(0) as ex, pytest.raises(KeyboardInterrupt):
        dt.featurize(dataset, url, engine=ex, chunk_rows=8, batch_size=4, split=SPLIT,
                     progress=interrupt)
    assert not os.path.exists(os.path.join(url, LOCK_NAME))
    assert len(open_store(url).pending_chunks()) > 0


def test_a_failed_first_step_leaves_no_empty_folder(tmp_path):
    url = tmp_path / "s.zarr"
    with StoreLock(str(url)):
        assert (url / LOCK_NAME).exists()
    assert not url.exists()
