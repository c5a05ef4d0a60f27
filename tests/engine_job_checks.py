"""Job-level engine conformance: the same store and the same head as the local engine.

An adapter's test module imports these with ``from engine_job_checks import *`` beside its
module-scoped ``executor`` fixture. The executor must offer ``worker_pids()`` (the processes
that run tasks) so that a check can kill one in the middle of a job.
"""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.dataset import load_dataset
from deeptransfer.featurization import run_featurize
from deeptransfer.models import ModelSpec
from deeptransfer.store import open_store
from deeptransfer.training import TrainConfig, train_head
from photos import make_photo_dataset

FEATURIZE = dict(model=ModelSpec("efficientnet_lite0"), chunk_rows=4, batch_size=4)
TRAIN = TrainConfig(workers=2, batch_size_per_worker=3, averaging_frequency=2, epochs=4, seed=7,
                    optimizer={"name": "adam", "lr": 0.01}, patience=None)


@pytest.fixture(scope="module")
def job_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("job_photos")
    make_photo_dataset(root)
    return load_dataset(str(root), split="train=0.6,val=0.2,test=0.2", seed=1)


@pytest.fixture(scope="module")
def local_store(job_manifest, tmp_path_factory):
    """The reference: the local engine's store, one single-threaded worker per core."""
    url = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    with LocalExecutor(2) as ex:
        run_featurize(ex, job_manifest, url, progress=False, **FEATURIZE)
    return url


@pytest.fixture(scope="module")
def local_head(local_store, tmp_path_factory):
    with LocalExecutor(2) as ex:
        return train_head(ex, local_store, TRAIN, str(tmp_path_factory.mktemp("ref_train")),
                          progress=False, plot=False)


def _assert_same_store(a_url: str, b_url: str) -> None:
    a, b = open_store(a_url), open_store(b_url)
    for name in ("paths", "labels", "split", "ok", "reasons", "features", "done"):
        assert np.array_equal(a[name][:], b[name][:]), f"{name} differs from the local engine's"


def _assert_same_head(a, b) -> None:
    assert list(a.params) == list(b.params)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert [h.get("val_top1") for h in a.history] == [h.get("val_top1") for h in b.history]


def _kill_one(executor) -> None:
    pids = executor.worker_pids()
    assert pids, "no worker process to kill"
    os.kill(pids[-1], signal.SIGKILL)


def test_featurize_gives_the_local_store_row_for_row(executor, job_manifest, local_store, tmp_path):
    url = str(tmp_path / "engine.zarr")
    rep = run_featurize(executor, job_manifest, url, progress=False, **FEATURIZE)
    assert rep.engine == executor.name
    _assert_same_store(local_store, url)


def test_train_gives_the_local_head(executor, local_store, local_head, tmp_path):
    res = train_head(executor, local_store, TRAIN, str(tmp_path / "t"), progress=False, plot=False)
    _assert_same_head(local_head, res)


def test_worker_killed_during_featurize_changes_nothing(executor, job_manifest, local_store,
                                                        tmp_path):
    url = str(tmp_path / "killed.zarr")
    seen = []

    def kill_after_first_chunk(res):
        seen.append(res.chunk)
        if len(seen) == 1:
            _kill_one(executor)

    run_featurize(executor, job_manifest, url, progress=kill_after_first_chunk, **FEATURIZE)
    assert len(seen) >= open_store(url).n_chunks  # every chunk reported (some maybe twice)
    _assert_same_store(local_store, url)


def test_worker_killed_during_training_changes_nothing(executor, local_store, local_head,
                                                       tmp_path):
    rounds = []

    def kill_after_round_one(record):
        rounds.append(record)
        if len(rounds) == 1:
            _kill_one(executor)

    res = train_head(executor, local_store, TRAIN, str(tmp_path / "t"), progress=False,
                     plot=False, callback=kill_after_round_one)
    assert len(rounds) == res.rounds  # no averaging round lost or run twice
    _assert_same_head(local_head, res)
