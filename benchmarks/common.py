"""Helpers shared by the benchmarks."""

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
