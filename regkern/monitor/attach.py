"""``regkern.patch_timm``: patch a timm model's attention (``regkern.timm``) and, on request, attach a
``NormMonitor`` to it (this layer), reachable as ``regkern.get_monitor(model)``."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..timm.patching import get_monitor, patch_attention
from .norm_monitor import NormMonitor

__all__ = ["patch_timm"]


def patch_timm(
    model: nn.Module,
    *,
    backend: Optional[str] = None,
    num_kv_registers: int = 0,
    monitor=False,
) -> nn.Module:
    """Swap every supported attention module of a timm model for its regkern drop-in, in place.

    Args:
        model: a timm model (``VisionTransformer``, ``Eva``, ...) or any module tree holding timm attention layers.
        backend: backend for every patched layer ("auto", "torch", "reference", ...); default $REGKERN_BACKEND/auto.
        num_kv_registers: add R learnable KV-only registers to every patched layer (new ``reg_k``/``reg_v``
            parameters, initialised small; 0 = none).
        monitor: True, or a dict of ``NormMonitor`` options, attaches a ``regkern.NormMonitor`` (then reachable as
            ``regkern.get_monitor(model)``).

    Returns:
        The same model object. Unsupported attention classes are left untouched with one warning that names them.
        The number of prefix tokens (CLS + registers) is read from ``model.num_prefix_tokens``.
    """
    if monitor and get_monitor(model) is not None:
        raise ValueError("monitor: the model already has a NormMonitor (regkern.get_monitor(model))")
    patch_attention(model, backend=backend, num_kv_registers=num_kv_registers)
    if monitor:
        options = monitor if isinstance(monitor, dict) else {}
        NormMonitor(model, **options)  # attaches itself: regkern.get_monitor(model)
    return model
