"""Sources beyond folder trees, on the local engine: the shipped source checks (every
layout gives the folder's store row for row; bad rows skipped with their reason), and the
source protocol's parts (detection, refs, readers, listing at scale)."""
from __future__ import annotations

import pytest

from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.testing.source_checks import SourceChecks

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def executor():
    with LocalExecutor(0) as ex:
        yield ex


class TestSourcesLocal(SourceChecks):
    pass
