"""Spark ML and SQL: pretrained-CNN features as a column, like Deep Learning Pipelines.

    from deeptransfer.adapters.spark_ml import DeepImageFeaturizer
    df = spark.createDataFrame([("photos/cat.jpg",), ("photos/dog.jpg",)], ["path"])
    feats = DeepImageFeaturizer(inputCol="path", outputCol="features").transform(df)

    raw = spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg").load("s3://b/photos")
    feats = DeepImageFeaturizer(inputCol="content").transform(raw)   # decoded from the bytes

The features column is ``array<float>``, or an ML Vector with ``outputType="vector"`` (what
Spark ML's own estimators take, e.g. in a Pipeline before LogisticRegression); an image
that cannot be read or decoded gets a null, never a failed job. Each Python worker builds
the model once (the core's ``get_runner`` cache; keep ``spark.python.worker.reuse`` on,
Spark's default) and runs the same per-image steps as ``deeptransfer.featurization``
(``load_image`` / ``decode_image`` -> ``preprocess_batch`` -> ``runner.forward``), so the
features equal the Zarr store's.

A trained model directory (``deeptransfer train``) classifies images the same way (its
frozen prefix, tuned suffix and head, as ``TransferModel.predict``), as a transformer or as
a SQL function:

    from deeptransfer.adapters.spark_ml import DeepImagePredictor, register_predict_udf
    DeepImagePredictor(modelDir="model/", probabilityCol="probability").transform(df)
    register_predict_udf(spark, "model/")          # SELECT path, predict(path) FROM images

The model's files are read on the driver and shipped with the job, so the workers need no
access to the model directory.

Rows reach the model in Arrow batches of ``spark.sql.execution.arrow.maxRecordsPerBatch``
rows (10,000 by default): with ``binaryFile`` content that is 10,000 encoded images in one
worker's memory, so lower it (e.g. to 256) for a content column.
"""
from typing import Any, Iterator, List, Optional

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Model, Transformer
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasOutputCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame
from pyspark.sql.functions import col, pandas_udf
from pyspark.sql.types import (ArrayType, BinaryType, FloatType, StringType, StructField,
                               StructType)

from deeptransfer.errors import InvalidParameterError

__all__ = ["DeepImageFeaturizer", "DeepImagePredictor", "register_predict_udf",
           "featurize_values"]


def _to_optional_string(value: Any) -> Optional[str]:
    return None if value is None else TypeConverters.toString(value)


OUTPUT_TYPES = ("array", "vector")


def _to_output_type(value: Any) -> str:
    if value not in OUTPUT_TYPES:
        raise TypeError(f"outputType must be one of {', '.join(map(repr, OUTPUT_TYPES))}; "
                        f"got {value!r}.")
    return value


