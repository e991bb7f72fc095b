"""torch.library ops of LayerNorm with norm capture, their backend choice, and ``layer_norm_with_norms``.

    regkern::layer_norm_fwd(x, weight?, bias?, eps, impl) -> (y, norms, mean, rstd)
    regkern::layer_norm_bwd(dy, x, weight?, bias?, mean, rstd, eps, impl) -> (dx, dweight, dbias)

y has x's shape and dtype (contiguous); norms (each row's input L2 norm, an observation: not differentiable), mean
and rstd (saved for the backward) are float32 of shape x.shape[:-1]. dweight/dbias come back as empty (0,) tensors
when weight/bias are absent (ops cannot return None).

``impl`` is "triton" (``regkern.layer_norm_triton``: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cuda"
(the extension's ``regkern::cuda_layer_norm_fwd``: its CUDA kernel, or its C++ reference on CPU tensors; the backward
runs the Triton kernel on CUDA tensors and the reference on the CPU) or "reference" (PyTorch, float32 math on any
device; float64 inputs are computed in float64). Being opaque ops with fake
implementations and registered autograd, they compose with ``torch.compile(fullgraph=True)``. Under CUDA autocast
the forward runs in float32, as ``F.layer_norm`` does.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import reference

__all__ = [
    "layer_norm_fwd",
    "layer_norm_bwd",
    "layer_norm_with_norms",
    "check_layer_norm_inputs",
    "layer_norm_not_supported_reasons",
    "choose_layer_norm_backend",
    "check_layer_norm_backend_name",
    "IMPLS",
    "BACKEND_NAMES",
]

IMPLS = ("triton", "cuda", "reference")
#: names ``layer_norm_with_norms(backend=...)`` and ``MonitoredLayerNorm(backend=...)`` accept (None = "auto")
BACKEND_NAMES = ("auto",) + IMPLS

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def check_layer_norm_inputs(x, weight, bias, eps) -> None:
    """Validate a LayerNorm call over the last dim of x; TypeError / ValueError naming the argument otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape (..., C), got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x: expected a floating dtype in {[str(d) for d in _X_DTYPES]}, got {x.dtype}")
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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: Tensor) -> Tensor:
    # a fresh empty tensor per absent gradient: op outputs may not alias each other
    return like.new_empty((0,))


# ------------------------------------------------------------------------------------------------------ ops


