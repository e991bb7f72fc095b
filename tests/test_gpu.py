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
