"""Benchmark shapes: real ViT shapes on a GPU, tiny ones on the CPU so the suite always runs."""

import pytest
import torch

from benchmarks.common import on_gpu


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")
