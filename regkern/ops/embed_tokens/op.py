"""torch.library op of the token embedding, with its fake and its one autograd.

    regkern::embed_tokens(x, pos_embed?, cls_token?, reg_token?, no_embed_class, impl) -> (B, P + M, C)

``impl`` is "reference" (``regkern.reference.embed_tokens``: concatenation, then one float32 add, rounded once; any
device), "triton" (``regkern.ops.embed_tokens.triton_kernels``: one pass, CUDA tensors or CPU tensors under
TRITON_INTERPRET=1) or "cuda" (the extension's ``regkern::cuda_embed_tokens``: the same result written in one pass;
its C++ reference on CPU tensors). The backward is the same for both: slices and batch sums of the output gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ... import reference
from . import cuda

__all__ = ["embed_tokens_op", "IMPLS", "triton_kernels"]

IMPLS = ("reference", "triton", "cuda")


def triton_kernels():
    """The Triton kernel and launcher (``regkern.ops.embed_tokens.triton_kernels``), imported on first use."""
    # lazy import of the optional triton dependency; TRITON_INTERPRET is read when the kernel is decorated
    from . import triton_kernels as module

    return module


@torch.library.custom_op("regkern::embed_tokens", mutates_args=())
def embed_tokens_op(
    x: Tensor,
    pos_embed: Optional[Tensor],
    cls_token: Optional[Tensor],
    reg_token: Optional[Tensor],
    no_embed_class: bool,
    impl: str,
) -> Tensor:
    """(B, P + M, C) in x's dtype; see ``regkern.embed_tokens``."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "cuda":
        return cuda.embed_tokens(x, pos_embed, cls_token, reg_token, no_embed_class)
    if impl == "triton":
        return triton_kernels().embed_tokens(x, pos_embed, cls_token, reg_token, no_embed_class)
    out = reference.embed_tokens(x, pos_embed, cls_token, reg_token, no_embed_class=no_embed_class)
    return out.contiguous()


@embed_tokens_op.register_fake
def _embed_tokens_fake(x, pos_embed, cls_token, reg_token, no_embed_class, impl):
    B, C = x.shape[0], x.shape[-1]
    if pos_embed is not None and pos_embed.shape[0] != 1:
        B = pos_embed.shape[0]  # the reference broadcasts x's batch against a batched pos_embed
    M = math.prod(x.shape[1:-1])
    P = (cls_token is not None) + (0 if reg_token is None else reg_token.shape[1])
    dtype = x.dtype if pos_embed is None else torch.promote_types(x.dtype, pos_embed.dtype)
    return x.new_empty((B, P + M, C), dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, pos_embed, cls_token, reg_token, no_embed_class, _ = inputs
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (pos_embed, cls_token, reg_token))
    ctx.shapes = tuple(None if t is None else t.shape for t in (pos_embed, cls_token, reg_token))
    ctx.R = 0 if reg_token is None else reg_token.shape[1]
    ctx.no_embed_class = no_embed_class


def _backward(ctx, dout):
    pos_dtype, cls_dtype, reg_dtype = ctx.dtypes
    pos_shape, cls_shape, reg_shape = ctx.shapes
    has_cls = cls_dtype is not None
    P = int(has_cls) + ctx.R
    acc = torch.promote_types(dout.dtype, torch.float32)  # batch sums accumulate in float32 (or float64)

    def reduce_to(grad, shape, dtype):  # the gradient of a broadcast input: summed over what was broadcast
        return grad.to(acc).sum_to_size(shape).to(dtype)

    patches = dout[:, P:].reshape(dout.shape[0], *ctx.x_shape[1:])
    dx = reduce_to(patches, ctx.x_shape, ctx.x_dtype)
    dcls = reduce_to(dout[:, :1], cls_shape, cls_dtype) if has_cls else None
    dreg = reduce_to(dout[:, int(has_cls) : P], reg_shape, reg_dtype) if reg_dtype is not None else None
    dpos = None
    if pos_dtype is not None:
        dpos = reduce_to(dout[:, P:] if ctx.no_embed_class else dout, pos_shape, pos_dtype)
    return dx, dpos, dcls, dreg, None, None


embed_tokens_op.register_autograd(_backward, setup_context=_setup_context)
