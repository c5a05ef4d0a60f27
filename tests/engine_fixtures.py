"""The fixtures the shipped job checks (deeptransfer.testing.job_checks) need: a small photo
dataset and the local engine's store and head on it (module-scoped, as the engine fixtures)."""
from __future__ import annotations

import pytest

from deeptransfer.adapters.local import LocalExecutor
from deeptransfer.dataset import load_dataset
from deeptransfer.testing.job_checks import reference_head, reference_store
from photos import make_photo_dataset


@pytest.fixture(scope="module")
def job_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("job_photos")
    make_photo_dataset(root)
    return load_dataset(str(root), split="train=0.6,val=0.2,test=0.2", seed=1)


@pytest.fixture(scope="module")
def local_store(job_manifest, tmp_path_factory):
    """The reference: the local engine's store, one single-threaded worker per core."""
    with LocalExecutor(2) as ex:
        return reference_store(ex, job_manifest, str(tmp_path_factory.mktemp("ref") / "ref.zarr"))


@pytest.fixture(scope="module")
def local_head(local_store, tmp_path_factory):
    with LocalExecutor(2) as ex:
        return reference_head(ex, local_store, str(tmp_path_factory.mktemp("ref_train")))
