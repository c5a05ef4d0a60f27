"""A `--engine spark` run through the CLI shows the user no Spark start-up chatter (issue 11,
item 9): no Log4j profile line, no "Setting default log level", no native-hadoop warning,
no pandas FutureWarning. Errors would still show (the driver logs at ERROR)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("pyspark")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("the Spark engine needs Java", allow_module_level=True)

pytestmark = pytest.mark.spark


def test_a_spark_run_prints_no_start_up_lines(tmp_path):
    from test_cli_messages import write_images

    data = write_images(tmp_path / "photos", n=2)
    # a failsafe only, far beyond the run's own time
    r = subprocess.run([sys.executable, "-m", "deeptransfer", "featurize", str(data),
                        str(tmp_path / "f.zarr"), "--engine", "spark", "--workers", "1",
                        "--chunk-rows", "2", "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    for noise in ("log4j", "Setting default log level", "setLogLevel", "NativeCodeLoader",
                  "native-hadoop", "FutureWarning", " INFO ", " WARN "):
        assert noise not in r.stderr, r.stderr
