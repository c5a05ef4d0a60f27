"""The checkpoint's metadata and every JSON file of a model directory are strict JSON (no NaN),
also for a run without a validation split, whose best "score" is not a number."""
from __future__ import annotations

import os

from safetensors import safe_open

from deeptransfer import jsonutil
from deeptransfer.engines import get_executor
from deeptransfer.training import load_checkpoint
from deeptransfer.modeldir import CHECKPOINT
from test_train import cfg, make_store, run




def test_no_validation_split_writes_strict_json_and_resumes(tmp_path):
    url = make_store(tmp_path / "f.zarr", n_val=0)
    out = tmp_path / "model"
    with get_executor("local", {"n_workers": 0}) as ex:
        run(ex, url, cfg(epochs=1), out)
        with safe_open(str(out / CHECKPOINT), "np") as f:
            state = jsonutil.loads(f.metadata()["state"])
        assert state["best"]["score"] is None
        for name in os.listdir(out):
            if name.endswith(".json"):
                jsonutil.loads((out / name).read_text())
            if name.endswith(".jsonl"):
                for line in (out / name).read_text().splitlines():
                    jsonutil.loads(line)
        # the run goes on from that checkpoint (a null score is "no score")
        res = run(ex, url, cfg(epochs=2), out)
    assert [e["epoch"] for e in res.history] == [0, 1]
    st, *_ = load_checkpoint(str(out / CHECKPOINT))
    assert st["epoch"] == 2
