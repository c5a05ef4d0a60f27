"""Training telemetry where users already look: TensorBoard and MLflow (``train --log``).

    with telemetry.logging(parse_logs(["tensorboard=runs/tb", "mlflow"]), config, model_dir):
        result = train_head(...)            # each round's record reaches every sink
        ...finish(result)

The sinks are fed from the same per-round records that go to rounds.jsonl: ``TrainRun``
calls ``on_round(run, plan, result, record)`` right after writing the record (the one hook;
a no-op when no sink is active), and the finished epochs are read off ``run.state.history``
as the rounds come (the last ones at ``finish``). Per round: loss, training accuracy,
learning rate, the round's time split (compute, overhead, total) and, per parameter tensor,
the update:parameter ratio and the cross-worker divergence before averaging
(``averaging.round_stats``). Per epoch: the training and validation metrics. MLflow also
gets the run's parameters (the flattened TrainConfig) and, at the end, the model directory
as an artifact.

Both are optional extras (``deeptransfer[tensorboard]``, ``deeptransfer[mlflow]``): a
missing one is a one-line error naming it, before any engine starts.
"""
from __future__ import annotations

import contextvars
import importlib.util
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence

from ..errors import InvalidParameterError

__all__ = ["LogSpec", "Sink", "parse_logs", "logging", "on_round", "ROUND_SCALARS",
           "EPOCH_SCALARS"]

#: rounds.jsonl field -> scalar name
ROUND_SCALARS = {"loss": "train/loss", "train_accuracy": "train/accuracy", "lr": "train/lr",
                 "compute_seconds": "time/compute_seconds",
                 "overhead_seconds": "time/overhead_seconds",
                 "round_seconds": "time/round_seconds"}
#: epoch history field -> scalar name (fields a run without validation lacks are skipped)
EPOCH_SCALARS = {"train_loss": "epoch/train_loss", "train_accuracy": "epoch/train_accuracy",
                 "val_top1": "val/top1", "val_top5": "val/top5",
                 "val_mean_per_class": "val/mean_per_class", "val_loss": "val/loss",
                 "seconds": "epoch/seconds"}
#: the file with the resumable state: not part of the model artifact MLflow keeps
_NOT_ARTIFACTS = {"checkpoint.safetensors"}

KINDS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"),
         "mlflow": ("mlflow", "mlflow")}


@dataclass(frozen=True)
class LogSpec:
    """One ``--log`` value: ``tensorboard=DIR``, ``mlflow`` or ``mlflow=URI``."""

    kind: str
    target: str | None = None

    def sink(self, config: Mapping[str, Any], model_dir: str) -> "Sink":
        if self.kind == "tensorboard":
            return TensorBoardSink(str(self.target))
        return MlflowSink(self.target, config, model_dir)


def parse_logs(values: Sequence[str] | None) -> list[LogSpec]:
    """The ``--log`` values, checked (syntax, and that the extra is installed)."""
    specs = []
    for v in values or ():
        kind, _, target = str(v).partition("=")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise InvalidParameterError(
                f"--log takes tensorboard=DIR, mlflow or mlflow=URI; got {v!r}.", param="log")
        if kind == "tensorboard" and not target:
            raise InvalidParameterError(
                "--log tensorboard needs a folder for its event files: tensorboard=DIR.",
                param="log")
        module, extra = KINDS[kind]
        if not _importable(module) or (kind == "tensorboard" and not _importable("tensorboard")):
            raise InvalidParameterError(
                f"--log {kind} needs the {extra} package: pip install "
                f"'deeptransfer[{extra}]'.", param="log")
        specs.append(LogSpec(kind, target or None))
    return specs


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Sink(Protocol):
    """Where telemetry goes. ``step`` is the record's ``iteration`` (minibatches per worker):
    rounds and epochs share one axis, as DL4J's score-vs-iteration chart has it."""

    def round(self, record: Mapping[str, Any], stats: Mapping[str, Mapping[str, float]]
              ) -> None: ...

    def epoch(self, entry: Mapping[str, Any]) -> None: ...

    def finish(self, model_dir: str, ok: bool) -> None: ...


def _round_values(record: Mapping[str, Any], stats: Mapping[str, Mapping[str, float]]
                  ) -> dict[str, float]:
    out = {name: float(record[k]) for k, name in ROUND_SCALARS.items() if k in record}
    for kind, per in stats.items():
        out.update({f"{kind}/{p}": float(v) for p, v in per.items()})
    return out


def _epoch_values(entry: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(entry[k]) for k, name in EPOCH_SCALARS.items()
            if isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)}


class TensorBoardSink:
    """Event files in ``logdir`` (``tensorboard --logdir DIR``), via torch's SummaryWriter."""

    def __init__(self, logdir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=logdir)

    def round(self, record: Mapping[str, Any], stats: Mapping[str, Mapping[str, float]]
              ) -> None:
        step = int(record["iteration"])
        wall = float(record.get("start_time", time.time())) + float(record.get("round_seconds", 0))
        for tag, v in _round_values(record, stats).items():
            self.writer.add_scalar(tag, v, step, walltime=wall)

    def epoch(self, entry: Mapping[str, Any]) -> None:
        step = int(entry["iteration"])
        for tag, v in _epoch_values(entry).items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def finish(self, model_dir: str, ok: bool) -> None:
        self.writer.close()


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return out


