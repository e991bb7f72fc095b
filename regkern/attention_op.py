"""torch.library ops of fused register attention, with fake (meta) implementations and registered autograd.

    regkern::attention_fwd(q, k, v, reg_k?, reg_v?, scale, num_prefix, impl) -> (out, lse)
    regkern::attention_bwd(dout, q, k, v, reg_k?, reg_v?, out, lse, scale, num_prefix, impl)
        -> (dq, dk, dv, dreg_k, dreg_v)          dreg_* are empty (0,) tensors when there are no registers

``impl`` is "triton" (the Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or "reference"
(the float32 PyTorch reference, any device: what ``torch.library.opcheck`` exercises on the CPU). Being opaque ops
with fake implementations, they compose with ``torch.compile(fullgraph=True)`` and CUDA-graph capture.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference

__all__ = ["attention_fwd", "attention_bwd", "IMPLS"]

IMPLS = ("triton", "reference")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


@torch.library.custom_op("regkern::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, reg_k: Optional[Tensor], reg_v: Optional[Tensor],
    scale: float, num_prefix: int, impl: str,
) -> Tuple[Tensor, Tensor]:
    """out (B, N, H, d) contiguous in q's dtype and lse (B, H, N) float32; see ``regkern.register_attention``."""
    _check_impl(impl)
    if impl == "triton":
        from .attention_triton import attention_forward

        return attention_forward(q, k, v, reg_k, reg_v, scale, num_prefix)
    out, stats = reference.register_attention(q, k, v, reg_k, reg_v, scale=scale, return_stats=("lse",))
    return out, stats.lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, reg_k, reg_v, scale, num_prefix, impl):
    B, N, H, d = q.shape
    return q.new_empty((B, N, H, d)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("regkern::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, reg_k: Optional[Tensor], reg_v: Optional[Tensor],
    out: Tensor, lse: Tensor, scale: float, num_prefix: int, impl: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (B, N, H, d) and dreg_k, dreg_v (reg_k's shape, summed over the batch when shared; (0,) if none)."""
    _check_impl(impl)
    if impl == "triton":
        from .attention_triton import attention_backward

        grads = attention_backward(dout, q, k, v, reg_k, reg_v, out, lse, scale, num_prefix)
    else:
        grads = reference.register_attention_backward(dout, q, k, v, reg_k, reg_v, out, lse, scale=scale)
    dq, dk, dv, drk, drv = grads
    if drk is None:
        drk, drv = q.new_empty((0,)), q.new_empty((0,))
    return dq, dk, dv, drk, drv


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, reg_k, reg_v, out, lse, scale, num_prefix, impl):
    grads = [q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)]
    if reg_k is None:
        return (*grads, q.new_empty((0,)), q.new_empty((0,)))
    return (*grads, reg_k.new_empty(reg_k.shape), reg_v.new_empty(reg_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, reg_k, reg_v, scale, num_prefix, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, reg_k, reg_v, out, lse)
    ctx.scale, ctx.num_prefix, ctx.impl = scale, num_prefix, impl
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, reg_k, reg_v, out, lse = ctx.saved_tensors
    dq, dk, dv, drk, drv = attention_bwd(dout, q, k, v, reg_k, reg_v, out, lse, ctx.scale, ctx.num_prefix, ctx.impl)
    if reg_k is None:
        drk = drv = None
    return dq, dk, dv, drk, drv, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
