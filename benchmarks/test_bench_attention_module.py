"""Module level: timm's Attention vs RegisterViTAttention (same weights), from x (B, N, C) to the projection output.

On the CPU this checks the claim that the plain regkern path costs no more than timm's own attention.
Run: ``pytest benchmarks --benchmark-only`` (``--benchmark-disable`` just executes each case once).
"""

import pytest
import torch

import regkern
from benchmarks.common import on_gpu, record, sync

# (name, B, N, C, H): ViT-B/14-reg4 at 224 px on a GPU; a small ViT-S-like shape on the CPU
SHAPES = [("vitb14reg4-224", 256, 261, 768, 12)] if on_gpu() else [("vits14reg4-cpu", 4, 261, 384, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("impl", ["timm", "regkern"])
def test_attention_module_forward(benchmark, device, shape, impl):
    timm = pytest.importorskip("timm")
    _, B, N, C, H = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = timm.layers.Attention(C, H, qkv_bias=True).to(device=device, dtype=dtype).eval()
    module = attn if impl == "timm" else regkern.RegisterViTAttention.from_timm(attn)
    x = torch.randn(B, N, C, device=device, dtype=dtype)

    def run():
        with torch.inference_mode():
            y = module(x)
        sync(device)
        return y

    run()  # warm-up outside the timed region
    y = benchmark(run)
    assert y.shape == (B, N, C)
    flops = 4 * B * H * N * N * (C // H) + 2 * B * N * C * 4 * C  # attention + qkv and proj matmuls
    bytes_moved = B * N * C * x.element_size() * 6  # x, qkv (3C), attention out, y
    record(
        benchmark,
        device,
        flops,
        bytes_moved,
        impl=impl,
        backend=getattr(module, "backend_name", "timm"),
        shape=shape[0],
        dtype=str(dtype),
    )
