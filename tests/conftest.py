"""Shared fixtures: small data sets, the shared real data (skipped when absent) and the ``gpu`` marker."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def load_shared(name: str) -> ad.AnnData:
    """Read ``../shared/data/<name>.h5ad``, skipping the calling test when the folder or file is absent."""
    path = SHARED_DATA / f"{name}.h5ad"
    if not path.exists():
        pytest.skip(f"shared data set {path} not available")
    return ad.read_h5ad(path)


def _torch_threads(n: int):
    """Run the test with ``n`` torch threads, restoring the former count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """Run with one torch thread (restored afterwards): small networks on a 2-core machine avoid OpenMP spin-waiting."""
    yield from _torch_threads(1)


@pytest.fixture
def two_torch_threads():
    """Run with two torch threads (restored afterwards): where a parallel kernel could make results vary."""
    yield from _torch_threads(2)


@pytest.fixture
def shared_data():
    """The loader of the shared real data sets (see :func:`load_shared`)."""
    return load_shared
