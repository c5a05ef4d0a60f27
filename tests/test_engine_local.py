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


from engine_job_checks import *  # noqa: E402,F401,F403 - featurize/train job checks
