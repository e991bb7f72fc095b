"""GPU checks of the backends available today (skipped without CUDA)."""

import pytest
import torch

import regkern
from tests.helpers import eager_attention, max_error, packed_qkv, registers

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N", [261, 1374])
def test_torch_backend_on_gpu_matches_reference(dtype, N):
    B, H, d, R = 2, 4, 64, 4
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device="cuda")
    reg_k, reg_v = registers(B, R, H, d, shared=True, dtype=dtype, device="cuda")
    out = regkern.register_attention(q, k, v, reg_k, reg_v, backend="torch")
    assert torch.isfinite(out).all()
    ref = regkern.register_attention(q.float(), k.float(), v.float(), reg_k.float(), reg_v.float(),
                                     backend="reference")
    own = max_error(eager_attention(q, k, v, reg_k, reg_v), ref)
    assert max_error(out, ref) <= 2 * own + 1e-6


def test_patched_model_on_gpu_matches_timm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        want = model(x)
        regkern.patch_timm(model)
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------- Triton kernels at real shapes

REAL_SHAPES = [(32, 261, 8, 64, 5), (16, 1374, 16, 64, 5)]  # (B, N, H, d, P): B*H >= 256


def _real_inputs(B, N, H, d, dtype, R=4, requires_grad=False):
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device="cuda")
    reg_k, reg_v = registers(B, R, H, d, shared=True, dtype=dtype, device="cuda")
    if requires_grad:
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        reg_k, reg_v = reg_k.requires_grad_(), reg_v.requires_grad_()
    return q, k, v, reg_k, reg_v


def _fp32(*ts):
    return [t.detach().float() for t in ts]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: f"B{s[0]}-N{s[1]}-H{s[2]}-D{s[3]}")
def test_triton_forward_at_real_shapes(dtype, shape):
    from regkern import attention_triton

    B, N, H, d, P = shape
    q, k, v, reg_k, reg_v = _real_inputs(B, N, H, d, dtype)
    out = torch.full((B, N, H, d), float("nan"), dtype=dtype, device="cuda")
    lse = torch.full((B, H, N), float("nan"), device="cuda")
    attention_triton.attention_forward(q, k, v, reg_k, reg_v, d ** -0.5, P, out=out, lse=lse)
    ref, stats = regkern.register_attention(*_fp32(q, k, v, reg_k, reg_v), return_stats=("lse",),
                                            backend="reference")
    own = max_error(eager_attention(q, k, v, reg_k, reg_v), ref)
    assert max_error(out, ref) <= 2 * own
    assert max_error(lse, stats.lse) <= 1e-2
    # deterministic: the same launch gives the same bits
    again, _ = attention_triton.attention_forward(q, k, v, reg_k, reg_v, d ** -0.5, P)
    assert torch.equal(again, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_backward_at_real_shape(dtype):
    B, N, H, d, P = 32, 261, 8, 64, 5
    inputs = _real_inputs(B, N, H, d, dtype, requires_grad=True)
    g = torch.randn(B, N, H, d, device="cuda", dtype=dtype)
    got = torch.autograd.grad(regkern.register_attention(*inputs, num_prefix=P, backend="triton"), inputs, g)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    want = torch.autograd.grad(regkern.register_attention(*ref_inputs, backend="reference"), ref_inputs, g.float())
    own_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    own = torch.autograd.grad(eager_attention(*own_inputs), own_inputs, g)
    for name, a, w, o in zip(["dq", "dk", "dv", "dreg_k", "dreg_v"], got, want, own):
        assert max_error(a, w) <= 3 * max_error(o, w), name


def test_patched_model_compiles_and_captures_in_cuda_graph():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224)
    model = model.cuda().eval().to(torch.bfloat16)
    regkern.patch_timm(model)
    assert all(m.backend_name == "triton" for m in model.modules() if isinstance(m, regkern.RegisterViTAttention))
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, atol=5e-2, rtol=5e-2)
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        new_x = torch.randn_like(x)
        static_x.copy_(new_x)
        graph.replay()
        torch.testing.assert_close(static_out, model(new_x), atol=0, rtol=0)


# --------------------------------------------------------------------------------- monitoring on the GPU


def test_monitored_model_matches_unmonitored_bits_and_captures_in_cuda_graph():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224).cuda().eval()
    base = base.to(torch.bfloat16)
    import copy

    plain = regkern.patch_timm(copy.deepcopy(base))
    monitored = regkern.patch_timm(copy.deepcopy(base), monitor=True)
    monitor = regkern.get_monitor(monitored)
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(monitored(x), plain(x))
        # capture the monitored forward in a CUDA graph: no host sync inside, accumulators keep their addresses
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            monitored(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        monitor.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            monitored(static_x)
        monitor.reset()
        for _ in range(3):
            graph.replay()
    report = monitor.report()
    assert report.rows[0]["count"] == 3 * 8  # 3 replays x 8 CLS tokens in layer 0
    assert monitor.attention_maps(-1).shape == (8, 6, 5, 16, 16)
