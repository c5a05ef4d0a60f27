"""Special files in a dataset (issue 11, item 12), re-split warnings (item 8) and fsspec
backend hints (item 7): nothing blocks, nothing is read without bound, nothing is dropped
without a row or a warning, and a missing backend is one line naming an extra that exists."""
from __future__ import annotations

import importlib
import io
import json
import os
import re
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest

import deeptransfer as dt
from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.dataset import load_dataset, scan
from deeptransfer.errors import EngineUnavailableError, InvalidParameterError
from deeptransfer.featurization import read_bytes
from deeptransfer.store import open_store
from photos import jpeg_bytes

REPO = Path(__file__).resolve().parent.parent
#: only a failsafe against a hang (the fixed code returns at once): generous on a busy
#: machine, and below pytest-timeout's 600 s so a blocked FIFO is released before it fires
WATCHDOG_S = 450


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return jpeg_bytes((rng.random((60, 80, 3)) * 255).astype(np.uint8))


def _release_fifo(path: str) -> None:
    """Unblock a reader stuck opening/reading the FIFO ``path`` (the old code's hang): a
    writer that opens and closes it gives the reader EOF."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def _run_guarded(fn, fifos=()):
    """``fn()`` in a thread; if it is still running after WATCHDOG_S, the FIFOs it may be
    blocked on are released and the test fails (instead of hanging the suite)."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(WATCHDOG_S)
    if t.is_alive():
        for f in fifos:
            _release_fifo(f)
        t.join(60)
        pytest.fail(f"still blocked after {WATCHDOG_S} s (a FIFO was opened?)")
    if "error" in out:
        raise out["error"]
    return out["value"]


# -- reading one file --------------------------------------------------------------------------
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "pipe.jpg")
    os.mkfifo(fifo)

    def read():
        with pytest.raises(OSError) as e:
            read_bytes(fifo)
        return str(e.value)

    assert _run_guarded(read, [fifo]) == "not a regular file (named pipe)"


def test_an_endless_device_is_refused_without_reading_it(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    with pytest.raises(OSError, match=r"not a regular file \(character device\)"):
        read_bytes(str(link))


def test_a_file_over_the_size_cap_is_refused(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(_jpeg(0) + b"\0" * 5000)
    with pytest.raises(OSError, match="file too large: .* > limit 4096 bytes"):
        read_bytes(str(big), max_bytes=4096)
    assert read_bytes(str(big), max_bytes=10**6) == big.read_bytes()


class _Endless(io.RawIOBase):
    """A stream that never ends, recording how many bytes were asked for."""

    def __init__(self):
        self.asked = 0

    def readable(self):
        return True

    def readinto(self, b):
        self.asked += len(b)
        b[:] = b"\0" * len(b)
        return len(b)


@pytest.mark.parametrize("reported", [None, 0, 10])
def test_a_read_stops_one_byte_past_the_cap_whatever_the_size_reported(reported):
    from deeptransfer.fs import _read_bounded

    f = _Endless()
    with pytest.raises(OSError, match="file too large"):
        _read_bounded(f, reported, max_bytes=1000)
    assert f.asked <= 1001


def test_fsspec_urls_get_the_same_checks(monkeypatch):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/safety/a/big.jpg", b"x" * 5000)
    fs.pipe("/safety/a/ok.jpg", b"x" * 10)
    try:
        with pytest.raises(OSError, match="file too large: 5000 bytes"):
            read_bytes("memory://safety/a/big.jpg", max_bytes=4096)
        with pytest.raises(OSError, match="is a directory"):
            read_bytes("memory://safety/a", max_bytes=4096)
        assert read_bytes("memory://safety/a/ok.jpg", max_bytes=4096) == b"x" * 10
        # a filesystem that under-reports the size is still read only up to the cap
        real_info = type(fs).info
        monkeypatch.setattr(type(fs), "info",
                            lambda self, p, **kw: {**real_info(self, p), "size": 1})
        with pytest.raises(OSError, match="more than the limit of 4096 bytes"):
            read_bytes("memory://safety/a/big.jpg", max_bytes=4096)
    finally:
        fs.rm("/safety", recursive=True)


# -- names that are not UTF-8 ------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    os.fsdecode(b"/d/caf\xe9.jpg"), os.fsdecode(b'/d/"q"\\\xff\xfe.png'), "/d/\udcff\ud800x",
])
def test_escaped_names_are_utf8_and_round_trip(name):
    from deeptransfer.fs import escape_path, unescape_path

    text = escape_path(name)
    text.encode("utf-8")  # storable in Zarr and JSON, printable
    assert text.startswith('"') and unescape_path(text) == name