class DeepImageFeaturizer(Transformer, HasInputCol, HasOutputCol, DefaultParamsReadable,
                          DefaultParamsWritable):
    """Adds a column of frozen pretrained-CNN features of images given by path or by bytes.

    ``inputCol``: a string column of image paths (local paths, ``file:`` URIs as
    ``binaryFile`` writes them, or fsspec URLs such as ``s3://``) or a binary column of
    encoded images (``content`` of the ``binaryFile`` source). ``modelName``/``layer``/
    ``weights``: the backbone, as in ``deeptransfer featurize`` (``deeptransfer models``
    lists them; ``layer=None`` is the model's default feature layer). ``batchSize``: images
    per forward pass in each worker. ``outputType``: ``"array"`` (array<float>, the
    default) or ``"vector"`` (an ML DenseVector, what Spark ML's estimators take).
    """

    modelName: "Param[str]" = Param(
        Params._dummy(), "modelName", "backbone from deeptransfer's model zoo",
        typeConverter=TypeConverters.toString)
    layer: "Param[Optional[str]]" = Param(
        Params._dummy(), "layer", "layer the network is cut at (None: the model's default)",
        typeConverter=_to_optional_string)
    weights: "Param[Optional[str]]" = Param(
        Params._dummy(), "weights", "state-dict path or URL (None: the model's default weights)",
        typeConverter=_to_optional_string)
    batchSize: "Param[int]" = Param(
        Params._dummy(), "batchSize", "images per forward pass in a worker (>= 1)",
        typeConverter=TypeConverters.toInt)
    outputType: "Param[str]" = Param(
        Params._dummy(), "outputType",
        "'array' (array<float>) or 'vector' (an ML Vector, for Spark ML estimators)",
        typeConverter=_to_output_type)

    @keyword_only
    def __init__(self, *, inputCol: str = "path", outputCol: str = "features",
                 modelName: str = "efficientnet_lite0", layer: Optional[str] = None,
                 weights: Optional[str] = None, batchSize: int = 16,
                 outputType: str = "array") -> None:
        super().__init__()
        self._setDefault(inputCol="path", outputCol="features", modelName="efficientnet_lite0",
                         layer=None, weights=None, batchSize=16, outputType="array")
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, inputCol: str = "path", outputCol: str = "features",
                  modelName: str = "efficientnet_lite0", layer: Optional[str] = None,
                  weights: Optional[str] = None, batchSize: int = 16,
                  outputType: str = "array") -> "DeepImageFeaturizer":
        return self._set(**self._input_kwargs)

    def setInputCol(self, value: str) -> "DeepImageFeaturizer":
        return self._set(inputCol=value)

    def setOutputCol(self, value: str) -> "DeepImageFeaturizer":
        return self._set(outputCol=value)

    def setModelName(self, value: str) -> "DeepImageFeaturizer":
        return self._set(modelName=value)

    def getModelName(self) -> str:
        return self.getOrDefault(self.modelName)

    def setLayer(self, value: Optional[str]) -> "DeepImageFeaturizer":
        return self._set(layer=value)

    def getLayer(self) -> Optional[str]:
        return self.getOrDefault(self.layer)

    def setWeights(self, value: Optional[str]) -> "DeepImageFeaturizer":
        return self._set(weights=value)

    def getWeights(self) -> Optional[str]:
        return self.getOrDefault(self.weights)

    def setBatchSize(self, value: int) -> "DeepImageFeaturizer":
        return self._set(batchSize=value)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def setOutputType(self, value: str) -> "DeepImageFeaturizer":
        return self._set(outputType=value)

    def getOutputType(self) -> str:
        return self.getOrDefault(self.outputType)

    def feature_dim(self) -> int:
        """Width of the features column (known without building the model)."""
        from deeptransfer.models import get_model_info
        from deeptransfer.models.registry import resolve_layer

        info = get_model_info(self.getModelName())
        return info.layers[resolve_layer(info, self.getLayer())]

    def _spec(self) -> Any:
        """The worker's FeaturizeSpec; unknown model or layer names fail here, on the driver."""
        from deeptransfer.errors import check_int
        from deeptransfer.featurization import FeaturizeSpec
        from deeptransfer.models import ModelSpec, get_model_info
        from deeptransfer.models.registry import resolve_layer

        check_int("batchSize", self.getBatchSize(), low=1, where="DeepImageFeaturizer")
        info = get_model_info(self.getModelName())
        layer = resolve_layer(info, self.getLayer())
        model = ModelSpec(name=self.getModelName(), layer=layer, weights=self.getWeights())
        from deeptransfer.backends import default_backend

        # featurize's default backend, so the transformer gives a default store's rows
        return FeaturizeSpec(store_url="", model=model, batch_size=self.getBatchSize(),
                             backend=default_backend())

    def _transform(self, dataset: DataFrame) -> DataFrame:
        in_col = _check_image_column(dataset, self.getInputCol(), "DeepImageFeaturizer")
        dtype = dataset.schema[in_col].dataType
        udf = _features_udf(self._spec(), isinstance(dtype, BinaryType))
        features = udf(col(in_col))
        if self.getOutputType() == "vector":
            from pyspark.ml.functions import array_to_vector

            features = array_to_vector(features)
        return dataset.withColumn(self.getOutputCol(), features)


