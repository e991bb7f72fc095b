"""``regkern.register_attention``: the public entry point, its input checks and backend dispatch."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Optional

import torch

from ...reference import STAT_NAMES
from .backends import AttentionBackend, AttentionRequest, resolve_backend

__all__ = ["register_attention", "check_attention_inputs", "check_scale"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    reg_k: Optional[torch.Tensor],
    reg_v: Optional[torch.Tensor],
    scale: Optional[float],
    return_stats: Iterable[str],
    num_prefix: int,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
) -> tuple[str, ...]:
    """Validate a ``register_attention`` call; returns the requested statistics as a tuple.

    Raises TypeError / ValueError naming the argument and what was expected. Nothing is broadcast silently.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape (B, N, H, d), got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, N, H, d), got {_describe(t)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q: expected a floating dtype in {[str(d) for d in _FLOAT_DTYPES]}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)} (B, N, H, d), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected the device of q ({q.device}), got {t.device}")
    B, N, H, d = q.shape
    if N < 1 or d < 1 or H < 1:
        raise ValueError(f"q: expected N, H, d >= 1, got {_describe(q)}")

    if (reg_k is None) != (reg_v is None):
        given, missing = ("reg_k", "reg_v") if reg_k is not None else ("reg_v", "reg_k")
        raise ValueError(f"{missing}: KV registers need both reg_k and reg_v; only {given} was given")
    if reg_k is not None:
        for name, t in (("reg_k", reg_k), ("reg_v", reg_v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() == 3:
                ok = t.shape[1:] == (H, d)
            elif t.dim() == 4:
                ok = t.shape[0] == B and t.shape[2:] == (H, d)
            else:
                ok = False
            if not ok:
                raise ValueError(
                    f"{name}: expected (R, {H}, {d}) shared by the batch or ({B}, R, {H}, {d}) per batch element, "
                    f"got {tuple(t.shape)}"
                )
            if t.dtype != q.dtype:
                raise TypeError(f"{name}: expected the dtype of q ({q.dtype}), got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name}: expected the device of q ({q.device}), got {t.device}")
        if reg_k.shape != reg_v.shape:
            raise ValueError(f"reg_v: expected the shape of reg_k {tuple(reg_k.shape)}, got {tuple(reg_v.shape)}")

    if scale is not None:
        check_scale(scale)

    if isinstance(return_stats, str):
        return_stats = (return_stats,)
    stats = tuple(return_stats or ())
    for s in stats:
        if s not in STAT_NAMES:
            raise ValueError(f"return_stats: unknown statistic {s!r}; expected any of {STAT_NAMES}")
    if len(set(stats)) != len(stats):
        raise ValueError(f"return_stats: each statistic at most once, got {stats}")

    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix: expected an int >= 0, got {num_prefix!r}")
    if num_prefix > N:
        raise ValueError(f"num_prefix: expected at most N = {N} (tokens in q), got {num_prefix}")
    if "prefix_rows" in stats and num_prefix == 0:
        raise ValueError("num_prefix: 'prefix_rows' was requested, so num_prefix must be >= 1 (CLS + registers)")

    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask: expected a bool or float tensor, got {type(attn_mask).__name__}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: expected the device of q ({q.device}), got {attn_mask.device}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask: expected dtype bool or floating, got {attn_mask.dtype}")
        target = (B, H, N, N)
        shape = tuple(attn_mask.shape)
        broadcastable = len(shape) <= 4 and all(s in (1, t) for s, t in zip(shape[::-1], target[::-1]))
        if not broadcastable:
            raise ValueError(f"attn_mask: expected a shape broadcastable to (B, H, N, N) = {target}, got {shape}")

    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    return stats


def _key_mask_as_attn_mask(key_mask, attn_mask, q: torch.Tensor) -> torch.Tensor:
    """``key_mask`` (B, N) as the SDPA-style (B, 1, 1, N) mask; ValueError naming it when it is not one."""
    if attn_mask is not None:
        raise ValueError("key_mask: pass either attn_mask or key_mask, not both")
    if not isinstance(key_mask, torch.Tensor) or key_mask.dim() != 2 or tuple(key_mask.shape) != tuple(q.shape[:2]):
        raise ValueError(
            f"key_mask: expected a (B, N) = {tuple(q.shape[:2])} tensor, got {getattr(key_mask, 'shape', key_mask)}"
        )
    return key_mask[:, None, None, :]


def check_scale(scale) -> None:
    """A finite real > 0: Python and NumPy numbers, or a one-element CPU tensor (a CUDA tensor would cost a sync)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.is_complex() or scale.dtype == torch.bool:
            raise ValueError(f"scale: expected a one-element real tensor, got shape {tuple(scale.shape)} {scale.dtype}")
        if scale.device.type != "cpu":
            raise ValueError(
                f"scale: expected a number or a CPU tensor (reading a {scale.device.type} tensor would sync), "
                f"got one on {scale.device}"
            )
        value = float(scale)
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        value = float(scale)
    else:
        raise ValueError(f"scale: expected a positive float or None (d ** -0.5), got {scale!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale: expected a finite float > 0 or None (d ** -0.5), got {scale!r}")


def _call_backend(backend, q, k, v, reg_k, reg_v, scale, stats, num_prefix, attn_mask, dropout_p):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return backend.attention(
        q,
        k,
        v,
        reg_k,
        reg_v,
        scale=scale,
        return_stats=stats,
        num_prefix=num_prefix,
        attn_mask=attn_mask,
        dropout_p=float(dropout_p),
    )


def run_attention(
    backend: AttentionBackend,
    q,
    k,
    v,
    reg_k=None,
    reg_v=None,
    *,
    scale=None,
    return_stats=(),
    num_prefix=0,
    attn_mask=None,
    dropout_p=0.0,
):
    """Check inputs and run an already chosen backend (what modules call from forward)."""
    stats = check_attention_inputs(q, k, v, reg_k, reg_v, scale, return_stats, num_prefix, attn_mask, dropout_p)
    return _call_backend(backend, q, k, v, reg_k, reg_v, scale, stats, num_prefix, attn_mask, dropout_p)


def register_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    reg_k: Optional[torch.Tensor] = None,
    reg_v: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    return_stats: Iterable[str] = (),
    num_prefix: int = 0,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
    key_mask: Optional[torch.Tensor] = None,
):
    """Multi-head attention over [KV-only registers, tokens], with optional statistics.

    Args:
        q, k, v: (B, N, H, d), same dtype and device, any strides: e.g. ``qkv(x).view(B, N, 3, H, d).unbind(2)``
            needs no copies.
        reg_k, reg_v: optional KV-only registers, (R, H, d) shared by the batch or (B, R, H, d); both or neither.
            They are keys/values only (no query, no output row); keys are ordered [registers, tokens].
        scale: score scale, default ``d ** -0.5``.
        return_stats: any of ``"lse"`` (B, H, N), ``"out_norm"`` (B, N), ``"received"`` (B, H, R + N),
            ``"prefix_rows"`` (B, H, P, R + N), ``"received_groups"`` (B, H, 4: ``received`` summed over [KV
            registers, prefix token 0, prefix tokens 1..P-1, patches]); see ``regkern.reference.AttentionStats``.
        num_prefix: P, the leading query tokens (CLS + registers) whose attention rows ``prefix_rows`` returns.
        attn_mask: optional SDPA-style mask over the token keys, bool (True = attend) or additive float,
            broadcastable to (B, H, N, N). Register keys are never masked.
        dropout_p: dropout probability on the attention weights (pass 0 in eval mode).
        key_mask: instead of ``attn_mask``, a per-image key mask (B, N): bool (True = attend, e.g. the valid tokens
            of padded images) or additive float; the same as ``attn_mask=key_mask[:, None, None, :]`` (a key mask,
            which the fused kernels take).
        backend: "auto", "triton", "cuda", "torch" or "reference"; default $REGKERN_BACKEND or "auto".
            An explicit backend that cannot serve the call raises ValueError with its reasons.

    Returns:
        out (B, N, H, d) contiguous, in q's dtype; or ``(out, stats)`` when ``return_stats`` is non-empty.

    Example::

        qkv = qkv_linear(x).view(B, N, 3, H, d)
        out = regkern.register_attention(*qkv.unbind(2), reg_k, reg_v)   # (B, N, H, d)
        y = proj(out.view(B, N, H * d))
    """
    if key_mask is not None:
        attn_mask = _key_mask_as_attn_mask(key_mask, attn_mask, q)
    stats = check_attention_inputs(q, k, v, reg_k, reg_v, scale, return_stats, num_prefix, attn_mask, dropout_p)
    choice = resolve_backend(backend, AttentionRequest.from_tensors(q, stats, attn_mask, dropout_p))
    return _call_backend(choice.backend, q, k, v, reg_k, reg_v, scale, stats, num_prefix, attn_mask, dropout_p)
