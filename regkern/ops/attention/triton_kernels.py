"""Triton kernels of fused register attention: forward (FA2-style online softmax) and backward (dK/dV, dQ).

Keys are split into two segments so that patch tiles stay aligned:
    small segment  R KV-only registers (own buffer, never concatenated) + the P prefix tokens (CLS, registers),
                   one tile of BLOCK_S >= R + P keys
    patch segment  tokens P .. N-1 in BLOCK_N tiles starting at P: a 261-token ViT-B/14-reg4 sequence (P = 5,
                   M = 256) runs 16 + 256 key columns instead of padding 261 to 320 or 384
Queries are tiled from row 0 (with prefix_rows: the prefix rows in a launch of their own, the rest from there on).
q, k, v are read as strided (B, N, H, d) views (last stride 1), registers as (B, R, H, d) with batch stride 0 when
shared. out is written contiguous (B, N, H, d); lse (B, H, N) float32 is the
natural-log sum-exp that the backward recomputes probabilities from.

Layout of this file: kernels, then launchers. Op registration and autograd live in ``regkern.ops.attention.op``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..dispatch import device_capability
from .configs import TileConfig, tile_config

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


#: The received pass reads the lse in log2 units minus this (written by the forward, STORE_LSE2), so that its
#: probabilities come scaled by 2^15 (at most 32768): float16 keeps them normal down to 2^-29, and the per-query
#: multiply to log2 units is gone; the sums are scaled back once per key.
PROB_LOG2_SHIFT = tl.constexpr(15.0)
PROB_UNSCALE = tl.constexpr(2.0**-15)


@triton.jit
def _load_rows(base, rows, row_stride, offs_d, row_mask, d_mask):
    # (len(rows), BLOCK_D) tile of a strided (rows, d) matrix; masked elements are 0
    return tl.load(
        base + rows[:, None] * row_stride + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
    )


@triton.jit
def _program_coords(num_tiles, H):
    # one flat grid axis (no 65535 limit on B*H); the tiles of one (b, h) are adjacent, so they share K/V in L2.
    # int64 so that offsets of large batches do not overflow
    pid = tl.program_id(0)
    tile = pid % num_tiles
    bh = (pid // num_tiles).to(tl.int64)
    return tile, bh, bh // H, bh % H


@triton.jit
def _prologue_tile(
    src,
    dst,
    load_mask,
    store_mask,
    col_ok,
    coef,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QK_NORM: tl.constexpr,
    USE_ROPE: tl.constexpr,
    ROTATE_HALF: tl.constexpr,
    FOLDED: tl.constexpr,
):
    # One [T, BLOCK_D] tile of q or k (src, dst: pointers in the caller's column order): LayerNorm over d, then
    # RoPE, in float32 and rounded once at the store. coef: (w, bias) [BLOCK_D] without RoPE; with a RoPE table
    # shared by the heads (FOLDED) _rope_coefficients' six tiles, made once per program; with one per head
    # (w, bias, sin_a, sin_b, cos_a, cos_b): folding would cost more per head than applying the affine and the
    # rotation in turn.
    if BLOCK_D == HEAD_DIM:  # in-bounds rows, every column real: no mask
        x = tl.load(src)  # [T, BLOCK_D]
    else:  # padded columns read 0
        x = tl.load(src, mask=load_mask, other=0.0)
    y = x.to(tl.float32)
    if QK_NORM:
        mean = tl.sum(y, axis=1) * (1.0 / HEAD_DIM)  # [T]
        yc = y - mean[:, None]
        if BLOCK_D != HEAD_DIM:  # padded columns stay out of the variance
            yc = tl.where(col_ok[None, :], yc, 0.0)
        rstd = tl.math.rsqrt(tl.sum(yc * yc, axis=1) * (1.0 / HEAD_DIM) + eps)  # [T]
        y = yc * rstd[:, None]
    if USE_ROPE and FOLDED:
        a_self, a_other, a_const, b_self, b_other, b_const = coef  # [T, BLOCK_D / 2] each
        ya, yb = _rope_pairs(y, ROTATE_HALF)
        if QK_NORM:
            out_a, out_b = a_self * ya + (a_other * yb + a_const), b_self * yb + (b_other * ya + b_const)
        else:  # no affine bias: the constant tiles are 0
            out_a, out_b = a_self * ya + a_other * yb, b_self * yb + b_other * ya
        y = _rope_unpair(out_a, out_b, ROTATE_HALF)
    elif USE_ROPE:
        w, b, sa, sb, ca, cb = coef
        if QK_NORM:
            y = y * w[None, :] + b[None, :]
        ya, yb = _rope_pairs(y, ROTATE_HALF)
        y = _rope_unpair(ya * ca - yb * sa, yb * cb + ya * sb, ROTATE_HALF)
    elif QK_NORM:
        w, b = coef
        y = y * w[None, :] + b[None, :]
    tl.store(dst, y.to(x.dtype), mask=store_mask)


@triton.jit
def _rope_coefficients(w, b, sa, sb, ca, cb, QK_NORM: tl.constexpr, ROTATE_HALF: tl.constexpr):
    # RoPE after the LayerNorm affine, folded: out_a = y_a cos_a - y_b sin_a and out_b = y_b cos_b + y_a sin_b for
    # each pair (a, b), where y = x^ w + bias, so out_a = (w_a cos_a) x^_a + (-w_b sin_a) x^_b + (bias_a cos_a -
    # bias_b sin_a) and likewise for b: six [T, BLOCK_D / 2] tiles (a_self, a_other, a_const, b_self, b_other,
    # b_const), computed once per program and used for every head (a table shared by the heads only)
    if QK_NORM:
        wa, wb = _rope_pairs(tl.broadcast_to(w[None, :], [sa.shape[0], w.shape[0]]), ROTATE_HALF)
        b_a, b_b = _rope_pairs(tl.broadcast_to(b[None, :], [sa.shape[0], b.shape[0]]), ROTATE_HALF)
        return wa * ca, -wb * sa, b_a * ca - b_b * sa, wb * cb, wa * sb, b_b * cb + b_a * sb
    else:
        return ca, -sa, tl.zeros_like(ca), cb, sb, tl.zeros_like(cb)


@triton.jit
def _rope_pairs(t, ROTATE_HALF: tl.constexpr):
    # [T, BLOCK_D] -> the two [T, BLOCK_D / 2] members of each rotation pair
    T: tl.constexpr = t.shape[0]
    BLOCK_H: tl.constexpr = t.shape[1] // 2
    if ROTATE_HALF:
        return tl.split(tl.permute(tl.reshape(t, [T, 2, BLOCK_H]), (0, 2, 1)))
    else:
        return tl.split(tl.reshape(t, [T, BLOCK_H, 2]))


@triton.jit
def _rope_unpair(a, b, ROTATE_HALF: tl.constexpr):
    # inverse of _rope_pairs
    T: tl.constexpr = a.shape[0]
    BLOCK_D: tl.constexpr = 2 * a.shape[1]
    if ROTATE_HALF:
        return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [T, BLOCK_D])
    else:
        return tl.reshape(tl.join(a, b), [T, BLOCK_D])


@triton.jit
def attn_prologue_kernel(
    Q,
    K,
    QO,
    KO,
    QNW,
    QNB,
    KNW,
    KNB,
    ROPE,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_ropeb,
    stride_ropeh,
    stride_ropem,
    H,
    N,
    P,
    norm_eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QK_NORM: tl.constexpr,
    USE_ROPE: tl.constexpr,
    ROTATE_HALF: tl.constexpr,
    ROPE_PER_HEAD: tl.constexpr,
):
    # timm's prologue once per token: q' and k' (per-head LayerNorm over d, then RoPE on tokens >= P) of BLOCK_T
    # tokens of one batch row, every head in turn, written contiguous (B, N, H, d); the attention passes then load
    # plain tiles. The affine parameters and (unless they differ per head) the sin/cos tiles are loaded once.
    num_tiles = tl.cdiv(N, BLOCK_T)
    pid = tl.program_id(0)
    b = (pid // num_tiles).to(tl.int64)
    rows = (pid % num_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T]
    row_mask = rows < N
    # For rotate_half, position p holds column (p // (BLOCK_D / 2)) * (d / 2) + p % (BLOCK_D / 2), so that both
    # halves start at a power of two; RoPE then pairs each column with its partner by a reshape and a split.
    BLOCK_H: tl.constexpr = BLOCK_D // 2
    offs_p = tl.arange(0, BLOCK_D)
    if ROTATE_HALF:
        cols = (offs_p // BLOCK_H) * (HEAD_DIM // 2) + offs_p % BLOCK_H
        col_ok = (offs_p % BLOCK_H) < HEAD_DIM // 2
    else:
        cols = offs_p
        col_ok = offs_p < HEAD_DIM
    mask = row_mask[:, None] & col_ok[None, :]  # [T, BLOCK_D]
    rope_mask = mask & (rows >= P)[:, None]  # patch tokens only: prefix rows read sin = 0, cos = 1
    table = ROPE + b * stride_ropeb + (rows - P)[:, None] * stride_ropem + cols[None, :]  # [T, BLOCK_D] (head 0)
    if QK_NORM:
        qw = tl.load(QNW + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
        qb = tl.load(QNB + cols, mask=col_ok, other=0.0).to(tl.float32)
        kw = tl.load(KNW + cols, mask=col_ok, other=0.0).to(tl.float32)
        kb = tl.load(KNB + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:  # unused
        qw = tl.zeros([BLOCK_D], dtype=tl.float32)
        qb, kw, kb = qw, qw, qw
    if USE_ROPE and not ROPE_PER_HEAD:  # folded once per program
        sa, sb, ca, cb = _rope_tiles(table, rope_mask, HEAD_DIM, ROTATE_HALF)
        q_coef = _rope_coefficients(qw, qb, sa, sb, ca, cb, QK_NORM, ROTATE_HALF)
        k_coef = _rope_coefficients(kw, kb, sa, sb, ca, cb, QK_NORM, ROTATE_HALF)
    else:  # the affine; with a table per head, _prologue_heads loads each head's sin/cos
        q_coef, k_coef = (qw, qb), (kw, kb)
    # loads read in-bounds rows (a ragged tile's last rows repeat row N - 1; only rows < N are stored), so that
    # they need no mask (nor the fill values a mask costs) unless d is padded
    load_rows = tl.minimum(rows, N - 1)
    load_mask = tl.broadcast_to(col_ok[None, :], [BLOCK_T, BLOCK_D])  # all true unless d is padded
    q_tile = Q + b * stride_qb + load_rows[:, None] * stride_qn + cols[None, :]  # [T, BLOCK_D] pointers of head 0
    k_tile = K + b * stride_kb + load_rows[:, None] * stride_kn + cols[None, :]
    out_tile = (b * N * H) * HEAD_DIM + rows[:, None] * (H * HEAD_DIM) + cols[None, :]  # offsets of head 0
    tiles = (q_tile, k_tile, QO + out_tile, KO + out_tile, load_mask, mask, col_ok)
    _prologue_heads(
        tiles, table, rope_mask, q_coef, k_coef, stride_qh, stride_kh, stride_ropeh, H, norm_eps,
        HEAD_DIM, BLOCK_D, QK_NORM, USE_ROPE, ROTATE_HALF, ROPE_PER_HEAD,
    )  # fmt: skip


@triton.jit
def _prologue_heads(
    tiles, table, rope_mask, q_coef, k_coef, stride_qh, stride_kh, stride_ropeh, H, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr, USE_ROPE: tl.constexpr,
    ROTATE_HALF: tl.constexpr, ROPE_PER_HEAD: tl.constexpr,
):  # fmt: skip
    # (its own function: the same loop inlined in the kernel compiles to ~3% more instructions, sm_90 and sm_80)
    # every head of one program's tokens in turn: q' and k' of head h per step. q_coef, k_coef: (w, bias) with a
    # RoPE table per head (this head's sin/cos are loaded here, under rope_mask), else their _prologue_tile coef
    q_tile, k_tile, q_out, k_out, load_mask, store_mask, col_ok = tiles
    for h in range(H):
        if USE_ROPE and ROPE_PER_HEAD:  # this head's sin/cos, shared by q and k
            sa, sb, ca, cb = _rope_tiles(table + h * stride_ropeh, rope_mask, HEAD_DIM, ROTATE_HALF)
            q_step = (q_coef[0], q_coef[1], sa, sb, ca, cb)
            k_step = (k_coef[0], k_coef[1], sa, sb, ca, cb)
        else:
            q_step, k_step = q_coef, k_coef
        _prologue_tile(
            q_tile + h * stride_qh, q_out + h * HEAD_DIM, load_mask, store_mask, col_ok, q_step, eps,
            HEAD_DIM, BLOCK_D, QK_NORM, USE_ROPE, ROTATE_HALF, not ROPE_PER_HEAD,
        )  # fmt: skip
        _prologue_tile(
            k_tile + h * stride_kh, k_out + h * HEAD_DIM, load_mask, store_mask, col_ok, k_step, eps,
            HEAD_DIM, BLOCK_D, QK_NORM, USE_ROPE, ROTATE_HALF, not ROPE_PER_HEAD,
        )  # fmt: skip


@triton.jit
def _rope_tiles(table, rope_mask, HEAD_DIM: tl.constexpr, ROTATE_HALF: tl.constexpr):
    # [T, BLOCK_D / 2] sin and cos of both members of each rotation pair, from [sin | cos] rows of 2 d
    sin = tl.load(table, mask=rope_mask, other=0.0).to(tl.float32)
    cos = tl.load(table + HEAD_DIM, mask=rope_mask, other=1.0).to(tl.float32)
    sa, sb = _rope_pairs(sin, ROTATE_HALF)
    ca, cb = _rope_pairs(cos, ROTATE_HALF)
    return sa, sb, ca, cb


@triton.jit
def _varlen_sequence(CU_SEQLENS, b, h, total):
    # packed sequence b: its first row, the first row of its (h) statistics in (H, total) buffers, its length
    start_row = tl.load(CU_SEQLENS + b).to(tl.int64)
    return start_row, h * total + start_row, tl.load(CU_SEQLENS + b + 1).to(tl.int64) - start_row


@triton.jit
def _load_small_segment(K, RK, k_base, rk_base, stride_kn, stride_rkr, offs_s, offs_d, d_mask, R, count):
    # rows offs_s of the key sequence [R registers from their own buffer, `count` tokens from K] as one tile (the
    # small segment: count = P); rows >= R + count are 0
    is_reg = offs_s < R
    is_tok = (offs_s >= R) & (offs_s < R + count)
    reg = _load_rows(RK + rk_base, offs_s, stride_rkr, offs_d, is_reg, d_mask)
    tok = _load_rows(K + k_base, offs_s - R, stride_kn, offs_d, is_tok, d_mask)
    return reg + tok


@triton.jit
def _store_prefix_scores(PS, pid_bh, offs_m, cols, s, P, num_keys, row_ok, col_ok):
    # scaled scores (log2 units) of the prefix queries; the launcher normalises them with the final lse
    ptrs = PS + (pid_bh * P + offs_m[:, None]) * num_keys + cols[None, :]
    tl.store(ptrs, s, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _tile_offsets(rows, row_stride, offs_d):
    # [len(rows), BLOCK_D] element offsets of a strided (rows, d) matrix
    return rows[:, None] * row_stride + offs_d[None, :]


@triton.jit
def _row_tile_ptrs(base, start, row_stride, hoisted, offs_n, offs_d, BLOCK_D: tl.constexpr):
    # [rows, BLOCK_D] pointers of the rows from `start` (keys, values; queries in the key-major passes): the scalar
    # row offset first, then the offsets
    # hoisted out of the loop (at d <= 64); at d = 128 the hoisted tile would hold registers that then spill
    if BLOCK_D <= 64:
        return (base + start * row_stride) + hoisted
    else:
        return base + _tile_offsets(offs_n, row_stride, offs_d)


@triton.jit
def _load_tile(ptrs, row_mask, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    # masks only what can be out of range: rows of a ragged tile, columns when d is not a power of two
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _key_bias(key_bias_b, offs, ok, MASK: tl.constexpr):
    # [BLOCK] the key-mask bias of token keys `offs` of one batch row (0 where not ok, when MASK)
    if MASK:
        return tl.load(key_bias_b + offs, mask=ok, other=0.0)
    return tl.load(key_bias_b + offs)


@triton.jit
def _softmax_update(s, m_i, l_i, acc, v, qk_scale_log2, DOT_PRECISION: tl.constexpr, MASKED_ROWS: tl.constexpr):
    # s: [BLOCK_M, BLOCK_*] raw scores, masked columns -inf. The scale rides in the exp2 argument (one FFMA per
    # score) and the max is taken before scaling (qk_scale_log2 > 0). MASKED_ROWS (key masks): a row may have seen
    # only masked keys so far (max -inf); it then subtracts 0, so that exp2 gives 0 rather than NaN
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale_log2)
    m_sub = m_new
    if MASKED_ROWS:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale_log2 - m_sub[:, None])  # [BLOCK_M, BLOCK_*]
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_patch_tile(
    q,
    m_i,
    l_i,
    acc,
    k_base,
    v_base,
    kv_offs_k,
    kv_offs_v,
    start,
    N,
    R,
    P,
    stride_kn,
    stride_vn,
    offs_d,
    qk_scale_log2,
    PREFIX_S,
    pid_bh,
    offs_m,
    prefix_ok,
    key_bias_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STAT_PREFIX: tl.constexpr,
    HAS_KEY_BIAS: tl.constexpr,
):
    # one BLOCK_N tile of patch keys from `start`; MASK only for the ragged last tile
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k = _load_tile(
        _row_tile_ptrs(k_base, start, stride_kn, kv_offs_k, offs_n, offs_d, BLOCK_D),
        n_mask,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        MASK,
    )
    v = _load_tile(
        _row_tile_ptrs(v_base, start, stride_vn, kv_offs_v, offs_n, offs_d, BLOCK_D),
        n_mask,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        MASK,
    )
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_KEY_BIAS:  # the key mask, in raw-score units (-inf: masked)
        s += _key_bias(key_bias_b, offs_n, n_mask, MASK)[None, :]
    if MASK:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    if STAT_PREFIX:
        _store_prefix_scores(PREFIX_S, pid_bh, offs_m, R + offs_n, s * qk_scale_log2, P, R + N, prefix_ok, n_mask)
    return _softmax_update(s, m_i, l_i, acc, v, qk_scale_log2, DOT_PRECISION, HAS_KEY_BIAS)


@triton.jit
def attn_fwd_kernel(
    Q,
    K,
    V,
    RK,
    RV,
    Out,
    LSE,
    OUT_SQ,
    PREFIX_S,
    KEY_BIAS,
    CU_SEQLENS,
    LSE2,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_rkb,
    stride_rkr,
    stride_rkh,
    stride_rvb,
    stride_rvr,
    stride_rvh,
    H,
    N,
    R,
    P,
    first_row,
    tiles,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SMALL: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STAT_OUT_SQ: tl.constexpr,
    STAT_PREFIX: tl.constexpr,
    HAS_KEY_BIAS: tl.constexpr,
    VARLEN: tl.constexpr = False,
    STORE_LSE2: tl.constexpr = False,
):
    # STORE_LSE2: the lse in log2 units, minus PROB_LOG2_SHIFT, into LSE2 too, for the received pass.
    # KEY_BIAS (B, N) float32: a key mask in raw-score units (bias / scale; -inf = masked), registers never masked.
    # This launch covers `tiles` query tiles from row first_row. The prefix queries, which record their attention
    # rows (STAT_PREFIX), get a small launch of their own, so that the other tiles carry none of that code.
    # VARLEN: b is a sequence of the packed (T, H, d) tokens, rows [CU_SEQLENS[b], CU_SEQLENS[b + 1]); N is then
    # the total T on entry (lse and out_norm are (H, T)) and this sequence's length below; `tiles` is the longest's
    pid_m, pid_bh, b, h = _program_coords(tiles, H)
    q_off = b * stride_qb + h * stride_qh
    k_off = b * stride_kb + h * stride_kh
    v_off = b * stride_vb + h * stride_vh
    out_row = b * N  # first row of this (b, h) in out (B, N, H, d); its lse / out_norm row is stat_row
    stat_row = pid_bh * N
    if VARLEN:
        total_rows = N
        start_row, stat_row, N = _varlen_sequence(CU_SEQLENS, b, h, N)
        if first_row + pid_m * BLOCK_M >= N:
            return  # a shorter sequence than the longest: no rows in this tile
        q_off = start_row * stride_qn + h * stride_qh
        k_off = start_row * stride_kn + h * stride_kh
        v_off = start_row * stride_vn + h * stride_vh
        out_row = start_row
    offs_m = first_row + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < N
    prefix_ok = (offs_m < P) & m_mask

    q_base = Q + q_off
    k_base = K + k_off
    v_base = V + v_off
    q = _load_tile(q_base + _tile_offsets(offs_m, stride_qn, offs_d), m_mask, offs_d, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BLOCK_M, BLOCK_D]

    if HAS_SMALL:
        offs_s = tl.arange(0, BLOCK_S)
        small_ok = offs_s < R + P
        ks = _load_small_segment(
            K,
            RK,
            k_off,
            b * stride_rkb + h * stride_rkh,
            stride_kn,
            stride_rkr,
            offs_s,
            offs_d,
            d_mask,
            R,
            P,
        )
        vs = _load_small_segment(
            V,
            RV,
            v_off,
            b * stride_rvb + h * stride_rvh,
            stride_vn,
            stride_rvr,
            offs_s,
            offs_d,
            d_mask,
            R,
            P,
        )
        s_small = tl.dot(q, tl.trans(ks), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_S]
        if HAS_KEY_BIAS:  # the prefix tokens of the small segment can be masked, its registers cannot
            s_small += _key_bias(KEY_BIAS + b * N, offs_s - R, (offs_s >= R) & small_ok, True)[None, :]
        s_small = tl.where(small_ok[None, :], s_small, float("-inf"))
        if STAT_PREFIX:
            _store_prefix_scores(
                PREFIX_S, pid_bh, offs_m, offs_s, s_small * qk_scale_log2, P, R + N, prefix_ok, small_ok
            )
        m_i, l_i, acc = _softmax_update(s_small, m_i, l_i, acc, vs, qk_scale_log2, DOT_PRECISION, HAS_KEY_BIAS)

    # patch keys: whole tiles unmasked, then the ragged last tile (HAS_TAIL; always with VARLEN) masked
    kv_rows = tl.arange(0, BLOCK_N)
    kv_offs_k = _tile_offsets(kv_rows, stride_kn, offs_d)  # [BLOCK_N, BLOCK_D], hoisted out of the loop
    kv_offs_v = _tile_offsets(kv_rows, stride_vn, offs_d)
    end_full = P + ((N - P) // BLOCK_N) * BLOCK_N
    for start in range(P, end_full, BLOCK_N):
        m_i, l_i, acc = _fwd_patch_tile(
            q, m_i, l_i, acc, k_base, v_base, kv_offs_k, kv_offs_v, start, N, R, P, stride_kn, stride_vn, offs_d,
            qk_scale_log2, PREFIX_S, pid_bh, offs_m, prefix_ok, KEY_BIAS + b * N,
            HEAD_DIM, BLOCK_N, BLOCK_D, False, DOT_PRECISION, STAT_PREFIX, HAS_KEY_BIAS,
        )  # fmt: skip
    run_tail = HAS_TAIL
    if VARLEN:  # each sequence its own ragged tail, if any
        run_tail = end_full < N
    if run_tail:
        m_i, l_i, acc = _fwd_patch_tile(
            q, m_i, l_i, acc, k_base, v_base, kv_offs_k, kv_offs_v, end_full, N, R, P, stride_kn, stride_vn, offs_d,
            qk_scale_log2, PREFIX_S, pid_bh, offs_m, prefix_ok, KEY_BIAS + b * N,
            HEAD_DIM, BLOCK_N, BLOCK_D, True, DOT_PRECISION, STAT_PREFIX, HAS_KEY_BIAS,
        )  # fmt: skip

    acc = acc * (1.0 / l_i)[:, None]
    if VARLEN:  # read again rather than held through the loop (registers)
        out_row = tl.load(CU_SEQLENS + b).to(tl.int64)
        stat_row = h * total_rows + out_row
    if STAT_OUT_SQ:  # this head's share of ||out[b, n]||^2, from the float32 accumulator
        tl.store(OUT_SQ + stat_row + offs_m, tl.sum(acc * acc, axis=1), mask=m_mask)
    # out is contiguous (B, N, H, d) (VARLEN: (T, H, d))
    o_ptrs = Out + ((out_row + offs_m[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    lse2 = m_i + tl.log2(l_i)
    tl.store(LSE + stat_row + offs_m, lse2 * 0.6931471805599453, mask=m_mask)
    if STORE_LSE2:
        tl.store(LSE2 + stat_row + offs_m, lse2 - PROB_LOG2_SHIFT, mask=m_mask)


@triton.jit
def _key_tile(N, P, H, BLOCK_KEYS: tl.constexpr):
    # the BLOCK_KEYS patch keys from P that a key-major program of the dK/dV pass owns
    pid_n, pid_bh, b, h = _program_coords(tl.cdiv(N - P, BLOCK_KEYS), H)
    offs_j = P + pid_n * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    return pid_bh, b, h, offs_j, offs_j < N


@triton.jit
def _received_key_tile(N, P, R, H, BLOCK_KEYS: tl.constexpr, SMALL_SEGMENT: tl.constexpr, SKIP_SMALL: tl.constexpr):
    # the received pass's keys are [R registers, N tokens] as one sequence: a program owns the small segment (its
    # first R + P), or BLOCK_KEYS of the sequence from its start (no second launch for the small segment) or from
    # R + P (SKIP_SMALL: the small segment has its own program, when that saves a whole tile)
    if SMALL_SEGMENT:
        pid_n, pid_bh, b, h = _program_coords(1, H)
        offs_j = tl.arange(0, BLOCK_KEYS)
        count = P
    else:
        start = R + P if SKIP_SMALL else 0
        pid_n, pid_bh, b, h = _program_coords(tl.cdiv(R + N - start, BLOCK_KEYS), H)
        offs_j = start + pid_n * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
        count = N
    return pid_bh, b, h, offs_j, offs_j < R + count, count


@triton.jit
def _received_query_tile(
    k,
    colsum,
    q_base,
    q_offs,
    start,
    N,
    stride_qn,
    offs_d,
    LSE2_BH,
    qk_scale_log2,
    key_bias,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_KEY_BIAS: tl.constexpr,
    COLSUM_MMA: tl.constexpr,
):
    # the probabilities (scaled by 2^PROB_LOG2_SHIFT through LSE2_BH) of ROWS queries from `start` on this program's
    # keys, summed over the queries; a piece of the ragged last tile (MASK; ROWS from _tail_pieces) computes its own
    # offsets.
    # COLSUM_MMA: colsum is a [BLOCK_KEYS, 16] accumulator and the sum over the queries is a tensor-core product
    # with a ones column (float16 probabilities, float32 accumulation, as flash attention's P V), which issues
    # fewer instructions than one FADD per score; its first column is the sum.
    offs_m = start + tl.arange(0, ROWS)
    m_mask = offs_m < N
    if MASK:  # padded queries get lse = +inf: probability 0
        q = _load_tile(q_base + _tile_offsets(offs_m, stride_qn, offs_d), m_mask, offs_d, HEAD_DIM, BLOCK_D, True)
        lse2 = tl.load(LSE2_BH + offs_m, mask=m_mask, other=float("inf"))
    else:
        q_ptrs = _row_tile_ptrs(q_base, start, stride_qn, q_offs, offs_m, offs_d, BLOCK_D)
        q = _load_tile(q_ptrs, m_mask, offs_d, HEAD_DIM, BLOCK_D, False)
        lse2 = tl.load(LSE2_BH + offs_m)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_KEYS, ROWS]
    if HAS_KEY_BIAS:
        st += key_bias[:, None]
    pt = tl.exp2(st * qk_scale_log2 - lse2[None, :])
    if COLSUM_MMA:
        ones = tl.where(tl.arange(0, 16)[None, :] == 0, 1.0, 0.0).to(tl.float16)  # [1, 16]
        colsum = tl.dot(pt.to(tl.float16), tl.broadcast_to(ones, [ROWS, 16]), colsum)
    else:
        colsum += tl.sum(pt, axis=1)
    return colsum


@triton.jit
def attn_received_kernel(
    Q,
    K,
    RK,
    LSE2,
    RECEIVED,
    GROUPS,
    KEY_BIAS,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_rkb,
    stride_rkr,
    stride_rkh,
    H,
    N,
    R,
    P,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SMALL_SEGMENT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    TAIL_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_KEYS: tl.constexpr,
    REDUCE_GROUPS: tl.constexpr,
    HAS_KEY_BIAS: tl.constexpr,
    COLSUM_MMA: tl.constexpr = False,
    PATCHES_REST: tl.constexpr = False,
    TAIL_SPLIT_ROWS: tl.constexpr = 0,
    SKIP_SMALL: tl.constexpr = False,
):
    # Attention each key receives, summed over all queries: a second pass over the keys with the final lse. The keys
    # are [R registers, N tokens] as one sequence: BLOCK_KEYS of it per program (from R + P with SKIP_SMALL), or
    # (SMALL_SEGMENT) its first R + P.
    # Keys past the end are zero rows whose sums are never stored, so only the ragged last query tile is masked.
    # STORE_KEYS writes the per-key sums (B, H, R + N); REDUCE_GROUPS adds them per key group into GROUPS (B, H, 4):
    # [KV registers, prefix token 0, prefix tokens 1.., patches], one atomic per (program, group). PATCHES_REST (the
    # small segment, when no program covers the patch keys): the patches' group is N minus the small segment's sums,
    # as each query's probabilities sum to 1; the group shares then cost one program per (batch, head).
    pid_bh, b, h, offs_j, valid, count = _received_key_tile(N, P, R, H, BLOCK_KEYS, SMALL_SEGMENT, SKIP_SMALL)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rk_base = b * stride_rkb + h * stride_rkh
    k = _load_small_segment(K, RK, b * stride_kb + h * stride_kh, rk_base, stride_kn, stride_rkr, offs_j, offs_d,
                            d_mask, R, count)  # fmt: skip
    key_bias = tl.zeros([BLOCK_KEYS], dtype=tl.float32)  # [BLOCK_KEYS] the key mask of this program's keys
    if HAS_KEY_BIAS:  # registers are never masked
        key_bias = _key_bias(KEY_BIAS + b * N, offs_j - R, (offs_j >= R) & valid, True)
    if COLSUM_MMA:
        colsum = tl.zeros([BLOCK_KEYS, 16], dtype=tl.float32)
    else:
        colsum = tl.zeros([BLOCK_KEYS], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    q_offs = _tile_offsets(tl.arange(0, BLOCK_M), stride_qn, offs_d)  # [BLOCK_M, BLOCK_D], hoisted
    lse2_bh = LSE2 + pid_bh * N  # the forward's lse in log2 units, minus PROB_LOG2_SHIFT
    end_full = (N // BLOCK_M) * BLOCK_M
    for start in range(0, end_full, BLOCK_M):
        colsum = _received_query_tile(
            k, colsum, q_base, q_offs, start, N, stride_qn, offs_d, lse2_bh, qk_scale_log2, key_bias, HEAD_DIM, BLOCK_M,
            BLOCK_D, False, DOT_PRECISION, HAS_KEY_BIAS, COLSUM_MMA,
        )  # fmt: skip
    if HAS_TAIL:
        if TAIL_SPLIT_ROWS > 0:  # e.g. 94 rows as 64 + 32 instead of 128
            colsum = _received_query_tile(
                k, colsum, q_base, q_offs, end_full, N, stride_qn, offs_d, lse2_bh, qk_scale_log2, key_bias, HEAD_DIM,
                TAIL_SPLIT_ROWS, BLOCK_D, True, DOT_PRECISION, HAS_KEY_BIAS, COLSUM_MMA,
            )  # fmt: skip
        colsum = _received_query_tile(
            k, colsum, q_base, q_offs, end_full + TAIL_SPLIT_ROWS, N, stride_qn, offs_d, lse2_bh, qk_scale_log2,
            key_bias, HEAD_DIM, TAIL_ROWS, BLOCK_D, True, DOT_PRECISION, HAS_KEY_BIAS, COLSUM_MMA,
        )  # fmt: skip
    if COLSUM_MMA:
        colsum = tl.sum(colsum, axis=1)  # [BLOCK_KEYS]: the first column, the others are 0
    colsum = colsum * PROB_UNSCALE  # the probabilities were scaled by 2^PROB_LOG2_SHIFT
    if STORE_KEYS:
        tl.store(RECEIVED + pid_bh * (R + N) + offs_j, colsum, mask=valid)
    if REDUCE_GROUPS:  # [KV registers, prefix token 0, prefix tokens 1.., patches]: one atomic per group
        colsum = tl.where(valid, colsum, 0.0)  # [BLOCK_KEYS]
        groups = tl.arange(0, 4)
        key_group = tl.where(offs_j < R, 0, tl.where(offs_j < R + P, tl.where(offs_j == R, 1, 2), 3))
        part = tl.sum(tl.where(key_group[:, None] == groups[None, :], colsum[:, None], 0.0), axis=0)  # [4]
        if PATCHES_REST:  # no pass over the patch keys: each of the N rows sums to 1, the patches get the rest
            part = tl.where(groups == 3, N - tl.sum(part, axis=0), part)
        tl.atomic_add(GROUPS + pid_bh * 4 + groups, part, mask=part != 0)


@triton.jit
def _dkdv_query_tile(
    k,
    v,
    dk,
    dv,
    q_base,
    do_base,
    q_offs,
    do_offs,
    lse_bh,
    delta_bh,
    start,
    N,
    stride_qn,
    stride_don,
    offs_d,
    qk_scale_log2,
    key_bias,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_KEY_BIAS: tl.constexpr,
):
    # the contribution of ROWS queries from `start` to this program's dK, dV (scores transposed: keys x queries).
    # Whole tiles use the hoisted offsets; the ragged last tile (MASK) is ROWS = the tail rounded up to a power of 2
    offs_m = start + tl.arange(0, ROWS)
    m_mask = offs_m < N
    if MASK:  # padded queries: lse = +inf gives probability 0
        q = _load_tile(q_base + _tile_offsets(offs_m, stride_qn, offs_d), m_mask, offs_d, HEAD_DIM, BLOCK_D, True)
        do = _load_tile(do_base + _tile_offsets(offs_m, stride_don, offs_d), m_mask, offs_d, HEAD_DIM, BLOCK_D, True)
        lse2 = tl.load(lse_bh + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_bh + offs_m, mask=m_mask, other=0.0)
    else:
        q_ptrs = _row_tile_ptrs(q_base, start, stride_qn, q_offs, offs_m, offs_d, BLOCK_D)
        do_ptrs = _row_tile_ptrs(do_base, start, stride_don, do_offs, offs_m, offs_d, BLOCK_D)
        q = _load_tile(q_ptrs, m_mask, offs_d, HEAD_DIM, BLOCK_D, False)  # [ROWS, BLOCK_D]
        do = _load_tile(do_ptrs, m_mask, offs_d, HEAD_DIM, BLOCK_D, False)
        lse2 = tl.load(lse_bh + offs_m) * 1.4426950408889634
        delta = tl.load(delta_bh + offs_m)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_KEYS, BLOCK_M]
    if HAS_KEY_BIAS:
        st += key_bias[:, None]
    pt = tl.exp2(st * qk_scale_log2 - lse2[None, :])
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_KEYS, BLOCK_M]
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    KEY_BIAS,
    CU_SEQLENS,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_don,
    stride_doh,
    H,
    N,
    P,
    qk_scale_log2,
    scale,
    tiles,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KEYS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    TAIL_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_KEY_BIAS: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # One program owns BLOCK_KEYS patch keys from P and loops over all queries. (The small segment's key gradients
    # come from attn_bwd_dq_kernel, which has its probabilities at hand.) VARLEN: as in attn_fwd_kernel (N is T on
    # entry, `tiles` the key tiles of the longest sequence)
    if VARLEN:
        pid_n, pid_bh, b, h = _program_coords(tiles, H)
        start_row, stat_row, N = _varlen_sequence(CU_SEQLENS, b, h, N)
        if P + pid_n * BLOCK_KEYS >= N:
            return
        offs_j = P + pid_n * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
        valid = offs_j < N
        q_off = start_row * stride_qn + h * stride_qh
        k_off = start_row * stride_kn + h * stride_kh
        v_off = start_row * stride_vn + h * stride_vh
        do_off = start_row * stride_don + h * stride_doh
        out_row = start_row
    else:
        pid_bh, b, h, offs_j, valid = _key_tile(N, P, H, BLOCK_KEYS)
        stat_row = pid_bh * N
        q_off = b * stride_qb + h * stride_qh
        k_off = b * stride_kb + h * stride_kh
        v_off = b * stride_vb + h * stride_vh
        do_off = b * stride_dob + h * stride_doh
        out_row = b * N
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k = _load_rows(K + k_off, offs_j, stride_kn, offs_d, valid, d_mask)  # [BLOCK_KEYS, BLOCK_D]
    v = _load_rows(V + v_off, offs_j, stride_vn, offs_d, valid, d_mask)

    dk = tl.zeros([BLOCK_KEYS, BLOCK_D], dtype=tl.float32)  # [BLOCK_KEYS, BLOCK_D]
    dv = tl.zeros([BLOCK_KEYS, BLOCK_D], dtype=tl.float32)
    key_bias = tl.zeros([BLOCK_KEYS], dtype=tl.float32)
    if HAS_KEY_BIAS:
        key_bias = _key_bias(KEY_BIAS + b * N, offs_j, valid, True)
    q_base = Q + q_off
    do_base = DO + do_off
    rows = tl.arange(0, BLOCK_M)
    q_offs = _tile_offsets(rows, stride_qn, offs_d)  # [BLOCK_M, BLOCK_D], hoisted
    do_offs = _tile_offsets(rows, stride_don, offs_d)
    lse_bh = LSE + stat_row
    delta_bh = DELTA + stat_row
    # Keys past the end are zero rows whose gradients are never stored, so only the ragged last query tile is masked
    end_full = (N // BLOCK_M) * BLOCK_M
    for start in range(0, end_full, BLOCK_M):
        dk, dv = _dkdv_query_tile(
            k, v, dk, dv, q_base, do_base, q_offs, do_offs, lse_bh, delta_bh, start, N, stride_qn, stride_don, offs_d,
            qk_scale_log2, key_bias, HEAD_DIM, BLOCK_M, BLOCK_D, False, DOT_PRECISION, HAS_KEY_BIAS,
        )  # fmt: skip
    run_tail = HAS_TAIL
    if VARLEN:  # each sequence its own ragged tail, if any
        run_tail = end_full < N
    if run_tail:
        dk, dv = _dkdv_query_tile(
            k, v, dk, dv, q_base, do_base, q_offs, do_offs, lse_bh, delta_bh, end_full, N, stride_qn, stride_don,
            offs_d, qk_scale_log2, key_bias, HEAD_DIM, TAIL_ROWS, BLOCK_D, True, DOT_PRECISION, HAS_KEY_BIAS,
        )  # fmt: skip
    dk = dk * scale
    # dk, dv are contiguous (B, N, H, d) (VARLEN: (T, H, d))
    ptrs = ((out_row + offs_j[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    mask = valid[:, None] & d_mask[None, :]
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_key_tile(
    q,
    do,
    lse2,
    delta,
    dq,
    k_base,
    v_base,
    kv_offs_k,
    kv_offs_v,
    start,
    N,
    stride_kn,
    stride_vn,
    offs_d,
    qk_scale_log2,
    key_bias_b,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_KEY_BIAS: tl.constexpr,
):
    # the contribution of BLOCK_N patch keys from `start` to this program's dQ; MASK only for the ragged last tile
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k = _load_tile(
        _row_tile_ptrs(k_base, start, stride_kn, kv_offs_k, offs_n, offs_d, BLOCK_D),
        n_mask,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        MASK,
    )  # [BLOCK_N, BLOCK_D]
    v = _load_tile(
        _row_tile_ptrs(v_base, start, stride_vn, kv_offs_v, offs_n, offs_d, BLOCK_D),
        n_mask,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        MASK,
    )
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if HAS_KEY_BIAS:
        s += _key_bias(key_bias_b, offs_n, n_mask, MASK)[None, :]
    p = tl.exp2(s * qk_scale_log2 - lse2[:, None])
    if MASK:
        p = tl.where(n_mask[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def attn_bwd_dq_kernel(
    Q,
    K,
    V,
    RK,
    RV,
    DO,
    LSE,
    DELTA,
    DQ,
    SMALL_GRAD,
    KEY_BIAS,
    CU_SEQLENS,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_rkb,
    stride_rkr,
    stride_rkh,
    stride_rvb,
    stride_rvr,
    stride_rvh,
    stride_dob,
    stride_don,
    stride_doh,
    H,
    N,
    R,
    P,
    qk_scale_log2,
    scale,
    tiles,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SMALL: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_KEY_BIAS: tl.constexpr,
    VARLEN: tl.constexpr,
):
    # VARLEN: as in attn_fwd_kernel (N is T on entry, `tiles` the query tiles of the longest sequence)
    if VARLEN:
        pid_m, pid_bh, b, h = _program_coords(tiles, H)
        start_row, stat_row, N = _varlen_sequence(CU_SEQLENS, b, h, N)
        if pid_m * BLOCK_M >= N:
            return  # its small-segment share stays the launcher's zeros
        q_off = start_row * stride_qn + h * stride_qh
        do_off = start_row * stride_don + h * stride_doh
        k_base = start_row * stride_kn + h * stride_kh
        v_base = start_row * stride_vn + h * stride_vh
        out_row = start_row
        share_tile = pid_bh * tiles + pid_m
    else:
        pid_m, pid_bh, b, h = _program_coords(tl.cdiv(N, BLOCK_M), H)
        stat_row = pid_bh * N
        q_off = b * stride_qb + h * stride_qh
        do_off = b * stride_dob + h * stride_doh
        k_base = b * stride_kb + h * stride_kh
        v_base = b * stride_vb + h * stride_vh
        out_row = b * N
        share_tile = pid_bh * tl.cdiv(N, BLOCK_M) + pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < N
    q = _load_rows(Q + q_off, offs_m, stride_qn, offs_d, m_mask, d_mask)
    do = _load_rows(DO + do_off, offs_m, stride_don, offs_d, m_mask, d_mask)
    lse2 = tl.load(LSE + stat_row + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + stat_row + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_SMALL:
        offs_s = tl.arange(0, BLOCK_S)
        ks = _load_small_segment(
            K, RK, k_base, b * stride_rkb + h * stride_rkh, stride_kn, stride_rkr, offs_s, offs_d, d_mask, R, P
        )
        vs = _load_small_segment(
            V, RV, v_base, b * stride_rvb + h * stride_rvh, stride_vn, stride_rvr, offs_s, offs_d, d_mask, R, P
        )
        s_small = tl.dot(q, tl.trans(ks), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_S]
        if HAS_KEY_BIAS:
            prefix_key = (offs_s >= R) & (offs_s < R + P)
            s_small += _key_bias(KEY_BIAS + b * N, offs_s - R, prefix_key, True)[None, :]
        p_small = tl.where((offs_s < R + P)[None, :], tl.exp2(s_small * qk_scale_log2 - lse2[:, None]), 0.0)
        dp_small = tl.dot(do, tl.trans(vs), input_precision=DOT_PRECISION)
        ds_small = p_small * (dp_small - delta[:, None])
        dq += tl.dot(ds_small.to(ks.dtype), ks, input_precision=DOT_PRECISION)
        # this query tile's share of the small segment's dV and dK (transposed, so that M = d suits wgmma); the
        # launcher sums the shares over the query tiles
        dv_small = tl.dot(tl.trans(do), p_small.to(do.dtype), input_precision=DOT_PRECISION)  # [BLOCK_D, BLOCK_S]
        dk_small = tl.dot(tl.trans(q), ds_small.to(q.dtype), input_precision=DOT_PRECISION) * scale
        share = SMALL_GRAD + share_tile * (2 * BLOCK_D * BLOCK_S)
        share_offs = offs_d[:, None] * BLOCK_S + offs_s[None, :]  # [BLOCK_D, BLOCK_S]
        tl.store(share + share_offs, dv_small)
        tl.store(share + BLOCK_D * BLOCK_S + share_offs, dk_small)

    kv_rows = tl.arange(0, BLOCK_N)
    kv_offs_k = _tile_offsets(kv_rows, stride_kn, offs_d)  # [BLOCK_N, BLOCK_D], hoisted
    kv_offs_v = _tile_offsets(kv_rows, stride_vn, offs_d)
    end_full = P + ((N - P) // BLOCK_N) * BLOCK_N
    for start in range(P, end_full, BLOCK_N):
        dq = _dq_key_tile(
            q, do, lse2, delta, dq, K + k_base, V + v_base, kv_offs_k, kv_offs_v, start, N, stride_kn, stride_vn,
            offs_d, qk_scale_log2, KEY_BIAS + b * N, HEAD_DIM, BLOCK_N, BLOCK_D, False, DOT_PRECISION, HAS_KEY_BIAS,
        )  # fmt: skip
    run_tail = HAS_TAIL
    if VARLEN:  # each sequence its own ragged tail, if any
        run_tail = end_full < N
    if run_tail:
        dq = _dq_key_tile(
            q, do, lse2, delta, dq, K + k_base, V + v_base, kv_offs_k, kv_offs_v, end_full, N, stride_kn, stride_vn,
            offs_d, qk_scale_log2, KEY_BIAS + b * N, HEAD_DIM, BLOCK_N, BLOCK_D, True, DOT_PRECISION, HAS_KEY_BIAS,
        )  # fmt: skip

    dq = dq * scale
    if VARLEN:  # read again rather than held through the loop (registers)
        out_row = tl.load(CU_SEQLENS + b).to(tl.int64)
    ptrs = ((out_row + offs_m[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + ptrs, dq.to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------- launchers

#: True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors).
INTERPRETED = type(attn_fwd_kernel).__name__ == "InterpretedFunction"


def _pow2_at_least(x: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(int(x), 1)))


def _tail_pieces(tail: int) -> tuple[int, int]:
    """Rows of the ragged last query tile as (first, second) power-of-two pieces, first 0 when one piece is as
    cheap: 94 -> (64, 32) instead of 128; 5 -> (0, 16)."""
    whole = _pow2_at_least(tail)
    first = 1 << (max(tail, 1).bit_length() - 1)  # the largest power of two <= tail
    if first < 16 or first == tail or first + _pow2_at_least(tail - first) >= whole:
        return 0, whole
    return first, _pow2_at_least(tail - first)


def loop_trip_counts(kernel_name: str, args: dict) -> tuple[int, ...]:
    """Iterations of each loop of ``kernel_name`` (in source order) for one launch's bound arguments (constexprs
    included): what ``regkern bench --static`` multiplies the SASS loop bodies by. Peeled ragged tiles are outside
    the loops. VARLEN launches count the longest sequence's loops, rounded up to whole tiles (an upper bound)."""
    N, P = int(args["N"]), int(args["P"])
    if args.get("VARLEN"):  # N is the packed total: the longest sequence, from the tiles the grid was sized by
        if kernel_name == "attn_bwd_dkdv_kernel":
            N = int(args["tiles"]) * int(args["BLOCK_KEYS"]) + P
        else:
            N = int(args["tiles"]) * int(args["BLOCK_M"])
    if kernel_name == "attn_prologue_kernel":
        return (int(args["H"]),)
    if kernel_name == "attn_fwd_kernel":
        return ((N - P) // int(args["BLOCK_N"]),)
    if kernel_name == "attn_received_kernel":
        return (N // int(args["BLOCK_M"]),)
    if kernel_name == "attn_bwd_dkdv_kernel":
        return (N // int(args["BLOCK_M"]),)
    if kernel_name == "attn_bwd_dq_kernel":
        return ((N - P) // int(args["BLOCK_N"]),)
    raise ValueError(f"kernel_name: expected one of this module's attention kernels, got {kernel_name!r}")


def _config(role: str, q: torch.Tensor) -> TileConfig:
    return tile_config(role, q.device, q.dtype, q.shape[-1], q.shape[1])


def _registers_view(reg: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(pointer tensor, (stride_b, stride_r, stride_h)) with batch stride 0 for shared registers."""
    if reg is None:
        return like, (0, 0, 0)
    if reg.stride(-1) != 1:
        reg = reg.contiguous()
    if reg.dim() == 3:
        return reg, (0, reg.stride(0), reg.stride(1))
    return reg, (reg.stride(0), reg.stride(1), reg.stride(2))


def _last_dim_unit_stride(t: torch.Tensor) -> torch.Tensor:
    # the kernels need stride(-1) == 1; qkv views already have it
    return t if t.stride(-1) == 1 else t.contiguous()


def _raw_key_bias(key_bias: Optional[torch.Tensor], B: int, N: int, scale: float, dummy: torch.Tensor) -> torch.Tensor:
    """The kernels' KEY_BIAS: ``key_bias`` (B, N) in scaled-score units divided by the scale (they add it to the raw
    scores), float32 contiguous; ``dummy`` when there is none (the kernels then never read it)."""
    if key_bias is None:
        return dummy
    if key_bias.shape != (B, N) or key_bias.dtype != torch.float32 or key_bias.device != dummy.device:
        raise ValueError(
            f"key_bias: expected a float32 (B, N) = ({B}, {N}) tensor on {dummy.device}, got "
            f"{key_bias.dtype} {tuple(key_bias.shape)} on {key_bias.device}"
        )
    raw = key_bias / scale
    # a finite bias stays finite (timm masks with finfo.min, which / scale would overflow to -inf): a row whose keys
    # all carry it then averages them, as the reference does, instead of giving NaN
    return torch.where(key_bias == float("-inf"), key_bias, raw.clamp_min(torch.finfo(torch.float32).min)).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _rope_view(rope: Optional[torch.Tensor], B: int, H: int, num_prefix: int, like: torch.Tensor):
    """timm RoPE table broadcastable to (B, H, M, 2d) -> (tensor, (stride_b, stride_h, stride_m)), 0 for broadcast."""
    if rope is None:
        return like, (0, 0, 0)
    d2 = 2 * like.shape[-1]
    M = like.shape[1] - num_prefix
    lead = tuple(rope.shape[:-2])
    if (
        rope.dim() < 2
        or rope.dim() > 4
        or tuple(rope.shape[-2:]) != (M, d2)
        or not all(s in (1, t) for s, t in zip(lead[::-1], (B, H)[::-1]))
    ):
        raise ValueError(
            f"rope: expected a [sin, cos] table broadcastable to (B, H, N - num_prefix, 2 * d) = "
            f"({B}, {H}, {M}, {d2}), got {tuple(rope.shape)}"
        )
    if rope.device != like.device:
        raise ValueError(f"rope: expected the device of q ({like.device}), got {rope.device}")
    r = rope if rope.stride(-1) == 1 else rope.contiguous()
    while r.dim() < 4:
        r = r.unsqueeze(0)
    r = r.expand(B, H, r.shape[2], r.shape[3])
    return r, (r.stride(0), r.stride(1), r.stride(2))


def _norm_params(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], d: int, like: torch.Tensor):
    # LayerNorm affine parameters as (d,) tensors; ones/zeros when absent
    w = weight if weight is not None else torch.ones(d, dtype=torch.float32, device=like.device)
    b = bias if bias is not None else torch.zeros(d, dtype=torch.float32, device=like.device)
    return w.contiguous(), b.contiguous()


def _prologue_outputs(out, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_prologue's (q', k') buffers: new ones, or ``out`` checked (two distinct contiguous tensors shaped and
    typed as q and k, on their device)."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
            k.shape, dtype=k.dtype, device=k.device
        )
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not all(isinstance(t, torch.Tensor) for t in out):
        raise ValueError(f"out: expected a (q_out, k_out) pair of tensors, got {type(out).__name__}")
    for name, t, like in (("out[0]", out[0], q), ("out[1]", out[1], k)):
        if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device or not t.is_contiguous():
            layout = "contiguous" if t.is_contiguous() else "non-contiguous"
            raise ValueError(
                f"{name}: expected a contiguous {like.dtype} {tuple(like.shape)} tensor on {like.device}, got a "
                f"{layout} {t.dtype} {tuple(t.shape)} tensor on {t.device}"
            )
    if out[0].untyped_storage().data_ptr() == out[1].untyped_storage().data_ptr():
        raise ValueError("out: expected two tensors of their own storage, got out[0] and out[1] sharing one")
    return out[0], out[1]


def qk_prologue(
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: Optional[torch.Tensor],
    q_norm_bias: Optional[torch.Tensor],
    k_norm_weight: Optional[torch.Tensor],
    k_norm_bias: Optional[torch.Tensor],
    norm_eps: float,
    qk_norm: bool,
    rope: Optional[torch.Tensor],
    num_prefix: int,
    rotate_half: bool,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.qk_prologue`` of q and k in one pre-pass kernel, once per token: q', k' (B, N, H, d) contiguous in
    the input dtype, computed in float32 and rounded once (timm rounds after the LayerNorm too, so half-precision
    results can differ from the reference by that rounding). One program per 16 tokens of a batch row does every
    head; a RoPE table shared by the heads is folded with the LayerNorm affine into per-token coefficients once per
    program, a table per head is applied as it is (the affine, then the rotation). The forward runs it before its
    attention passes; the backward recomputes q', k' with it. ``out``: contiguous (B, N, H, d) buffers to write q',
    k' into (tests pre-fill them with NaN)."""
    q, k = _last_dim_unit_stride(q), _last_dim_unit_stride(k)
    B, N, H, d = q.shape
    qnw, qnb = _norm_params(q_norm_weight, q_norm_bias, d, q)
    knw, knb = _norm_params(k_norm_weight, k_norm_bias, d, q)
    rope_t, srope = _rope_view(rope, B, H, num_prefix, q)
    q_out, k_out = _prologue_outputs(out, q, k)
    cfg = _config("prologue", q)
    attn_prologue_kernel[(triton.cdiv(N, cfg.block_m) * B,)](
        q,
        k,
        q_out,
        k_out,
        qnw,
        qnb,
        knw,
        knb,
        rope_t,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        *srope,
        H,
        N,
        num_prefix,
        norm_eps,
        HEAD_DIM=d,
        BLOCK_T=cfg.block_m,
        BLOCK_D=_pow2_at_least(d),
        QK_NORM=bool(qk_norm),
        USE_ROPE=rope is not None,
        ROTATE_HALF=bool(rotate_half),
        ROPE_PER_HEAD=rope is not None and H > 1 and srope[1] != 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return q_out, k_out


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    reg_k: Optional[torch.Tensor],
    reg_v: Optional[torch.Tensor],
    scale: float,
    num_prefix: int,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    *,
    qk_norm: bool = False,
    q_norm_weight: Optional[torch.Tensor] = None,
    q_norm_bias: Optional[torch.Tensor] = None,
    k_norm_weight: Optional[torch.Tensor] = None,
    k_norm_bias: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-6,
    rope: Optional[torch.Tensor] = None,
    rotate_half: bool = False,
    stats: tuple[str, ...] = (),
    key_bias: Optional[torch.Tensor] = None,
):
    """Launch the forward kernel. Returns out (B, N, H, d) contiguous and lse (B, H, N) float32, written into the
    given buffers when passed (tests pre-fill them with NaN so unwritten elements show).

    With ``qk_norm`` and/or ``rope``, ``qk_prologue`` first transforms q and k once per token (per-head LayerNorm over
    d with the given affine parameters, then RoPE on tokens >= num_prefix; ``reference.qk_prologue``); registers are
    raw keys and get neither. The lse is that of the attention over the transformed q, k.

    ``stats``: any of "out_norm", "prefix_rows", "received", "received_groups" (see ``reference.AttentionStats``);
    then the call returns ``(out, lse, {name: tensor})``. out_norm and prefix_rows come from the forward's epilogue
    (per-head squared norms, the prefix queries' scores normalised with the final lse); received takes a second pass
    over the registers and tokens as one key sequence (in half precision its sums over the queries are tensor-core
    products of float16 probabilities, accumulated in float32: relative error below 2^-11 per probability);
    received_groups alone (what NormMonitor runs) only over the small segment of registers and prefix tokens, one
    program per (batch, head), the patches getting the rest of each row (atomics into (B, H, 4)).

    ``key_bias``: a key mask as an additive bias (B, N) float32 over the token keys, in the units of the scaled scores
    (as SDPA's; -inf = masked; registers are never masked). A row whose keys are all masked attends to the registers
    only; with no registers it is NaN (out) and -inf (lse), as in the reference."""
    q, k, v = (_last_dim_unit_stride(t) for t in (q, k, v))
    B, N, H, d = q.shape
    R = 0 if reg_k is None else reg_k.shape[-3]
    P = num_prefix
    rk, srk = _registers_view(reg_k, k)
    rv, srv = _registers_view(reg_v, v)
    out = torch.empty((B, N, H, d), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device) if lse is None else lse
    want_norm, want_prefix = "out_norm" in stats, "prefix_rows" in stats
    out_sq = torch.empty((B, H, N), dtype=torch.float32, device=q.device) if want_norm else lse
    prefix_s = torch.full((B, H, P, R + N), float("-inf"), device=q.device) if want_prefix else lse
    key_bias_raw = _raw_key_bias(key_bias, B, N, scale, lse)
    store_keys, reduce_groups = "received" in stats, "received_groups" in stats
    # the received pass reads the lse in log2 units, which the forward writes next to the natural one
    lse2 = torch.empty((B, H, N), dtype=torch.float32, device=q.device) if store_keys or reduce_groups else lse
    if qk_norm or rope is not None:  # once per token; the attention passes then load plain q', k' tiles
        q, k = qk_prologue(
            q, k, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, norm_eps, qk_norm, rope, P, rotate_half
        )
    cfg = _config("forward", q)
    args = (
        q,
        k,
        v,
        rk,
        rv,
        out,
        lse,
        out_sq,
        prefix_s,
        key_bias_raw,
        lse,  # CU_SEQLENS: not read without VARLEN
        lse2,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        *srk,
        *srv,
        H,
        N,
        R,
        P,
    )

    def options(block_m: int, block_n: int, num_warps: int, num_stages: int, record: bool) -> dict:
        return dict(
            HEAD_DIM=d,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_S=_pow2_at_least(R + P),
            BLOCK_D=_pow2_at_least(d),
            HAS_SMALL=(R + P) > 0,
            HAS_TAIL=(N - P) % block_n != 0,
            DOT_PRECISION=_dot_precision(q.dtype),
            STAT_OUT_SQ=want_norm,
            STAT_PREFIX=record,
            HAS_KEY_BIAS=key_bias is not None,
            VARLEN=False,
            STORE_LSE2=lse2 is not lse,
            num_warps=num_warps,
            num_stages=num_stages,
        )

    # with prefix_rows, the first rows (the prefix queries, padded to 16) record their scores in a small launch of
    # their own (64-key tiles keep its stores within registers); the rows from there on carry no store in their loop
    block_p = _pow2_at_least(P)
    prefix_rows = min(N, block_p) if want_prefix and P else 0
    if prefix_rows:
        record = options(block_p, min(cfg.block_n, 64), max(2, block_p // 16), min(cfg.num_stages, 2), True)
        attn_fwd_kernel[(B * H,)](*args, 0, 1, scale * LOG2E, **record)
    if N > prefix_rows:
        tiles = triton.cdiv(N - prefix_rows, cfg.block_m)
        attn_fwd_kernel[(tiles * B * H,)](
            *args,
            prefix_rows,
            tiles,
            scale * LOG2E,
            **options(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, False),
        )
    if not stats:
        return out, lse
    results = {}
    if want_norm:
        results["out_norm"] = out_sq.sum(1).sqrt()
    if want_prefix:
        results["prefix_rows"] = torch.exp2(prefix_s - (lse[:, :, :P, None] * LOG2E))
    if store_keys or reduce_groups:
        received = torch.empty((B, H, R + N) if store_keys else (1,), dtype=torch.float32, device=q.device)
        groups = torch.zeros((B, H, 4) if reduce_groups else (1,), dtype=torch.float32, device=q.device)
        args = (
            q,
            k,
            rk,
            lse2,
            received,
            groups,
            key_bias_raw,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            *srk,
            H,
            N,
            R,
            P,
            scale * LOG2E,
        )
        rcfg = _config("received", q)
        tail_pieces = _tail_pieces(N % rcfg.block_m)
        common = dict(
            HEAD_DIM=d,
            BLOCK_M=rcfg.block_m,
            BLOCK_D=_pow2_at_least(d),
            HAS_TAIL=N % rcfg.block_m != 0,
            TAIL_SPLIT_ROWS=tail_pieces[0],
            TAIL_ROWS=tail_pieces[1],
            DOT_PRECISION=_dot_precision(q.dtype),
            STORE_KEYS=store_keys,
            REDUCE_GROUPS=reduce_groups,
            HAS_KEY_BIAS=key_bias is not None,
            num_warps=rcfg.num_warps,
            # the key mask's bias stays in registers through the query loop: one stage fewer before Hopper
            num_stages=rcfg.num_stages if key_bias is None or _hopper(q) else min(rcfg.num_stages, 2),
        )
        # a key mask's bias rides through the query loop in registers: 128 keys would then spill on Hopper
        block_keys = rcfg.block_n if key_bias is None else min(rcfg.block_n, 64)
        # per-key sums: tiles over [registers, tokens], or over the patches plus a program for the small segment
        # when that makes a tile fewer (N = 261, R = 4, P = 5: 2 tiles of 128 + 16 keys instead of 3 tiles)
        skip_small = R + P > 0 and triton.cdiv(N - P, block_keys) < triton.cdiv(R + N, block_keys)
        grid = triton.cdiv(R + N - (R + P if skip_small else 0), block_keys) * B * H
        if (store_keys or R + P == 0) and grid:
            attn_received_kernel[(grid,)](
                *args, BLOCK_KEYS=block_keys, SMALL_SEGMENT=False, SKIP_SMALL=skip_small,
                COLSUM_MMA=q.dtype != torch.float32, **common,
            )  # fmt: skip
        if R + P > 0 and (skip_small or not store_keys):
            # without per-key sums the group shares need only the small segment: the patches get the rest of each row
            attn_received_kernel[(B * H,)](
                *args, BLOCK_KEYS=_pow2_at_least(R + P), SMALL_SEGMENT=True, PATCHES_REST=not store_keys, **common
            )
        if store_keys:
            results["received"] = received
        if reduce_groups:
            results["received_groups"] = groups
    return out, lse, results


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    reg_k: Optional[torch.Tensor],
    reg_v: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_prefix: int,
    grad_buffers: Optional[tuple[torch.Tensor, ...]] = None,
    key_bias: Optional[torch.Tensor] = None,
):
    """Launch the backward kernels. Returns dq, dk, dv (B, N, H, d) contiguous and dreg_k, dreg_v (the shape of
    reg_k, summed over the batch when shared) or None. ``grad_buffers``: optional (dq, dk, dv, drk, drv) to write
    into, drk/drv float32 (B, max(R, 1), H, d) (tests pre-fill them with NaN). ``key_bias``: the forward's key mask
    (``attention_forward``); it gets no gradient."""
    q, k, v, dout = (_last_dim_unit_stride(t) for t in (q, k, v, dout))
    B, N, H, d = q.shape
    R = 0 if reg_k is None else reg_k.shape[-3]
    P = num_prefix
    rk, srk = _registers_view(reg_k, k)
    rv, srv = _registers_view(reg_v, v)
    # delta = rowsum(dO * O), (B, H, N) float32
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    if grad_buffers is None:
        dq = torch.empty((B, N, H, d), dtype=q.dtype, device=q.device)
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
        drk = torch.empty((B, max(R, 1), H, d), dtype=torch.float32, device=q.device)
        drv = torch.empty_like(drk)
    else:
        dq, dk, dv, drk, drv = grad_buffers
    key_bias_raw = _raw_key_bias(key_bias, B, N, scale, delta)
    kv_cfg, q_cfg = _config("backward_dkdv", q), _config("backward_dq", q)
    BLOCK_D = _pow2_at_least(d)
    BLOCK_S = _pow2_at_least(R + P)
    common = dict(
        HEAD_DIM=d,
        BLOCK_D=BLOCK_D,
        DOT_PRECISION=_dot_precision(q.dtype),
        HAS_KEY_BIAS=key_bias is not None,
        VARLEN=False,
    )
    q_strides = (q.stride(0), q.stride(1), q.stride(2))
    k_strides = (k.stride(0), k.stride(1), k.stride(2))
    v_strides = (v.stride(0), v.stride(1), v.stride(2))
    do_strides = (dout.stride(0), dout.stride(1), dout.stride(2))
    if N > P:
        attn_bwd_dkdv_kernel[(triton.cdiv(N - P, kv_cfg.block_n) * B * H,)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk,
            dv,
            key_bias_raw,
            delta,  # CU_SEQLENS: not read without VARLEN
            *q_strides,
            *k_strides,
            *v_strides,
            *do_strides,
            H,
            N,
            P,
            scale * LOG2E,
            scale,
            0,  # tiles: VARLEN only
            BLOCK_M=kv_cfg.block_m,
            BLOCK_KEYS=kv_cfg.block_n,
            HAS_TAIL=N % kv_cfg.block_m != 0,
            TAIL_ROWS=_pow2_at_least(N % kv_cfg.block_m),
            num_warps=kv_cfg.num_warps,
            num_stages=kv_cfg.num_stages,
            **common,
        )
    # the dQ kernel also writes each query tile's share of the small segment's dV, dK (transposed): (B*H, tiles,
    # [dV, dK], BLOCK_D, BLOCK_S) float32, summed below (8 KB per query tile and head at d = 64 with 16 small keys,
    # a few percent of dK's size; deterministic, unlike atomics)
    q_tiles = triton.cdiv(N, q_cfg.block_m)
    small_grad = torch.empty(
        (B * H, q_tiles, 2, BLOCK_D, BLOCK_S) if R + P else (1,), dtype=torch.float32, device=q.device
    )
    attn_bwd_dq_kernel[(q_tiles * B * H,)](
        q,
        k,
        v,
        rk,
        rv,
        dout,
        lse,
        delta,
        dq,
        small_grad,
        key_bias_raw,
        delta,  # CU_SEQLENS: not read without VARLEN
        *q_strides,
        *k_strides,
        *v_strides,
        *srk,
        *srv,
        *do_strides,
        H,
        N,
        R,
        P,
        scale * LOG2E,
        scale,
        0,  # tiles: VARLEN only
        BLOCK_M=q_cfg.block_m,
        BLOCK_N=q_cfg.block_n,
        BLOCK_S=BLOCK_S,
        HAS_SMALL=(R + P) > 0,
        HAS_TAIL=(N - P) % q_cfg.block_n != 0,
        num_warps=q_cfg.num_warps,
        num_stages=q_cfg.num_stages,
        **common,
    )
    if R + P:
        # (B, R + P, H, d): the registers' rows, then the prefix tokens'
        shares = small_grad.sum(1).view(B, H, 2, BLOCK_D, BLOCK_S)[..., :d, : R + P].permute(2, 0, 4, 1, 3)
        dv_small, dk_small = shares[0], shares[1]
        dk[:, :P] = dk_small[:, R:]
        dv[:, :P] = dv_small[:, R:]
        if R:
            drk[:, :R] = dk_small[:, :R]
            drv[:, :R] = dv_small[:, :R]
    dreg_k = dreg_v = None
    if reg_k is not None and not R:  # zero registers still get (empty) gradients of their shape
        dreg_k, dreg_v = torch.zeros_like(reg_k), torch.zeros_like(reg_v)
    if R:
        if reg_k.dim() == 3:
            drk, drv = drk.sum(0), drv.sum(0)
        dreg_k, dreg_v = drk.to(reg_k.dtype), drv.to(reg_v.dtype)
    return dq, dk, dv, dreg_k, dreg_v


# ------------------------------------------------------------------------------------ variable-length launchers


def _hopper(q: torch.Tensor) -> bool:
    return q.device.type == "cuda" and device_capability(q.device) >= (9, 0)


def _varlen_config(role: str, q: torch.Tensor, max_seqlen: int) -> TileConfig:
    """The fixed-length configuration of ``role``, except at head dims above 64 before Hopper: there the varlen
    programs, which also hold their sequence's offsets, take at most two stages and half the key (forward) or query
    (dQ) tile, so that sm_80 does not spill."""
    cfg = tile_config(role, q.device, q.dtype, q.shape[-1], max_seqlen)
    if q.shape[-1] <= 64 or q.device.type != "cuda" or _hopper(q):
        return cfg
    stages = max(1, min(cfg.num_stages, 2))
    if role == "forward":
        return TileConfig(cfg.block_m, max(16, cfg.block_n // 2), cfg.num_warps, stages)
    if role == "backward_dq":
        return TileConfig(max(16, cfg.block_m // 2), cfg.block_n, cfg.num_warps, stages)
    return TileConfig(cfg.block_m, cfg.block_n, cfg.num_warps, stages)


def attention_forward_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    reg_k: Optional[torch.Tensor],
    reg_v: Optional[torch.Tensor],
    scale: float,
    num_prefix: int,
    want_out_norm: bool = False,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
):
    """Register attention over S packed sequences: q, k, v (T, H, d) strided, sequence s the rows
    [cu_seqlens[s], cu_seqlens[s + 1]) (int32, checked by the caller), each with its own first ``num_prefix`` tokens as
    its prefix segment and registers (R, H, d) shared or (S, R, H, d) per sequence. One launch over
    (query tiles of the longest sequence) x S x H; the tiles past a sequence's end return at once.

    Returns out (T, H, d) contiguous, lse (H, T) float32 and out_norm (T,) float32 (None unless ``want_out_norm``)."""
    q, k, v = (_last_dim_unit_stride(t) for t in (q, k, v))
    cu_seqlens = cu_seqlens.contiguous()  # the kernels read offsets b and b + 1
    T, H, d = q.shape
    S = cu_seqlens.numel() - 1
    R = 0 if reg_k is None else reg_k.shape[-3]
    P = num_prefix
    rk, srk = _registers_view(reg_k, k)
    rv, srv = _registers_view(reg_v, v)
    out = torch.empty((T, H, d), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device) if lse is None else lse
    out_sq = torch.empty((H, T), dtype=torch.float32, device=q.device) if want_out_norm else lse
    if T and S and max_seqlen:
        cfg = _varlen_config("forward", q, max_seqlen)
        tiles = triton.cdiv(max_seqlen, cfg.block_m)
        attn_fwd_kernel[(tiles * S * H,)](
            q, k, v, rk, rv, out, lse, out_sq, lse, lse, cu_seqlens, lse,
            0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1), *srk, *srv,
            H, T, R, P, 0, tiles, scale * LOG2E,
            HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_S=_pow2_at_least(R + P),
            BLOCK_D=_pow2_at_least(d), HAS_SMALL=(R + P) > 0, HAS_TAIL=True, DOT_PRECISION=_dot_precision(q.dtype),
            STAT_OUT_SQ=want_out_norm, STAT_PREFIX=False, HAS_KEY_BIAS=False, VARLEN=True,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return out, lse, (out_sq.sum(0).sqrt() if want_out_norm else None)


def attention_backward_varlen(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    reg_k: Optional[torch.Tensor],
    reg_v: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_prefix: int,
):
    """Gradients of ``attention_forward_varlen``: dq, dk, dv (T, H, d) contiguous and dreg_k, dreg_v in the
    registers' shape (summed over the sequences when shared) or None."""
    q, k, v, dout = (_last_dim_unit_stride(t) for t in (q, k, v, dout))
    cu_seqlens = cu_seqlens.contiguous()
    T, H, d = q.shape
    S = cu_seqlens.numel() - 1
    R = 0 if reg_k is None else reg_k.shape[-3]
    P = num_prefix
    rk, srk = _registers_view(reg_k, k)
    rv, srv = _registers_view(reg_v, v)
    delta = (dout.float() * out.float()).sum(-1).transpose(0, 1).contiguous()  # (H, T)
    dq = torch.empty((T, H, d), dtype=q.dtype, device=q.device)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    BLOCK_D, BLOCK_S = _pow2_at_least(d), _pow2_at_least(R + P)
    common = dict(HEAD_DIM=d, BLOCK_D=BLOCK_D, DOT_PRECISION=_dot_precision(q.dtype), HAS_KEY_BIAS=False, VARLEN=True)
    if not (T and S and max_seqlen):
        return (
            dq,
            dk,
            dv,
            None if reg_k is None else torch.zeros_like(reg_k),
            None if reg_v is None else torch.zeros_like(reg_v),
        )
    kv_cfg = _varlen_config("backward_dkdv", q, max_seqlen)
    q_cfg = _varlen_config("backward_dq", q, max_seqlen)
    if max_seqlen > P:
        key_tiles = triton.cdiv(max_seqlen - P, kv_cfg.block_n)
        attn_bwd_dkdv_kernel[(key_tiles * S * H,)](
            q, k, v, dout, lse, delta, dk, dv, delta, cu_seqlens,
            0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1),
            0, dout.stride(0), dout.stride(1),
            H, T, P, scale * LOG2E, scale, key_tiles,
            BLOCK_M=kv_cfg.block_m, BLOCK_KEYS=kv_cfg.block_n, HAS_TAIL=True, TAIL_ROWS=kv_cfg.block_m,
            num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages, **common,
        )  # fmt: skip
    q_tiles = triton.cdiv(max_seqlen, q_cfg.block_m)
    # each query tile's share of its sequence's small-segment dV, dK; tiles past a sequence's end add zeros
    small_grad = torch.zeros(
        (S * H, q_tiles, 2, BLOCK_D, BLOCK_S) if R + P else (1,), dtype=torch.float32, device=q.device
    )
    attn_bwd_dq_kernel[(q_tiles * S * H,)](
        q, k, v, rk, rv, dout, lse, delta, dq, small_grad, delta, cu_seqlens,
        0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1), *srk, *srv,
        0, dout.stride(0), dout.stride(1),
        H, T, R, P, scale * LOG2E, scale, q_tiles,
        BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n, BLOCK_S=BLOCK_S, HAS_SMALL=(R + P) > 0, HAS_TAIL=True,
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages, **common,
    )  # fmt: skip
    dreg_k = dreg_v = None
    if reg_k is not None and not R:  # zero registers still get (empty) gradients of their shape
        dreg_k, dreg_v = torch.zeros_like(reg_k), torch.zeros_like(reg_v)
    if R + P:
        # (S, R + P, H, d): the registers' rows, then the prefix tokens'
        shares = small_grad.sum(1).view(S, H, 2, BLOCK_D, BLOCK_S)[..., :d, : R + P].permute(2, 0, 4, 1, 3)
        dv_small, dk_small = shares[0], shares[1]
        if P:
            rows = (cu_seqlens[:-1, None].long() + torch.arange(P, device=q.device)).flatten()  # (S * P,)
            dk[rows] = dk_small[:, R:].reshape(S * P, H, d).to(dk.dtype)
            dv[rows] = dv_small[:, R:].reshape(S * P, H, d).to(dv.dtype)
        if R:
            drk, drv = dk_small[:, :R], dv_small[:, :R]
            if reg_k.dim() == 3:
                drk, drv = drk.sum(0), drv.sum(0)
            # copies: views of one buffer must not leave an op as two outputs
            dreg_k, dreg_v = drk.to(reg_k.dtype, copy=True), drv.to(reg_v.dtype, copy=True)
    return dq, dk, dv, dreg_k, dreg_v