def _features_udf(spec: Any, binary: bool) -> Any:
    @pandas_udf(ArrayType(FloatType()))  # type: ignore[call-overload]
    def features(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        from deeptransfer.featurization import get_runner

        runner = get_runner(spec)  # built once per Python worker, then cached
        for values in batches:
            yield pd.Series(featurize_values(runner, values.tolist(), binary=binary),
                            dtype=object)

    return features


def _local_path(path: str) -> str:
    # binaryFile writes local paths as "file:/dir/x.jpg"; the core reads "file:///dir/x.jpg"
    if path.startswith("file:") and not path.startswith("file://"):
        return path[len("file:"):]
    return path


def _source(value: Any, binary: Optional[bool]) -> Any:
    if value is None:
        return None
    if binary or (binary is None and isinstance(value, (bytes, bytearray, memoryview))):
        return bytes(value)
    return _local_path(str(value))


def featurize_values(runner: Any, values: List[Any], *, binary: Optional[bool] = None,
                     views: str = "center",
                     storage_options: Any = None) -> List[Optional[np.ndarray]]:
    """Features of each image (a path, or encoded bytes); None where it fails.

    ``binary``: whether the values are encoded images (True) or paths (False); None decides
    per value (bytes-like: an image, anything else: a path). The core's
    ``featurize_sources`` does the work, so a row gets exactly the features (and ``views``)
    ``featurize`` and ``TransferModel.predict`` give it; a file that cannot be read or
    decoded, a degenerate image and non-finite features give None.
    """
    from deeptransfer.featurization import featurize_sources

    feats, reasons = featurize_sources(runner, [_source(v, binary) for v in values],
                                       views=views, storage_options=storage_options)
    return [None if reasons[i] else feats[i] for i in range(len(values))]


# -- trained models ---------------------------------------------------------------------------
MODEL_FILES = ("config.json", "head.safetensors")


def _read_model(model_dir: str) -> dict:
    """The files of a saved model, checked by loading it here, on the driver."""
    import os

    import hashlib

    import deeptransfer

    model = deeptransfer.load(model_dir)  # a bad directory fails now, with its reason
    files = {}
    for name in MODEL_FILES:
        with open(os.path.join(model_dir, name), "rb") as f:
            files[name] = f.read()
    # the workers' cache key, computed once here rather than per batch there
    key = hashlib.sha256(b"".join(files[n] for n in MODEL_FILES)).hexdigest()
    return {"files": files, "classes": list(model.classes), "key": key}


#: kind of the saved models in the one worker cache (``deeptransfer.worker_state``)
MODELS = "saved_model"


def _worker_model(model: dict) -> Any:
    """The model rebuilt from its files in a worker process, once per process and model (the
    core's worker cache, keyed by the files' digest)."""
    from deeptransfer import worker_state

    def build() -> Any:
        import os
        import tempfile

        import deeptransfer

        with tempfile.TemporaryDirectory(prefix="deeptransfer-model-") as d:
            for name, data in model["files"].items():
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
            return deeptransfer.load(d)

    return worker_state.get(MODELS, (model["key"],), build)


def _predict_values(saved: dict, batch_size: int, values: List[Any]
                    ) -> List[Optional[np.ndarray]]:
    """Class probabilities of each image (a path or encoded bytes); None where it fails.

    ``TransferModel.predict_proba_sources`` does the work: the same prefix, tuned suffix,
    head and views as ``predict``, with the runner from the core's cache.
    """
    model = _worker_model(saved)
    probs, reasons = model.predict_proba_sources([_source(v, None) for v in values],
                                                 batch_size=batch_size)
    return [None if reasons[i] else probs[i] for i in range(len(values))]


_PREDICTION = StructType([StructField("label", StringType()),
                          StructField("probability", ArrayType(FloatType()))])


def _prediction_udf(model: dict, batch_size: int, *, label_only: bool = False) -> Any:
    """A pandas UDF: image -> struct(label, probability), or only the label."""
    classes = model["classes"]

    def labels(probs: List[Optional[np.ndarray]]) -> List[Optional[str]]:
        return [None if p is None else classes[int(np.argmax(p))] for p in probs]

    if label_only:
        @pandas_udf(StringType())  # type: ignore[call-overload]
        def predict_label(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            for values in batches:
                yield pd.Series(labels(_predict_values(model, batch_size, values.tolist())),
                                dtype=object)

        return predict_label

    @pandas_udf(_PREDICTION)  # type: ignore[call-overload]
    def predict(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        for values in batches:
            probs = _predict_values(model, batch_size, values.tolist())
            yield pd.DataFrame({"label": labels(probs),
                                "probability": pd.Series(probs, dtype=object)})

    return predict


class DeepImagePredictor(Model, HasInputCol, HasOutputCol, DefaultParamsReadable,
                         DefaultParamsWritable):
    """Adds the class a trained deeptransfer model gives each image (by path or by bytes).

    ``modelDir``: a directory written by ``deeptransfer train``; it is read on the driver
    when ``transform`` is called and shipped with the job. ``outputCol``: the predicted class
    name (string). ``probabilityCol``: if set, also the class probabilities (array<float>,
    in the order of the model's ``classes``). An image that cannot be read or decoded gets
    nulls. ``batchSize``: images per forward pass in each worker.
    """

    modelDir: "Param[str]" = Param(
        Params._dummy(), "modelDir", "directory of a model saved by deeptransfer train",
        typeConverter=TypeConverters.toString)
    probabilityCol: "Param[Optional[str]]" = Param(
        Params._dummy(), "probabilityCol",
        "column for the class probabilities (None: not added)", typeConverter=_to_optional_string)
    batchSize: "Param[int]" = Param(
        Params._dummy(), "batchSize", "images per forward pass in a worker (>= 1)",
        typeConverter=TypeConverters.toInt)

    @keyword_only
    def __init__(self, *, modelDir: Optional[str] = None, inputCol: str = "path",
                 outputCol: str = "prediction", probabilityCol: Optional[str] = None,
                 batchSize: int = 16) -> None:
        super().__init__()
        self._setDefault(inputCol="path", outputCol="prediction", probabilityCol=None,
                         batchSize=16)
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, modelDir: Optional[str] = None, inputCol: str = "path",
                  outputCol: str = "prediction", probabilityCol: Optional[str] = None,
                  batchSize: int = 16) -> "DeepImagePredictor":
        return self._set(**self._input_kwargs)

    def setModelDir(self, value: str) -> "DeepImagePredictor":
        return self._set(modelDir=value)

    def getModelDir(self) -> str:
        return self.getOrDefault(self.modelDir)

    def setInputCol(self, value: str) -> "DeepImagePredictor":
        return self._set(inputCol=value)

    def setOutputCol(self, value: str) -> "DeepImagePredictor":
        return self._set(outputCol=value)

    def setProbabilityCol(self, value: Optional[str]) -> "DeepImagePredictor":
        return self._set(probabilityCol=value)

    def getProbabilityCol(self) -> Optional[str]:
        return self.getOrDefault(self.probabilityCol)

    def setBatchSize(self, value: int) -> "DeepImagePredictor":
        return self._set(batchSize=value)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        from deeptransfer.errors import check_int

        if not self.isDefined(self.modelDir):
            raise InvalidParameterError(
                "DeepImagePredictor needs modelDir: the directory `deeptransfer train` wrote.")
        check_int("batchSize", self.getBatchSize(), low=1, where="DeepImagePredictor")
        in_col = _check_image_column(dataset, self.getInputCol(), "DeepImagePredictor")
        udf = _prediction_udf(_read_model(self.getModelDir()), self.getBatchSize())
        tmp = f"__deeptransfer_{self.uid}"
        out = dataset.withColumn(tmp, udf(col(in_col)))  # one model pass for both columns
        out = out.withColumn(self.getOutputCol(), col(f"{tmp}.label"))
        if self.getProbabilityCol():
            out = out.withColumn(self.getProbabilityCol(), col(f"{tmp}.probability"))
        return out.drop(tmp)


def register_predict_udf(spark: Any, model_dir: str, name: str = "predict", *,
                         batch_size: int = 16) -> Any:
    """Register SQL function ``name(image)`` -> the class a saved model gives the image.

    ``image`` is a path (string) or encoded image bytes (binary, e.g. ``binaryFile``'s
    ``content``); null where the image cannot be read. Returns the registered UDF::

        register_predict_udf(spark, "model/")
        spark.sql("SELECT path, predict(path) AS label FROM images")
    """
    from deeptransfer.errors import check_int

    check_int("batch_size", batch_size, low=1, where="register_predict_udf")
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidParameterError(
            f"The 'name' parameter of register_predict_udf must be a SQL function name such "
            f"as 'predict'. Got {name!r} instead.")
    return spark.udf.register(name, _prediction_udf(_read_model(model_dir), batch_size,
                                                    label_only=True))


def _check_image_column(dataset: DataFrame, in_col: str, who: str) -> str:
    if in_col not in dataset.columns:
        raise InvalidParameterError(
            f"{who}'s inputCol {in_col!r} is not a column of the DataFrame "
            f"(columns: {', '.join(dataset.columns)}).")
    dtype = dataset.schema[in_col].dataType
    if not isinstance(dtype, (StringType, BinaryType)):
        raise InvalidParameterError(
            f"{who}'s inputCol {in_col!r} must hold image paths (string) or encoded images "
            f"(binary, e.g. binaryFile's 'content'). Got {dtype.simpleString()}.")
    return in_col
