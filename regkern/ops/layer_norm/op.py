"""torch.library ops of LayerNorm with norm capture: fakes, the one autograd, the input checks.

    regkern::layer_norm_fwd(x, weight?, bias?, eps, impl) -> (y, norms, mean, rstd)
    regkern::layer_norm_bwd(dy, x, weight?, bias?, mean, rstd, eps, impl) -> (dx, dweight, dbias)
    regkern::layer_norm_fwd_monitored(x, weight?, bias?, eps, impl, num_cls, num_prefix, threshold, inner_edges,
        top_k, write_norms, count!, total!, total_sq!, maximum!, outliers!, histogram!)
        -> (y, prefix_norms, patch_norms, candidates, mean, rstd)

y has x's shape and dtype (contiguous); norms (each row's input L2 norm, an observation: not differentiable), mean
and rstd (saved for the backward) are float32 of shape x.shape[:-1]. dweight/dbias come back as empty (0,) tensors
when weight/bias are absent (ops cannot return None).

``impl`` is "triton" (``regkern.ops.layer_norm.triton_kernels``: CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), "cuda" (the extension's ``regkern::cuda_layer_norm_fwd``: its CUDA kernel, or its C++
reference on CPU tensors; the backward runs the Triton kernel on CUDA tensors and the reference on the CPU) or
"reference" (PyTorch, float32 math on any device; float64 inputs are computed in float64). Being opaque ops with fake
implementations and registered autograd, they compose with ``torch.compile(fullgraph=True)``.

``layer_norm_fwd_monitored`` is the forward with the norm monitor's reduction (``reference.norm_statistics``) added in
place to the accumulators (x is (B, N, C)); it mutates its arguments, so its autograd (the same backward) is the
``torch.autograd.Function`` in ``function.py``. "triton" fuses the reduction into the LayerNorm kernel (atomics),
"cuda" into the extension's kernel (its C++ reference on CPU tensors); "reference" runs its forward and then the
reference reduction.

Under CUDA autocast the forward runs in float32, as ``F.layer_norm`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import reference
from ..dispatch import kernels_problem
from . import cuda

__all__ = [
    "layer_norm_fwd",
    "layer_norm_bwd",
    "layer_norm_fwd_monitored",
    "NormAccumulators",
    "check_layer_norm_inputs",
    "triton_kernels",
    "triton_problem",
    "IMPLS",
    "X_DTYPES",
    "KERNEL_DTYPES",
]

IMPLS = ("triton", "cuda", "reference")

#: dtypes of x the op accepts, and those the Triton and CUDA kernels compute
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_kernels():
    """The Triton kernels and launchers (``regkern.ops.layer_norm.triton_kernels``), imported on first use."""
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


def check_layer_norm_inputs(x, weight, bias, eps) -> None:
    """Validate a LayerNorm call over the last dim of x; TypeError / ValueError naming the argument otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape (..., C), got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x: expected a floating dtype in {[str(d) for d in X_DTYPES]}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dim (..., C), got a {x.dim()}-dim tensor")
    C = x.shape[-1]
    if C < 1:
        raise ValueError(f"x: expected a last dim C >= 1, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape ({C},) or None, got {type(t).__name__}")
        if tuple(t.shape) != (C,):
            raise ValueError(f"{name}: expected shape ({C},) (the last dim of x), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected the device of x ({x.device}), got {t.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")


