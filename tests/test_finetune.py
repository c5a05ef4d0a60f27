"""Fine-tuning the backbone's last stages from cached maps, with parameter averaging.

The proofs of issue 12 for a trainable suffix (blocks.6 + conv_head of EfficientNet-Lite0 on
stored blocks.5 maps): one worker is exactly plain minibatch training (bitwise, with the
layer-wise learning rate as torch parameter groups); N workers averaging after every plain
SGD step equal one process with N x the batch; a head-only run on the same maps trains the
head alone; what does not fit the store is refused in one line. That every engine gives the
same weights is in the shipped conformance suite (deeptransfer.testing.job_checks).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deeptransfer.dataset import load_dataset
from deeptransfer.errors import InvalidParameterError
from deeptransfer.featurization import run_featurize
from deeptransfer.models import ModelSpec
from deeptransfer.store import open_store
from deeptransfer.training import TrainConfig, train_head
from deeptransfer.training.averaging import one_torch_thread
from deeptransfer.training.heads import HeadConfig, head_params
from deeptransfer.training.optim import OptimizerConfig, make_optimizer
from deeptransfer.training.trainable import SuffixSpec, build_trainable
from photos import make_photo_dataset
from test_train import SerialExecutor, assert_params_equal
from test_train import reference_loop as train_reference_loop


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_photos")
    make_photo_dataset(root, bad=False)
    return load_dataset(str(root), split="train=0.7,val=0.3", seed=0)


def _featurize(manifest, url, **kw):
    with SerialExecutor(0) as ex:
        run_featurize(ex, manifest, url, model=ModelSpec("efficientnet_lite0", layer=kw.pop(
            "layer", "blocks.5")), chunk_rows=8, batch_size=8, progress=False, **kw)
    return url


@pytest.fixture(scope="module")
def maps(photos, tmp_path_factory):
    return _featurize(photos, str(tmp_path_factory.mktemp("ft") / "maps.zarr"), keep_maps=True)


@pytest.fixture(scope="module")
def pooled(photos, tmp_path_factory):
    return _featurize(photos, str(tmp_path_factory.mktemp("ft") / "pooled.zarr"))


def cfg(**kw) -> TrainConfig:
    base = dict(batch_size_per_worker=4, averaging_frequency=2, epochs=2, seed=3, patience=None,
                optimizer=OptimizerConfig("sgd", lr=0.05, momentum=0.9))
    return TrainConfig(**{**base, **kw})


def reference_loop(url, c: TrainConfig, *, n_parts: int = 1, momentum: float = 0.9):
    """Plain single-process training of the same module (test_train's loop): torch.optim.SGD
    over two parameter groups (the suffix at lr x suffix_lr_scale); with n_parts > 1, one
    step per round on the union of the workers' minibatches."""
    st = open_store(url)
    suffix = SuffixSpec.from_store(st.attrs, c.train_from)
    model = build_trainable(suffix, c.head, st.feature_dim, len(st.classes), seed=c.seed,
                            pretrained=True)
    lr = c.optimizer.lr

    def make_opt(m):
        groups = [{"params": [p for n, p in m.named_parameters() if n.startswith("suffix.")],
                   "lr": lr * c.suffix_lr_scale},
                  {"params": [p for n, p in m.named_parameters()
                              if not n.startswith("suffix.")]}]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=False)

    with one_torch_thread():  # fit_shard's thread count: the same float sums
        return train_reference_loop(url, c.head, make_opt, seed=c.seed, epochs=c.epochs,
                                    batch=c.batch_size_per_worker, repartition=c.repartition,
                                    n_parts=n_parts, model=model)


def test_the_store_holds_maps_and_the_suffix_is_the_stages_after_the_cut(maps):
    st = open_store(maps)
    assert st.attrs["maps"] is True and tuple(st.attrs["feature_shape"]) == (192, 7, 7)
    suffix = SuffixSpec.from_store(st.attrs, None)
    assert suffix.train_from == "blocks.6" and suffix.end == "pool"
    m = build_trainable(suffix, HeadConfig(), st.feature_dim, len(st.classes), pretrained=True)
    names = list(m.state_dict())
    assert names[0].startswith("suffix.blocks_6.") and names[-2:] == ["fc.weight", "fc.bias"]
    # BatchNorm is frozen by folding: no batch statistics, train and eval are one function
    assert not any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    x = torch.from_numpy(st.read_rows(st.split_rows("train")[:3])[0])
    with torch.no_grad():
        assert torch.equal(m.train()(x), m.eval()(x))


def test_one_worker_is_exactly_plain_minibatch_training(maps, tmp_path):
    c = cfg()
    res = train_head(SerialExecutor(1), maps, c, str(tmp_path), progress=False, plot=False)
    ref = reference_loop(maps, c)
    assert_params_equal(res.last_params, ref)
    init = head_params(build_trainable(res.suffix, c.head, 192, 3, seed=3, pretrained=True))
    # the suffix was trained, at its own learning rate: both moved
    for k in ("suffix.blocks_6.0.conv_pw.weight", "fc.weight"):
        assert np.abs(res.last_params[k] - init[k]).max() > 1e-6, k


