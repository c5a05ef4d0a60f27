"""Spark ML: DeepImageFeaturizer on real photos gives the features `deeptransfer.featurization` stores.

    .venv/bin/python -m pytest tests/test_spark_ml.py -q

One local[2] session for the module (started and stopped through SparkExecutor).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

pytest.importorskip("pyspark")
pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("the Spark engine needs Java", allow_module_level=True)

from deeptransfer.adapters.spark import SparkExecutor  # noqa: E402
from deeptransfer.adapters.spark_ml import (DeepImageFeaturizer, DeepImagePredictor,  # noqa: E402
                                            register_predict_udf)
from deeptransfer.errors import InvalidParameterError, StoreError, UnknownModelError  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.filterwarnings(
    "ignore:PySpark does not yet fully support pandas:FutureWarning")]

BAD = "broken.jpg"


@pytest.fixture(scope="module")
def spark():
    with SparkExecutor(2) as ex:
        yield ex.session


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three real photos as JPEG in two class folders, one corrupt file; their stored features."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_image

    import deeptransfer as dt
    from deeptransfer.store import open_store

    root = tmp_path_factory.mktemp("photos")
    for cls, name, pixels in [("drinks", "coffee.jpg", data.coffee()),
                              ("animals", "chelsea.jpg", data.chelsea()),
                              ("places", "china.jpg", load_sample_image("china.jpg"))]:
        (root / cls).mkdir()
        Image.fromarray(pixels).save(root / cls / name, quality=92)
    (root / "animals" / BAD).write_bytes(b"\xff\xd8\xff\xe0" + b"\x00JFIF" + bytes(200))
    store = str(tmp_path_factory.mktemp("store") / "features.zarr")
    dt.featurize(str(root), store, engine="local", workers=0, progress=False)
    s = open_store(store)
    feats, _ = s.read_rows(np.arange(s.n_rows))
    ok = s["ok"][:]
    paths = [p for c in range(s.n_chunks) for p in s.chunk_paths(c)]
    expected = {os.path.basename(p): (f if k else None) for p, f, k in zip(paths, feats, ok)}
    assert expected[BAD] is None and sum(v is not None for v in expected.values()) == 3
    return root, expected, store


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check(rows, expected, key) -> None:
    got = {os.path.basename(r[key]): r["features"] for r in rows}
    assert set(got) >= set(expected)
    for name, want in expected.items():
        if want is None:
            assert got[name] is None, f"{name}: a bad image must give null features"
        else:
            assert got[name] is not None and len(got[name]) == len(want)
            assert _cosine(got[name], want) >= 0.9999, name
            np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=1e-3)


def test_features_from_paths_equal_the_store(spark, photos):
    root, expected, _ = photos
    paths = sorted(str(p) for p in root.rglob("*.jpg")) + [str(root / "missing.jpg")]
    df = spark.createDataFrame([(p, i) for i, p in enumerate(paths)], ["path", "id"])
    out = DeepImageFeaturizer(inputCol="path", outputCol="features", batchSize=2).transform(df)
    assert out.schema["features"].dataType.simpleString() == "array<float>"
    assert out.columns == ["path", "id", "features"]
    rows = out.collect()
    _check(rows, expected, "path")
    assert next(r for r in rows if r["path"].endswith("missing.jpg"))["features"] is None


def test_features_from_binary_file_rows(spark, photos):
    root, expected, _ = photos
    raw = spark.read.format("binaryFile").option("recursiveFileLookup", "true") \
        .option("pathGlobFilter", "*.jpg").load(str(root))
    out = DeepImageFeaturizer(inputCol="content").transform(raw).select("path", "features")
    rows = out.collect()
    assert len(rows) == 4
    _check(rows, expected, "path")
    # binaryFile's own "file:/..." paths work as a path column too
    by_path = DeepImageFeaturizer().transform(raw.select("path")).collect()
    _check(by_path, expected, "path")


def test_params_defaults_and_persistence(tmp_path):
    f = DeepImageFeaturizer()
    assert (f.getInputCol(), f.getOutputCol(), f.getModelName(), f.getLayer(), f.getBatchSize()) \
        == ("path", "features", "efficientnet_lite0", None, 16)
    assert f.feature_dim() == 1280
    g = f.copy({f.batchSize: 4}).setOutputCol("emb")
    assert (g.getBatchSize(), g.getOutputCol(), f.getBatchSize()) == (4, "emb", 16)
    assert "modelName" in f.explainParams() and f.getOutputType() == "array"
    with pytest.raises(TypeError):
        DeepImageFeaturizer(outputType="tensor")
    with pytest.raises(TypeError):
        DeepImageFeaturizer("path")  # keyword-only, like Spark ML's own transformers


def test_saved_featurizer_loads_back(spark, tmp_path):
    f = DeepImageFeaturizer(inputCol="content", batchSize=8)
    f.write().overwrite().save(str(tmp_path / "featurizer"))
    g = DeepImageFeaturizer.load(str(tmp_path / "featurizer"))
    assert (g.getInputCol(), g.getBatchSize(), g.getModelName()) == \
        ("content", 8, "efficientnet_lite0")


def test_bad_arguments_fail_on_the_driver(spark):
    df = spark.createDataFrame([("a.jpg", 1)], ["path", "n"])
    with pytest.raises(UnknownModelError):
        DeepImageFeaturizer(modelName="no_such_net").transform(df)
    with pytest.raises(UnknownModelError):
        DeepImageFeaturizer(layer="no_such_layer").transform(df)
    with pytest.raises(InvalidParameterError, match="not a column"):
        DeepImageFeaturizer(inputCol="image").transform(df)
    with pytest.raises(InvalidParameterError, match="string"):
        DeepImageFeaturizer(inputCol="n").transform(df)
    with pytest.raises(InvalidParameterError, match="batchSize"):
        DeepImageFeaturizer(batchSize=0).transform(df)


def test_in_a_pipeline_with_spark_ml_classifier(spark, photos):
    """Features -> ML Vector -> LogisticRegression, all inside one Spark ML Pipeline."""
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression

    root, _, _ = photos
    rows = [(str(p), float(i % 2)) for i, p in enumerate(sorted(root.rglob("*.jpg")))
            if p.name != BAD]
    df = spark.createDataFrame(rows, ["path", "label"])
    pipe = Pipeline(stages=[
        DeepImageFeaturizer(outputType="vector"),
        LogisticRegression(maxIter=10, regParam=0.1),
    ])
    pred = pipe.fit(df).transform(df).select("label", "prediction").collect()
    assert len(pred) == 3 and all(r["prediction"] in (0.0, 1.0) for r in pred)


# -- a trained model: DeepImagePredictor and the SQL function ------------------------------------
@pytest.fixture(scope="module")
def model_dir(photos, tmp_path_factory):
    # deeptransfer.api.train: once the deeptransfer.training sub-package has been imported (the
    # job checks do), the package attribute `deeptransfer.training` is that module
    from deeptransfer.api import train

    _, _, store = photos
    out = str(tmp_path_factory.mktemp("model") / "model")
    train(store, out, engine="local", workers=1, engine_options={"n_workers": 0}, epochs=2,
             patience=None, progress=False)
    return out


def _image_paths(root) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.jpg")) + [str(root / "missing.jpg")]


def test_predictor_gives_the_saved_models_predictions(spark, photos, model_dir):
    import deeptransfer as dt

    root, _, _ = photos
    paths = _image_paths(root)
    model = dt.load(model_dir)
    want = {p.path: p for p in model.predict(paths)}
    df = spark.createDataFrame([(p,) for p in paths], ["path"])
    pred = DeepImagePredictor(modelDir=model_dir, probabilityCol="probability", batchSize=2)
    out = pred.transform(df)
    assert out.columns == ["path", "prediction", "probability"]
    rows = out.collect()
    assert_rows_match(rows, want, paths, model.classes)


def test_predictor_uses_the_views_the_model_was_trained_with(spark, photos, model_dir,
                                                             tmp_path):
    # a model of center+flip features must see center+flip features in Spark too
    import deeptransfer as dt
    from model_dirs import copy_with_views

    flip_dir = copy_with_views(model_dir, tmp_path / "flip-model", "center+flip")
    root, _, _ = photos
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    want = {p.path: p.score for p in dt.load(str(flip_dir)).predict(paths)}
    center = {p.path: p.score for p in dt.load(model_dir).predict(paths)}
    good = [p for p in paths if want[p] is not None]  # the dataset has bad files too
    assert good and any(abs(want[p] - center[p]) > 1e-3 for p in good), "views must matter"
    df = spark.createDataFrame([(p,) for p in paths], ["path"])
    pred = DeepImagePredictor(modelDir=str(flip_dir), probabilityCol="probability")
    rows = pred.transform(df).collect()
    assert len(rows) == len(paths)
    for r in rows:
        if want[r["path"]] is None:
            assert r["probability"] is None
        else:
            assert max(r["probability"]) == pytest.approx(want[r["path"]], rel=1e-4), r["path"]


def test_sql_predict_function_on_paths_and_bytes(spark, photos, model_dir):
    import deeptransfer as dt

    root, _, _ = photos
    paths = _image_paths(root)
    want = {p.path: p.label for p in dt.load(model_dir).predict(paths)}
    register_predict_udf(spark, model_dir)
    spark.createDataFrame([(p,) for p in paths], ["path"]).createOrReplaceTempView("images")
    got = {r["path"]: r["label"] for r in
           spark.sql("SELECT path, predict(path) AS label FROM images").collect()}
    assert got == want
    spark.read.format("binaryFile").option("recursiveFileLookup", "true") \
        .option("pathGlobFilter", "*.jpg").load(str(root)).createOrReplaceTempView("raw")
    got = {os.path.basename(r["path"]): r["label"] for r in
           spark.sql("SELECT path, predict(content) AS label FROM raw").collect()}
    assert got == {os.path.basename(p): lab for p, lab in want.items()
                   if not p.endswith("missing.jpg")}


def test_predictor_bad_arguments_fail_on_the_driver(spark, tmp_path):
    df = spark.createDataFrame([("a.jpg",)], ["path"])
    with pytest.raises(InvalidParameterError, match="modelDir"):
        DeepImagePredictor().transform(df)
    with pytest.raises(StoreError, match="not a deeptransfer model"):
        DeepImagePredictor(modelDir=str(tmp_path)).transform(df)
    with pytest.raises(StoreError):
        register_predict_udf(spark, str(tmp_path))
    with pytest.raises(InvalidParameterError, match="name"):
        register_predict_udf(spark, str(tmp_path), name="drop table")


def assert_rows_match(rows, want, paths, classes, *, exact: bool = False) -> None:
    """DeepImagePredictor's rows carry predict's label and probabilities for every path
    (``exact``: every class's probability to the bit; else the top score to 1e-4)."""
    assert len(rows) == len(paths)
    for r in rows:
        w = want[r["path"]]
        assert r["prediction"] == w.label, r["path"]
        if w.label is None:
            assert r["probability"] is None
        elif exact:
            probs = dict(w.top_k)
            np.testing.assert_array_equal(r["probability"], [probs[c] for c in classes])
        else:
            assert len(r["probability"]) == len(classes)
            assert max(r["probability"]) == pytest.approx(w.score, rel=1e-4)
