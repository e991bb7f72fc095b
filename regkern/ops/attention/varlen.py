"""Variable-length register attention: S sequences of different lengths packed into (T, H, d), each with its own
prefix segment ([CLS, registers]) and KV registers, without padding.

    regkern::attention_varlen_fwd(q, k, v, cu_seqlens, reg_k?, reg_v?, max_seqlen, scale, num_prefix, want_out_norm)
        -> (out (T, H, d), lse (H, T), out_norm (T,) or (0,))
    regkern::attention_varlen_bwd(dout, q, k, v, cu_seqlens, reg_k?, reg_v?, out, lse, max_seqlen, scale,
                                  num_prefix) -> (dq, dk, dv, dreg_k, dreg_v)

The Triton kernels are the fixed-length ones with ``VARLEN`` set: one launch covers (tiles of the longest sequence)
x S x H, each program reading its sequence's offsets from ``cu_seqlens``. ``register_attention_varlen`` checks the
inputs and dispatches: "triton" (CUDA, or CPU under the interpreter), "torch" (SDPA over the sequences padded to
the longest, with a key mask), "reference" (``reference.register_attention_varlen``: each sequence alone).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import reference
from ..dispatch import device_capability
from .backends import BACKENDS, DISPATCHER, AttentionRequest
from .function import check_scale
from .op import triton_kernels

__all__ = ["register_attention_varlen", "attention_varlen_fwd", "attention_varlen_bwd", "VARLEN_BACKENDS"]

#: the backends that run variable-length attention
VARLEN_BACKENDS = ("triton", "torch", "reference")
VARLEN_STATS = ("lse", "out_norm")


@torch.library.custom_op("regkern::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    reg_k: Optional[Tensor],
    reg_v: Optional[Tensor],
    max_seqlen: int,
    scale: float,
    num_prefix: int,
    want_out_norm: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """out (T, H, d) contiguous in q's dtype, lse (H, T) float32, out_norm (T,) float32 ((0,) when not wanted)."""
    out, lse, out_norm = triton_kernels().attention_forward_varlen(
        q, k, v, cu_seqlens, max_seqlen, reg_k, reg_v, scale, num_prefix, want_out_norm
    )
    return out, lse, out_norm if want_out_norm else q.new_empty((0,), dtype=torch.float32)


@attention_varlen_fwd.register_fake
def _attention_varlen_fwd_fake(q, k, v, cu_seqlens, reg_k, reg_v, max_seqlen, scale, num_prefix, want_out_norm):
    T, H, d = q.shape
    return (
        q.new_empty((T, H, d)),
        q.new_empty((H, T), dtype=torch.float32),
        q.new_empty((T,) if want_out_norm else (0,), dtype=torch.float32),
    )


