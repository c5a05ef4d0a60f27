import os
import sys

# engine_checks.py and the fixtures module are imported by name from the adapters' tests
sys.path.insert(0, os.path.dirname(__file__))
# servers that tests start listen on loopback, and Spark's Python workers run this interpreter
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
