"""How a compiled backend uses the worker's cores: one process per core, none pinned."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("openvino")

from deeptransfer.backends import build_backend


def _prefix() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())


def test_openvino_does_not_pin_worker_threads():
    # OpenVINO pins its threads to cores by default, every process to the same first cores:
    # two 1-thread featurize workers then ran on one core (half the throughput)
    backend = build_backend("openvino", _prefix(), batch_size=2, crop=16, threads=1)
    assert backend.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert int(backend.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
