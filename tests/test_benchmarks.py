"""benchmarks/engines.py: the helpers, and one ``--quick`` run end to end on generated digits.

The quick run starts every engine (Spark only where Java is found) and every peer on a few
dozen of scikit-learn's digits written as PNG files, and checks that the last line of stdout
is one JSON object with every field, sane values, and ratios that agree with the figures.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import engines  # noqa: E402  (benchmarks/engines.py)

HAS_JAVA = bool(os.environ.get("JAVA_HOME") or shutil.which("java"))


# -- helpers ----------------------------------------------------------------------------------

def test_fit_slope_is_the_exponent():
    xs = [100, 200, 400, 800]
    assert engines.fit_slope(xs, [0.01 * x for x in xs]) == pytest.approx(1.0)
    assert engines.fit_slope(xs, [1e-5 * x * x for x in xs]) == pytest.approx(2.0)
    assert engines.fit_slope(xs, [3.0] * 4) == pytest.approx(0.0, abs=1e-12)
    assert engines.fit_slope([100], [1.0]) is None
    assert engines.fit_slope([100, 100], [1.0, 2.0]) is None


def test_fit_line_recovers_fixed_and_per_image_cost():
    a, b = engines.fit_line([100, 200, 400], [2.0 + 0.01 * x for x in (100, 200, 400)])
    assert a == pytest.approx(2.0) and b == pytest.approx(0.01)


def test_time_to_target_sums_epochs_until_reached():
    hist = [{"seconds": 1.0, "val_top1": 0.2}, {"seconds": 2.0, "val_top1": 0.5},
            {"seconds": 4.0, "val_top1": 0.7}]
    assert engines.time_to(hist, 0.5) == pytest.approx(3.0)
    assert engines.time_to(hist, 0.1) == pytest.approx(1.0)
    assert engines.time_to(hist, 0.9) is None
    assert engines.time_to([{"seconds": 1.0, "val_top1": None}], 0.1) is None


def test_ratios_and_aggregate_medians():
    def run(name, kind, ips, epoch):
        return {"kind": kind, "name": name, "featurize_ips": ips, "train_epoch_seconds": epoch,
                "round_overhead_ms": 5.0 if epoch else None, "peak_rss_mb": 1000.0,
                "startup_seconds": 2.0, "worker_peak_rss_mb": [300.0, 310.0],
                "history": [{"seconds": 1.0, "val_top1": 0.9}] if epoch else None}

    res = {"local": engines.aggregate([run("local", "engine", 100.0, 1.0),
                                       run("local", "engine", 120.0, 3.0)], 0.5),
           "forward_limit": engines.aggregate([run("forward_limit", "peer", 150.0, None)], 0.5)}
    res["forward_limit"]["history"] = None
    engines.add_ratios(res)
    assert res["local"]["featurize_ips"] == pytest.approx(110.0)
    assert res["local"]["train_epoch_seconds"] == pytest.approx(2.0)
    assert res["local"]["samples"]["featurize_ips"] == [100.0, 120.0]
    assert res["local"]["ratio_to_local"]["featurize_ips"] == pytest.approx(1.0)
    assert res["forward_limit"]["ratio_to_local"]["featurize_ips"] == pytest.approx(150 / 110)
    assert res["forward_limit"]["ratio_to_local"]["train_epoch_seconds"] is None
    assert res["local"]["time_to_target_seconds"] == pytest.approx(1.0)


# -- the quick run, end to end ----------------------------------------------------------------
# Sized to seconds, not minutes: every benchmark child is a fresh Python process that starts
# its engine, so the whole harness (aggregation, ratios, scaling fits, files) runs once with
# the local engine and the peers that need no other runtime, and each other engine or peer
# runs on its own in its own test. No subprocess timeout: a slow or busy machine only makes
# them slower (pytest-timeout still catches a hang).

def _run_engines_py(tmp_path, *args: str) -> dict:
    from deeptransfer.demo import make_digits_dataset

    data = make_digits_dataset(tmp_path / "digits")
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               PYSPARK_DRIVER_PYTHON=sys.executable)
    cmd = [sys.executable, os.path.join(BENCH, "engines.py"), str(data), "--quick",
           "--split", "train=0.6,val=0.2,test=0.2", "--out", str(tmp_path / "out"), "--json",
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = _run_engines_py(root, "--limit", "16", "--epochs", "2", "--engines", "local",
                          "--peers", "pytorch_dt,forward_limit", "--scaling-workers", "1,2")
    return out, root / "out"


def _check_row(name: str, r: dict, local: dict) -> None:
    """The fields every row has, sane values, and ratios that agree with the figures
    (``local``: the local engine's row, ``{}`` when it did not run)."""
    for k in engines.FIELDS:
        assert k in r, (name, k)
    assert r["featurize_ips"] > 0 and math.isfinite(r["featurize_ips"]), name
    assert r["peak_rss_mb"] > 50, name  # a process with torch imported
    assert r["driver_peak_rss_mb"] <= r["peak_rss_mb"] + 1e-6
    assert set(r["ratio_to_local"]) == set(engines.RATIO_FIELDS)
    for k, q in r["ratio_to_local"].items():
        a, b = r.get(k), local.get(k)
        if a is None or not b:
            assert q is None, (name, k)
        else:
            assert q == pytest.approx(a / b, rel=1e-9), (name, k)


def _check_engine_row(name: str, r: dict) -> None:
    assert r["kind"] == "engine"
    assert r["startup_seconds"] > 0
    assert r["train_epoch_seconds"] > 0
    assert r["round_overhead_ms"] >= 0 and r["round_compute_ms"] > 0
    assert len(r["worker_peak_rss_mb"]) == 2, name
    assert all(w > 50 for w in r["worker_peak_rss_mb"]), name
    assert r["time_to_target_seconds"] is not None and r["time_to_target_seconds"] > 0


def test_quick_run_reports_every_field(quick_run):
    out, _ = quick_run
    res = out["results"]
    assert set(res) == {"local", "pytorch_dt", "forward_limit"}
    assert out["images"] == 16 and out["quick"] is True
    for name, r in res.items():
        _check_row(name, r, res["local"])
    _check_engine_row("local", res["local"])
    for k in engines.FIELDS + ("time_to_target_seconds",):
        assert res["local"]["ratio_to_local"][k] == pytest.approx(1.0)
    pt = res["pytorch_dt"]
    assert pt["kind"] == "peer" and pt["train_epoch_seconds"] > 0
    assert pt["round_overhead_ms"] is None and pt["startup_seconds"] > 0
    fl = res["forward_limit"]
    assert fl["startup_seconds"] is None and fl["train_epoch_seconds"] is None
    assert fl["best_batch"] in (8, 16)


def test_quick_run_scaling_and_files(quick_run):
    out, out_dir = quick_run
    sc = out["scaling"]
    sizes = sorted({p["images"] for p in sc["points"]})
    assert sizes == [4, 8, 16]
    assert sorted({p["workers"] for p in sc["points"]}) == [1, 2]
    for p in sc["points"]:
        assert p["featurize_seconds"] > 0 and p["train_seconds"] > 0
    for w in ("1", "2"):
        assert math.isfinite(sc["fits"][w]["featurize_slope"])
        assert math.isfinite(sc["fits"][w]["train_slope"])
    for f in ("results.md", "results.json", "engines.png", "scaling.png", "runs.log"):
        assert (out_dir / f).stat().st_size > 0, f
    md = (out_dir / "results.md").read_text()
    assert "featurize img/s" in md and "slope" in md
    assert json.loads((out_dir / "results.json").read_text())["images"] == 16


_OTHER_ROWS = [pytest.param("dask", "engine", marks=pytest.mark.dask),
               pytest.param("spark", "engine", marks=[pytest.mark.spark, pytest.mark.skipif(
                   not HAS_JAVA, reason="Spark needs Java")]),
               pytest.param("pytorch", "peer"),
               pytest.param("spark_udf", "peer", marks=[pytest.mark.spark, pytest.mark.skipif(
                   not HAS_JAVA, reason="Spark needs Java")])]


@pytest.mark.parametrize("name,kind", _OTHER_ROWS)
def test_each_other_engine_and_peer_reports_its_row(tmp_path, name, kind):
    """One engine or peer on its own: its row has every field (its ratios to local are None
    without a local run; test_quick_run_reports_every_field checks the ratios)."""
    args = ["--limit", "8", "--epochs", "1", "--no-scaling"]
    args += (["--engines", name, "--peers", ""] if kind == "engine"
             else ["--engines", "", "--peers", name])
    out = _run_engines_py(tmp_path, *args)
    res = out["results"]
    assert set(res) == {name}
    _check_row(name, res[name], {})
    if kind == "engine":
        _check_engine_row(name, res[name])
    elif name == "pytorch":
        assert res[name]["kind"] == "peer" and res[name]["train_epoch_seconds"] > 0
        assert res[name]["startup_seconds"] > 0
    else:
        assert res[name]["startup_seconds"] > 0 and res[name]["train_epoch_seconds"] is None


def test_cost_model_grows_communication_with_workers():
    def eng(over, task):
        return {"round_overhead_ms": over, "per_task_overhead_ms": task, "startup_seconds": 2.0}

    heads = [{"in_dim": d, "classes": c, "params": d * c + c, "param_bytes_f32": 4 * (d * c + c),
              "result_bytes": 24 * (d * c + c), "steps_ms": 1e-5 * d * c, "export_ms": 2e-6 * d * c}
             for d, c in ((1280, 102), (1280, 257), (1280, 1000), (4096, 257), (4096, 1000))]
    out = {"classes": 102, "cost_inputs": {"forward_ips": {"vgg16": {"ips": 5.0}}, "head_round": heads},
           "results": {"local": {"worker_ms_per_image": {"read": 0.1, "preprocess": 1.0,
                                                         "forward": 14.0, "task": 16.0},
                                 "round_compute_ms": 2.0},
                       "forward_limit": {"featurize_ips": 130.0},
                       "dask": eng(15.0, 10.0), "spark": eng(95.0, 30.0)}}
    cm = engines.cost_model(out)
    assert len(cm["rows"]) == 2 * 2 * 2 * 3  # models x datasets x engines x worker counts
    assert cm["inputs"]["forward_ms_per_image"]["vgg16"] == pytest.approx(14.0 * 130 / 5)
    for model in ("efficientnet_lite0", "vgg16"):
        for eng_name in ("dask", "spark"):
            rows = [r for r in cm["rows"] if r["model"] == model and r["engine"] == eng_name
                    and r["dataset"] == "ImageNet"]
            assert [r["workers"] for r in rows] == [10, 100, 1000]
            feats = [r["featurize_s"] for r in rows]
            assert feats[0] > feats[1] > feats[2] > 0
            assert rows[-1]["round_comm_ms"] > rows[0]["round_comm_ms"]
    md = engines.cost_model_markdown(cm)
    assert md.count("\n") == 2 + len(cm["rows"])


def test_the_users_model_is_the_reference_implementation_with_the_same_features():
    """The plain-loop peer loads EfficientNet-Lite0 as a user would (the reference package);
    it computes deeptransfer's features, so the rows compare pipelines on one network."""
    import torch

    import peers

    torch.manual_seed(0)
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    ref, pp_ref = peers.user_backbone("efficientnet_lite0")
    ours, pp_ours = peers.user_backbone("efficientnet_lite0", "deeptransfer")
    assert type(ref).__name__ == "Pooled"
    assert type(ref.net).__module__.startswith("efficientnet_lite_pytorch")
    assert pp_ref == pp_ours
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert a.shape == b.shape == (2, 1280)
    assert torch.allclose(a, b, atol=1e-4)


def test_rounds_benchmark_reports_compute_and_overhead(capsys):
    import rounds

    out = rounds.main(["--dim", "16", "--classes", "5", "--rows-per-class", "200",
                       "--epochs", "2", "--engines", "local", "--repeats", "1", "--json"])
    assert out["params"] == 17 * 5
    r = out["results"]["local"]
    assert r["compute_ms"] > 0 and r["overhead_ms"] > 0 and r["checkpoint_ms"] > 0
    assert r["driver_ms"] > 0 and r["checkpoint_wait_ms"] >= 0
    assert r["total_p90_ms"] >= r["total_ms"]
    # the whole gap between round starts beyond compute holds the engine's part
    assert r["total_ms"] > r["overhead_ms"] * 0.5
    (run,) = out["runs"]["local"]
    assert run["rounds"] >= 4  # ~800 train rows, 2 x 160 a round: several rounds an epoch
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["results"]["local"] == r


def test_a_timed_out_benchmark_child_takes_its_whole_process_group_with_it(tmp_path):
    # an engine child that hangs leaves workers, nannies or a JVM behind unless the whole
    # group goes; here the child starts a grandchild and both outlive the timeout
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    with pytest.raises(subprocess.TimeoutExpired):
        engines.run_group([sys.executable, "-c", code], dict(os.environ), timeout=3)
    grandchild = int(pidfile.read_text())
    deadline = time.time() + 120  # a bound for a hang, not a speed limit
    while time.time() < deadline and _running(grandchild):
        time.sleep(0.05)
    assert not _running(grandchild), "the grandchild outlived the timed-out benchmark child"


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
