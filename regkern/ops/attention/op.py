"""torch.library ops of fused register attention, with fake (meta) implementations and registered autograd.

    regkern::attention_fwd(q, k, v, reg_k?, reg_v?, q_norm_weight?, q_norm_bias?, k_norm_weight?, k_norm_bias?,
                           rope?, key_bias?, scale, num_prefix, qk_norm, norm_eps, rotate_half,
                           stat_out_norm, stat_prefix_rows, stat_received, stat_received_groups, impl)
        -> (out, lse, out_norm, prefix_rows, received, received_groups)
    regkern::attention_bwd(dout, <the forward's tensors>, out, lse, scale, num_prefix, qk_norm, norm_eps,
                           rotate_half, impl)
        -> (dq, dk, dv, dreg_k, dreg_v, dq_norm_weight, dq_norm_bias, dk_norm_weight, dk_norm_bias)

Optional gradients come back as empty (0,) tensors when their input is absent (ops cannot return None).
``key_bias`` (B, N) float32 is a key mask as an additive bias over the token keys in scaled-score units (-inf =
masked; registers never masked; ``backends.key_bias_from_mask``); it gets no gradient.

The prologue (timm's ``qk_norm`` LayerNorm over d, then RoPE on tokens >= num_prefix; ``reference.qk_prologue``)
runs in Triton as a pre-pass kernel, once per token, before the attention passes. The backward recomputes the
transformed q, k (Triton: the same pre-pass), runs the attention backward on them and applies
``reference.qk_prologue_backward``.

``impl`` is "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cuda" (the extension's
``regkern::cuda_attention_fwd``: the csrc/ kernel on CUDA tensors, its C++ reference on CPU tensors; no qk prologue,
no prefix_rows/received; the backward is Triton's on CUDA tensors and the reference on the CPU) or "reference"
(float32 PyTorch, any device: what ``torch.library.opcheck`` exercises on the CPU). The CUDA kernel is one more
implementation of this op: the op's autograd below is the only one. Being opaque ops with fake implementations, they
compose with ``torch.compile(fullgraph=True)`` and CUDA-graph capture.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import reference
from ..dispatch import kernels_problem
from . import cuda

__all__ = ["attention_fwd", "attention_bwd", "IMPLS", "triton_kernels", "triton_problem"]

IMPLS = ("triton", "cuda", "reference")


def triton_kernels():
    """The Triton kernels and launchers (``regkern.ops.attention.triton_kernels``), imported on first use."""
    # lazy import of the optional triton dependency: a missing or broken triton must not break `import regkern`,
    # and TRITON_INTERPRET is read when the kernels are decorated
    from . import triton_kernels as module

    return module


def triton_problem(device_type: str) -> str:
    """Why the Triton kernels cannot run on ``device_type`` ("" when they can, as far as the device goes)."""
    return kernels_problem(triton_kernels, device_type)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


@torch.library.custom_op("regkern::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    reg_k: Optional[Tensor],
    reg_v: Optional[Tensor],
    q_norm_weight: Optional[Tensor],
    q_norm_bias: Optional[Tensor],
    k_norm_weight: Optional[Tensor],
    k_norm_bias: Optional[Tensor],
    rope: Optional[Tensor],
    key_bias: Optional[Tensor],
    scale: float,
    num_prefix: int,
    qk_norm: bool,
    norm_eps: float,
    rotate_half: bool,
    stat_out_norm: bool,
    stat_prefix_rows: bool,
    stat_received: bool,
    stat_received_groups: bool,
    impl: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """out (B, N, H, d) contiguous in q's dtype, lse (B, H, N) float32, and the requested statistics (float32):
    out_norm (B, N), prefix_rows (B, H, P, R + N), received (B, H, R + N), received_groups (B, H, 4); (0,) when not
    requested. See ``regkern.register_attention``."""
    _check_impl(impl)
    flags = (stat_out_norm, stat_prefix_rows, stat_received, stat_received_groups)
    wanted = tuple(name for name, on in zip(OP_STATS, flags) if on)
    if impl == "cuda":
        if (
            qk_norm
            or rope is not None
            or stat_prefix_rows
            or stat_received
            or stat_received_groups
            or key_bias is not None
        ):
            raise ValueError(
                "impl: 'cuda' runs neither the qk_norm/RoPE prologue, key masks nor the prefix_rows/received/"
                "received_groups statistics (use impl 'triton')"
            )
        out, lse, out_norm = cuda.attention_forward(q, k, v, reg_k, reg_v, scale, num_prefix, stat_out_norm)
        stats = {"out_norm": out_norm}
    elif impl == "triton":
        result = triton_kernels().attention_forward(
            q,
            k,
            v,
            reg_k,
            reg_v,
            scale,
            num_prefix,
            qk_norm=qk_norm,
            q_norm_weight=q_norm_weight,
            q_norm_bias=q_norm_bias,
            k_norm_weight=k_norm_weight,
            k_norm_bias=k_norm_bias,
            norm_eps=norm_eps,
            rope=rope,
            rotate_half=rotate_half,
            stats=wanted,
            key_bias=key_bias,
        )
        out, lse, stats = result if wanted else (*result, {})
    else:
        q = reference.qk_prologue(q, q_norm_weight, q_norm_bias, norm_eps, qk_norm, rope, num_prefix, rotate_half)
        k = reference.qk_prologue(k, k_norm_weight, k_norm_bias, norm_eps, qk_norm, rope, num_prefix, rotate_half)
        out, stats = reference.register_attention(
            q,
            k,
            v,
            reg_k,
            reg_v,
            scale=scale,
            return_stats=("lse",) + wanted,
            num_prefix=num_prefix,
            attn_mask=None if key_bias is None else key_bias[:, None, None, :],
        )
        lse = stats["lse"]
    return (out, lse, *(stats[name] if name in wanted else q.new_empty((0,), dtype=torch.float32) for name in OP_STATS))


#: the statistics ``attention_fwd`` returns after out and lse, in order (each with a ``stat_<name>`` flag)
OP_STATS = ("out_norm", "prefix_rows", "received", "received_groups")


@attention_fwd.register_fake
def _attention_fwd_fake(
    q,
    k,
    v,
    reg_k,
    reg_v,
    qnw,
    qnb,
    knw,
    knb,
    rope,
    key_bias,
    scale,
    num_prefix,
    qk_norm,
    norm_eps,
    rotate_half,
    stat_out_norm,
    stat_prefix_rows,
    stat_received,
    stat_received_groups,
    impl,
):
    B, N, H, d = q.shape
    keys = N + (0 if reg_k is None else reg_k.shape[-3])

    def stat(on, shape):
        return q.new_empty(shape if on else (0,), dtype=torch.float32)

    return (
        q.new_empty((B, N, H, d)),
        q.new_empty((B, H, N), dtype=torch.float32),
        stat(stat_out_norm, (B, N)),
        stat(stat_prefix_rows, (B, H, num_prefix, keys)),
        stat(stat_received, (B, H, keys)),
        stat(stat_received_groups, (B, H, 4)),
    )


@torch.library.custom_op("regkern::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    reg_k: Optional[Tensor],
    reg_v: Optional[Tensor],
    q_norm_weight: Optional[Tensor],
    q_norm_bias: Optional[Tensor],
    k_norm_weight: Optional[Tensor],
    k_norm_bias: Optional[Tensor],
    rope: Optional[Tensor],
    key_bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    scale: float,
    num_prefix: int,
    qk_norm: bool,
    norm_eps: float,
    rotate_half: bool,
    impl: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``attention_fwd`` for every tensor input (reg grads summed over the batch when shared)."""
    _check_impl(impl)
    prologue = qk_norm or rope is not None
    qp, kp = q, k
    if prologue and impl == "triton":  # recompute q', k' with the forward's own pre-pass
        qp, kp = triton_kernels().qk_prologue(
            q,
            k,
            q_norm_weight,
            q_norm_bias,
            k_norm_weight,
            k_norm_bias,
            norm_eps,
            qk_norm,
            rope,
            num_prefix,
            rotate_half,
        )
    elif prologue:
        qp = reference.qk_prologue(q, q_norm_weight, q_norm_bias, norm_eps, qk_norm, rope, num_prefix, rotate_half)
        kp = reference.qk_prologue(k, k_norm_weight, k_norm_bias, norm_eps, qk_norm, rope, num_prefix, rotate_half)
    if impl == "triton" or (impl == "cuda" and q.is_cuda):  # the cuda implementation's backward is Triton's
        grads = triton_kernels().attention_backward(
            dout, qp, kp, v, reg_k, reg_v, out, lse, scale, num_prefix, key_bias=key_bias
        )
    else:
        grads = reference.register_attention_backward(
            dout, qp, kp, v, reg_k, reg_v, out, lse, scale=scale, key_bias=key_bias
        )
    dq, dk, dv, drk, drv = grads
    dqw = dqb = dkw = dkb = None
    if prologue:
        dq, dqw, dqb = reference.qk_prologue_backward(
            dq, q, q_norm_weight, q_norm_bias, norm_eps, qk_norm, rope, num_prefix, rotate_half
        )
        dk, dkw, dkb = reference.qk_prologue_backward(
            dk, k, k_norm_weight, k_norm_bias, norm_eps, qk_norm, rope, num_prefix, rotate_half
        )
    # a fresh empty tensor per absent gradient: op outputs may not alias each other
    return tuple(q.new_empty((0,)) if g is None else g for g in (dq, dk, dv, drk, drv, dqw, dqb, dkw, dkb))


