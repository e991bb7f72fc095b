"""Pure-PyTorch reference semantics of every regkern op.

This module is the single source of truth: every kernel (Triton, CUDA) is tested against these functions and
the CPU path uses them. All arithmetic runs in float32 (or wider, for float64 inputs) and results are cast back
to the input dtype at the end. Nothing here is fast; it materialises the attention matrix.

Layout conventions (same for every backend):
    q, k, v      (B, N, H, d)   any strides, e.g. the unbound slices of ``qkv(x).view(B, N, 3, H, d)``
    reg_k, reg_v (R, H, d)      KV-only registers shared by the batch, or (B, R, H, d) per batch element
    keys         ordered [R registers, N tokens]: key index j < R is register j, j >= R is token j - R
    out          (B, N, H, d)   contiguous, so ``out.view(B, N, H * d)`` feeds the output projection
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "STAT_NAMES",
    "AttentionStats",
    "register_attention",
    "register_attention_varlen",
    "received_groups",
    "layer_norm_with_norms",
    "NormStatistics",
    "patch_norm_keys",
    "unpack_norm_keys",
    "norm_statistics",
    "embed_tokens",
    "apply_rope",
]

#: Statistics ``register_attention`` can return, in a fixed order.
STAT_NAMES = ("lse", "out_norm", "received", "prefix_rows", "received_groups")


class AttentionStats(Mapping):
    """Statistics returned by ``register_attention(..., return_stats=...)``; read by key or attribute.

    Only the requested statistics are present. All tensors are float32:
        lse          (B, H, N)         natural-log sum-exp of the scaled scores over all R + N keys
        out_norm     (B, N)            L2 norm of the float32 output of token n over all heads
        received     (B, H, R + N)     attention probability each key receives, summed over the N queries
        prefix_rows  (B, H, P, R + N)  full attention rows of the first P = ``num_prefix`` queries
        received_groups (B, H, 4)      ``received`` summed over the key groups [KV registers, prefix token 0 (CLS
                                       when the model has one), prefix tokens 1..P-1, patch tokens]; each (b, h) sums
                                       to N. What the norm monitor needs, without the (B, H, R + N) tensor.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"statistic {name!r} was not requested; requested: {sorted(self._tensors)}") from None

    def __getattr__(self, name: str) -> torch.Tensor:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._tensors[name]
        except KeyError:
            raise AttributeError(f"statistic {name!r} was not requested; requested: {sorted(self._tensors)}") from None

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._tensors.items())
        return f"AttentionStats({items})"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_heads_first(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (B, L, H, d) -> (B, H, L, d) in the compute dtype
    return t.to(dtype).transpose(1, 2)


def batched_registers(reg: torch.Tensor, batch: int) -> torch.Tensor:
    # (R, H, d) shared -> (B, R, H, d); (B, R, H, d) is returned as is
    return reg.unsqueeze(0).expand(batch, *reg.shape) if reg.dim() == 3 else reg


def token_mask_to_bias(
    attn_mask: Optional[torch.Tensor], num_registers: int, dtype: torch.dtype
) -> Optional[torch.Tensor]:
    """Turn an SDPA-style mask over the N token keys into an additive bias over all R + N keys.

    ``attn_mask`` is boolean (True = may attend) or additive float, broadcastable to (B, H, N, N). Register keys are
    never masked. Returns a float tensor broadcastable to (B, H, N, R + N), or None.
    """
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        bias = bias.masked_fill(~attn_mask, float("-inf"))
    else:
        bias = attn_mask.to(dtype)
    if num_registers:
        bias = F.pad(bias, (num_registers, 0), value=0.0)
    return bias


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
):
    """Materialising reference of register attention (no input checks: ``regkern.register_attention`` does them).

    Args:
        q, k, v: (B, N, H, d) queries, keys and values, any strides.
        reg_k, reg_v: optional KV-only registers, (R, H, d) shared by the batch or (B, R, H, d).
        scale: score scale, default ``d ** -0.5``.
        return_stats: names from ``STAT_NAMES``; when non-empty the call returns ``(out, AttentionStats)``.
        num_prefix: P, number of leading query tokens (CLS + registers) whose rows ``prefix_rows`` returns.
        attn_mask: optional mask over the token keys, bool (True = attend) or additive, broadcastable to
            (B, H, N, N); register keys are never masked.
        dropout_p: dropout on the attention probabilities (statistics are taken before dropout).

    Returns:
        out (B, N, H, d) contiguous in q's dtype, or ``(out, stats)``.
    """
    B, N, H, d = q.shape
    cdtype = _compute_dtype(q.dtype)
    scale = d**-0.5 if scale is None else float(scale)
    qf = _to_heads_first(q, cdtype)
    kf = _to_heads_first(k, cdtype)
    vf = _to_heads_first(v, cdtype)
    R = 0
    if reg_k is not None:
        R = reg_k.shape[-3]
        kf = torch.cat([_to_heads_first(batched_registers(reg_k, B), cdtype), kf], dim=2)
        vf = torch.cat([_to_heads_first(batched_registers(reg_v, B), cdtype), vf], dim=2)

    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, N, R + N)
    bias = token_mask_to_bias(attn_mask, R, cdtype)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, N)
    # softmax, not exp(scores - lse): a row whose every score carries a huge finite bias (timm's finfo.min masks)
    # loses log(n) in lse and would sum to n; softmax normalises it (the average of the values, as SDPA gives)
    probs = torch.softmax(scores, dim=-1)
    used = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    out_f = torch.matmul(used, vf).transpose(1, 2)  # (B, N, H, d)
    out = out_f.to(q.dtype).contiguous()

    requested = tuple(return_stats or ())
    if not requested:
        return out
    stats = {}
    for name in requested:
        if name == "lse":
            stats[name] = lse.float()
        elif name == "out_norm":
            stats[name] = out_f.reshape(B, N, H * d).norm(dim=-1).float()
        elif name == "received":
            stats[name] = probs.sum(dim=2).float()
        elif name == "prefix_rows":
            stats[name] = probs[:, :, :num_prefix, :].float().contiguous()
        elif name == "received_groups":
            stats[name] = received_groups(probs.sum(dim=2), R, num_prefix).float()
        else:  # checked by the public entry point; kept for direct callers
            raise ValueError(f"return_stats: unknown statistic {name!r}; expected any of {STAT_NAMES}")
    return out, AttentionStats(stats)