@pytest.mark.parametrize("name", ["/d/plain.jpg", '/d/"quoted".jpg', '"a".jpg', '"a\\b"',
                                  "/d/ü #1.png"])
def test_valid_names_are_left_alone(name):
    from deeptransfer.fs import escape_path, unescape_path

    assert escape_path(name) == name and unescape_path(name) == name


# -- the scan ----------------------------------------------------------------------------------
def _fail_listing(monkeypatch, folder: Path) -> None:
    """Make listing ``folder`` fail as an unreadable folder does (tests run as root in CI,
    where chmod 000 does not stop reading)."""
    real = os.scandir
    target = os.fsencode(str(folder))

    def scandir(path="."):
        if not isinstance(path, int) and os.fsencode(os.fspath(path)).rstrip(b"/") == target:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_sub_folder_is_warned_about(tmp_path, monkeypatch):
    (tmp_path / "a" / "locked").mkdir(parents=True)
    (tmp_path / "a" / "1.jpg").write_bytes(b"x")
    (tmp_path / "a" / "locked" / "2.jpg").write_bytes(b"x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1.jpg").write_bytes(b"x")
    _fail_listing(monkeypatch, tmp_path / "a" / "locked")
    m = scan(str(tmp_path))
    assert [p.rsplit("/", 2)[-2:] for p in m.paths] == [["a", "1.jpg"], ["b", "1.jpg"]]
    assert "could not list 'a/locked': permission denied; its images are left out" in m.warnings


def test_an_unreadable_class_folder_is_warned_about_once(tmp_path, monkeypatch):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "1.jpg").write_bytes(b"x")
    _fail_listing(monkeypatch, tmp_path / "b")
    m = scan(str(tmp_path))
    assert m.classes == ["a"]
    assert m.warnings == ["could not list 'b': permission denied; its images are left out"]


