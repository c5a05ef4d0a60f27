"""S3 for real: an S3-compatible server (moto's standalone server) on 127.0.0.1, stopped by
the fixture; featurize from s3:// (a folder tree, a manifest, a Parquet table, shards) to an
s3:// store, train with the model directory on s3://, evaluate and predict from there."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("pyarrow")
moto_server = pytest.importorskip("moto.server")

import deeptransfer as dt  # noqa: E402
from deeptransfer.store import open_store  # noqa: E402
from deeptransfer.testing.source_checks import write_sources  # noqa: E402

BUCKET = "photos"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with a bucket holding the source-check layouts; the
    environment points botocore at it (workers inherit it); stopped at the end."""
    import s3fs

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir(BUCKET)
        local = write_sources(tmp_path_factory.mktemp("s3data"))
        root = os.path.dirname(local["folder"])
        fs.put(root + "/", f"{BUCKET}/data/", recursive=True)
        s3fs.S3FileSystem.clear_instance_cache()
        yield {"options": options, "fs": fs, "local": local,
               "url": lambda p: f"s3://{BUCKET}/data/{os.path.relpath(p, root)}"}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


FEAT = dict(chunk_rows=4, batch_size=4, split="train=0.5,val=0.25,test=0.25", seed=3,
            progress=False)


@pytest.fixture(scope="module")
def s3_store(s3):
    """The folder tree on S3 featurized into a store on S3."""
    store = f"s3://{BUCKET}/stores/folder.zarr"
    rep = dt.featurize(s3["url"](s3["local"]["folder"]), store, storage_options=s3["options"],
                       **FEAT)
    return store, rep


def test_featurize_train_evaluate_predict_on_s3(s3, s3_store):
    so = s3["options"]
    folder = s3["url"](s3["local"]["folder"])
    store, rep = s3_store
    assert rep.featurized == 14 and len(rep.skipped) == 1
    st = open_store(store, storage_options=so)
    assert st.is_complete() and all(str(p).startswith("s3://") for p in st["paths"][:])
    # the same images from a local folder give the same features
    local_store = str(s3["local"]["folder"]) + "_local.zarr"
    dt.featurize(s3["local"]["folder"], local_store, **FEAT)
    assert np.array_equal(open_store(local_store)["features"][:], st["features"][:])
    model_dir = f"s3://{BUCKET}/models/head"
    res = dt.train(store, model_dir, storage_options=so, epochs=3, workers=1, progress=False)
    for name in ("config.json", "head.safetensors"):  # the model directory is on S3
        assert s3["fs"].exists(f"{BUCKET}/models/head/{name}")
    m = dt.evaluate(model_dir, store, split="test", storage_options=so)
    assert m["n"] > 0 and 0.0 <= m["top1"] <= 1.0
    model = dt.load(model_dir)
    img = f"{folder}/a/img_0.jpg"
    pred = model.predict([img], storage_options=so)
    assert pred[0].error is None and pred[0].label in st.classes
    # predict reads the image from S3 and gives the probabilities of its stored features
    row = [str(p) for p in st["paths"][:]].index(img)
    feats = st["features"][row:row + 1]
    probs = model.predict_proba_features(feats)[0]
    assert pred[0].label == st.classes[int(np.argmax(probs))]
    assert res is not None


@pytest.mark.parametrize("kind", ["csv", "parquet", "webdataset"])
def test_remote_sources_give_the_folder_store(s3, s3_store, kind):
    so = s3["options"]
    ref_store = s3_store[0]
    url = s3["url"](s3["local"][kind])
    store = f"s3://{BUCKET}/stores/{kind}.zarr"
    rep = dt.featurize(url, store, storage_options=so, **FEAT)
    assert rep.featurized == 14, rep.skipped
    a, b = open_store(ref_store, storage_options=so), open_store(store, storage_options=so)
    assert a["features"][:].tobytes() == b["features"][:].tobytes()
    assert list(a["labels"][:]) == list(b["labels"][:])
    if kind == "csv":  # uris relative to the manifest: on the manifest's bucket
        assert all(str(p).startswith(f"s3://{BUCKET}/data/folder/") for p in b["paths"][:])