@attention_bwd.register_fake
def _attention_bwd_fake(
    dout,
    q,
    k,
    v,
    reg_k,
    reg_v,
    qnw,
    qnb,
    knw,
    knb,
    rope,
    key_bias,
    out,
    lse,
    scale,
    num_prefix,
    qk_norm,
    norm_eps,
    rotate_half,
    impl,
):
    def like(t):
        return q.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return (
        like(q),
        like(q),
        like(q),
        like(reg_k),
        like(reg_v),
        like(qnw if qk_norm else None),
        like(qnb if qk_norm else None),
        like(knw if qk_norm else None),
        like(knb if qk_norm else None),
    )


_TENSOR_INPUTS = 11  # q, k, v, reg_k, reg_v, q/k norm weights and biases, rope, key_bias


_BWD_SCALARS = 5  # scale, num_prefix, qk_norm, norm_eps, rotate_half (then the stat flags, then impl)


def _setup_context(ctx, inputs, output):
    tensors = inputs[:_TENSOR_INPUTS]
    ctx.scalars = inputs[_TENSOR_INPUTS:]
    out, lse, *stats = output
    ctx.save_for_backward(*tensors, out, lse)
    ctx.mark_non_differentiable(lse, *stats)  # statistics are observations, not differentiable outputs


def _backward(ctx, dout, *_stat_grads):
    saved = ctx.saved_tensors
    tensors, out, lse = saved[:_TENSOR_INPUTS], saved[_TENSOR_INPUTS], saved[_TENSOR_INPUTS + 1]
    scalars = ctx.scalars[:_BWD_SCALARS] + ctx.scalars[-1:]
    grads = attention_bwd(dout, *tensors, out, lse, *scalars)
    # optional inputs that were None get None; rope (a fixed table) and key_bias (a mask) get no gradient
    result = [None if t is None else g for t, g in zip(tensors[:9], grads)]
    return (*result, None, None) + (None,) * len(ctx.scalars)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
