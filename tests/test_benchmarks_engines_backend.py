"""benchmarks/engines.py with a backend: the engines featurize with --backend (a column of
the table), Ray Data is a row of the peers table, and the ratios the targets name are
printed by the one run."""
from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import engines  # noqa: E402  (benchmarks/engines.py)
from test_benchmarks import _check_row, _run_engines_py  # noqa: E402


def test_featurize_ratios_are_engines_to_local_and_local_to_peers():
    res = {"local": {"featurize_ips": 300.0}, "dask": {"featurize_ips": 270.0},
           "spark": {"featurize_ips": 240.0}, "ray_data": {"featurize_ips": 50.0},
           "pytorch": {"featurize_ips": 40.0}, "spark_udf": {"featurize_ips": None}}
    r = engines.featurize_ratios(res)
    assert r == {"dask / local": pytest.approx(0.9), "spark / local": pytest.approx(0.8),
                 "local / Ray Data map_batches": pytest.approx(6.0),
                 "local / plain PyTorch loop": pytest.approx(7.5)}
    assert engines.featurize_ratios({"dask": {"featurize_ips": 1.0}}) == {}


def test_the_local_engine_runs_the_backend_and_ray_data_is_a_peer_row(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("ray")
    out = _run_engines_py(tmp_path, "--limit", "8", "--epochs", "1", "--no-scaling",
                          "--engines", "local", "--peers", "ray_data",
                          "--backend", "onnxruntime")
    res = out["results"]
    assert set(res) == {"local", "ray_data"} and out["backend"] == "onnxruntime"
    assert res["local"]["backend"] == "onnxruntime"
    for name, r in res.items():
        _check_row(name, r, res["local"])
    ray = res["ray_data"]
    assert ray["kind"] == "peer" and ray["startup_seconds"] > 0
    assert ray["train_epoch_seconds"] is None
    local_over_ray = res["local"]["featurize_ips"] / ray["featurize_ips"]
    assert out["featurize_ratios"]["local / Ray Data map_batches"] == \
        pytest.approx(local_over_ray)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| deeptransfer local | onnxruntime |" in md
    assert "Ray Data map_batches" in md and "local / Ray Data map_batches" in md
