"""What test-time registers need of a timm ViT/Eva: its blocks with ``mlp.fc2``, their hidden size, the prefix-token
count, and the hook helpers shared by detection and application."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ["check_model", "hidden_size", "prefix_tokens", "first_arg", "with_first_arg", "StopForward", "check_int"]


def check_model(model) -> list[nn.Module]:
    """The model's blocks, each checked to have ``mlp.fc2`` (ValueError/TypeError naming ``model`` otherwise)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a timm ViT), got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module) or not len(blocks):
        raise ValueError(f"model: {type(model).__name__} has no non-empty `blocks`; expected a timm ViT/Eva")
    for i, block in enumerate(blocks):
        fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
        if not isinstance(fc2, nn.Module):
            raise ValueError(f"model: blocks[{i}] has no `mlp.fc2` (supported MLPs: timm Mlp, GluMlp, SwiGLU)")
    return list(blocks)


def hidden_size(block: nn.Module) -> Optional[int]:
    fc2 = block.mlp.fc2
    size = getattr(fc2, "in_features", None)
    if size is None and isinstance(getattr(fc2, "weight", None), torch.Tensor) and fc2.weight.dim() == 2:
        size = fc2.weight.shape[1]
    return int(size) if size is not None else None


def prefix_tokens(model: nn.Module) -> int:
    value = getattr(model, "num_prefix_tokens", 0) or 0
    return int(value)


def first_arg(args, kwargs, name: str = "x"):
    return args[0] if args else kwargs[name]


def with_first_arg(args, kwargs, value, name: str = "x"):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs[name] = value
    return args, kwargs


class StopForward(Exception):
    """Raised by a hook to end a forward early once everything needed was captured."""


def check_int(value, name: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an int {bound}, got {value!r}")
    return value
