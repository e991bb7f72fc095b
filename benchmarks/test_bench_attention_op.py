"""Op level: from the qkv Linear output (B, N, 3C) to the (B, N, C) tensor the projection consumes, layout copies
included, forward and forward + backward.

Contenders (each doing the same job):
    timm               timm's own path: reshape/permute, SDPA (default backend), transpose/reshape
    sdpa-<backend>     the same with one SDPA backend forced (flash, efficient, cudnn, math)
    xformers           xformers.ops.memory_efficient_attention, when it imports with working kernels
    flex               FlexAttention (torch.compile'd), GPU only
    regkern-triton     the fused kernel; -R4/-R16 with KV-only registers; -outnorm with the out_norm epilogue;
                       -monitor with out_norm + prefix_rows epilogues; -monitor-received adding the received pass
    regkern-torch      regkern's SDPA backend
    naive-registers    torch.cat of 4 registers to k/v + SDPA + a separate out-norm pass (registers + monitoring
                       without regkern)
    timm-maps          timm's unfused attention plus the reductions the monitor gives (prefix rows, column sums,
                       out norms): the attention-map feature without regkern
    regkern-cuda       the CUDA backend's forward (regkern._C; its backward runs the Triton backward kernels); -R4
                       with KV-only registers, -outnorm with the out_norm epilogue. Skipped unless the extension is
                       built and loads (``regkern.cuda_ext.available()``)

GPU: ViT-S/16, ViT-B/14-reg4, ViT-L/14-reg4, ViT-g/14-reg4 shapes in bf16. CPU: one tiny shape with the contenders
that run there. ``pytest benchmarks --benchmark-only``; ``python -m regkern bench`` runs and summarises the suite.
"""

import pytest
import torch
import torch.nn.functional as F

import regkern
from benchmarks.common import cuda_backend_unavailable, on_gpu, peak_memory_bytes, record, sync

# (id, B, N, H, P) with d = 64
GPU_SHAPES = [
    ("vits16-224", 512, 197, 6, 1),
    ("vitb14reg4-224", 256, 261, 12, 5),
    ("vitl14reg4-518", 32, 1374, 16, 5),
    ("vitg14reg4-518", 16, 1374, 24, 5),
]
CPU_SHAPES = [("tiny-cpu", 2, 261, 2, 5)]
SHAPES = GPU_SHAPES if on_gpu() else CPU_SHAPES
D = 64


def heads_first(qkv, B, N, H):
    return qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)


def timm_path(qkv, B, N, H, reg, P):
    q, k, v = heads_first(qkv, B, N, H)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)


def sdpa_forced(backend_name):
    def run(qkv, B, N, H, reg, P):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return timm_path(qkv, B, N, H, reg, P)

    return run


def xformers_path(qkv, B, N, H, reg, P):
    import xformers.ops as xops

    q, k, v = qkv.view(B, N, 3, H, D).unbind(2)  # xformers takes (B, N, H, d) directly
    return xops.memory_efficient_attention(q, k, v).reshape(B, N, H * D)


_flex_compiled = None


def flex_path(qkv, B, N, H, reg, P):
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    q, k, v = heads_first(qkv, B, N, H)
    return _flex_compiled(q, k, v).transpose(1, 2).reshape(B, N, H * D)


def regkern_path(backend, stats=()):
    def run(qkv, B, N, H, reg, P):
        q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
        reg_k, reg_v = reg if reg is not None else (None, None)
        out = regkern.register_attention(q, k, v, reg_k, reg_v, num_prefix=P, backend=backend, return_stats=stats)
        out = out[0] if stats else out
        return out.view(B, N, H * D)

    return run


