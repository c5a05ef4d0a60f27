"""deeptransfer: distributed transfer learning on images, on a laptop, Dask or Spark.

Featurize once with a frozen pretrained CNN into a Zarr store, then train a classifier
head on the stored features with parameter averaging; the engine ("local", "dask",
"dask-cuda", "spark") only changes where the same steps run.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import evaluate, featurize, info, load, train, train_config  # noqa: E402
from .api import report  # noqa: E402
from .api import curve, search  # noqa: E402
from .engines import available_engines, get_executor  # noqa: E402
from .features import open_features  # noqa: E402
from .errors import (  # noqa: E402
    DatasetNotFoundError, DeeptransferError, EngineUnavailableError, InvalidParameterError,
    StoreError, TaskError, UnknownModelError, WeightsNotFoundError)

__all__ = [
    "featurize", "train", "evaluate", "report", "search", "curve", "open_features", "load", "train_config", "info", "get_executor", "available_engines", "DeeptransferError",
    "InvalidParameterError", "DatasetNotFoundError", "UnknownModelError",
    "WeightsNotFoundError", "StoreError", "EngineUnavailableError", "TaskError", "__version__",
]