def test_an_unlistable_folder_on_an_fsspec_filesystem_is_warned_about(monkeypatch):
    import fsspec

    fs = fsspec.filesystem("memory")
    for rel in ("a/1.jpg", "a/denied/2.jpg", "b/1.jpg"):
        fs.pipe(f"/unlistable/{rel}", b"x")
    real_ls = type(fs).ls

    def ls(self, path, detail=True, **kw):
        if path.rstrip("/").endswith("/a/denied"):
            raise PermissionError(13, "Permission denied", path)
        return real_ls(self, path, detail=detail, **kw)

    monkeypatch.setattr(type(fs), "ls", ls)
    try:
        m = scan("memory://unlistable")
    finally:
        fs.rm("/unlistable", recursive=True)
    assert [p.split("unlistable/", 1)[1] for p in m.paths] == ["a/1.jpg", "b/1.jpg"]
    assert m.warnings == ["could not list 'a/denied': permission denied; its images are left out"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root reads a chmod 000 folder anyway (the tests above simulate it)")
def test_a_chmod_000_folder_is_warned_about(tmp_path):
    (tmp_path / "a" / "locked").mkdir(parents=True)
    (tmp_path / "a" / "1.jpg").write_bytes(b"x")
    (tmp_path / "a" / "locked" / "2.jpg").write_bytes(b"x")
    os.chmod(tmp_path / "a" / "locked", 0)
    try:
        m = scan(str(tmp_path))
    finally:
        os.chmod(tmp_path / "a" / "locked", 0o755)
    assert len(m) == 1
    assert "could not list 'a/locked': permission denied; its images are left out" in m.warnings


def test_links_are_followed_and_a_link_loop_does_not_hang_the_scan(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "x.jpg").write_bytes(b"x")
    ds = tmp_path / "ds"
    (ds / "a").mkdir(parents=True)
    (ds / "a" / "1.jpg").write_bytes(b"x")
    (ds / "a" / "link.jpg").symlink_to(ds / "a" / "1.jpg")  # a link to a file: a row
    (ds / "a" / "up").symlink_to("..")  # a loop to the dataset root
    (ds / "a" / "self").symlink_to(".")  # a loop to the class folder
    (ds / "b").symlink_to(real, target_is_directory=True)  # a linked class folder
    m = _run_guarded(lambda: scan(str(ds)))
    assert m.classes == ["a", "b"]
    assert sorted(p.rsplit("/", 1)[-1] for p in m.paths) == ["1.jpg", "link.jpg", "x.jpg"]
    loops = sorted(w for w in m.warnings if "symbolic link loop" in w)
    assert [w.split()[1] for w in loops] == ["'a/self':", "'a/up':"]


def test_resplitting_a_presplit_tree_says_so(tmp_path):
    for s, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / s / c).mkdir(parents=True)
            for i in range(n):
                (tmp_path / s / c / f"{i}.jpg").write_bytes(b"x")
    assert not any("re-splits" in w for w in load_dataset(str(tmp_path)).warnings)
    for kw, flag in (({"per_class_train": 2}, "--per-class-train"),
                     ({"split": "train=0.5,test=0.5"}, "--split")):
        w = [w for w in load_dataset(str(tmp_path), **kw).warnings if "re-splits" in w]
        assert w == [f"the dataset is already split into train/val folders; {flag} re-splits it "
                     f"(its images are pooled and drawn again); omit {flag} to keep the folders' "
                     f"split"]


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture
def make_odd_dataset(monkeypatch):
    """``make(root)`` writes good images beside every kind of file a scan meets in the wild
    under ``root`` and returns (good image names, {name: reason} of the rows that must be
    skipped, FIFOs)."""
    def make(root: Path):
        a, b = root / "a", root / "b"
        (a / "locked").mkdir(parents=True)
        b.mkdir()
        for i in range(3):
            (a / f"a{i}.jpg").write_bytes(_jpeg(i))
            (b / f"b{i}.jpg").write_bytes(_jpeg(10 + i))
        (a / "locked" / "hidden_by_perms.jpg").write_bytes(_jpeg(20))
        _fail_listing(monkeypatch, a / "locked")
        os.mkfifo(a / "pipe.jpg")
        (a / "zero.jpg").symlink_to("/dev/zero")
        (a / "alias.jpg").symlink_to(a / "a0.jpg")
        (a / "loop").symlink_to("..")
        with open(os.fsencode(str(b)) + b"/caf\xe9.jpg", "wb") as f:
            f.write(_jpeg(30))
        good = {"a0.jpg", "a1.jpg", "a2.jpg", "alias.jpg", "b0.jpg", "b1.jpg", "b2.jpg",
                'caf\\xe9.jpg"'}
        bad = {"pipe.jpg": "not a regular file (named pipe)",
               "zero.jpg": "not a regular file (character device)"}
        return good, bad, [str(a / "pipe.jpg")]

    return make


def test_featurize_a_dataset_of_special_files_end_to_end(make_odd_dataset, tmp_path):
    root = tmp_path / "photos"
    good, bad, fifos = make_odd_dataset(root)
    store = str(tmp_path / "f.zarr")
    with LocalExecutor(n_workers=0) as ex:
        rep = _run_guarded(lambda: dt.featurize(str(root), store, engine=ex, chunk_rows=4,
                                                batch_size=4, progress=False), fifos)
    st = open_store(store)
    assert st.is_complete()
    paths = [str(p) for p in st["paths"][:]]
    ok = st["ok"][:]
    assert {p.rsplit("/", 1)[-1] for p, k in zip(paths, ok) if k} == good
    assert rep.featurized == len(good) == int(ok.sum())
    skipped = {p.rsplit("/", 1)[-1]: r for p, r in rep.skipped}
    assert skipped == bad
    assert "could not list 'a/locked': permission denied; its images are left out" in rep.warnings
    assert any("'a/loop': a symbolic link loop" in w for w in rep.warnings)
    # the non-UTF-8 name is stored escaped, and its features are those of its bytes
    (row,) = [i for i, p in enumerate(paths) if p.endswith('caf\\xe9.jpg"')]
    twin = tmp_path / "twin" / "c"
    twin.mkdir(parents=True)
    (twin / "same.jpg").write_bytes(_jpeg(30))
    with LocalExecutor(n_workers=0) as ex:
        dt.featurize(str(twin.parent), str(tmp_path / "t.zarr"), engine=ex, split="train=1",
                     batch_size=4, progress=False)
    twin_features = open_store(str(tmp_path / "t.zarr"))["features"][0]
    np.testing.assert_allclose(st["features"][row], twin_features, rtol=1e-5, atol=1e-6)
    json.loads(json.dumps(rep.to_dict(), allow_nan=False))  # the --json output


