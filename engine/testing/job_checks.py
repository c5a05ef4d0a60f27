"""Job-level engine checks: featurize gives the local engine's store row for row and training
its weights bit for bit, also when a worker is killed in the middle of the job.

The job is the fullest one: a store of blocks.5 maps with an augmented view per training
image, then fine-tuning blocks.6 + conv_head + the head on them (pooled stores and head-only
training run the same steps with less in them).

``EngineJobChecks`` needs, beside ``executor``, the fixtures ``job_manifest`` (a small
dataset: a ``deeptransfer.dataset.Manifest`` with train and val rows), ``local_store``
(``reference_store(LocalExecutor(2), job_manifest, url)``) and ``local_head``
(``reference_head(LocalExecutor(2), local_store, dir)``): the core imports no adapter, so the
reference engine is the caller's. The killing checks need ``executor.worker_pids()``;
engines without it skip them.
"""
from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np

from ..executor import Executor
from ..featurization import run_featurize
from ..models import ModelSpec
from ..store import open_store
from ..training import TrainConfig, train_head
from .engine_checks import worker_pids_or_skip

#: the fullest store: blocks.5 maps (float16) with one augmented view per training image
FEATURIZE = dict(model=ModelSpec("efficientnet_lite0", layer="blocks.5"), keep_maps=True,
                 train_views=1, chunk_rows=4, batch_size=4)
#: fine-tuning blocks.6 + conv_head + the head, each epoch on a seeded choice of views.
#: 4 shards a round whatever the engine's workers: each round combines 4 partial results,
#: where a reduction order other than tree_plan changes the float sums (2 or 3 would not)
TRAIN = TrainConfig(workers=4, batch_size_per_worker=3, averaging_frequency=2, epochs=3, seed=7,
                    optimizer={"name": "adam", "lr": 0.01}, patience=None)


def reference_store(reference: Executor, manifest: Any, url: str) -> str:
    """The reference store, featurized by ``reference`` (the local engine in our tests)."""
    run_featurize(reference, manifest, url, progress=False, **FEATURIZE)
    return url


def reference_head(reference: Executor, store_url: str, out_dir: str) -> Any:
    """The reference head, trained by ``reference`` on ``store_url``."""
    return train_head(reference, store_url, TRAIN, out_dir, progress=False, plot=False)


def assert_same_store(a_url: str, b_url: str) -> None:
    a, b = open_store(a_url), open_store(b_url)
    for name in ("paths", "labels", "split", "ok", "reasons", "features", "done", "image",
                 "view"):
        if name not in a.group and name not in b.group:
            continue
        assert np.array_equal(a[name][:], b[name][:]), f"{name} differs from the local engine's"


def assert_same_head(a: Any, b: Any) -> None:
    assert list(a.params) == list(b.params)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert [h.get("val_top1") for h in a.history] == [h.get("val_top1") for h in b.history]


def _kill_one(executor: Executor) -> None:
    os.kill(worker_pids_or_skip(executor)[-1], signal.SIGKILL)


def check_featurize_gives_the_local_store(executor: Executor, manifest: Any, local_store: str,
                                          tmp_dir: str) -> None:
    url = os.path.join(tmp_dir, "engine.zarr")
    rep = run_featurize(executor, manifest, url, progress=False, **FEATURIZE)
    assert rep.engine == executor.name
    assert_same_store(local_store, url)


def check_train_gives_the_local_head(executor: Executor, local_store: str, local_head: Any,
                                     tmp_dir: str) -> None:
    res = train_head(executor, local_store, TRAIN, os.path.join(tmp_dir, "t"), progress=False,
                     plot=False)
    assert_same_head(local_head, res)


def check_worker_killed_during_featurize(executor: Executor, manifest: Any, local_store: str,
                                         tmp_dir: str) -> None:
    worker_pids_or_skip(executor)  # skipped before any work if the engine cannot say
    url = os.path.join(tmp_dir, "killed.zarr")
    seen = []

    def kill_after_first_chunk(res: Any) -> None:
        seen.append(res.chunk)
        if len(seen) == 1:
            _kill_one(executor)

    run_featurize(executor, manifest, url, progress=kill_after_first_chunk, **FEATURIZE)
    assert len(seen) >= open_store(url).n_chunks  # every chunk reported (some maybe twice)
    assert_same_store(local_store, url)


def check_worker_killed_during_training(executor: Executor, local_store: str, local_head: Any,
                                        tmp_dir: str) -> None:
    worker_pids_or_skip(executor)
    rounds = []

    def kill_after_round_one(record: Any) -> None:
        rounds.append(record)
        if len(rounds) == 1:
            _kill_one(executor)

    res = train_head(executor, local_store, TRAIN, os.path.join(tmp_dir, "t"), progress=False,
                     plot=False, callback=kill_after_round_one)
    assert len(rounds) == res.rounds  # no averaging round lost or run twice
    assert_same_head(local_head, res)


class EngineJobChecks:
    """The job checks as pytest tests (fixtures: see the module docstring)."""

    def test_featurize_gives_the_local_store_row_for_row(self, executor, job_manifest,
                                                         local_store, tmp_path):
        check_featurize_gives_the_local_store(executor, job_manifest, local_store, str(tmp_path))

    def test_train_gives_the_local_head(self, executor, local_store, local_head, tmp_path):
        check_train_gives_the_local_head(executor, local_store, local_head, str(tmp_path))

    def test_worker_killed_during_featurize_changes_nothing(self, executor, job_manifest,
                                                            local_store, tmp_path):
        check_worker_killed_during_featurize(executor, job_manifest, local_store, str(tmp_path))

    def test_worker_killed_during_training_changes_nothing(self, executor, local_store,
                                                           local_head, tmp_path):
        check_worker_killed_during_training(executor, local_store, local_head, str(tmp_path))
