"""Small ops around the attention, forward: LayerNorm with norm capture and the token embedding.

Contenders (each doing the same job):
    layer_norm: x (B, N, C) -> y (B, N, C), norms (B, N) float32
        torch              F.layer_norm + torch.linalg.vector_norm (two passes over x; the baseline)
        regkern-triton     regkern.layer_norm_with_norms(backend="triton"): one pass
        regkern-cuda       the same with backend="cuda"
    embed_tokens: patches (B, M, C) -> (B, 1 + R + M, C), no_embed_class (DINOv2 with registers)
        torch              timm's _pos_embed in the input dtype: patches + pos_embed, torch.cat with CLS and registers
        regkern-reference  regkern.embed_tokens(backend="reference"): PyTorch, position add in float32
        regkern-cuda       the same with backend="cuda"
The regkern-cuda contenders are skipped unless the CUDA extension is built and loads (``regkern.cuda_ext``).

GPU: ViT-B/14-reg4 224 px (B=64, N=261, C=768) and ViT-L/14-reg4 518 px (B=32, N=1374, C=1024) LayerNorms, the
ViT-B/14-reg4 embedding (B=64, M=256, C=768, R=4), bf16. CPU: tiny shapes, float32, the contenders that run there.
``pytest benchmarks --benchmark-only``; ``python -m regkern bench`` runs and summarises the suite.
"""

import pytest
import torch
import torch.nn.functional as F

import regkern
from benchmarks.common import cuda_backend_unavailable, on_gpu, peak_memory_bytes, record, sync

# (id, B, N, C)
LN_SHAPES = (
    [("ln-vitb14reg4-224", 64, 261, 768), ("ln-vitl14reg4-518", 32, 1374, 1024)]
    if on_gpu()
    else [("ln-tiny-cpu", 2, 261, 384)]
)
# (id, B, M, C, R): M patch tokens, one CLS token and R registers
EMBED_SHAPES = [("embed-vitb14reg4-224", 64, 256, 768, 4)] if on_gpu() else [("embed-tiny-cpu", 2, 256, 384, 4)]
EPS = 1e-6


def skip_unless_runnable(contender: str, device: torch.device) -> None:
    if contender.startswith("regkern-cuda"):
        reason = cuda_backend_unavailable(device)
        if reason:
            pytest.skip(f"{contender}: {reason}")
    elif contender == "regkern-triton" and device.type != "cuda":
        pytest.skip(f"{contender} needs a CUDA GPU")


def sync_every(fn, device: torch.device, every: int):
    """``fn`` synchronising on every ``every``-th call only. Timed with ``pedantic(iterations=every)``, a round
    queues ``every`` calls and waits once, so the per-call median is the GPU time of these microsecond kernels rather
    than launch + synchronisation latency (the counter is reset right before timing, keeping rounds aligned)."""
    calls = [0]

    def run():
        out = fn()
        calls[0] += 1
        if calls[0] % every == 0:
            sync(device)
        return out

    run.reset = lambda: calls.__setitem__(0, 0)
    return run


def measure(benchmark, device, fn, contender):
    """Warm up (skipping a backend that refuses the call), peak memory, then timed rounds; returns peak bytes.
    Only a refusal (ValueError with reasons) skips: a kernel that fails fails the benchmark."""
    try:
        fn()
        sync(device)
    except ValueError as err:  # an explicitly named backend refusing this call, e.g. a C beyond its limit
        pytest.skip(f"{contender} cannot run here: {str(err).splitlines()[0]}")
    peak = peak_memory_bytes(fn, device)
    every = 10 if device.type == "cuda" else 1
    run = sync_every(fn, device, every)
    run.reset()
    benchmark.pedantic(
        run,
        rounds=20 if device.type == "cuda" else 3,
        iterations=every,
        warmup_rounds=3 if device.type == "cuda" else 1,
    )
    sync(device)
    return peak


