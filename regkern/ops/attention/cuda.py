"""The CUDA implementation of the attention forward: the extension's ``regkern::cuda_attention_fwd`` (csrc/).

    regkern::cuda_attention_fwd(q, k, v, reg_k?, reg_v?, scale, num_prefix, want_out_norm) -> (out, lse, out_norm)
        q, k, v (B, N, H, d); out (B, N, H, d) contiguous; lse (B, H, N) float32; out_norm (B, N) float32 or (0,).

It is one more implementation (``impl="cuda"``) of ``regkern::attention_fwd``, whose autograd is the only one; the
C++ op gets a fake implementation here (so it can be traced and opchecked) and no autograd of its own.
"""

from __future__ import annotations

import torch

from .. import cuda_ext

__all__ = ["attention_forward"]


def _attention_fake(q, k, v, reg_k, reg_v, scale, num_prefix, want_out_norm):
    B, N, H, d = q.shape
    f32 = dict(dtype=torch.float32)
    return (
        q.new_empty((B, N, H, d)),
        q.new_empty((B, H, N), **f32),
        q.new_empty((B, N) if want_out_norm else (0,), **f32),
    )


def _register_fake() -> None:
    torch.library.register_fake("regkern::cuda_attention_fwd")(_attention_fake)


cuda_ext.on_load(_register_fake)


def attention_forward(q, k, v, reg_k, reg_v, scale: float, num_prefix: int, want_out_norm: bool):
    """(out, lse, out_norm) from the C++ op; ValueError with the reasons when the extension cannot serve q's
    device."""
    cuda_ext.require(q.device.type)
    return torch.ops.regkern.cuda_attention_fwd(
        q, k, v, reg_k, reg_v, float(scale), int(num_prefix), bool(want_out_norm)
    )