def test_cli_featurize_reports_warnings_and_special_files(make_odd_dataset, tmp_path, capsys):
    from deeptransfer.cli import main

    # a pre-split tree: the re-split warning reaches the report too
    presplit = tmp_path / "presplit"
    good, bad, fifos = make_odd_dataset(presplit / "train")
    rc = _run_guarded(lambda: main(["featurize", str(presplit), str(tmp_path / "f.zarr"),
                                    "--workers", "0", "--per-class-train", "2", "--json"]), fifos)
    out = capsys.readouterr().out
    assert rc == 0
    rep = json.loads(out)
    assert rep["featurized"] == len(good)
    assert {p.rsplit("/", 1)[-1]: r for p, r in rep["skipped"]} == bad
    assert any("--per-class-train re-splits it" in w for w in rep["warnings"])
    assert ("could not list 'train/a/locked': permission denied; its images are left out"
            in rep["warnings"])


# -- fsspec backends -----------------------------------------------------------------------------
def _without_backend(monkeypatch, protocol: str) -> None:
    """Make ``protocol``'s fsspec backend fail to import, as when it is not installed
    (``None`` in sys.modules stops an import), whether or not it is installed here."""
    import sys

    registry = importlib.import_module("fsspec.registry")
    package = registry.known_implementations[protocol]["class"].split(".", 1)[0]
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.delitem(registry._registry, protocol, raising=False)


@pytest.mark.parametrize("protocol,extra,package", [("s3", "s3", "s3fs"), ("gs", "gcs", "gcsfs")])
def test_a_missing_backend_is_one_line_naming_an_extra_that_exists(
        protocol, extra, package, monkeypatch, capsys, tmp_path):
    from deeptransfer.cli import main

    _without_backend(monkeypatch, protocol)
    rc = main(["featurize", f"{protocol}://b/photos", str(tmp_path / "out.zarr")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"pip install 'deeptransfer[{extra}]'" in err and package in err
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert [re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in extras[extra]] == [package]
    assert not (tmp_path / "out.zarr").exists()


def test_the_wrapper_names_the_backend_and_refuses_unknown_protocols(monkeypatch):
    from deeptransfer.fs import url_to_fs

    _without_backend(monkeypatch, "s3")
    with pytest.raises(EngineUnavailableError, match=r"s3:// needs the s3fs package"):
        url_to_fs("s3://bucket/key")
    with pytest.raises(EngineUnavailableError, match=r"deeptransfer\[s3\]"):
        read_bytes("s3://bucket/key.jpg")
    with pytest.raises(InvalidParameterError, match="unknown protocol 'nosuchfs'"):
        url_to_fs("nosuchfs://x/y")


def test_the_cli_size_cap_skips_a_larger_image_and_keeps_the_others(tmp_path, capsys):
    """--max-image-mb reaches the workers: a real 1.x MB photo is skipped at 1 MB with its
    reason (and featurized at the default 64), the small ones are featurized either way."""
    from PIL import Image

    from deeptransfer.cli import main

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for k in range(2):
            (tmp_path / "d" / cls / f"{k}.jpg").write_bytes(
                jpeg_bytes(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)))
    big = tmp_path / "d" / "a" / "big.png"
    Image.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big)
    assert 1 << 20 < big.stat().st_size < 2 << 20
    args = ["featurize", str(tmp_path / "d"), "--workers", "0", "--chunk-rows", "8", "--json"]
    assert main(args[:2] + [str(tmp_path / "s1"), *args[2:], "--max-image-mb", "1"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["featurized"] == 4
    assert [(os.path.basename(p), r.split(":")[0]) for p, r in rep["skipped"]] == \
        [("big.png", "file too large")]
    assert open_store(str(tmp_path / "s1")).attrs["max_image_bytes"] == 1 << 20
    assert main(args[:2] + [str(tmp_path / "s64"), *args[2:]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["featurized"] == 5
