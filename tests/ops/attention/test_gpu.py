"""GPU checks of the attention backends (torch, triton) at real shapes (marker ``gpu``; skipped without CUDA)."""

import pytest
import torch

import regkern
from regkern.ops.attention.op import triton_kernels
from tests.helpers import case_id, dtype_id, eager_attention, max_error, packed_qkv, registers

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("N", [261, 1374])
def test_torch_backend_on_gpu_matches_reference(dtype, N):
    B, H, d, R = 2, 4, 64, 4
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device="cuda")
    reg_k, reg_v = registers(B, R, H, d, shared=True, dtype=dtype, device="cuda")
    out = regkern.register_attention(q, k, v, reg_k, reg_v, backend="torch")
    assert torch.isfinite(out).all()
    ref = regkern.register_attention(q.float(), k.float(), v.float(), reg_k.float(), reg_v.float(), backend="reference")
    own = max_error(eager_attention(q, k, v, reg_k, reg_v), ref)
    assert max_error(out, ref) <= 2 * own + 1e-6


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: case_id(B=s[0], N=s[1], H=s[2], D=s[3]))
def test_triton_forward_at_real_shapes(dtype, shape):
    B, N, H, d, P = shape
    q, k, v, reg_k, reg_v = _real_inputs(B, N, H, d, dtype)
    out = torch.full((B, N, H, d), float("nan"), dtype=dtype, device="cuda")
    lse = torch.full((B, H, N), float("nan"), device="cuda")
    triton_kernels().attention_forward(q, k, v, reg_k, reg_v, d**-0.5, P, out=out, lse=lse)
    ref, stats = regkern.register_attention(*_fp32(q, k, v, reg_k, reg_v), return_stats=("lse",), backend="reference")
    own = max_error(eager_attention(q, k, v, reg_k, reg_v), ref)
    assert max_error(out, ref) <= 2 * own
    assert max_error(lse, stats.lse) <= 1e-2
    # deterministic: the same launch gives the same bits
    again, _ = triton_kernels().attention_forward(q, k, v, reg_k, reg_v, d**-0.5, P)
    assert torch.equal(again, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
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
