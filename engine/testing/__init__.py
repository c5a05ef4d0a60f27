"""The engine conformance suite, shipped so that every engine is checked the same way.

An engine is a subclass of :class:`deeptransfer.executor.Executor`. Its test module provides
an ``executor`` fixture that starts it (3+ workers, so that a reduction in any order other
than the core's ``tree_plan`` fails) and subclasses the check classes, the pattern of
fsspec's ``fsspec/tests/abstract`` and zarr's ``zarr.testing.store.StoreTests``::

    import pytest
    from deeptransfer.testing.engine_checks import EngineChecks

    @pytest.fixture(scope="module")
    def executor():
        with MyExecutor(3) as ex:
            yield ex

    class TestMyEngine(EngineChecks):
        pass

``EngineJobChecks`` (``deeptransfer.testing.job_checks``) adds the job-level checks (the
local engine's store row for row, the same trained head bit for bit, a worker killed in
the middle of a job); it also needs ``job_manifest``, ``local_store`` and ``local_head``
fixtures (``reference_store`` and ``reference_head`` build the last two). Each check is
also a plain function (``check_*``) taking the executor, for use outside pytest.

The step functions the checks send to workers live in these modules, so the workers of any
deployment that has deeptransfer installed can import them by name. Importing this package
does not import pytest; the checks that skip import it when they do.
"""