def torch_layer_norm(x, w, b):
    y = F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    return y, torch.linalg.vector_norm(x.float(), dim=-1)


LN_CONTENDERS = {
    "torch": torch_layer_norm,
    "regkern-triton": lambda x, w, b: regkern.layer_norm_with_norms(x, w, b, EPS, backend="triton"),
    "regkern-cuda": lambda x, w, b: regkern.layer_norm_with_norms(x, w, b, EPS, backend="cuda"),
}


@pytest.mark.parametrize("contender", list(LN_CONTENDERS))
@pytest.mark.parametrize("shape", LN_SHAPES, ids=[s[0] for s in LN_SHAPES])
def test_layer_norm_with_norms(benchmark, device, shape, contender):
    name, B, N, C = shape
    skip_unless_runnable(contender, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    w = torch.randn(C, device=device, dtype=dtype)
    b = torch.randn(C, device=device, dtype=dtype)
    fn = LN_CONTENDERS[contender]

    def call():
        with torch.no_grad():
            return fn(x, w, b)

    peak = measure(benchmark, device, call, contender)
    y, norms = call()
    assert y.shape == (B, N, C) and norms.shape == (B, N)
    flops = 8 * B * N * C  # sums, squares, centring, scaling, affine: a bandwidth-bound op, FLOPs for reference
    bytes_moved = 2 * B * N * C * x.element_size() + 4 * B * N + 2 * C * w.element_size()  # x in, y out, norms
    record(
        benchmark,
        device,
        flops,
        bytes_moved,
        op="layer_norm",
        shape=name,
        B=B,
        N=N,
        C=C,
        mode="fwd",
        contender=contender,
        dtype=str(dtype),
        peak_memory_bytes=peak,
    )


def timm_pos_embed(patches, pos_embed, cls_token, reg_token):
    B = patches.shape[0]
    x = patches + pos_embed
    return torch.cat([cls_token.expand(B, -1, -1), reg_token.expand(B, -1, -1), x], dim=1)


def regkern_embed(backend):
    def run(patches, pos_embed, cls_token, reg_token):
        return regkern.embed_tokens(patches, pos_embed, cls_token, reg_token, no_embed_class=True, backend=backend)

    return run


EMBED_CONTENDERS = {
    "torch": timm_pos_embed,
    "regkern-reference": regkern_embed("reference"),
    "regkern-cuda": regkern_embed("cuda"),
}


@pytest.mark.parametrize("contender", list(EMBED_CONTENDERS))
@pytest.mark.parametrize("shape", EMBED_SHAPES, ids=[s[0] for s in EMBED_SHAPES])
def test_embed_tokens(benchmark, device, shape, contender):
    name, B, M, C, R = shape
    skip_unless_runnable(contender, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    patches = torch.randn(B, M, C, device=device, dtype=dtype)
    pos_embed = torch.randn(1, M, C, device=device, dtype=dtype)
    cls_token = torch.randn(1, 1, C, device=device, dtype=dtype)
    reg_token = torch.randn(1, R, C, device=device, dtype=dtype)
    fn = EMBED_CONTENDERS[contender]

    def call():
        with torch.no_grad():
            return fn(patches, pos_embed, cls_token, reg_token)

    peak = measure(benchmark, device, call, contender)
    P = 1 + R
    assert call().shape == (B, P + M, C)
    element = patches.element_size()
    bytes_moved = (B * M * C + M * C + P * C + B * (P + M) * C) * element  # patches, pos_embed, prefix in; tokens out
    # N: the sequence length the op produces, what a dispatch lookup for embed_tokens passes
    record(
        benchmark,
        device,
        B * M * C,
        bytes_moved,
        op="embed_tokens",
        shape=name,
        B=B,
        M=M,
        N=P + M,
        C=C,
        R=R,
        P=P,
        mode="fwd",
        contender=contender,
        dtype=str(dtype),
        peak_memory_bytes=peak,
    )
