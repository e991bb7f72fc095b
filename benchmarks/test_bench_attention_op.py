"""Op level: from the qkv Linear output (B, N, 3C) to the (B, N, C) tensor the projection consumes, layout copies
included. Contenders: timm's own path (SDPA + reshapes), SDPA with each backend forced, regkern triton (R = 0/4/16
KV registers) and regkern torch. Forward, and forward + backward.

GPU: the ViT shapes of the Triton-attention issue in bf16. CPU: one tiny shape with the contenders that exist there.
Run: ``pytest benchmarks --benchmark-only``; results carry FLOPs, bytes, TFLOP/s and GB/s in ``extra_info``.
"""

import pytest
import torch
import torch.nn.functional as F

import regkern
from benchmarks.common import on_gpu, sync

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


def timm_path(qkv, B, N, H, reg, P):
    q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)


def sdpa_forced(backend_name):
    def run(qkv, B, N, H, reg, P):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return timm_path(qkv, B, N, H, reg, P)

    return run


def regkern_path(backend):
    def run(qkv, B, N, H, reg, P):
        q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
        reg_k, reg_v = reg if reg is not None else (None, None)
        out = regkern.register_attention(q, k, v, reg_k, reg_v, num_prefix=P, backend=backend)
        return out.view(B, N, H * D)

    return run


CONTENDERS = {
    "timm": (timm_path, 0),
    "sdpa-math": (sdpa_forced("MATH"), 0),
    "regkern-torch": (regkern_path("torch"), 0),
}
if on_gpu():
    CONTENDERS.update({
        "sdpa-flash": (sdpa_forced("FLASH_ATTENTION"), 0),
        "sdpa-efficient": (sdpa_forced("EFFICIENT_ATTENTION"), 0),
        "sdpa-cudnn": (sdpa_forced("CUDNN_ATTENTION"), 0),
        "regkern-triton": (regkern_path("triton"), 0),
        "regkern-triton-R4": (regkern_path("triton"), 4),
        "regkern-triton-R16": (regkern_path("triton"), 16),
    })


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_op(benchmark, device, shape, contender, mode):
    name, B, N, H, P = shape
    fn, R = CONTENDERS[contender]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, requires_grad=mode != "fwd")
    reg = None
    if R:
        reg = tuple(torch.randn(R, H, D, device=device, dtype=dtype, requires_grad=mode != "fwd") for _ in range(2))
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
        run()  # warm-up outside the timed region (Triton compile, cuDNN plans)
    except RuntimeError as err:  # e.g. a forced SDPA backend that does not support this shape/device
        pytest.skip(f"{contender} cannot run here: {str(err).splitlines()[0]}")
    flops = 4 * B * H * N * (N + R) * D * (1 if mode == "fwd" else 3.5)
    bytes_moved = (qkv.numel() + B * N * H * D) * qkv.element_size() * (1 if mode == "fwd" else 3)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
        regkern=regkern.__version__, dtype=str(dtype), shape=name, B=B, N=N, H=H, d=D, R=R, P=P, mode=mode,
        flops=flops, bytes=bytes_moved,
    )
    benchmark.pedantic(run, rounds=10 if device.type == "cuda" else 3, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable (CI just executes each case)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(tflops=flops / median / 1e12, gbps=bytes_moved / median / 1e9)
