"""The CUDA implementation of the LayerNorm forward: the extension's ``regkern::cuda_layer_norm_fwd`` (csrc/).

    regkern::cuda_layer_norm_fwd(x, weight?, bias?, eps) -> (y, norms, mean, rstd)
        y like x; norms, mean, rstd x.shape[:-1] float32.
    regkern::cuda_layer_norm_fwd_monitored(x, weight?, bias?, eps, num_cls, num_prefix, threshold, inner_edges,
            top_k, write_norms, count!, total!, total_sq!, maximum!, outliers!, histogram!)
            -> (y, prefix_norms, patch_norms, candidates, mean, rstd)
        x (B, N, C); the norm monitor's reduction added to the accumulators in the kernel's pass (atomics);
        candidates: 16 packed keys per warp of the grid on CUDA tensors, every patch on CPU tensors.

One more implementation (``impl="cuda"``) of ``regkern::layer_norm_fwd``, whose autograd is the only one; the C++
op gets a fake implementation here and no autograd of its own.
"""

from __future__ import annotations

import torch

from .. import cuda_ext
from ..dispatch import multiprocessor_count

__all__ = ["layer_norm_forward", "layer_norm_forward_monitored", "num_candidates"]

#: csrc/layer_norm.cu: rows (warps) per block, blocks per SM of the monitored grid, candidates per warp
_ROWS_PER_BLOCK, _BLOCKS_PER_SM, _TOP_K = 4, 8, 16


def num_candidates(rows: int, device: torch.device) -> int:
    """Top-k candidates the CUDA kernel returns for ``rows`` tokens on ``device`` (its launcher's grid)."""
    blocks = max(1, min(-(-rows // _ROWS_PER_BLOCK), _BLOCKS_PER_SM * multiprocessor_count(device)))
    return blocks * _ROWS_PER_BLOCK * _TOP_K


def _layer_norm_fake(x, weight, bias, eps):
    lead = x.shape[:-1]
    return (x.new_empty(x.shape), *(x.new_empty(lead, dtype=torch.float32) for _ in range(3)))


def _layer_norm_monitored_fake(
    x, weight, bias, eps, num_cls, num_prefix, threshold, inner_edges, top_k, write_norms, *accumulators
):
    B, N = x.shape[0], x.shape[1]

    def stat(*shape):
        return x.new_empty(shape, dtype=torch.float32)

    def norms(*shape):
        return stat(*shape) if write_norms else stat(0)

    count = num_candidates(B * N, x.device) if x.device.type == "cuda" else B * (N - num_prefix)
    candidates = x.new_empty((count,), dtype=torch.int64)
    return x.new_empty(x.shape), norms(B, num_prefix), norms(B, N - num_prefix), candidates, stat(B, N), stat(B, N)


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
    """(y, prefix_norms, patch_norms, candidates, mean, rstd) from the C++ op, the statistics added to ``acc`` (a
    ``NormAccumulators``) in place; ValueError with the reasons when the extension cannot serve x's device."""
    cuda_ext.require(x.device.type)
    if not 0 <= acc.top_k <= _TOP_K:
        raise ValueError(f"accumulators.top_k: the CUDA kernel keeps at most {_TOP_K} candidates, got {acc.top_k}")
    return torch.ops.regkern.cuda_layer_norm_fwd_monitored(
        x, weight, bias, float(eps), int(acc.num_cls), int(acc.num_prefix), float(acc.threshold), acc.inner_edges,
        int(acc.top_k), bool(acc.write_norms), *acc.buffers(),
    )  # fmt: skip