def received_groups(received: torch.Tensor, num_registers: int, num_prefix: int) -> torch.Tensor:
    """(..., R + N) attention received per key -> (..., 4) summed over [KV registers, prefix token 0, prefix tokens
    1..P-1, patch tokens] (``AttentionStats.received_groups``)."""
    R, P = num_registers, num_prefix
    bounds = (0, R, R + min(P, 1), R + P, received.shape[-1])
    return torch.stack([received[..., a:b].sum(-1) for a, b in zip(bounds[:-1], bounds[1:])], dim=-1)


def layer_norm_with_norms(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim that also returns each input token's L2 norm.

    Args:
        x: (..., C) input, e.g. the residual stream (B, N, C).
        weight, bias: (C,) affine parameters or None.
        eps: LayerNorm epsilon.

    Returns:
        y (..., C) in x's dtype, and norms (...) float32: ``||x[..., :]||_2`` of the input, computed in float32
        (the residual-stream norm where high-norm artifacts live).
    """
    cdtype = _compute_dtype(x.dtype)
    xf = x.to(cdtype)
    C = x.shape[-1]
    w = None if weight is None else weight.to(cdtype)
    b = None if bias is None else bias.to(cdtype)
    y = F.layer_norm(xf, (C,), w, b, eps).to(x.dtype)
    norms = torch.linalg.vector_norm(xf, dim=-1).float()
    return y, norms


class NormStatistics(NamedTuple):
    """What ``norm_statistics`` returns, per token group (CLS, registers, patches): G = 3 rows each."""

    count: torch.Tensor  # (G,) int64: tokens
    total: torch.Tensor  # (G,) float64: sum of norms
    total_sq: torch.Tensor  # (G,) float64: sum of squared norms
    maximum: torch.Tensor  # (G,) float32: largest norm (0 for an empty group)
    outliers: torch.Tensor  # (G,) int64: norms > threshold
    histogram: torch.Tensor  # (G, len(inner_edges) + 1) int64: tokens per bin


def norm_statistics(
    norms: torch.Tensor,
    num_cls: int,
    num_prefix: int,
    threshold,
    inner_edges: torch.Tensor,
) -> NormStatistics:
    """The norm monitor's reduction of one batch of token norms, per token group.

    Args:
        norms: (B, N) float32 token norms; token n belongs to group 0 (CLS) if n < num_cls, 1 (registers) if
            n < num_prefix, else 2 (patches).
        threshold: a float or 0-dim tensor; a norm above it is an outlier.
        inner_edges: (bins - 1,) ascending float32 bin edges; a norm falls into bin i when exactly i edges lie
            strictly below it (``torch.bucketize(norm, inner_edges)``), so bins 0 and bins - 1 hold what lies beyond.

    Vectorised (one pass per statistic, every group at once) and free of host synchronisation.
    """
    B, N = norms.shape
    device = norms.device
    token = torch.arange(N, device=device)
    group = ((token >= num_cls).long() + (token >= num_prefix).long()).expand(B, N).reshape(-1)  # (B * N,)
    flat = norms.reshape(-1).float()
    G, bins = 3, inner_edges.numel() + 1

    def per_group(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(G, dtype=dtype, device=device).index_add_(0, group, values.to(dtype))

    wide = flat.double()
    maximum = torch.zeros(G, dtype=torch.float32, device=device).scatter_reduce_(0, group, flat, "amax")
    bucket = torch.bucketize(flat, inner_edges.to(device=device, dtype=torch.float32))
    histogram = torch.zeros(G * bins, dtype=torch.int64, device=device)
    histogram.index_add_(0, group * bins + bucket, torch.ones_like(bucket))
    return NormStatistics(
        count=per_group(torch.ones_like(group), torch.int64),
        total=per_group(wide, torch.float64),
        total_sq=per_group(wide * wide, torch.float64),
        maximum=maximum,
        outliers=per_group(flat > threshold, torch.int64),
        histogram=histogram.view(G, bins),
    )


def patch_norm_keys(patch_norms: torch.Tensor) -> torch.Tensor:
    """(B, M) float32 patch norms -> (B * M,) int64 keys ``norm bits << 32 | b * M + m``: non-negative float32 bits
    order as integers, so the largest keys are the largest norms (ties: the later patch), and one ``topk`` over
    keys gives values and positions at once. ``unpack_norm_keys`` inverts it."""
    flat = patch_norms.float().contiguous().reshape(-1)
    bits = flat.view(torch.int32).to(torch.int64)
    return (bits << 32) | torch.arange(flat.numel(), device=flat.device)


def unpack_norm_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed keys (``patch_norm_keys``; -1 = none) -> (norms float32, flat patch indices int64)."""
    norms = (keys >> 32).to(torch.int32).view(torch.float32)
    return norms, keys & 0xFFFFFFFF


def embed_tokens(
    x: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
    cls_token: Optional[torch.Tensor] = None,
    reg_token: Optional[torch.Tensor] = None,
    *,
    no_embed_class: bool = False,
) -> torch.Tensor:
    """The entry sequence [CLS, registers, patches] with position embeddings, as timm's
    ``VisionTransformer._pos_embed``.

    Args:
        x: (B, M, C) patch tokens, or (B, Hp, Wp, C) (flattened row-major to M = Hp * Wp).
        pos_embed: (1, M, C) when ``no_embed_class`` (added to patches only), else (1, P + M, C) covering the prefix
            too; None for models without absolute position embeddings. It must already match the grid: resample with
            ``timm.layers.resample_abs_pos_embed`` first for dynamic image sizes.
        cls_token: (1, 1, C) or None (models without a class token).
        reg_token: (1, R, C) or None.
        no_embed_class: timm's flag: position embeddings skip the prefix tokens (DeiT-3, DINOv2 with registers).

    Returns:
        (B, P + M, C) with P = (cls_token is not None) + R, in ``torch.result_type`` of the inputs. Position
        embeddings are added in float32 and rounded once (identical to timm in float32).
    """
    B, C = x.shape[0], x.shape[-1]
    x = x.reshape(B, -1, C)
    prefix = [t.expand(B, -1, -1) for t in (cls_token, reg_token) if t is not None]
    out_dtype = x.dtype if pos_embed is None else torch.result_type(x, pos_embed)
    if pos_embed is None:
        return torch.cat(prefix + [x], dim=1).to(out_dtype)
    cdtype = _compute_dtype(out_dtype)
    if no_embed_class:
        x = (x.to(cdtype) + pos_embed.to(cdtype)).to(out_dtype)
        return torch.cat([t.to(out_dtype) for t in prefix] + [x], dim=1) if prefix else x
    seq = torch.cat([t.to(cdtype) for t in prefix] + [x.to(cdtype)], dim=1) if prefix else x.to(cdtype)
    return (seq + pos_embed.to(cdtype)).to(out_dtype)


def rope_to_token_layout(rope: torch.Tensor) -> torch.Tensor:
    """Convert a timm RoPE tensor (broadcastable to (B, H, M, 2d), as timm's EvaAttention uses it) to the
    (b, M, h, 2d) layout that broadcasts against (B, M, H, d) tokens."""
    r = rope
    while r.dim() < 4:
        r = r.unsqueeze(0)
    return r.transpose(1, 2)


def apply_rope(t: torch.Tensor, rope: torch.Tensor, num_prefix: int, *, rotate_half: bool = False) -> torch.Tensor:
    """Rotary position embedding on the patch tokens of t, prefix tokens untouched (timm EvaAttention semantics).

    Args:
        t: (B, N, H, d) queries or keys.
        rope: concatenated [sin, cos] table in timm's layout, broadcastable to (B, H, M, 2d) with M = N - num_prefix.
        num_prefix: tokens at the start of the sequence that get no rotation (CLS and registers).
        rotate_half: timm's 'half' layout ([-x2, x1]) instead of the interleaved one ([-x1, x0, -x3, x2, ...]).

    Returns:
        (B, N, H, d) in t's dtype. The rotation uses normal dtype promotion with the table, as timm does.
    """
    r = rope_to_token_layout(rope)
    sin, cos = r.chunk(2, dim=-1)
    x = t[:, num_prefix:]
    if rotate_half:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    else:
        rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    x = (x * cos + rotated * sin).to(t.dtype)
    if num_prefix == 0:
        return x
    return torch.cat([t[:, :num_prefix], x], dim=1)


def register_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    reg_k: Optional[torch.Tensor] = None,
    reg_v: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    num_prefix: int = 0,
    return_stats: Iterable[str] = (),
):
    """``register_attention`` applied to each of S packed sequences alone: the semantics of
    ``regkern.register_attention_varlen``.

    Args:
        q, k, v: (T, H, d) packed tokens; sequence s is rows [cu_seqlens[s], cu_seqlens[s + 1]).
        cu_seqlens: (S + 1,) integer offsets (read on the host).
        reg_k, reg_v: (R, H, d) shared by the sequences or (S, R, H, d) per sequence; both or neither.
        num_prefix: the first ``num_prefix`` tokens of every sequence are its prefix (CLS + registers).
        return_stats: any of "lse" -> (H, T) and "out_norm" -> (T,).

    Returns:
        out (T, H, d) in q's dtype, or ``(out, AttentionStats)``.
    """
    wanted = tuple(return_stats)
    outs, lses, norms = [], [], []
    bounds = [int(x) for x in cu_seqlens.tolist()]
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        rk = rv = None
        if reg_k is not None:
            rk, rv = (reg_k[s], reg_v[s]) if reg_k.dim() == 4 else (reg_k, reg_v)
        out, stats = register_attention(
            q[None, start:end], k[None, start:end], v[None, start:end], rk, rv, scale=scale, num_prefix=num_prefix,
            return_stats=("lse", "out_norm"),
        )  # fmt: skip
        outs.append(out[0])
        lses.append(stats.lse[0])
        norms.append(stats.out_norm[0])
    T, H, _ = q.shape
    out = torch.cat(outs) if outs else q * 0  # T = 0: an empty output that autograd still connects to q
    if not wanted:
        return out
    found = {
        "lse": torch.cat(lses, dim=1) if lses else q.new_empty((H, T), dtype=torch.float32),
        "out_norm": torch.cat(norms) if norms else q.new_empty((T,), dtype=torch.float32),
    }
    return out, AttentionStats({name: found[name] for name in wanted})