@torch.library.custom_op("regkern::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, impl: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """y (x's shape and dtype), norms, mean, rstd (x.shape[:-1], float32). See ``layer_norm_with_norms``."""
    _check_impl(impl)
    check_layer_norm_inputs(x, weight, bias, eps)
    if impl == "triton":
        from . import layer_norm_triton

        if x.dtype not in _TRITON_DTYPES:
            raise ValueError(f"impl: 'triton' supports float16, bfloat16 and float32 inputs, got x of {x.dtype}")
        if x.device.type == "cpu" and not layer_norm_triton.INTERPRETED:
            raise ValueError("impl: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before regkern's Triton "
                             "kernels are imported")
        return layer_norm_triton.layer_norm_forward(x, weight, bias, eps)
    if impl == "cuda":
        reasons = layer_norm_not_supported_reasons("cuda", x.device.type, x.dtype, x.shape[-1])
        if reasons:
            raise ValueError("impl: 'cuda' cannot run this LayerNorm: " + "; ".join(reasons))
        y, norms, mean, rstd = torch.ops.regkern.cuda_layer_norm_fwd(x, weight, bias, float(eps))
        return y, norms, mean, rstd
    y, norms = reference.layer_norm_with_norms(x, weight, bias, eps)
    xf = x.to(_compute_dtype(x.dtype))
    var, mean = torch.var_mean(xf, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    return y.contiguous(), norms.contiguous(), mean.float().contiguous(), rstd.float().contiguous()


@layer_norm_fwd.register_fake
def _layer_norm_fwd_fake(x, weight, bias, eps, impl):
    lead = x.shape[:-1]
    stat = (lambda: x.new_empty(lead, dtype=torch.float32))
    return x.new_empty(x.shape), stat(), stat(), stat()


@torch.library.custom_op("regkern::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
    eps: float, impl: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """dx (x's shape and dtype), dweight, dbias (weight/bias's shape and dtype, or (0,) when absent)."""
    _check_impl(impl)
    if impl == "triton" or (impl == "cuda" and x.is_cuda):  # the cuda backend's backward is Triton's
        from .layer_norm_triton import layer_norm_backward

        dx, dw, db = layer_norm_backward(dy, x, weight, bias, mean, rstd)
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


# ------------------------------------------------------------------------------------------ backend choice


def layer_norm_not_supported_reasons(impl: str, device_type: str, dtype: torch.dtype, C: int) -> List[str]:
    """Reasons, in words, why ``impl`` cannot run LayerNorm over rows of C elements of ``dtype`` on
    ``device_type``; empty when it can."""
    _check_impl(impl)
    if dtype not in _X_DTYPES:
        return [f"dtype {dtype} is not supported (float16, bfloat16, float32, float64)"]
    if impl == "reference":
        return []
    if impl == "cuda":
        return _cuda_not_supported_reasons(device_type, dtype)
    try:
        from . import layer_norm_triton
    except ImportError as err:  # triton missing or broken
        return [f"triton cannot be imported ({err})"]
    reasons = []
    if device_type == "cpu":
        if not layer_norm_triton.INTERPRETED:
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before regkern's Triton kernels are imported")
    elif device_type != "cuda":
        reasons.append(f"device type {device_type!r} is not supported (CUDA, or CPU under the interpreter)")
    if dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {dtype} is not supported (float16, bfloat16, float32)")
    if C > layer_norm_triton.MAX_C:
        reasons.append(f"C = {C} > {layer_norm_triton.MAX_C} (a row is held in registers)")
    return reasons


def _cuda_not_supported_reasons(device_type: str, dtype: torch.dtype) -> List[str]:
    reasons = []
    if device_type == "cuda":
        if dtype not in _TRITON_DTYPES:
            reasons.append(f"dtype {dtype} is not supported by the CUDA kernel (float16, bfloat16, float32)")
    elif device_type != "cpu":
        reasons.append(f"device type {device_type!r} is not supported (CUDA; CPU runs the C++ reference)")
    from . import cuda_ext

    reasons += cuda_ext.not_loaded_reasons(device_type, build=not reasons)  # no build for a refused call
    return reasons


def check_layer_norm_backend_name(backend: Optional[str]) -> str:
    """The backend name ("auto" for None); TypeError / ValueError naming ``backend`` for anything unknown."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a string in {BACKEND_NAMES} or None, got {type(backend).__name__}")
    name = "auto" if backend is None else backend
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown LayerNorm backend {name!r}; expected one of {list(BACKEND_NAMES)}")
    return name


def choose_layer_norm_backend(
    backend: Optional[str], device_type: str, dtype: torch.dtype, C: int, device: Optional[torch.device] = None
) -> Tuple[str, str]:
    """(impl, why): the implementation for LayerNorm over rows of C elements, chosen once.

    None / "auto": on CUDA, "cuda" where the measured dispatch table (``regkern.dispatch_table``, keyed on the
    device's compute capability, dtype and C) says the CUDA kernel is faster, else "triton" when it supports the
    call; "reference" otherwise (the interpreter is never picked automatically). ``device``: the CUDA device whose
    capability keys the table (default: the current one). An explicitly named backend must be able to run, else
    ValueError naming ``backend`` and why."""
    name = check_layer_norm_backend_name(backend)
    where = f"{device_type}/{str(dtype).replace('torch.', '')}"
    if name != "auto":
        reasons = layer_norm_not_supported_reasons(name, device_type, dtype, C)
        if reasons:
            raise ValueError(f"backend: {name!r} cannot run LayerNorm on {where} (C = {C}): " + "; ".join(reasons))
        return name, "requested by the backend argument"
    if device_type != "cuda":
        return "reference", f"auto: triton is used on cuda only (name it explicitly otherwise); {where} -> reference"
    from . import dispatch_table

    from .backends import device_capability

    capability = device_capability(torch.device("cuda") if device is None else device)  # when choosing, not import
    preferred, why = dispatch_table.choose("layer_norm", capability, dtype, C)
    if preferred == "cuda":
        reasons = layer_norm_not_supported_reasons("cuda", device_type, dtype, C)
        if not reasons:
            return "cuda", f"auto: {why}"
        why = f"{why}, but cuda cannot run: " + "; ".join(reasons)
    reasons = layer_norm_not_supported_reasons("triton", device_type, dtype, C)
    if reasons:
        return "reference", f"auto: triton cannot run on {where}: " + "; ".join(reasons) + f" (cuda: {why})"
    return "triton", f"auto: first supporting backend for {where} (cuda: {why})"


def layer_norm_with_norms(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6, *, backend: Optional[str] = None
) -> Tuple[Tensor, Tensor]:
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
