"""Shared fixtures. GPU tests (marker ``gpu``) skip themselves when CUDA is not available."""

import pytest
import torch


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