def naive_registers(qkv, B, N, H, reg, P):
    q, k, v = heads_first(qkv, B, N, H)
    reg_k, reg_v = (r.transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1) for r in reg)
    out = F.scaled_dot_product_attention(q, torch.cat([reg_k, k], 2), torch.cat([reg_v, v], 2))
    out = out.transpose(1, 2).reshape(B, N, H * D)
    out_norm = torch.linalg.vector_norm(out.float(), dim=-1)  # the separate monitoring pass
    return out + 0 * out_norm.unsqueeze(-1).to(out.dtype)


def timm_maps(qkv, B, N, H, reg, P):
    q, k, v = heads_first(qkv, B, N, H)
    attn = ((q * D**-0.5) @ k.transpose(-2, -1)).softmax(-1)
    prefix_rows = attn[:, :, :P].float().clone()
    received = attn.float().sum(2)
    out = (attn @ v).transpose(1, 2).reshape(B, N, H * D)
    out_norm = torch.linalg.vector_norm(out.float(), dim=-1)
    return out + 0 * (prefix_rows.sum() + received.sum() + out_norm.sum()).to(out.dtype)


# name -> (function, KV registers R, needs a GPU)
CONTENDERS = {
    "timm": (timm_path, 0, False),
    "sdpa-math": (sdpa_forced("MATH"), 0, False),
    "sdpa-flash": (sdpa_forced("FLASH_ATTENTION"), 0, True),
    "sdpa-efficient": (sdpa_forced("EFFICIENT_ATTENTION"), 0, True),
    "sdpa-cudnn": (sdpa_forced("CUDNN_ATTENTION"), 0, True),
    "xformers": (xformers_path, 0, True),
    "flex": (flex_path, 0, True),
    "regkern-torch": (regkern_path("torch"), 0, False),
    "regkern-triton": (regkern_path("triton"), 0, True),
    "regkern-triton-R4": (regkern_path("triton"), 4, True),
    "regkern-triton-R16": (regkern_path("triton"), 16, True),
    "regkern-triton-outnorm": (regkern_path("triton", ("out_norm",)), 0, True),
    "regkern-triton-monitor": (regkern_path("triton", ("out_norm", "prefix_rows")), 0, True),
    "regkern-triton-monitor-received": (regkern_path("triton", ("out_norm", "prefix_rows", "received")), 0, True),
    "regkern-cuda": (regkern_path("cuda"), 0, True),
    "regkern-cuda-R4": (regkern_path("cuda"), 4, True),
    "regkern-cuda-outnorm": (regkern_path("cuda", ("out_norm",)), 0, True),
    "naive-registers": (naive_registers, 4, False),
    "timm-maps": (timm_maps, 0, False),
}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_op(benchmark, device, shape, contender, mode):
    name, B, N, H, P = shape
    fn, R, needs_gpu = CONTENDERS[contender]
    if needs_gpu and device.type != "cuda":
        pytest.skip(f"{contender} needs a CUDA GPU")
    if contender == "xformers":
        pytest.importorskip("xformers.ops")
    if contender.startswith("regkern-cuda"):
        reason = cuda_backend_unavailable(device)
        if reason:
            pytest.skip(f"{contender}: {reason}")
    if ("monitor" in contender or "outnorm" in contender) and mode != "fwd":
        pytest.skip("monitoring statistics are an inference feature (forward only)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grad_needed = mode != "fwd"
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, requires_grad=grad_needed)
    reg = None
    if R:
        reg = tuple(torch.randn(R, H, D, device=device, dtype=dtype, requires_grad=grad_needed) for _ in range(2))
    grad = torch.randn(B, N, H * D, device=device, dtype=dtype)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(qkv, B, N, H, reg, P)
        else:
            out = fn(qkv, B, N, H, reg, P)
            out.backward(grad)
        sync(device)
        return out

    try:
        run()  # warm-up outside the timed region (Triton compile and autotune, torch.compile, cuDNN plans)
    except (RuntimeError, NotImplementedError) as err:  # e.g. a forced SDPA backend that rejects this shape
        if contender.startswith("regkern"):
            raise  # regkern's own kernels must run: a failure is a failure, not a skip
        pytest.skip(f"{contender} cannot run here: {str(err).splitlines()[0]}")
    peak = peak_memory_bytes(run, device)
    benchmark.pedantic(run, rounds=20 if device.type == "cuda" else 3, warmup_rounds=3 if device.type == "cuda" else 1)
    passes = 1 if mode == "fwd" else 3.5  # backward ~ 2.5 forward matmul work
    flops = 4 * B * H * N * (N + R) * D * passes
    element = qkv.element_size()
    bytes_moved = (B * N * 3 * H * D + B * N * H * D) * element * (1 if mode == "fwd" else 3)
    record(
        benchmark,
        device,
        flops,
        bytes_moved,
        op="attention",
        shape=name,
        B=B,
        N=N,
        H=H,
        d=D,
        R=R,
        P=P,
        mode=mode,
        contender=contender,
        dtype=str(dtype),
        peak_memory_bytes=peak,
    )