def _check_triton_can_run(x: Tensor) -> None:
    """ValueError naming ``impl`` when the Triton kernels cannot take x (dtype, or no GPU / interpreter)."""
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"impl: 'triton' supports float16, bfloat16 and float32 inputs, got x of {x.dtype}")
    problem = triton_problem(x.device.type)
    if problem:
        raise ValueError(f"impl: 'triton' cannot run: {problem}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: Tensor) -> Tensor:
    # a fresh empty tensor per absent gradient: op outputs may not alias each other
    return like.new_empty((0,))


@dataclass
class NormAccumulators:
    """Where the monitored LayerNorm adds one layer's norm statistics (``reference.norm_statistics``), in place.

    Tokens n < num_cls are group 0 (CLS), n < num_prefix group 1 (registers), the rest group 2 (patches).
    threshold: outliers are norms above it (``math.inf``: none counted, e.g. when the caller applies a relative
    threshold itself). inner_edges: (bins - 1,) ascending float32 histogram edges on the device.
    top_k: how many of the largest patch norms the caller keeps: the forward returns candidates (packed keys,
    ``reference.patch_norm_keys``) among which ``topk`` finds them. write_norms: also return the (B, P) and
    (B, N - P) norms (else (0,) tensors: no per-token round trip).
    Buffers (on the device, usually rows of a monitor's (layers, 3, ...) tensors): count (3,) int64, total and
    total_sq (3,) float64, maximum (3,) float32, outliers (3,) int64, histogram (3, bins) int64."""

    num_cls: int
    num_prefix: int
    threshold: float
    inner_edges: Tensor
    count: Tensor
    total: Tensor
    total_sq: Tensor
    maximum: Tensor
    outliers: Tensor
    histogram: Tensor
    top_k: int = 8
    write_norms: bool = True

    def buffers(self) -> tuple[Tensor, ...]:
        return self.count, self.total, self.total_sq, self.maximum, self.outliers, self.histogram

    def check(self, x: Tensor) -> None:
        """ValueError naming what does not fit a monitored call on x (B, N, C)."""
        if x.dim() != 3:
            raise ValueError(f"x: the norm monitor expects tokens (B, N, C), got shape {tuple(x.shape)}")
        if not 0 <= self.num_cls <= self.num_prefix <= x.shape[1]:
            raise ValueError(
                f"accumulators: expected 0 <= num_cls <= num_prefix <= N = {x.shape[1]}, "
                f"got {self.num_cls}, {self.num_prefix}"
            )
        bins = self.inner_edges.numel() + 1
        expected = {
            "count": ((3,), torch.int64),
            "total": ((3,), torch.float64),
            "total_sq": ((3,), torch.float64),
            "maximum": ((3,), torch.float32),
            "outliers": ((3,), torch.int64),
            "histogram": ((3, bins), torch.int64),
        }
        for name, t in zip(expected, self.buffers()):
            shape, dtype = expected[name]
            if tuple(t.shape) != shape or t.dtype != dtype or t.device != x.device or not t.is_contiguous():
                raise ValueError(
                    f"accumulators.{name}: expected a contiguous {dtype} tensor of shape {shape} on {x.device}, "
                    f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        e = self.inner_edges
        if e.dim() != 1 or e.dtype != torch.float32 or e.device != x.device or not e.is_contiguous():
            raise ValueError(
                f"accumulators.inner_edges: expected a contiguous 1-dim float32 tensor on {x.device}, "
                f"got {e.dtype} {tuple(e.shape)} on {e.device}"
            )


# ------------------------------------------------------------------------------------------------------ ops


@torch.library.custom_op("regkern::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, impl: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """y (x's shape and dtype), norms, mean, rstd (x.shape[:-1], float32). See ``layer_norm_with_norms``."""
    _check_impl(impl)
    check_layer_norm_inputs(x, weight, bias, eps)
    if impl == "triton":
        _check_triton_can_run(x)
        return triton_kernels().layer_norm_forward(x, weight, bias, eps)
    if impl == "cuda":
        if x.is_cuda and x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"impl: 'cuda' supports float16, bfloat16 and float32 CUDA inputs, got x of {x.dtype}")
        return cuda.layer_norm_forward(x, weight, bias, eps)
    # reference.layer_norm_with_norms, with mean and rstd from the same native_layer_norm call that F.layer_norm makes
    # (a separate var_mean costs more than the LayerNorm on the CPU)
    cdtype = _compute_dtype(x.dtype)
    xf = x.to(cdtype)
    w, b = (None if t is None else t.to(cdtype) for t in (weight, bias))
    y, mean, rstd = torch.native_layer_norm(xf, (x.shape[-1],), w, b, eps)
    norms = torch.linalg.vector_norm(xf, dim=-1).float()
    lead = x.shape[:-1]
    return (
        y.to(x.dtype).contiguous(),
        norms.contiguous(),
        mean.reshape(lead).float().contiguous(),
        rstd.reshape(lead).float().contiguous(),
    )


@layer_norm_fwd.register_fake
def _layer_norm_fwd_fake(x, weight, bias, eps, impl):
    lead = x.shape[:-1]

    def stat():
        return x.new_empty(lead, dtype=torch.float32)

    return x.new_empty(x.shape), stat(), stat(), stat()


@torch.library.custom_op("regkern::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    impl: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """dx (x's shape and dtype), dweight, dbias (weight/bias's shape and dtype, or (0,) when absent)."""
    _check_impl(impl)
    if impl == "triton" or (impl == "cuda" and x.is_cuda):  # the cuda implementation's backward is Triton's
        dx, dw, db = triton_kernels().layer_norm_backward(dy, x, weight, bias, mean, rstd)
    else:
        dx, dw, db = _reference_backward(dy, x, weight, bias, mean, rstd, eps)
    return dx, _empty(x) if dw is None else dw, _empty(x) if db is None else db


def _reference_backward(dy, x, weight, bias, mean, rstd, eps):
    """The explicit LayerNorm gradient in float32 (float64 for float64 x):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, xhat = (x - mean) * rstd."""
    cdtype = _compute_dtype(x.dtype)
    xf, dyf = x.to(cdtype), dy.to(cdtype)
    if cdtype == torch.float64:  # the saved float32 statistics would cap the precision: recompute them
        var, mean = torch.var_mean(xf, dim=-1, correction=0)
        rstd = torch.rsqrt(var + eps)
    mean, rstd = mean.to(cdtype).unsqueeze(-1), rstd.to(cdtype).unsqueeze(-1)
    xhat = (xf - mean) * rstd
    g = dyf if weight is None else dyf * weight.to(cdtype)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    C = x.shape[-1]
    dw = None if weight is None else (dyf * xhat).reshape(-1, C).sum(0).to(weight.dtype)
    db = None if bias is None else dyf.reshape(-1, C).sum(0).to(bias.dtype)
    return dx.to(x.dtype).contiguous(), dw, db


@layer_norm_bwd.register_fake
def _layer_norm_bwd_fake(dy, x, weight, bias, mean, rstd, eps, impl):
    def like(t):
        return x.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return x.new_empty(x.shape), like(weight), like(bias)


_ACCUMULATORS = ("count", "total", "total_sq", "maximum", "outliers", "histogram")


@torch.library.custom_op("regkern::layer_norm_fwd_monitored", mutates_args=_ACCUMULATORS)
def layer_norm_fwd_monitored(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    impl: str,
    num_cls: int,
    num_prefix: int,
    threshold: float,
    inner_edges: Tensor,
    top_k: int,
    write_norms: bool,
    count: Tensor,
    total: Tensor,
    total_sq: Tensor,
    maximum: Tensor,
    outliers: Tensor,
    histogram: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y (x's shape and dtype), prefix_norms (B, P) and patch_norms (B, N - P) float32 ((0,) unless write_norms),
    top-k candidates (int64 packed keys, -1 = none; their number depends on the implementation), mean and rstd
    (B, N) float32; the norm statistics of this batch added to the accumulators."""
    _check_impl(impl)
    check_layer_norm_inputs(x, weight, bias, eps)
    acc = NormAccumulators(
        num_cls, num_prefix, threshold, inner_edges, count, total, total_sq, maximum, outliers, histogram, top_k,
        write_norms,
    )  # fmt: skip
    acc.check(x)
    if impl == "triton":
        _check_triton_can_run(x)
        return triton_kernels().layer_norm_forward_monitored(x, weight, bias, eps, acc)
    if impl == "cuda":
        if x.is_cuda and x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"impl: 'cuda' supports float16, bfloat16 and float32 CUDA inputs, got x of {x.dtype}")
        return cuda.layer_norm_forward_monitored(x, weight, bias, eps, acc)
    y, norms, mean, rstd = layer_norm_fwd(x, weight, bias, eps, impl)
    stats = reference.norm_statistics(norms, num_cls, num_prefix, threshold, inner_edges)
    for buffer, part in zip(acc.buffers(), stats):
        if buffer is maximum:
            torch.maximum(buffer, part, out=buffer)
        else:
            buffer.add_(part)
    candidates = reference.patch_norm_keys(norms[:, num_prefix:])  # every patch is a candidate
    if not write_norms:
        return y, norms.new_empty((0,)), norms.new_empty((0,)), candidates, mean, rstd
    return y, norms[:, :num_prefix].clone(), norms[:, num_prefix:].clone(), candidates, mean, rstd


def num_candidates(impl: str, x: Tensor, num_prefix: int, top_k: int) -> int:
    """How many top-k candidates ``layer_norm_fwd_monitored`` returns for x (B, N, C) on ``impl``."""
    B, N, C = x.shape
    if impl == "triton":
        kernels = triton_kernels()
        return kernels.monitored_programs(B * N, C, x.device)[0] * kernels.candidates_per_program(top_k)
    if impl == "cuda" and x.device.type == "cuda":
        return cuda.num_candidates(B * N, x.device)
    return B * (N - num_prefix)  # reference, and the C++ reference on CPU tensors: every patch


@layer_norm_fwd_monitored.register_fake
def _layer_norm_fwd_monitored_fake(
    x, weight, bias, eps, impl, num_cls, num_prefix, threshold, inner_edges, top_k, write_norms, *acc
):
    B, N = x.shape[0], x.shape[1]

    def stat(*shape):
        return x.new_empty(shape, dtype=torch.float32)

    def norms(*shape):
        return stat(*shape) if write_norms else stat(0)

    candidates = x.new_empty((num_candidates(impl, x, num_prefix, top_k),), dtype=torch.int64)
    return x.new_empty(x.shape), norms(B, num_prefix), norms(B, N - num_prefix), candidates, stat(B, N), stat(B, N)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, impl = inputs
    _, norms, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps, ctx.impl = eps, impl
    ctx.mark_non_differentiable(norms, mean, rstd)  # norms are an observation; mean/rstd are saved statistics


def _backward(ctx, dy, _dnorms, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.eps, ctx.impl)
    return dx, None if weight is None else dw, None if bias is None else db, None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
# as F.layer_norm under CUDA autocast (layer_norm is on its float32 list): inputs cast to float32, y float32.
# CPU autocast leaves layer_norm alone, and so leaves this op alone.
torch.library.register_autocast("regkern::layer_norm_fwd", "cuda", torch.float32)
