"""Augmented training views featurized once (featurize --train-views K): the crop-box kernel
against Pillow, the seeded boxes, the view rows of a store (bitwise the same on any worker
count and after a resume), the per-epoch draw, and the rows a training round reads."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deeptransfer import worker_state
from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.augment import TrainViews, draw_view, random_resized_box, view_rng
from deeptransfer.dataset import load_dataset
from deeptransfer.featurization import run_featurize
from deeptransfer.kernels import resized_crop_normalize
from deeptransfer.models import ModelSpec
from deeptransfer.store import open_store
from deeptransfer.training import shards
from deeptransfer.training.shards import ShardTask, load_round, partition_rows
from photos import make_photo_dataset

SPLIT = "train=0.5,val=0.25,test=0.25"
HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# -- the kernel and the boxes ----------------------------------------------------------------
def _reference(img, box, crop, flip, two_pass=True):
    """PIL crop, bicubic resize (Pillow's horizontal pass, then its vertical pass, as its
    Resample.c orders them; or one resize call), flip, as 8-bit values."""
    top, left, h, w = box
    c = Image.fromarray(img).crop((left, top, left + w, top + h))
    if two_pass:
        c = c.resize((crop, h), Image.BICUBIC)
    a = np.asarray(c.resize((crop, crop), Image.BICUBIC)).astype(np.float32)
    return a[:, ::-1] if flip else a


def test_box_crop_kernel_matches_pillow_crop_resize_and_flip():
    from skimage import data

    img = data.chelsea()  # 300 x 451
    rng = np.random.default_rng(0)
    boxes = [(0, 0, 300, 451), (37, 101, 120, 95), (250, 400, 50, 51), (5, 9, 30, 44)]
    for _ in range(40):  # down- and upscales, mixed, boxes at the borders
        h, w = int(rng.integers(1, 301)), int(rng.integers(1, 452))
        boxes.append((int(rng.integers(0, 301 - h)), int(rng.integers(0, 452 - w)), h, w))
    flips = [i % 2 == 1 for i in range(len(boxes))]
    for layout in ("nhwc", "nchw"):
        shape = (len(boxes), 96, 96, 3) if layout == "nhwc" else (len(boxes), 3, 96, 96)
        out = np.full(shape, -9.0, np.float32)
        # mean 0, std 1/255: the normalized values are the 8-bit ones
        resized_crop_normalize([img] * len(boxes), boxes, out, crop=96, flips=flips,
                               layout=layout, parallel=False, mean=(0, 0, 0), std=(1 / 255,) * 3)
        got = out if layout == "nhwc" else out.transpose(0, 2, 3, 1)
        for i, (box, flip) in enumerate(zip(boxes, flips)):
            np.testing.assert_array_equal(got[i], _reference(img, box, 96, flip), err_msg=str(box))
            one_call = _reference(img, box, 96, flip, two_pass=False)
            assert np.abs(got[i] - one_call).max() <= 2, box
    out = np.zeros((1, 96, 96, 3), np.float32)
    resized_crop_normalize([img], [boxes[1]], out, crop=96, **HALF)  # normalization as ever
    ref = _reference(img, boxes[1], 96, False) / np.float32(255.0) * 2 - 1
    np.testing.assert_allclose(out[0], ref, atol=1e-6)
    with pytest.raises(ValueError, match="not inside"):
        resized_crop_normalize([img], [(0, 0, 301, 10)], out[:1], crop=96, **HALF)


def test_boxes_are_seeded_inside_the_image_and_within_scale():
    tv = TrainViews(k=4)
    seen = set()
    for row in range(200):
        box, flip = draw_view(300, 451, tv, seed=3, image_row=row, view=1)
        assert draw_view(300, 451, tv, seed=3, image_row=row, view=1) == (box, flip)
        top, left, h, w = box
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 451
        assert 0.25 * 0.98 <= h * w / (300 * 451) <= 1.0 + 1e-9
        assert 0.75 * 0.97 <= w / h <= 4 / 3 * 1.03
        seen.add((box, flip))
    assert len(seen) == 200  # 200 different views
    flips = [draw_view(300, 451, tv, seed=3, image_row=r, view=2)[1] for r in range(400)]
    assert 150 < sum(flips) < 250
    assert draw_view(300, 451, tv, seed=4, image_row=0, view=1) != draw_view(
        300, 451, tv, seed=3, image_row=0, view=1)
    # a box no try can fit (a 1 x 500 strip): torchvision's fallback, the center
    assert random_resized_box(1, 500, view_rng(0, 0, 1)) == (0, 249, 1, 1)


# -- the store -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("photos")
    make_photo_dataset(r)  # with its bad files: their views are skipped with them
    return str(r)


def _featurize(ex, root, url, k, **kw):
    manifest = load_dataset(root, split=SPLIT)
    return run_featurize(ex, manifest, url, model=ModelSpec("efficientnet_lite0"), chunk_rows=8,
                         batch_size=4, train_views=k, seed=5, progress=False, **kw)


@pytest.fixture(scope="module")
def stores(root, tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    urls = {n: str(d / f"{n}.zarr") for n in ("plain", "serial", "two")}
    # one thread per task everywhere: CPU convolutions are bitwise equal for equal threads
    with LocalExecutor(0, threads_per_worker=1) as ex:
        _featurize(ex, root, urls["plain"], 0)
        _featurize(ex, root, urls["serial"], 2)
    with LocalExecutor(2) as ex:
        _featurize(ex, root, urls["two"], 2)
    return urls


ARRAYS = ("features", "ok", "reasons", "labels", "split", "paths", "image", "view")


def test_views_follow_the_images_tied_to_them(stores):
    plain, st = open_store(stores["plain"]), open_store(stores["serial"])
    n = plain.n_rows
    train = np.flatnonzero(plain["split"][:] == 0)
    assert st.n_images == n and st.n_rows == n + 2 * len(train) and st.train_views == 2
    assert st.attrs["train_views"] == {"k": 2, "scale": [0.25, 1.0],
                                       "ratio": [0.75, 4 / 3], "flip": True}
    image, view = st["image"][:], st["view"][:]
    assert image.dtype == np.int32 and view.dtype == np.int8
    np.testing.assert_array_equal(image[n:], np.repeat(train, 2))
    np.testing.assert_array_equal(view[n:], np.tile([1, 2], len(train)))
    np.testing.assert_array_equal(st["labels"][n:], plain["labels"][:][image[n:]])
    # the image rows are the store without views, bitwise; evaluation sees only them
    for name in ("features", "ok", "reasons", "labels", "split", "paths"):
        assert np.array_equal(st[name][:n], plain[name][:]), name
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(st.split_rows(split), plain.split_rows(split))
    assert st.skipped() == plain.skipped()  # a bad image once, not once per view
    ok = st["ok"][:]
    np.testing.assert_array_equal(ok[n:], ok[image[n:]])  # a view is there iff its image is
    f = st["features"][:]
    good = np.flatnonzero(ok[n:]) + n
    assert len(good) > 10
    # every view is another picture of its image: near its center view, never equal to it
    d_view = np.linalg.norm(f[good] - f[image[good]], axis=1)
    d_other = np.linalg.norm(f[good] - f[np.roll(image[good], 3)], axis=1)
    assert (d_view > 0).all() and np.median(d_view) < np.median(d_other)
    assert plain.summary()["view_rows"] == 0 and st.summary()["view_rows"] == n_views(st)


def n_views(st):
    return st.n_rows - st.n_images


def test_views_are_bitwise_the_same_on_any_worker_count(stores):
    a, b = open_store(stores["serial"]), open_store(stores["two"])
    for name in ARRAYS:
        assert np.array_equal(a[name][:], b[name][:]), name


def test_a_killed_run_with_views_resumes_to_the_same_store(stores, root, tmp_path):
    url = str(tmp_path / "killed.zarr")
    calls = []

    def die(res):
        calls.append(res.chunk)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with LocalExecutor(0, threads_per_worker=1) as ex:
        with pytest.raises(KeyboardInterrupt):
            run_featurize(ex, load_dataset(root, split=SPLIT), url,
                          model=ModelSpec("efficientnet_lite0"), chunk_rows=8, batch_size=4,
                          train_views=2, seed=5, progress=die)
        st = open_store(url, check=False)
        assert st.pending_chunks() and st.pending_chunks()[-1] == st.n_chunks - 1  # views left
        rep = _featurize(ex, root, url, 2)
    assert rep.computed_now > 0 and rep.view_rows == n_views(open_store(url))
    a, b = open_store(stores["serial"]), open_store(url)
    for name in ARRAYS:
        assert np.array_equal(a[name][:], b[name][:]), name
    with LocalExecutor(0) as ex:  # other views are another store: refused, not mixed
        from deeptransfer.errors import StoreError

        with pytest.raises(StoreError, match="train_views"):
            _featurize(ex, root, url, 3)


# -- training draws a view per image per epoch -----------------------------------------------
def test_view_rows_are_seeded_uniform_and_a_function_of_the_image_row(stores):
    st = open_store(stores["serial"])
    train = st.split_rows("train")
    table = st.view_table(train)
    assert table.shape == (len(train), 3) and (table[:, 0] == train).all()
    v0 = st.view_rows(train, seed=1, epoch=0)
    np.testing.assert_array_equal(v0, st.view_rows(train, seed=1, epoch=0))
    # the same row whatever else is asked with it, in any order
    np.testing.assert_array_equal(st.view_rows(train[::-1], seed=1, epoch=0), v0[::-1])
    np.testing.assert_array_equal(st.view_rows(train[3:5], seed=1, epoch=0), v0[3:5])
    counts = np.zeros(3)
    epochs = [st.view_choice(train, seed=1, epoch=e) for e in range(300)]
    for c in epochs:
        counts += np.bincount(c, minlength=3)
    ok_views = st["ok"][:][table[:, 1:]].all(axis=1)
    assert ok_views.all()  # the skipped images are not in split_rows
    n = 300 * len(train)
    assert (np.abs(counts - n / 3) < 4 * np.sqrt(n * 2 / 9)).all(), counts  # uniform on {0,1,2}
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(st.view_choice(train, seed=2, epoch=0), epochs[0])
    plain = open_store(stores["plain"])
    np.testing.assert_array_equal(plain.view_rows(train, seed=1, epoch=4), train)


@pytest.mark.parametrize("repartition", ["epoch", "never"])
@pytest.mark.parametrize("cache", ["split", "partition", "none"])
def test_a_round_reads_each_images_view_of_the_epoch(stores, repartition, cache):
    url = stores["serial"]
    st = open_store(url)
    train = st.split_rows("train")  # 1280 x 4 + 8 bytes a row, 3 rows (image + 2 views) each
    per_image = (1280 * 4 + 8) * 3
    part = shards.partition_sizes(len(train), 2)[0]  # partition 0, the larger one
    assert part < len(train) and part >= 6
    cap = {"split": len(train) * per_image, "partition": part * per_image,
           "none": (part - 1) * per_image}[cache]
    worker_state.forget(shards.FEATURES)
    worker_state.forget(shards.ROWS)
    drawn = []
    for epoch, offset, count in [(0, 0, 4), (0, 4, 2), (1, 1, 5), (2, 0, 6)]:
        task = ShardTask(url, "train", seed=1, epoch=epoch, n_parts=2, part=0, offset=offset,
                         count=count, repartition=repartition, cache_bytes=cap)
        rows = partition_rows(train, seed=1, epoch=epoch, n_parts=2, part=0,
                              repartition=repartition)[offset:offset + count]
        x, y = load_round(task)
        views = st.view_rows(rows, seed=1, epoch=epoch)
        xr, yr = st.read_rows(views)
        assert x.dtype == np.float32 and x.shape == (count, 1280)
        np.testing.assert_array_equal(x, xr)
        np.testing.assert_array_equal(y, yr)
        drawn.extend(views >= st.n_images)
        assert worker_state.stats(shards.FEATURES).nbytes <= cap
    assert any(drawn) and not all(drawn)  # views and center rows both trained on
    kept = worker_state.stats(shards.FEATURES).entries
    assert kept == (0 if cache == "none" else 1)


def test_training_on_views_is_the_same_on_any_engine_and_uses_the_views(stores, tmp_path):
    from deeptransfer.training import HeadConfig, OptimizerConfig, TrainConfig, train_head

    c = TrainConfig(head=HeadConfig("softmax"), optimizer=OptimizerConfig("sgd", lr=0.1),
                    workers=2, batch_size_per_worker=2, averaging_frequency=2, epochs=3, seed=3,
                    patience=None)

    def fit(ex, url, name):
        shards.clear_caches()
        return train_head(ex, url, c, str(tmp_path / name), progress=False, plot=False)

    with LocalExecutor(0, threads_per_worker=1) as ex:
        a = fit(ex, stores["serial"], "a")
        plain = fit(ex, stores["plain"], "plain")
    with LocalExecutor(2) as ex:
        b = fit(ex, stores["serial"], "b")
    for k in a.last_params:
        np.testing.assert_array_equal(a.last_params[k], b.last_params[k], err_msg=k)
    # the views were trained on: another head than on the same images' center rows only
    assert any(not np.array_equal(a.last_params[k], plain.last_params[k]) for k in a.last_params)


def test_a_map_store_with_views_and_its_repair(root, tmp_path, capsys):
    import os
    import shutil

    from deeptransfer.cli import main
    from deeptransfer.errors import StoreError

    url = str(tmp_path / "mv.zarr")
    with LocalExecutor(0, threads_per_worker=1) as ex:
        rep = run_featurize(
            ex, load_dataset(root, split=SPLIT), url,
            model=ModelSpec("efficientnet_lite0", "blocks.5"), keep_maps=True, chunk_rows=8,
            batch_size=4, train_views=1, seed=5, progress=False)
    st = open_store(url)
    assert rep.feature_shape == [192, 7, 7] and rep.view_rows == st.n_rows - st.n_images > 0
    assert st["features"].shape == (st.n_rows, 192, 7, 7) and st["features"].dtype == np.float16
    train = st.split_rows("train")
    views = st.view_rows(train, seed=0, epoch=0)
    x, _ = st.read_rows(views)
    assert x.shape == (len(train), 192, 7, 7)
    task = ShardTask(url, "train", seed=0, epoch=0, n_parts=1, part=0, offset=0,
                     count=len(train), repartition="epoch")
    xr, _ = load_round(task)
    np.testing.assert_array_equal(
        xr, st.read_rows(st.view_rows(partition_rows(train, seed=0, epoch=0, n_parts=1,
                                                     part=0, repartition="epoch"),
                                      seed=0, epoch=0))[0])
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert "train views  1 per training image" in out and "192 x 7 x 7" in out
    before = {n: st[n][:] for n in ARRAYS}
    # a view chunk's features and a chunk of the view index lost: refused, then repaired
    last = st.n_chunks - 1
    os.remove(os.path.join(url, st._keys("features")[last]))
    os.remove(os.path.join(url, st._keys("view")[0]))
    with pytest.raises(StoreError, match="damaged"):
        open_store(url)
    with LocalExecutor(0, threads_per_worker=1) as ex:
        again = run_featurize(ex, load_dataset(root, split=SPLIT), url,
                              model=ModelSpec("efficientnet_lite0", "blocks.5"), keep_maps=True,
                              chunk_rows=8, batch_size=4, train_views=1, seed=5, progress=False)
    assert set(again.repaired_chunks) >= {0, last}
    st = open_store(url)
    for n in ARRAYS:
        assert np.array_equal(before[n], st[n][:]), n
    shutil.rmtree(url)