# 8 sequences of different lengths (ViT-B/14-reg4 at 224 px ... ViT-L/14-reg4 at 518 px), each with its
# [CLS, 4 registers] prefix: packed without padding (regkern varlen) vs padded to the longest (SDPA, key mask)
VARLEN_LENGTHS = [197, 261, 401, 577, 785, 1025, 1230, 1374] if on_gpu() else [5, 17, 33, 9]
VARLEN_H, VARLEN_P = (16, 5) if on_gpu() else (2, 5)


def _varlen_regkern(q, k, v, cu, lengths, reg):
    return regkern.register_attention_varlen(q, k, v, cu, num_prefix=VARLEN_P, max_seqlen=max(lengths))


def _varlen_padded_sdpa(q, k, v, cu, lengths, reg):
    """What users do without varlen: pad every sequence to the longest, mask the padding keys, SDPA, unpad."""
    L = max(lengths)
    pos = torch.arange(L, device=q.device)
    valid = pos[None, :] < torch.tensor(lengths, device=q.device)[:, None]
    index = (cu[:-1, None].long() + pos[None, :]).clamp(max=q.shape[0] - 1)

    def pad(t):
        return (t[index] * valid[..., None, None].to(t.dtype)).transpose(1, 2)  # (S, H, L, d)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2)[valid]


VARLEN_CONTENDERS = {"regkern-varlen": _varlen_regkern, "sdpa-padded": _varlen_padded_sdpa}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("contender", list(VARLEN_CONTENDERS))
def test_packed_sequences(benchmark, device, contender, mode):
    lengths, H, dtype = VARLEN_LENGTHS, VARLEN_H, (torch.bfloat16 if device.type == "cuda" else torch.float32)
    T = sum(lengths)
    grad_needed = mode != "fwd"
    qkv = torch.randn(T, 3, H, D, device=device, dtype=dtype, requires_grad=grad_needed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    fn = VARLEN_CONTENDERS[contender]
    grad = torch.randn(T, H, D, device=device, dtype=dtype)

    def run():
        q, k, v = qkv.unbind(1)
        if mode == "fwd":
            with torch.no_grad():
                out = fn(q, k, v, cu, lengths, None)
        else:
            out = fn(q, k, v, cu, lengths, None)
            out.backward(grad)
        sync(device)
        return out

    run()
    benchmark.pedantic(run, rounds=20 if device.type == "cuda" else 3, warmup_rounds=3 if device.type == "cuda" else 1)
    passes = 1 if mode == "fwd" else 3.5
    flops = sum(4 * H * n * n * D for n in lengths) * passes
    record(
        benchmark,
        device,
        flops,
        T * 4 * H * D * qkv.element_size(),
        op="attention-varlen",
        shape=f"S{len(lengths)}-T{T}",
        lengths=lengths,
        H=H,
        d=D,
        P=VARLEN_P,
        mode=mode,
        contender=contender,
        dtype=str(dtype),
        padded_tokens=len(lengths) * max(lengths),
    )