@pytest.mark.parametrize("workers", [2, 4])
def test_averaging_every_step_equals_n_times_the_batch(maps, tmp_path, workers):
    # 17 train rows in minibatches of 2: every step but the last has 2 rows on every worker
    # (so the mean of the workers' gradients is the union's), the last 1 row on one worker
    c = cfg(workers=workers, averaging_frequency=1, batch_size_per_worker=2,
            optimizer=OptimizerConfig("sgd", lr=0.05, momentum=0.0))
    assert len(open_store(maps).split_rows("train")) == 17
    res = train_head(SerialExecutor(workers), maps, c, str(tmp_path), progress=False,
                     plot=False)
    ref = reference_loop(maps, c, n_parts=workers, momentum=0.0)
    for k in ref:
        scale = max(float(np.abs(ref[k]).max()), 1.0)
        assert np.abs(res.last_params[k] - ref[k]).max() <= 2e-6 * scale, k


def test_layer_wise_learning_rates_take_only_trainable_parameters():
    suffix = SuffixSpec("efficientnet_lite0", None, "blocks.5", (192, 7, 7), "blocks.6")
    m = build_trainable(suffix, HeadConfig(), 192, 4, pretrained=False)
    m.suffix.conv_head.requires_grad_(False)
    opt = make_optimizer(OptimizerConfig("sgd", lr=0.1, weight_decay=1e-4), m, 0.1,
                         {"suffix.": 0.1})
    by_id = {id(p): n for n, p in m.named_parameters()}
    seen = set()
    for g in opt.param_groups:
        for p in g["params"]:
            n = by_id[id(p)]
            seen.add(n)
            assert g["lr"] == pytest.approx(0.01 if n.startswith("suffix.") else 0.1), n
            assert g["weight_decay"] == (1e-4 if p.ndim >= 2 else 0.0), n
    assert not any(n.startswith("suffix.conv_head") for n in seen)
    assert "suffix.blocks_6.0.conv_pw.weight" in seen and "fc.bias" in seen


def test_head_only_on_maps_trains_the_head_on_pooled_maps(maps, pooled, tmp_path):
    res = train_head(SerialExecutor(1), maps, cfg(train_from="head"), str(tmp_path),
                     progress=False, plot=False)
    assert res.suffix.train_from is None and list(res.last_params) == ["fc.weight", "fc.bias"]
    # the pooled maps are the pooled store's vectors (to float16 rounding of the maps)
    a, b = open_store(maps), open_store(pooled)
    rows = a.split_rows("train")
    xm = a.read_rows(rows)[0].mean((2, 3))
    xp = b.read_rows(rows)[0]
    assert np.abs(xm - xp).max() <= 2e-3 * np.abs(xp).max()


def test_what_does_not_fit_the_store_is_refused_before_training(maps, pooled, tmp_path):
    with pytest.raises(InvalidParameterError, match="--keep-maps"):
        train_head(SerialExecutor(1), pooled, cfg(train_from="blocks.6"), str(tmp_path / "a"),
                   progress=False)
    with pytest.raises(InvalidParameterError, match="'blocks.6'"):
        train_head(SerialExecutor(1), maps, cfg(train_from="blocks.4"), str(tmp_path / "b"),
                   progress=False)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_a_fine_tuning_run_stopped_mid_epoch_resumes_to_the_same_weights(photos, tmp_path):
    url = _featurize(photos, str(tmp_path / "views.zarr"), keep_maps=True, train_views=2)
    c = cfg(epochs=3, optimizer=OptimizerConfig("adam", lr=1e-3))
    whole = train_head(SerialExecutor(2), url, c, str(tmp_path / "whole"), progress=False,
                       plot=False)

    class Stop(Exception):
        pass

    seen = []

    def stop_at_round_4(record):
        seen.append(record)
        if len(seen) == 4:
            raise Stop

    with pytest.raises(Stop):
        train_head(SerialExecutor(2), url, c, str(tmp_path / "cut"), progress=False, plot=False,
                   callback=stop_at_round_4)
    resumed = train_head(SerialExecutor(2), url, c, str(tmp_path / "cut"), progress=False,
                         plot=False)
    assert_params_equal(whole.last_params, resumed.last_params)
    assert_params_equal(whole.params, resumed.params)


def test_predict_on_the_files_gives_evaluations_probabilities_on_the_store(maps, tmp_path):
    import deeptransfer as dt
    from deeptransfer.evaluation import predict_split

    res = train_head(SerialExecutor(2), maps, cfg(), str(tmp_path / "m"), progress=False,
                     plot=False)
    model = dt.load(tmp_path / "m")
    assert model.suffix == res.suffix and model.suffix.train_from == "blocks.6"
    st = open_store(maps)
    pred = predict_split(SerialExecutor(1), maps, res.params, res.head, "val",
                         suffix=res.suffix)
    want = torch.softmax(torch.from_numpy(pred.logits), dim=1).numpy()
    paths = [str(p) for p in st["paths"][:][pred.rows]]
    with one_torch_thread():  # the workers' thread count: the same float sums
        got, reasons = model.predict_proba_sources(paths)
    assert not any(reasons)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # and it is the tuned suffix that ran: the backbone's own stages give other numbers
    pretrained = build_trainable(res.suffix, res.head, 192, 3, seed=3, pretrained=True)
    assert not np.allclose(head_params(pretrained)["suffix.conv_head.0.weight"],
                           res.params["suffix.conv_head.0.weight"])
