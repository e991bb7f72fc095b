"""``regkern.embed_tokens``: the entry sequence [CLS, registers, patches] + position embeddings, on a chosen backend.

Backends:
    reference  ``regkern.reference.embed_tokens`` (PyTorch: concatenation, then one float32 add, rounded once).
    cuda       ``regkern::cuda_embed_tokens`` from the extension: the same result written in one pass (no
               concatenated intermediate); CPU tensors run its C++ reference. All tensors must share x's dtype.
"auto" picks "cuda" only on CUDA tensors where the measured dispatch table (``regkern.dispatch_table``) says it is
faster, else "reference" (there is no Triton kernel for this op).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from . import reference

__all__ = ["embed_tokens", "embed_tokens_not_supported_reasons", "choose_embed_tokens_backend", "BACKEND_NAMES"]

BACKEND_NAMES = ("auto", "reference", "cuda")
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def embed_tokens_not_supported_reasons(backend: str, x, pos_embed, cls_token, reg_token) -> List[str]:
    """Reasons, in words, why ``backend`` cannot run this call; empty when it can."""
    if backend == "reference":
        return []
    if backend != "cuda":
        raise ValueError(f"backend: expected one of {list(BACKEND_NAMES)}, got {backend!r}")
    reasons = []
    if x.device.type == "cuda" and x.dtype not in _CUDA_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported by the CUDA kernel (float16, bfloat16, float32)")
    elif x.device.type not in ("cuda", "cpu"):
        reasons.append(f"device type {x.device.type!r} is not supported (CUDA; CPU runs the C++ reference)")
    for name, t in (("pos_embed", pos_embed), ("cls_token", cls_token), ("reg_token", reg_token)):
        if t is not None and t.dtype != x.dtype:
            reasons.append(f"{name} is {t.dtype}, x is {x.dtype}: the CUDA kernel needs one dtype")
    from . import cuda_ext

    reasons += cuda_ext.not_loaded_reasons(x.device.type, build=not reasons)  # no build for a refused call
    return reasons


def choose_embed_tokens_backend(backend: Optional[str], x, pos_embed, cls_token, reg_token) -> Tuple[str, str]:
    """(backend, why) for one call; ValueError naming ``backend`` when an explicitly named one cannot run."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a string in {BACKEND_NAMES} or None, got {type(backend).__name__}")
    name = backend or "auto"
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown embed_tokens backend {name!r}; expected one of {list(BACKEND_NAMES)}")
    if name != "auto":
        reasons = embed_tokens_not_supported_reasons(name, x, pos_embed, cls_token, reg_token)
        if reasons:
            raise ValueError(f"backend: {name!r} cannot run embed_tokens: " + "; ".join(reasons))
        return name, "requested by the backend argument"
    if x.device.type != "cuda":
        return "reference", "auto: the cuda kernel is chosen on CUDA tensors only"
    from . import dispatch_table

    from .backends import device_capability

    capability = device_capability(x.device)
    num_patches = math.prod(x.shape[1:-1])  # (B, M, C) or (B, Hp, Wp, C)
    seq_len = (cls_token is not None) + (0 if reg_token is None else reg_token.shape[1]) + num_patches
    preferred, why = dispatch_table.choose("embed_tokens", capability, x.dtype, x.shape[-1], seq_len)
    if preferred == "cuda":
        reasons = embed_tokens_not_supported_reasons("cuda", x, pos_embed, cls_token, reg_token)
        if not reasons:
            return "cuda", f"auto: {why}"
        why += ", but cuda cannot run: " + "; ".join(reasons)
    return "reference", f"auto: reference ({why})"


def embed_tokens(
    x: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
    cls_token: Optional[torch.Tensor] = None,
    reg_token: Optional[torch.Tensor] = None,
    *,
    no_embed_class: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The entry sequence [CLS, registers, patches] with position embeddings, as timm's
    ``VisionTransformer._pos_embed``.

    Args:
        x: (B, M, C) patch tokens, or (B, Hp, Wp, C) (flattened row-major to M = Hp * Wp).
        pos_embed: (1, M, C) when ``no_embed_class`` (added to patches only), else (1, P + M, C) covering the prefix
            too; None for models without absolute position embeddings. Resample it to the grid first
            (``timm.layers.resample_abs_pos_embed``) for dynamic image sizes.
        cls_token: (1, 1, C) or None. reg_token: (1, R, C) or None.
        no_embed_class: timm's flag: position embeddings skip the prefix tokens (DeiT-3, DINOv2 with registers).
        backend: None / "auto", "reference" or "cuda" (see the module docstring).

    Returns:
        (B, P + M, C) with P = (cls_token is not None) + R. Position embeddings are added in float32 and rounded once
        (identical to timm in float32). Differentiable in every tensor input.
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected patch tokens (B, M, C) or (B, Hp, Wp, C), got {got}")
    name, _ = choose_embed_tokens_backend(backend, x, pos_embed, cls_token, reg_token)
    if name == "cuda":
        return torch.ops.regkern.cuda_embed_tokens(x, pos_embed, cls_token, reg_token, bool(no_embed_class))
    return reference.embed_tokens(x, pos_embed, cls_token, reg_token, no_embed_class=no_embed_class)
