"""The local engine against the shared engine checks."""
import pytest

from deeptransfer.adapters.local import LocalExecutor
from engine_checks import *  # noqa: F401,F403 - the conformance suite


@pytest.fixture(scope="module")
def executor():
    with LocalExecutor(2) as ex:
        yield ex


def test_inline_mode_runs_in_process():
    import os

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


from engine_job_checks import *  # noqa: E402,F401,F403 - featurize/train job checks
