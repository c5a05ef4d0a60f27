"""Search on a store of maps: head-only trials are stacked on the pooled maps, trials that
fine-tune backbone stages (train_from) run one per task with the averaging worker step;
both are the heads train_head trains alone with one worker."""
from __future__ import annotations

import numpy as np
import pytest

from deeptransfer.dataset import load_dataset
from deeptransfer.featurization import run_featurize
from deeptransfer.models import ModelSpec
from deeptransfer.selection.search import run_search
from deeptransfer.selection.space import trial_train_config
from deeptransfer.training import TrainConfig, train_head
from deeptransfer.training import shards
from photos import make_photo_dataset
from test_train import SerialExecutor


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_maps_photos")
    make_photo_dataset(root, bad=False)
    manifest = load_dataset(str(root), split="train=0.7,val=0.3", seed=0)
    url = str(tmp_path_factory.mktemp("search_maps") / "maps.zarr")
    with SerialExecutor(0) as ex:
        run_featurize(ex, manifest, url, model=ModelSpec("efficientnet_lite0", layer="blocks.5"),
                      chunk_rows=8, batch_size=8, progress=False, keep_maps=True)
    return url


def test_search_on_maps_runs_head_and_fine_tuning_trials(maps, tmp_path):
    shards.clear_caches()
    space = {"head": ["linear"], "train_from": ["head", "none"], "optimizer": ["sgd"],
             "momentum": 0.9, "lr": [0.01], "dropout": 0.0, "batch_norm": False,
             "weight_decay": 0.0, "label_smoothing": 0.0, "epochs": 2}
    base = TrainConfig(batch_size_per_worker=4, seed=3)
    res = run_search(SerialExecutor(1), maps, str(tmp_path / "s"), space=space, trials=None,
                     sampler="grid", halving=False, base=base, progress=False, retrain=False)
    assert sorted(r["param_train_from"] for r in res.results) == ["head", "none"]
    for r in res.results:
        cfg = trial_train_config({k[6:]: r[k] for k in r if k.startswith("param_")}, base)
        alone = train_head(SerialExecutor(1), maps, TrainConfig(
            **{**cfg.__dict__, "workers": 1, "averaging_frequency": 1000, "patience": None}),
            str(tmp_path / f"alone{r['trial']}"), progress=False, plot=False)
        # the trial's validation score is that of the lone run's last head
        from deeptransfer.evaluation import metrics, predict_split

        pred = predict_split(SerialExecutor(1), maps, alone.last_params, cfg.head, "val",
                             suffix=alone.suffix)
        m = metrics(pred.labels, pred.logits, alone.classes)
        assert r["val_top1"] == pytest.approx(m["top1"], abs=1e-9), r["param_train_from"]
    fine = [r for r in res.results if r["param_train_from"] == "none"][0]
    assert np.isfinite(fine["train_loss"])
