"""The CUDA implementation of the LayerNorm forward: the extension's ``regkern::cuda_layer_norm_fwd`` (csrc/).

    regkern::cuda_layer_norm_fwd(x, weight?, bias?, eps) -> (y, norms, mean, rstd)
        y like x; norms, mean, rstd x.shape[:-1] float32.
    regkern::cuda_layer_norm_fwd_monitored(x, weight?, bias?, eps, num_cls, num_prefix, threshold, inner_edges,
            count!, total!, total_sq!, maximum!, outliers!, histogram!) -> (y, prefix_norms, patch_norms, mean, rstd)
        x (B, N, C); the norm monitor's reduction added to the accumulators in the kernel's pass (atomics).

One more implementation (``impl="cuda"``) of ``regkern::layer_norm_fwd``, whose autograd is the only one; the C++
op gets a fake implementation here and no autograd of its own.
"""

from __future__ import annotations

import torch

from .. import cuda_ext

__all__ = ["layer_norm_forward", "layer_norm_forward_monitored"]


def _layer_norm_fake(x, weight, bias, eps):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape), *(x.new_empty(lead, dtype=torch.float32) for _ in range(3)))


def _layer_norm_monitored_fake(x, weight, bias, eps, num_cls, num_prefix, threshold, inner_edges, *accumulators):
    B, N = x.shape[0], x.shape[1]

    def stat(*shape):
        return x.new_empty(shape, dtype=torch.float32)

    return x.new_empty(x.shape), stat(B, num_prefix), stat(B, N - num_prefix), stat(B, N), stat(B, N)


def _register_fake() -> None:
    torch.library.register_fake("regkern::cuda_layer_norm_fwd")(_layer_norm_fake)
    torch.library.register_fake("regkern::cuda_layer_norm_fwd_monitored")(_layer_norm_monitored_fake)


cuda_ext.on_load(_register_fake)


def layer_norm_forward(x, weight, bias, eps: float):
    """(y, norms, mean, rstd) from the C++ op; ValueError with the reasons when the extension cannot serve x's
    device."""
    cuda_ext.require(x.device.type)
    return torch.ops.regkern.cuda_layer_norm_fwd(x, weight, bias, float(eps))


def layer_norm_forward_monitored(x, weight, bias, eps: float, acc):
    """(y, prefix_norms, patch_norms, mean, rstd) from the C++ op, the statistics added to ``acc`` (a
    ``NormAccumulators``) in place; ValueError with the reasons when the extension cannot serve x's device."""
    cuda_ext.require(x.device.type)
    return torch.ops.regkern.cuda_layer_norm_fwd_monitored(
        x, weight, bias, float(eps), int(acc.num_cls), int(acc.num_prefix), float(acc.threshold), acc.inner_edges,
        *acc.buffers(),
    )  # fmt: skip