def mlflow_uri(target: str | None) -> str:
    """``mlflow=URI``, else $MLFLOW_TRACKING_URI, else the file store ./mlruns."""
    uri = target or os.environ.get("MLFLOW_TRACKING_URI") or "./mlruns"
    if "://" not in uri and not uri.startswith("file:"):
        uri = "file://" + os.path.abspath(uri)
    return uri


class MlflowSink:
    """One MLflow run (experiment ``deeptransfer``, named after the model directory): the
    parameters, per-round and per-epoch metrics, and the model directory as artifacts."""

    EXPERIMENT = "deeptransfer"

    def __init__(self, target: str | None, config: Mapping[str, Any], model_dir: str):
        uri = mlflow_uri(target)
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store (what `mlflow ui` reads without a server) in
            # maintenance mode behind this switch; a database URI needs no switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.client = c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name(self.EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else c.create_experiment(self.EXPERIMENT)
        name = os.path.basename(os.path.normpath(str(model_dir))) or "model"
        self.run_id = c.create_run(exp_id, run_name=name,
                                   tags={"deeptransfer.model_dir": str(model_dir)}).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            c.log_batch(self.run_id, params=params[i:i + 100])

    def _log(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k.replace("/", "."), v, ts, step) for k, v in values.items()]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 1000])

    def round(self, record: Mapping[str, Any], stats: Mapping[str, Mapping[str, float]]
              ) -> None:
        self._log(_round_values(record, stats), int(record["global_round"]))

    def epoch(self, entry: Mapping[str, Any]) -> None:
        self._log(_epoch_values(entry), int(entry["epoch"]))

    def finish(self, model_dir: str, ok: bool) -> None:
        if ok and os.path.isdir(model_dir):
            for name in sorted(os.listdir(model_dir)):
                p = os.path.join(model_dir, name)
                if os.path.isfile(p) and name not in _NOT_ARTIFACTS:
                    self.client.log_artifact(self.run_id, p, artifact_path="model")
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class _Session:
    """The active sinks of one training call and the epochs they have been given."""

    def __init__(self, sinks: list[Sink], epochs_before: int = 0):
        self.sinks = sinks
        # the history's index sent last: a resumed run sends only the epochs it runs
        self.epochs_sent = epochs_before - 1

    def send_epochs(self, history: Sequence[Mapping[str, Any]]) -> None:
        for entry in history[self.epochs_sent + 1:]:
            for s in self.sinks:
                s.epoch(entry)
        self.epochs_sent = max(self.epochs_sent, len(history) - 1)


_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "deeptransfer_telemetry", default=None)


def _epochs_done(model_dir: str) -> int:
    """Epochs the checkpoint in ``model_dir`` holds (a run resumed there starts after them);
    0 without one (or one not on a local disk)."""
    path = os.path.join(str(model_dir), "checkpoint.safetensors")
    if not os.path.isfile(path):
        return 0
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            import json

            return len(json.loads((f.metadata() or {}).get("state", "{}")).get("history", []))
    except Exception:  # noqa: BLE001 - the run itself reports a damaged checkpoint
        return 0


@contextmanager
def logging(specs: Sequence[LogSpec], config: Mapping[str, Any], model_dir: str, *,
            resume: bool = True) -> Iterator["_Finisher"]:
    """Activate the sinks of ``specs`` for the training run in ``model_dir`` inside the
    block (``resume``: as the run will; its earlier epochs are not sent again)."""
    before = _epochs_done(model_dir) if (resume and specs) else 0
    sinks: list[Sink] = [spec.sink(config, model_dir) for spec in specs]
    session = _Session(sinks, before)
    token = _ACTIVE.set(session if sinks else None)
    fin = _Finisher(session, model_dir)
    try:
        yield fin
    except BaseException:
        fin.close(ok=False)
        raise
    finally:
        _ACTIVE.reset(token)
        fin.close(ok=True)


class _Finisher:
    def __init__(self, session: _Session, model_dir: str):
        self.session, self.model_dir, self.closed = session, model_dir, False

    def finish(self, history: Sequence[Mapping[str, Any]]) -> None:
        """The epochs the rounds have not carried yet (the last one, a reused run's)."""
        self.session.send_epochs(history)

    def close(self, ok: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for s in self.session.sinks:
            s.finish(self.model_dir, ok)


def on_round(run: Any, plan: Any, result: Any, record: Mapping[str, Any]) -> None:
    """The hook ``TrainRun.apply_round`` calls once the round's record is written."""
    session = _ACTIVE.get()
    if session is None:
        return
    from .averaging import round_stats

    session.send_epochs(run.state.history)  # epochs that ended before this round
    stats = round_stats(plan.shared.params, run.params, result)
    for s in session.sinks:
        s.round(record, stats)
