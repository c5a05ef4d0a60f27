"""Spark ML with a model that holds a tuned suffix: DeepImagePredictor and the SQL predict
function run prefix + saved suffix + head, as ``TransferModel.predict`` does.

    .venv/bin/python -m pytest tests/test_spark_ml_suffix.py -q

One local[1] session for the module.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("pyspark")
pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("the Spark engine needs Java", allow_module_level=True)

import deeptransfer as dt  # noqa: E402
from deeptransfer.adapters.spark import SparkExecutor  # noqa: E402
from deeptransfer.adapters.spark_ml import DeepImagePredictor, register_predict_udf  # noqa: E402
from suffix_models import save_suffix_model, tuned_params  # noqa: E402
from test_spark_ml import assert_rows_match  # noqa: E402

pytestmark = [pytest.mark.spark, pytest.mark.filterwarnings(
    "ignore:PySpark does not yet fully support pandas:FutureWarning")]


@pytest.fixture(scope="module")
def spark():
    with SparkExecutor(1) as ex:
        yield ex.session


def test_predictor_and_sql_function_run_the_saved_suffix(spark, tmp_path):
    from PIL import Image
    from skimage import data

    for name, pixels in [("coffee.jpg", data.coffee()), ("chelsea.jpg", data.chelsea()),
                         ("rocket.jpg", data.rocket())]:
        Image.fromarray(pixels).save(tmp_path / name, quality=92)
    paths = [str(tmp_path / n) for n in ("coffee.jpg", "chelsea.jpg", "rocket.jpg",
                                         "missing.jpg")]
    model_dir = str(save_suffix_model(tmp_path / "model", tuned_params(), views="center+flip",
                                      dtype="float16"))
    model = dt.load(model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the Spark worker runs (equal threads: equal CPU features)
    try:
        want = {p.path: p for p in model.predict(paths, top_k=3, batch_size=2)}
    finally:
        torch.set_num_threads(threads)
    assert want[paths[-1]].error and all(want[p].error is None for p in paths[:3])
    df = spark.createDataFrame([(p,) for p in paths], ["path"])
    rows = DeepImagePredictor(modelDir=model_dir, probabilityCol="probability",
                              batchSize=2).transform(df).collect()
    assert_rows_match(rows, want, paths, model.classes, exact=True)
    # the SQL function, on encoded bytes
    register_predict_udf(spark, model_dir, batch_size=2)
    spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg").load(str(tmp_path)) \
        .createOrReplaceTempView("raw")
    got = {os.path.basename(r["path"]): r["label"] for r in
           spark.sql("SELECT path, predict(content) AS label FROM raw").collect()}
    assert got == {os.path.basename(p): want[p].label for p in paths[:3]}
