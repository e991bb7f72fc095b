"""Shared fixtures. GPU tests (marker ``gpu``) skip themselves when CUDA is not available."""

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. The flag is read when the kernels are
# decorated, so it must be set before anything imports regkern.attention_triton.
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
