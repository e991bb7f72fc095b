"""Triton kernel of the token embedding: out[b] = [CLS, registers, x[b]] + position embeddings, in one pass.

Each program writes BLOCK_T consecutive output tokens of one image: a token reads its one source row (the CLS
token, a register, or patch row x[b, t - P]) and, where timm adds one, its position-embedding row; the sum runs in
float32 and is rounded once to the output dtype, as ``reference.embed_tokens``. No concatenated intermediate.

Layout of this file: the kernel, then the launcher. The op and its autograd live in ``regkern.ops.embed_tokens.op``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def embed_tokens_kernel(
    X,
    POS,
    CLS,
    REG,
    OUT,
    T,
    C,
    NUM_CLS,
    P,
    stride_xb,
    stride_xm,
    stride_pb,
    stride_pt,
    stride_ob,
    stride_ot,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_POS: tl.constexpr,
    NO_EMBED_CLASS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    col_ok = cols < C
    valid = tokens < T
    is_patch = tokens >= P
    is_cls = tokens < NUM_CLS
    ok = valid[:, None] & col_ok[None, :]  # [BLOCK_T, BLOCK_C]
    patch = (tokens - P).to(tl.int64)  # patch * stride of large inputs does not overflow
    x = tl.load(X + b * stride_xb + patch[:, None] * stride_xm + cols[None, :], mask=ok & is_patch[:, None])
    prefix = tl.load(CLS + cols[None, :] + tokens[:, None] * 0, mask=ok & is_cls[:, None])
    reg = tl.load(REG + (tokens - NUM_CLS)[:, None] * C + cols[None, :], mask=ok & (~is_cls & ~is_patch)[:, None])
    prefix = tl.where(is_cls[:, None], prefix.to(tl.float32), reg.to(tl.float32))
    # select, never add zeros: a -0.0 input stays -0.0, as the reference's concatenation keeps it
    value = tl.where(is_patch[:, None], x.to(tl.float32), prefix)  # [BLOCK_T, BLOCK_C]
    if HAS_POS:
        if NO_EMBED_CLASS:  # position embeddings of the patches only
            pos = tl.load(POS + b * stride_pb + patch[:, None] * stride_pt + cols[None, :], mask=ok & is_patch[:, None])
            value = tl.where(is_patch[:, None], value + pos.to(tl.float32), value)
        else:
            pos = tl.load(POS + b * stride_pb + tokens.to(tl.int64)[:, None] * stride_pt + cols[None, :], mask=ok)
            value = value + pos.to(tl.float32)
    out_rows = OUT + b * stride_ob + tokens.to(tl.int64)[:, None] * stride_ot
    tl.store(out_rows + cols[None, :], value.to(OUT.dtype.element_ty), mask=ok)


#: True when the kernel was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors).
INTERPRETED = type(embed_tokens_kernel).__name__ == "InterpretedFunction"

#: Largest C the kernel takes (one token row is held in registers).
MAX_C = 16384


def launch_config(C: int, device_type: str) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_C, num_warps): about 4096 elements per program on the GPU; small tiles under the
    interpreter."""
    block_c = triton.next_power_of_2(max(int(C), 1))
    if device_type != "cuda":
        return 8, block_c, 1
    block_t = max(1, min(32, 4096 // block_c))
    return block_t, block_c, 4


def embed_tokens(
    x: torch.Tensor,
    pos_embed: Optional[torch.Tensor],
    cls_token: Optional[torch.Tensor],
    reg_token: Optional[torch.Tensor],
    no_embed_class: bool,
) -> torch.Tensor:
    """Launch the kernel. x (B, M, C) or (B, Hp, Wp, C) with unit last stride; pos_embed (1 or B, P + M or M, C);
    cls_token (1, 1, C); reg_token (1, R, C). Returns (B, P + M, C) contiguous in the inputs' result dtype."""
    B, C = x.shape[0], x.shape[-1]
    x = x.reshape(B, -1, C)
    if x.stride(-1) != 1:
        x = x.contiguous()
    M = x.shape[1]
    num_cls = int(cls_token is not None)
    R = 0 if reg_token is None else reg_token.shape[1]
    P = num_cls + R
    out_dtype = x.dtype if pos_embed is None else torch.result_type(x, pos_embed)
    out = torch.empty((B, P + M, C), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    pos = x if pos_embed is None else pos_embed.contiguous()
    stride_pb = 0 if pos_embed is None or pos.shape[0] == 1 else pos.stride(0)
    BLOCK_T, BLOCK_C, num_warps = launch_config(C, x.device.type)
    embed_tokens_kernel[(triton.cdiv(P + M, BLOCK_T), B)](
        x,
        pos,
        x if cls_token is None else cls_token.contiguous(),
        x if reg_token is None else reg_token.contiguous(),
        out,
        P + M,
        C,
        num_cls,
        P,
        x.stride(0),
        x.stride(1),
        stride_pb,
        0 if pos_embed is None else pos.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_T=BLOCK_T,
        BLOCK_C=BLOCK_C,
        HAS_POS=pos_embed is not None,
        NO_EMBED_CLASS=bool(no_embed_class),
        num_warps=num_warps,
    )
    return out
