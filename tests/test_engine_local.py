"""The local engine against the shipped engine checks (deeptransfer.testing), with 3 workers."""
import os

import pytest

from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.testing.engine_checks import EngineChecks
from deeptransfer.testing.job_checks import EngineJobChecks
from engine_fixtures import job_manifest, local_head, local_store  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def executor():
    with LocalExecutor(3) as ex:
        yield ex


class TestLocalEngine(EngineChecks, EngineJobChecks):
    pass


def test_inline_mode_runs_in_process():
    from deeptransfer.diagnostics import probe

    with LocalExecutor(0) as ex:
        assert [r["pid"] for _, r in ex.map_unordered(probe, [1, 2])] == [os.getpid()] * 2


def test_a_task_that_always_kills_its_worker_is_a_task_error():
    from deeptransfer.diagnostics import probe
    from deeptransfer.errors import TaskError

    with LocalExecutor(1, max_retries=1) as ex:
        with pytest.raises(TaskError, match="lost its worker"):
            list(ex.map_unordered(probe, [{"value": 0, "die": True}]))
        assert [r["value"] for _, r in ex.map_unordered(probe, [7])] == [7]  # still usable
