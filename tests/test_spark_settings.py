"""The settings of a Spark session the engine starts: round results travel in the task's
own message (spark.task.maxDirectResultSize), the user's conf still wins."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyspark")

from deeptransfer.adapters.spark import DIRECT_RESULT_SIZE, SparkExecutor  # noqa: E402


def test_round_results_come_back_directly_and_user_conf_wins():
    with SparkExecutor(1, conf={"spark.task.maxFailures": "2"}) as ex:
        conf = ex.sc.getConf()
        # a fine-tuned suffix's result (13.7 MB) is above Spark's 1 MB default: it went
        # through the block manager, one fetch more per result and round
        assert conf.get("spark.task.maxDirectResultSize") == DIRECT_RESULT_SIZE == "64m"
        assert conf.get("spark.task.maxFailures") == "2"
        # 16 MB results (np.full(n, 1.0) per task), summed: they come back whole
        total = ex.map_reduce(np.full, [2_000_000, 2_000_000], np.add, shared=1.0)
        assert total.shape == (2_000_000,) and float(total.sum()) == 4_000_000.0
    with SparkExecutor(1, conf={"spark.task.maxDirectResultSize": "2m"}) as ex:
        assert ex.sc.getConf().get("spark.task.maxDirectResultSize") == "2m"

