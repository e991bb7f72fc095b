"""Python side of the C++ ops in csrc/: fake implementations (torch.compile, meta tensors) and autograd.

The ops themselves (schemas, CPU and CUDA kernels) come from the extension; ``regkern.cuda_ext.load`` registers
what is here right after loading it. Shapes (see csrc/ops.cpp):

    regkern::cuda_attention_fwd(q, k, v, reg_k?, reg_v?, scale, num_prefix, want_out_norm) -> (out, lse, out_norm)
        q, k, v (B, N, H, d); out (B, N, H, d) contiguous; lse (B, H, N) float32; out_norm (B, N) float32 or (0,).
        Backward: ``regkern::attention_bwd`` (the Triton kernels on CUDA tensors, the reference on the CPU).
    regkern::cuda_layer_norm_fwd(x, weight?, bias?, eps) -> (y, norms, mean, rstd)
        y like x; norms, mean, rstd x.shape[:-1] float32. Used through ``regkern::layer_norm_fwd`` (impl "cuda"),
        whose autograd runs ``regkern::layer_norm_bwd``.
    regkern::cuda_embed_tokens(x, pos_embed?, cls_token?, reg_token?, no_embed_class) -> (B, P + M, C)
        Backward in PyTorch: slices and batch sums of the output gradient.
"""

from __future__ import annotations

import torch

__all__ = ["register_python_parts"]

_registered = False


def _attention_fake(q, k, v, reg_k, reg_v, scale, num_prefix, want_out_norm):
    B, N, H, d = q.shape
    f32 = dict(dtype=torch.float32)
    return (q.new_empty((B, N, H, d)), q.new_empty((B, H, N), **f32),
            q.new_empty((B, N) if want_out_norm else (0,), **f32))


def _attention_setup(ctx, inputs, output):
    q, k, v, reg_k, reg_v, scale, num_prefix, _ = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, reg_k, reg_v, out, lse)
    ctx.scale, ctx.num_prefix = scale, num_prefix
    ctx.mark_non_differentiable(lse, output[2])


def _attention_backward(ctx, dout, _dlse, _dnorm):
    from .attention_op import attention_bwd

    q, k, v, reg_k, reg_v, out, lse = ctx.saved_tensors
    impl = "triton" if q.is_cuda else "reference"
    grads = attention_bwd(dout, q, k, v, reg_k, reg_v, None, None, None, None, None, out, lse, ctx.scale,
                          ctx.num_prefix, False, 0.0, False, impl)
    dq, dk, dv, drk, drv = grads[:5]
    return dq, dk, dv, None if reg_k is None else drk, None if reg_v is None else drv, None, None, None


def _layer_norm_fake(x, weight, bias, eps):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape), *(x.new_empty(lead, dtype=torch.float32) for _ in range(3)))


def _embed_fake(x, pos_embed, cls_token, reg_token, no_embed_class):
    B, C = x.shape[0], x.shape[-1]
    M = 1
    for s in x.shape[1:-1]:
        M *= s
    P = (cls_token is not None) + (0 if reg_token is None else reg_token.shape[1])
    return x.new_empty((B, P + M, C))


def _embed_setup(ctx, inputs, output):
    x, pos_embed, cls_token, reg_token, no_embed_class = inputs
    ctx.x_shape = x.shape
    ctx.has = (pos_embed is not None, cls_token is not None, reg_token is not None)
    ctx.R = 0 if reg_token is None else reg_token.shape[1]
    ctx.no_embed_class = no_embed_class


def _embed_backward(ctx, dout):
    has_pos, has_cls, has_reg = ctx.has
    P = int(has_cls) + ctx.R
    dx = dout[:, P:].reshape(ctx.x_shape)
    dcls = dout[:, :1].sum(0, keepdim=True) if has_cls else None
    dreg = dout[:, int(has_cls):P].sum(0, keepdim=True) if has_reg else None
    dpos = None
    if has_pos:
        dpos = (dout[:, P:] if ctx.no_embed_class else dout).sum(0, keepdim=True)
    return dx, dpos, dcls, dreg, None


def register_python_parts() -> None:
    """Register fakes and autograd for the extension's ops (once; the ops must already be loaded)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("regkern::cuda_attention_fwd")(_attention_fake)
    torch.library.register_autograd("regkern::cuda_attention_fwd", _attention_backward,
                                    setup_context=_attention_setup)
    torch.library.register_fake("regkern::cuda_layer_norm_fwd")(_layer_norm_fake)
    torch.library.register_fake("regkern::cuda_embed_tokens")(_embed_fake)
    torch.library.register_autograd("regkern::cuda_embed_tokens", _embed_backward, setup_context=_embed_setup)
    _registered = True
