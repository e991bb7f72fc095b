"""Triton kernels of LayerNorm with norm capture: forward (y, token norms, mean, rstd), backward (dx, dweight, dbias).

Rows are the C-long vectors of x (..., C) viewed as (rows, C) with last stride 1; BLOCK_C pads C to a power of two
with masks and each program handles BLOCK_R rows (one block in the forward; a contiguous run of blocks in the
backward). All math runs in float32; y and dx are stored in x's dtype.

    forward   y = (x - mean) * rstd * weight + bias; per row also norms = ||x||_2, mean, rstd (float32), the norm
              being the residual-stream observation ``reference.layer_norm_with_norms`` returns
    backward  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, xhat = (x - mean) * rstd from
              the saved mean/rstd; each program writes its float32 partial sums of dy * xhat and dy over its rows
              to a (programs, C) buffer that the launcher sums with torch: deterministic, no atomics

Layout of this file: kernels, then launchers. Op registration and autograd live in ``regkern.ops.layer_norm.op``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..dispatch import multiprocessor_count


@triton.jit
def _row_block(block, BLOCK_R: tl.constexpr):
    # the rows of one block, int64 so that row * stride of large inputs does not overflow
    return block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)


@triton.jit
def _ln_fwd_rows(X, Y, W, BIAS, MEAN, RSTD, rows, n_rows, C, stride_x, stride_y, eps,
                 BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):  # fmt: skip
    # y, mean and rstd of BLOCK_R rows; returns each row's input L2 norm and the row mask
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_C]
    sum_sq = tl.sum(x * x, axis=1)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)  # two-pass variance: no cancellation for large means
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    return tl.sqrt(sum_sq), row_mask


@triton.jit
def ln_fwd_kernel(
    X,
    Y,
    W,
    BIAS,
    NORMS,
    MEAN,
    RSTD,
    n_rows,
    C,
    stride_x,
    stride_y,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
):
    rows = _row_block(tl.program_id(0), BLOCK_R)
    norms, row_mask = _ln_fwd_rows(
        X, Y, W, BIAS, MEAN, RSTD, rows, n_rows, C, stride_x, stride_y, eps, BLOCK_C, HAS_W, HAS_B
    )  # fmt: skip
    tl.store(NORMS + rows, norms, mask=row_mask)


@triton.jit
def _max_with_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def ln_fwd_monitored_kernel(
    X,
    Y,
    W,
    BIAS,
    PREFIX_NORMS,
    PATCH_NORMS,
    CANDIDATES,
    MEAN,
    RSTD,
    EDGES,
    COUNT,
    TOTAL,
    TOTAL_SQ,
    MAXIMUM,
    OUTLIERS,
    HISTOGRAM,
    n_rows,
    C,
    stride_x,
    stride_y,
    eps,
    N,
    NUM_CLS,
    NUM_PREFIX,
    threshold,
    num_edges,
    blocks_per_program,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_HIST: tl.constexpr,
    TOP_K: tl.constexpr,
    WRITE_NORMS: tl.constexpr,
):
    # The forward of ln_fwd_kernel over rows (b, n) of (B, N, C), plus the norm monitor's reduction in the same pass:
    # per token group g (0 CLS, 1 registers, 2 patches) count, sum, sum of squares, max, outliers and histogram,
    # kept in registers over the program's row blocks and added to the accumulators with one atomic per
    # (statistic, group) and per non-empty histogram bin. The program's TOP_K largest patch norms go to CANDIDATES
    # as packed keys (norm bits << 32 | b * (N - P) + n - P; -1 for none), which one topk merges. With WRITE_NORMS
    # the norms also go to PREFIX_NORMS (B, P) and PATCH_NORMS (B, N - P) (norm maps, relative thresholds).
    pid = tl.program_id(0)
    bins = num_edges + 1
    edge_ids = tl.arange(0, BLOCK_E)
    edges = tl.load(EDGES + edge_ids, mask=edge_ids < num_edges, other=float("inf"))  # [BLOCK_E]; padding never below
    groups = tl.arange(0, 4)  # [4]: groups 0..2, one padding lane
    slots = tl.arange(0, BLOCK_HIST)  # [BLOCK_HIST]: group * bins + bin
    # per (row slot, group) partial statistics, summed elementwise over the row blocks and reduced once at the end
    count = tl.zeros([BLOCK_R, 4], dtype=tl.int32)
    outliers = tl.zeros([BLOCK_R, 4], dtype=tl.int32)
    # float64 sums, as the reference: the monitor's std comes from sum_sq / n - mean^2, which cancels
    total = tl.zeros([BLOCK_R, 4], dtype=tl.float64)
    total_sq = tl.zeros([BLOCK_R, 4], dtype=tl.float64)
    maximum = tl.zeros([BLOCK_R, 4], dtype=tl.float32)
    histogram = tl.zeros([BLOCK_HIST], dtype=tl.int32)
    # per row slot, the TOP_K largest keys it has seen: the union over slots holds the program's top TOP_K
    top_ids = tl.arange(0, TOP_K)
    top = tl.full([BLOCK_R, TOP_K], -1, dtype=tl.int64)
    for i in range(0, blocks_per_program):
        rows = _row_block(pid * blocks_per_program + i, BLOCK_R)  # [BLOCK_R]
        norms, row_mask = _ln_fwd_rows(
            X, Y, W, BIAS, MEAN, RSTD, rows, n_rows, C, stride_x, stride_y, eps, BLOCK_C, HAS_W, HAS_B
        )  # fmt: skip
        row = rows.to(tl.int32)  # B * N < 2**31 tokens: 32-bit division
        token = row % N
        image = row // N
        is_patch = token >= NUM_PREFIX
        patch_index = image * (N - NUM_PREFIX) + token - NUM_PREFIX
        if WRITE_NORMS:
            tl.store(PATCH_NORMS + patch_index, norms, mask=row_mask & is_patch)
            tl.store(PREFIX_NORMS + image * NUM_PREFIX + token, norms, mask=row_mask & (token < NUM_PREFIX))
        # non-negative float bits order as integers: the packed key orders by norm
        key = (norms.to(tl.int32, bitcast=True).to(tl.int64) << 32) | patch_index.to(tl.int64)
        key = tl.where(row_mask & is_patch, key, -1)  # [BLOCK_R]
        smallest = tl.min(top, axis=1)  # [BLOCK_R]
        first = tl.min(tl.where(top == smallest[:, None], top_ids[None, :], TOP_K), axis=1)
        replace = (top_ids[None, :] == first[:, None]) & (key > smallest)[:, None]
        top = tl.where(replace, key[:, None], top)  # [BLOCK_R, TOP_K]
        group = (token >= NUM_CLS).to(tl.int32) + is_patch.to(tl.int32)
        in_group = (group[:, None] == groups[None, :]) & row_mask[:, None]  # [BLOCK_R, 4]
        grouped = tl.where(in_group, norms[:, None], 0.0)
        count += in_group.to(tl.int32)
        outliers += (in_group & (norms > threshold)[:, None]).to(tl.int32)
        wide = grouped.to(tl.float64)
        total += wide
        total_sq += wide * wide
        maximum = tl.maximum(maximum, grouped, propagate_nan=tl.PropagateNan.ALL)  # a NaN norm shows, as in amax
        below = tl.sum((edges[None, :] < norms[:, None]).to(tl.int32), axis=1)  # [BLOCK_R]: torch.bucketize
        below = tl.where(norms != norms, num_edges, below)  # NaN: the last bin, as torch.bucketize
        histogram += tl.histogram(group * bins + below, BLOCK_HIST, mask=row_mask)
    count = tl.sum(count, axis=0)  # [4]
    outliers = tl.sum(outliers, axis=0)
    total = tl.sum(total, axis=0)
    total_sq = tl.sum(total_sq, axis=0)
    maximum = tl.reduce(maximum, 0, _max_with_nan)
    seen = (groups < 3) & (count > 0)
    tl.atomic_add(COUNT + groups, count.to(tl.int64), mask=seen)
    tl.atomic_add(TOTAL + groups, total, mask=seen)
    tl.atomic_add(TOTAL_SQ + groups, total_sq, mask=seen)
    tl.atomic_max(MAXIMUM + groups, maximum, mask=seen)
    tl.atomic_add(OUTLIERS + groups, outliers.to(tl.int64), mask=seen & (outliers > 0))
    tl.atomic_add(HISTOGRAM + slots, histogram.to(tl.int64), mask=histogram > 0)
    # the program's TOP_K: the first TOP_K of its slots' keys sorted in descending order
    ranked = tl.reshape(tl.sort(tl.reshape(top, [BLOCK_R * TOP_K]), descending=True), [BLOCK_R, TOP_K])
    best = tl.max(tl.where(tl.arange(0, BLOCK_R)[:, None] == 0, ranked, -1), axis=0)  # [TOP_K]
    tl.store(CANDIDATES + pid * TOP_K + top_ids, best)


@triton.jit
def ln_bwd_kernel(
    DY,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW_PARTIAL,
    DB_PARTIAL,
    n_rows,
    C,
    stride_dy,
    stride_x,
    stride_dx,
    blocks_per_program,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
):
    # program p owns row blocks [p * blocks_per_program, (p + 1) * blocks_per_program); rows >= n_rows are masked
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, blocks_per_program):
        rows = _row_block(pid * blocks_per_program + i, BLOCK_R)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy
        if HAS_W:
            g = dy * w[None, :]
        c_xhat = tl.sum(g * xhat, axis=1) / C
        c_mean = tl.sum(g, axis=1) / C
        dx = (g - (xhat * c_xhat[:, None] + c_mean[:, None])) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            db += tl.sum(dy, axis=0)
    if HAS_W:
        tl.store(DW_PARTIAL + pid * C + cols, dw, mask=col_mask)
    if HAS_B:
        tl.store(DB_PARTIAL + pid * C + cols, db, mask=col_mask)


# ----------------------------------------------------------------------------------------------- launchers

#: True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors).
INTERPRETED = type(ln_fwd_kernel).__name__ == "InterpretedFunction"

#: Largest row length the kernels take (one row is held in registers: BLOCK_C = next_power_of_2(C)).
MAX_C = 16384


def launch_config(C: int, device_type: str) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps). Fixed, not autotuned: the interpreter cannot autotune and ViT widths are few.

    On the GPU a program holds about 4096 elements (C = 384: 8 rows of 512; C = 1536: 2 rows of 2048)."""
    block_c = triton.next_power_of_2(max(int(C), 1))
    if device_type != "cuda":
        return 16, block_c, 1  # interpreter: many rows per program keep CPU tests fast
    block_r = max(1, min(16, 4096 // block_c))
    num_warps = min(16, max(4, block_r * block_c // 512))
    return block_r, block_c, num_warps


def _backward_programs(device: torch.device) -> int:
    """How many programs share the backward's rows (and so how many partial sums the launcher adds)."""
    if device.type != "cuda":
        return 4  # interpreter: several programs, each looping over several row blocks
    return 4 * multiprocessor_count(device)


def _rows_view(t: torch.Tensor, C: int) -> torch.Tensor:
    """(rows, C) view with last stride 1 (a copy only when no such view exists)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, C)


def layer_norm_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    y: Optional[torch.Tensor] = None,
    norms: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel over the last dim of x (..., C).

    Returns y (x's shape and dtype, contiguous), norms (x.shape[:-1], float32: ||x||_2 of each row), mean and rstd
    (x.shape[:-1], float32, for the backward). y and norms are written into the given buffers when passed (tests
    pre-fill them with NaN so unwritten elements show); y must then be contiguous."""
    C = x.shape[-1]
    x2 = _rows_view(x, C)
    n_rows = x2.shape[0]
    lead = x.shape[:-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if y is None else y
    norms = torch.empty(lead, dtype=torch.float32, device=x.device) if norms is None else norms
    mean = torch.empty(lead, dtype=torch.float32, device=x.device)
    rstd = torch.empty(lead, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, norms, mean, rstd
    y2 = y.view(n_rows, C)
    w = x2 if weight is None else weight.contiguous()
    b = x2 if bias is None else bias.contiguous()
    BLOCK_R, BLOCK_C, num_warps = launch_config(C, x.device.type)
    ln_fwd_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
        x2,
        y2,
        w,
        b,
        norms,
        mean,
        rstd,
        n_rows,
        C,
        x2.stride(0),
        y2.stride(0),
        float(eps),
        BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        num_warps=num_warps,
    )
    return y, norms, mean, rstd


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dx: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel. Returns dx (x's shape and dtype, contiguous; written into ``dx`` when passed),
    dweight and dbias (the shape and dtype of weight/bias, summed over all rows) or None when absent.

    mean and rstd are the forward's float32 (x.shape[:-1]) outputs; ``bias`` is only asked whether it exists."""
    C = x.shape[-1]
    x2 = _rows_view(x, C)
    dy2 = _rows_view(dy, C)
    n_rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dx is None else dx
    has_w, has_b = weight is not None, bias is not None
    BLOCK_R, BLOCK_C, num_warps = launch_config(C, x.device.type)
    num_blocks = triton.cdiv(n_rows, BLOCK_R)
    per_program = max(1, triton.cdiv(num_blocks, _backward_programs(x.device)))
    programs = triton.cdiv(num_blocks, per_program)
    dw_partial = torch.empty((programs, C) if has_w else (0,), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((programs, C) if has_b else (0,), dtype=torch.float32, device=x.device)
    if n_rows:
        dx2 = dx.view(n_rows, C)
        ln_bwd_kernel[(programs,)](
            dy2,
            x2,
            x2 if weight is None else weight.contiguous(),
            mean.reshape(-1),
            rstd.reshape(-1),
            dx2,
            dw_partial if has_w else rstd,
            db_partial if has_b else rstd,  # float32 stand-ins, never stored to
            n_rows,
            C,
            dy2.stride(0),
            x2.stride(0),
            dx2.stride(0),
            per_program,
            BLOCK_R=BLOCK_R,
            BLOCK_C=BLOCK_C,
            HAS_W=has_w,
            HAS_B=has_b,
            num_warps=num_warps,
        )
    dweight = dw_partial.sum(0).to(weight.dtype) if has_w else None
    dbias = db_partial.sum(0).to(bias.dtype) if has_b else None
    return dx, dweight, dbias


def layer_norm_forward_monitored(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    accumulators,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the monitored forward over x (B, N, C): LayerNorm, and the norm monitor's reduction added in place to
    ``accumulators`` (a ``regkern.ops.layer_norm.NormAccumulators``) with atomics.

    Returns y (x's shape and dtype), prefix_norms (B, P) and patch_norms (B, N - P) float32 ((0,) unless
    ``accumulators.write_norms``), top-k candidates (programs * top_k,) int64 packed keys (see the kernel), mean and
    rstd (B, N)."""
    B, N, C = x.shape
    acc = accumulators
    P = acc.num_prefix
    x2 = _rows_view(x, C)
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def norms_buffer(*shape):
        return torch.empty(shape if acc.write_norms else (0,), dtype=torch.float32, device=x.device)

    prefix_norms, patch_norms = norms_buffer(B, P), norms_buffer(B, N - P)
    mean = torch.empty((B, N), dtype=torch.float32, device=x.device)
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    programs, per_program = monitored_programs(n_rows, C, x.device)
    top_k = candidates_per_program(acc.top_k)
    if n_rows >= 2**31:
        raise ValueError(f"x: at most 2**31 - 1 tokens (B * N) per call, got shape {tuple(x.shape)}")
    candidates = torch.empty((programs * top_k,), dtype=torch.int64, device=x.device)
    if n_rows == 0:
        return y, prefix_norms, patch_norms, candidates.fill_(-1), mean, rstd
    BLOCK_R, BLOCK_C, num_warps = launch_config(C, x.device.type)
    num_edges = acc.inner_edges.numel()
    ln_fwd_monitored_kernel[(programs,)](
        x2,
        y.view(n_rows, C),
        x2 if weight is None else weight.contiguous(),
        x2 if bias is None else bias.contiguous(),
        prefix_norms if acc.write_norms else mean,  # float32 stand-ins, never stored to
        patch_norms if acc.write_norms else mean,
        candidates,
        mean,
        rstd,
        acc.inner_edges,
        acc.count,
        acc.total,
        acc.total_sq,
        acc.maximum,
        acc.outliers,
        acc.histogram,
        n_rows,
        C,
        x2.stride(0),
        C,
        float(eps),
        N,
        acc.num_cls,
        P,
        float(acc.threshold),
        num_edges,
        per_program,
        BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK_E=triton.next_power_of_2(max(num_edges, 1)),
        BLOCK_HIST=triton.next_power_of_2(3 * (num_edges + 1)),
        TOP_K=top_k,
        WRITE_NORMS=bool(acc.write_norms),
        num_warps=num_warps,
    )
    return y, prefix_norms, patch_norms, candidates, mean, rstd


def candidates_per_program(top_k: int) -> int:
    """Top-k candidates each program of the monitored forward keeps (a power of two >= top_k, at least 1)."""
    return triton.next_power_of_2(max(int(top_k), 1))


def monitored_programs(n_rows: int, C: int, device: torch.device) -> tuple[int, int]:
    """(programs, row blocks per program) of the monitored forward: few programs, each over many rows, so that the
    atomics per call stay ~ programs x (groups + non-empty bins) and the top-k candidates ~ programs x k."""
    BLOCK_R = launch_config(C, device.type)[0]
    num_blocks = max(1, triton.cdiv(n_rows, BLOCK_R))
    per_program = max(1, triton.cdiv(num_blocks, _backward_programs(device)))
    return triton.cdiv(num_blocks, per_program), per_program
