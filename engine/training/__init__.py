"""Training a classifier head on stored features with parameter averaging.

- ``heads``: HeadConfig, build_head, the loss;
- ``optim``: OptimizerConfig, schedules, optimizer state as averageable arrays;
- ``shards``: which rows each worker trains on, and the per-worker feature cache;
- ``averaging``: the engine-agnostic steps fit_shard / combine / average;
- ``loop``: TrainConfig, the resume rules, and train_head (one TrainRun driven to its end);
- ``run``: TrainRun, a run's steps (plan a round, apply it, end an epoch) and its RunState;
- ``checkpoint``: RunDir (the one writer of a model directory, local or fsspec), checkpoints;
- ``plot``: the training chart.
"""
from .averaging import RoundState, ShardResult, average, combine, fit_shard
from .heads import HeadConfig, build_head, head_from_params, head_params, load_params
from .loop import (TrainConfig, TrainingWarning, TrainResult, check_resume, load_checkpoint,
                   rounds_per_epoch, train_head)
from .optim import OptimizerConfig, lr_at
from .run import RoundPlan, RunState, TrainRun, check_trainable
from .shards import ShardTask, partition_rows

__all__ = [
    "HeadConfig", "OptimizerConfig", "TrainConfig", "TrainResult", "TrainingWarning", "RoundState",
    "ShardTask", "ShardResult", "build_head", "head_from_params", "head_params", "load_params", "fit_shard",
    "combine", "average", "train_head", "check_resume", "load_checkpoint", "rounds_per_epoch",
    "partition_rows", "lr_at", "TrainRun", "RunState", "RoundPlan", "check_trainable",
]
