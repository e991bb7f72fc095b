"""GPU checks of patched timm models: same outputs as timm, torch.compile and CUDA graphs (marker ``gpu``)."""

import pytest
import torch

import regkern

pytestmark = pytest.mark.gpu


def test_patched_model_on_gpu_matches_timm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        want = model(x)
        regkern.patch_timm(model)
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


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