@torch.library.custom_op("regkern::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    reg_k: Optional[Tensor],
    reg_v: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    max_seqlen: int,
    scale: float,
    num_prefix: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (T, H, d) and dreg_k, dreg_v in the registers' shape ((0,) without registers). Internal: the
    arguments are those ``register_attention_varlen`` checked (max_seqlen >= every length, cu_seqlens valid)."""
    dq, dk, dv, drk, drv = triton_kernels().attention_backward_varlen(
        dout, q, k, v, cu_seqlens, max_seqlen, reg_k, reg_v, out, lse, scale, num_prefix
    )
    return dq, dk, dv, q.new_empty((0,)) if drk is None else drk, q.new_empty((0,)) if drv is None else drv


@attention_varlen_bwd.register_fake
def _attention_varlen_bwd_fake(dout, q, k, v, cu_seqlens, reg_k, reg_v, out, lse, max_seqlen, scale, num_prefix):
    def like(t):
        return q.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return like(q), like(q), like(q), like(reg_k), like(reg_v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, reg_k, reg_v, max_seqlen, scale, num_prefix, _ = inputs
    out, lse, out_norm = output
    ctx.save_for_backward(q, k, v, cu_seqlens, reg_k, reg_v, out, lse)
    ctx.scalars = (max_seqlen, scale, num_prefix)
    ctx.mark_non_differentiable(lse, out_norm)


def _backward(ctx, dout, _dlse, _dnorm):
    q, k, v, cu_seqlens, reg_k, reg_v, out, lse = ctx.saved_tensors
    dq, dk, dv, drk, drv = attention_varlen_bwd(dout, q, k, v, cu_seqlens, reg_k, reg_v, out, lse, *ctx.scalars)
    return (
        dq, dk, dv, None, None if reg_k is None else drk, None if reg_v is None else drv, None, None, None, None,
    )  # fmt: skip


attention_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_varlen_inputs(q, k, v, cu_seqlens, num_prefix, reg_k, reg_v, scale, return_stats, max_seqlen):
    """ValueError/TypeError naming the argument; returns (the sequence lengths as ints, max_seqlen, stats)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a (T, H, d) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if not q.is_floating_point():
        raise TypeError(f"q: expected a floating dtype, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name}: expected the shape, dtype and device of q {tuple(q.shape)} {q.dtype} {q.device}, got "
                f"{tuple(t.shape)} {t.dtype} {t.device}"
            )
    T, H, d = q.shape
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an int32 tensor (S + 1,), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens: expected an int32 tensor of shape (S + 1,) with S >= 1, got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: expected the device of q ({q.device}), got {cu_seqlens.device}")
    bounds = [int(x) for x in cu_seqlens.tolist()]  # one host read, as flash-attn's max_seqlen
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, got {bounds[0]}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {bounds}")
    if bounds[-1] != T:
        raise ValueError(f"cu_seqlens: expected to end at T = {T} (q's tokens), got {bounds[-1]}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix: expected an int >= 0, got {num_prefix!r}")
    short = [i for i, n in enumerate(lengths) if n < num_prefix]
    if short:
        raise ValueError(
            f"cu_seqlens: sequence {short[0]} has {lengths[short[0]]} tokens, fewer than num_prefix = {num_prefix}"
        )
    if (reg_k is None) != (reg_v is None):
        raise ValueError("reg_k/reg_v: KV registers need both reg_k and reg_v")
    S = len(lengths)
    if reg_k is not None:
        for name, t in (("reg_k", reg_k), ("reg_v", reg_v)):
            ok = isinstance(t, torch.Tensor) and (
                (t.dim() == 3 and t.shape[1:] == (H, d)) or (t.dim() == 4 and t.shape[0] == S and t.shape[2:] == (H, d))
            )
            if not ok:
                raise ValueError(
                    f"{name}: expected (R, H, d) = (R, {H}, {d}) shared or (S, R, H, d) = ({S}, R, {H}, {d}), got "
                    f"{getattr(t, 'shape', type(t).__name__)}"
                )
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(
                    f"{name}: expected q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}"
                )
        if reg_k.shape != reg_v.shape:
            raise ValueError(f"reg_v: expected the shape of reg_k {tuple(reg_k.shape)}, got {tuple(reg_v.shape)}")
    if scale is not None:
        check_scale(scale)
    stats = tuple(return_stats)
    unknown = [s for s in stats if s not in VARLEN_STATS]
    if unknown:
        raise ValueError(f"return_stats: variable-length attention returns {VARLEN_STATS}, got {unknown}")
    longest = max(lengths)
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < longest:
            raise ValueError(f"max_seqlen: expected an int >= the longest sequence ({longest}), got {max_seqlen!r}")
        longest = max_seqlen
    return lengths, longest, stats


def _triton_reasons(q: Tensor) -> list[str]:
    """Why the Triton kernels cannot run this call (device, dtype, head dim: the fixed-length backend's rules)."""
    request = AttentionRequest(q.device.type, q.dtype, q.shape[-1], capability=device_capability(q.device))
    return BACKENDS["triton"].not_supported_reasons(request)


def _varlen_backend(backend: Optional[str], q: Tensor) -> str:
    DISPATCHER.check_name(backend)  # unknown names fail as everywhere
    name, source = DISPATCHER.requested_name(backend)
    if name == "auto":
        return "triton" if q.is_cuda and not _triton_reasons(q) else "torch"
    if name not in VARLEN_BACKENDS:
        raise ValueError(
            f"backend: {name!r} (from {source}) has no variable-length attention; one of {VARLEN_BACKENDS} or 'auto'"
        )
    if name == "triton":
        reasons = _triton_reasons(q)
        if reasons:
            raise ValueError(f"backend: 'triton' (from {source}) cannot run this call: {'; '.join(reasons)}")
    return name


def _padded(q, k, v, lengths, reg_k, reg_v, scale, num_prefix, stats):
    """The torch backend: the sequences padded to the longest, padding keys masked, through register_attention."""
    T, H, d = q.shape
    S, L = len(lengths), max(lengths)
    starts = torch.tensor([0] + lengths[:-1], device=q.device).cumsum(0)
    pos = torch.arange(L, device=q.device)
    valid = pos[None, :] < torch.tensor(lengths, device=q.device)[:, None]  # (S, L)
    index = (starts[:, None] + pos[None, :]).clamp(max=max(T - 1, 0))  # (S, L) rows of the packed tensors

    def pad(t):
        return t[index] * valid[..., None, None].to(t.dtype)  # (S, L, H, d), padding rows zero

    mask = valid[:, None, None, :]
    result = BACKENDS["torch"].attention(
        pad(q), pad(k), pad(v), reg_k, reg_v, scale=scale, return_stats=stats, num_prefix=num_prefix,
        attn_mask=mask, dropout_p=0.0,
    )  # fmt: skip
    out, found = (result, None) if not stats else result
    flat = valid.flatten()
    out = out.reshape(S * L, H, d)[flat]
    if not stats:
        return out
    values = {}
    if "lse" in stats:
        values["lse"] = found.lse.permute(1, 0, 2).reshape(H, S * L)[:, flat]
    if "out_norm" in stats:
        values["out_norm"] = found.out_norm.reshape(S * L)[flat]
    return out, reference.AttentionStats(values)


def register_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    *,
    num_prefix: int = 0,
    reg_k: Optional[Tensor] = None,
    reg_v: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_stats: Iterable[str] = (),
    max_seqlen: Optional[int] = None,
    backend: Optional[str] = None,
):
    """Register attention over S sequences of different lengths packed without padding: exactly
    ``register_attention`` applied to each sequence alone.

    Args:
        q, k, v: (T, H, d) strided views of the packed tokens (e.g. ``qkv.view(T, 3, H, d).unbind(1)``).
        cu_seqlens: int32 (S + 1,) on q's device: 0, then the running sum of the lengths, ending at T. Read on the
            host once (the checks and the launch grid need the lengths).
        num_prefix: the first ``num_prefix`` tokens of every sequence are its prefix (CLS + registers); every
            sequence has at least that many.
        reg_k, reg_v: KV-only registers, (R, H, d) shared by all sequences or (S, R, H, d) per sequence.
        scale: score scale, default ``d ** -0.5``.
        return_stats: any of "lse" (H, T) and "out_norm" (T,), float32.
        max_seqlen: the longest sequence, when known (>= it); the launch grid is sized by it.
        backend: "auto" (Triton on CUDA, else torch), "triton", "torch" or "reference"; default $REGKERN_BACKEND.

    Returns:
        out (T, H, d) contiguous in q's dtype, or ``(out, AttentionStats)`` when ``return_stats`` is non-empty.
    """
    lengths, longest, stats = _check_varlen_inputs(
        q, k, v, cu_seqlens, num_prefix, reg_k, reg_v, scale, return_stats, max_seqlen
    )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = _varlen_backend(backend, q)
    if name == "reference":
        return reference.register_attention_varlen(
            q, k, v, cu_seqlens, reg_k, reg_v, scale=scale, num_prefix=num_prefix, return_stats=stats
        )
    if name == "torch":
        return _padded(q, k, v, lengths, reg_k, reg_v, scale, num_prefix, stats)
    out, lse, out_norm = attention_varlen_fwd(
        q, k, v, cu_seqlens, reg_k, reg_v, longest, scale, num_prefix, "out_norm" in stats
    )
    if not stats:
        return out
    return out, reference.AttentionStats({s: {"lse": lse, "out_norm": out_norm}[s] for s in stats})
