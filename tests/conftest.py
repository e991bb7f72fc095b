"""Shared fixtures. GPU tests (marker ``gpu``) skip themselves when CUDA is not available."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. The flag is read when the kernels are
# decorated, so it must be set before anything imports regkern.ops.attention.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # tests choose backends explicitly; a developer's $REGKERN_BACKEND must not leak in
    monkeypatch.delenv("REGKERN_BACKEND", raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run a handful of tokens: one thread is fastest and avoids OpenMP spin contention that makes every
    small op take milliseconds when other processes share the two cores. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
