"""``regkern.layer_norm_with_norms``: LayerNorm that also returns each token's input L2 norm, on a chosen backend."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .backends import choose_layer_norm_backend
from .op import check_layer_norm_inputs, layer_norm_fwd

__all__ = ["layer_norm_with_norms"]


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