def register_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    reg_k: Optional[torch.Tensor],
    reg_v: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    key_bias: Optional[torch.Tensor] = None,
):
    """Gradients of ``register_attention`` (no dropout; a key mask as ``key_bias`` (B, N), the additive bias over
    the token keys in scaled-score units, -inf = masked), recomputing probabilities from the saved LSE.

    Args:
        dout: (B, N, H, d) gradient of out; q, k, v, reg_k, reg_v as in the forward; out (B, N, H, d) and
            lse (B, H, N) as the forward returned them.

    Returns:
        dq, dk, dv (B, N, H, d) in the inputs' dtype and dreg_k, dreg_v in the registers' shape (summed over the
        batch when the registers are shared) or None. Float32 math: p = exp(s - lse), delta = rowsum(dout * out),
        ds = p * (dout v^T - delta), dq = scale ds k, dk = scale ds^T q, dv = p^T dout.
    """
    B, N, H, d = q.shape
    cdtype = _compute_dtype(q.dtype)
    qf, kf, vf = (_to_heads_first(t, cdtype) for t in (q, k, v))
    R = 0
    if reg_k is not None:
        R = reg_k.shape[-3]
        kf = torch.cat([_to_heads_first(batched_registers(reg_k, B), cdtype), kf], dim=2)
        vf = torch.cat([_to_heads_first(batched_registers(reg_v, B), cdtype), vf], dim=2)
    dof = _to_heads_first(dout, cdtype)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if key_bias is not None:  # registers are never masked
        scores = scores + F.pad(key_bias.to(cdtype), (R, 0))[:, None, None, :]
    p = torch.exp(scores - lse.to(cdtype).unsqueeze(-1))
    delta = (dof * _to_heads_first(out, cdtype)).sum(-1, keepdim=True)
    dv_all = torch.matmul(p.transpose(-1, -2), dof)
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * scale
    dk_all = torch.matmul(ds.transpose(-1, -2), qf) * scale

    def tokens_last(t):  # (B, H, L, d) -> fresh contiguous (B, L, H, d) (never a view with a storage offset)
        return t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).copy_(t.transpose(1, 2))

    dq = tokens_last(dq).to(q.dtype)
    dk = tokens_last(dk_all[:, :, R:]).to(k.dtype)
    dv = tokens_last(dv_all[:, :, R:]).to(v.dtype)
    if not R:
        return dq, dk, dv, None, None
    dreg_k, dreg_v = tokens_last(dk_all[:, :, :R]), tokens_last(dv_all[:, :, :R])
    if reg_k.dim() == 3:
        dreg_k, dreg_v = dreg_k.sum(0), dreg_v.sum(0)
    return dq, dk, dv, dreg_k.to(reg_k.dtype), dreg_v.to(reg_v.dtype)


