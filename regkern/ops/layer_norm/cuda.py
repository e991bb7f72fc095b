"""The CUDA implementation of the LayerNorm forward: the extension's ``regkern::cuda_layer_norm_fwd`` (csrc/).

    regkern::cuda_layer_norm_fwd(x, weight?, bias?, eps) -> (y, norms, mean, rstd)
        y like x; norms, mean, rstd x.shape[:-1] float32.

One more implementation (``impl="cuda"``) of ``regkern::layer_norm_fwd``, whose autograd is the only one; the C++
op gets a fake implementation here and no autograd of its own.
"""

from __future__ import annotations

import torch

from .. import cuda_ext

__all__ = ["layer_norm_forward"]


def _layer_norm_fake(x, weight, bias, eps):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape), *(x.new_empty(lead, dtype=torch.float32) for _ in range(3)))


def _register_fake() -> None:
    torch.library.register_fake("regkern::cuda_layer_norm_fwd")(_layer_norm_fake)


cuda_ext.on_load(_register_fake)


def layer_norm_forward(x, weight, bias, eps: float):
    """(y, norms, mean, rstd) from the C++ op; ValueError with the reasons when the extension cannot serve x's
    device."""
    cuda_ext.require(x.device.type)
    return torch.ops.regkern.cuda_layer_norm_fwd(x, weight, bias, float(eps))
