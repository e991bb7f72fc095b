"""``regkern.layer_norm_with_norms``: LayerNorm that also returns each token's input L2 norm, on a chosen backend."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import choose_layer_norm_backend
from .op import NormAccumulators, check_layer_norm_inputs, layer_norm_bwd, layer_norm_fwd, layer_norm_fwd_monitored

__all__ = ["layer_norm_with_norms", "layer_norm_monitored", "apply_layer_norm_monitored"]


def layer_norm_with_norms(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6, *, backend: Optional[str] = None
) -> tuple[Tensor, Tensor]:
    """LayerNorm over the last dim of x (..., C) that also returns each row's input L2 norm, on a chosen backend.

    Same semantics as ``reference.layer_norm_with_norms``: y (x's shape and dtype) and norms (x.shape[:-1], float32,
    not differentiable). Differentiable in x, weight and bias.

    Args:
        backend: None or "auto" (on CUDA "cuda" where the measured dispatch table prefers it, else "triton";
            "reference" elsewhere), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cuda" (the csrc/ kernel;
            CPU tensors run its C++ reference) or "reference". ValueError when an explicitly named backend cannot
            run."""
    check_layer_norm_inputs(x, weight, bias, eps)
    impl, _ = choose_layer_norm_backend(backend, x.device.type, x.dtype, x.shape[-1], device=x.device)
    y, norms, _, _ = layer_norm_fwd(x, weight, bias, float(eps), impl)
    return y, norms


class _MonitoredLayerNorm(torch.autograd.Function):
    # the op mutates the accumulators, so its autograd lives here: the backward of regkern::layer_norm_fwd
    @staticmethod
    def forward(ctx, x, weight, bias, eps, impl, acc):
        y, prefix_norms, patch_norms, candidates, mean, rstd = layer_norm_fwd_monitored(
            x, weight, bias, eps, impl, acc.num_cls, acc.num_prefix, float(acc.threshold), acc.inner_edges,
            int(acc.top_k), bool(acc.write_norms), *acc.buffers(),
        )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.eps, ctx.impl = eps, impl
        ctx.mark_non_differentiable(prefix_norms, patch_norms, candidates)
        return y, prefix_norms, patch_norms, candidates

    @staticmethod
    def backward(ctx, dy, _dprefix, _dpatch, _dcandidates):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.eps, ctx.impl)
        return dx, None if weight is None else dw, None if bias is None else db, None, None, None


def layer_norm_monitored(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    accumulators: NormAccumulators,
    *,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LayerNorm of the residual stream x (B, N, C) that adds the batch's token-norm statistics, per token group, to
    ``accumulators`` in place (``reference.norm_statistics`` semantics; no host synchronisation).

    Returns y (x's shape and dtype; differentiable in x, weight, bias), prefix_norms (B, P) and patch_norms
    (B, N - P) float32 with P = ``accumulators.num_prefix`` ((0,) unless ``accumulators.write_norms``), and the
    top-k candidates: int64 keys (``reference.patch_norm_keys``, -1 = none) among which
    ``torch.topk(candidates, accumulators.top_k)`` finds the batch's largest patch norms with their positions.
    On "triton" the reduction runs inside the LayerNorm kernel (one launch), on "cuda" inside the extension's kernel
    (its C++ reference on CPU tensors); "reference" reduces with PyTorch after its forward. Under CUDA autocast the
    LayerNorm runs in float32, as ``F.layer_norm`` does."""
    check_layer_norm_inputs(x, weight, bias, eps)
    accumulators.check(x)
    impl, _ = choose_layer_norm_backend(backend, x.device.type, x.dtype, x.shape[-1], device=x.device)
    return apply_layer_norm_monitored(x, weight, bias, eps, accumulators, impl)


def apply_layer_norm_monitored(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, accumulators: NormAccumulators, impl: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``layer_norm_monitored`` on an already chosen implementation (modules choose once, not in forward)."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
    return _MonitoredLayerNorm.apply(x, weight, bias, float(eps), impl, accumulators)
