"""The script spark-submit runs: the deeptransfer CLI on the session spark-submit configured.

    spark-submit --master yarn --deploy-mode client \\
        --conf spark.pyspark.python=/opt/venv/bin/python \\
        $(python -m deeptransfer spark-entry) featurize s3://bucket/photos s3://bucket/features.zarr

Everything after the script path is a deeptransfer command line (``featurize``, ``train``,
...). This script gets the SparkSession that spark-submit set up (master, executors,
memory: ``SparkSession.builder.getOrCreate()``), tells the Spark engine to use it instead
of starting ``local[N]`` (the ``DEEPTRANSFER_SPARK_SESSION=active`` environment variable),
adds ``--engine spark`` to commands that take an engine when the command line has no
``--engine``, gives the Python workers the malloc settings of ``deeptransfer.workerenv``
(unless ``spark.executorEnv.GLIBC_TUNABLES`` is set), runs ``deeptransfer.cli.main`` and stops the session at the end. See
deploy/spark.md.
"""
from __future__ import annotations

import os
import sys

# Run as a script, this file's folder (the adapters: dask.py, spark.py, ...) would be first
# on sys.path and shadow the real `dask` and `pyspark` packages' siblings; drop it.
_here = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _here:
    sys.path.pop(0)

USAGE = """\
usage: spark-submit [spark options] $(python -m deeptransfer spark-entry) COMMAND [ARGS]

Runs `deeptransfer COMMAND ARGS` with the Spark engine on the session spark-submit
configured (--master, --num-executors, --executor-cores, --conf ...). Example:

  spark-submit --master yarn --deploy-mode client \\
      --conf spark.pyspark.python=/opt/venv/bin/python --num-executors 8 \\
      $(python -m deeptransfer spark-entry) featurize s3://bucket/photos s3://bucket/features.zarr

`--engine spark` is added to commands that take an engine unless one is given.
"""


def with_spark_engine(argv: list[str]) -> list[str]:
    """``argv`` with ``--engine spark`` added where the command takes an engine and has none."""
    argv = list(argv)
    if any(a == "--engine" or a.startswith("--engine=") for a in argv):
        return argv
    from deeptransfer.cli import ENGINE_COMMANDS

    if argv and argv[0] in ENGINE_COMMANDS:
        argv += ["--engine", "spark"]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    from deeptransfer.adapters.spark import SESSION_ENV, worker_malloc_conf
    from deeptransfer.cli import main as cli_main

    builder = SparkSession.builder.appName(f"deeptransfer {argv[0]}")
    submitted = SparkConf()  # what spark-submit was given (--conf, spark-defaults.conf)
    for k, v in worker_malloc_conf(submitted.contains).items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    if not spark.sparkContext.getConf().contains("spark.log.level"):
        spark.sparkContext.setLogLevel("WARN")  # INFO lines would bury the progress bar
    os.environ[SESSION_ENV] = "active"
    try:
        return cli_main(with_spark_engine(argv))
    finally:
        spark.stop()


if __name__ == "__main__":
    sys.exit(main())