def _rotate(x: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    # the 90-degree pair rotation of RoPE; it is skew-symmetric: rotate(.)^T = -rotate(.)
    if rotate_half:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def qk_prologue(
    t: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    eps: float,
    qk_norm: bool,
    rope: Optional[torch.Tensor],
    num_prefix: int,
    rotate_half: bool,
) -> torch.Tensor:
    """What timm does to q or k between the qkv projection and attention: per-head LayerNorm over d (``qk_norm``),
    then RoPE on the patch tokens (EvaAttention). t (B, N, H, d) -> (B, N, H, d) in t's dtype, rounded after each
    step as timm rounds. The Triton backend's pre-pass kernel computes the same once per token in float32 and rounds
    once, at the end (timm under autocast does the same), so in half precision it can differ from this by one
    rounding; its tests bound its error against a float64 evaluation of this function."""
    if qk_norm:
        t = F.layer_norm(t, (t.shape[-1],), norm_weight, norm_bias, eps)
    if rope is not None:
        t = apply_rope(t, rope, num_prefix, rotate_half=rotate_half)
    return t


def qk_prologue_backward(
    grad: torch.Tensor,
    t: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    eps: float,
    qk_norm: bool,
    rope: Optional[torch.Tensor],
    num_prefix: int,
    rotate_half: bool,
):
    """Gradients of ``qk_prologue`` by explicit formulas (float32): returns (dt, dweight, dbias) (None when absent).

    RoPE: y = x cos + rot(x) sin, rot^T = -rot, so dx = dy cos - rot(dy sin) on patch tokens.
    LayerNorm: x^ = (x - mean) rstd, g = dy w; dx = rstd (g - mean(g) - x^ mean(g x^)); dw = sum dy x^; db = sum dy.
    """
    g = grad.float()
    if rope is not None:
        r = rope_to_token_layout(rope).float()
        sin, cos = r.chunk(2, dim=-1)
        patch = g[:, num_prefix:]
        patch = patch * cos - _rotate(patch * sin, rotate_half)
        g = torch.cat([g[:, :num_prefix], patch], dim=1) if num_prefix else patch
    if not qk_norm:
        return g.to(t.dtype), None, None
    x = t.float()
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    x_hat = (x - mean) * rstd
    gy = g * norm_weight.float() if norm_weight is not None else g
    dx = rstd * (gy - gy.mean(-1, keepdim=True) - x_hat * (gy * x_hat).mean(-1, keepdim=True))
    reduce_dims = tuple(range(g.dim() - 1))
    dw = (g * x_hat).sum(reduce_dims).to(norm_weight.dtype) if norm_weight is not None else None
    db = g.sum(reduce_dims).to(norm_bias.dtype) if norm_bias is not None else None
    return dx.to(t.dtype), dw, db
