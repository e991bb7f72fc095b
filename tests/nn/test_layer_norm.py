"""MonitoredLayerNorm: a drop-in nn.LayerNorm (same parameters, state_dict, outputs, gradients) that hands each
token's input norm to a sink; torch.compile without graph breaks. Triton runs under TRITON_INTERPRET=1 on the CPU."""

import pytest
import torch
import torch.nn as nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ln_kernels = pytest.importorskip("regkern.ops.layer_norm.triton_kernels")
if DEVICE == "cpu" and not ln_kernels.INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from regkern.nn import MonitoredLayerNorm  # noqa: E402


def perturbed(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


def timm_layer_norm(C, **kwargs):
    timm = pytest.importorskip("timm")
    return timm.layers.LayerNorm(C, **kwargs)


@pytest.mark.parametrize("kind", ["torch", "torch-nobias", "torch-noaffine", "timm"])
def test_state_dict_round_trips_strict(kind):
    C = 24
    if kind == "timm":
        ref = timm_layer_norm(C)
        ours = MonitoredLayerNorm(C, eps=1e-6)
    else:
        kwargs = {"torch": {}, "torch-nobias": dict(bias=False), "torch-noaffine": dict(elementwise_affine=False)}[kind]
        ref = nn.LayerNorm(C, **kwargs)
        ours = MonitoredLayerNorm(C, **kwargs)
    assert isinstance(ours, nn.LayerNorm)
    perturbed(ref)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = type(ref)(C) if kind == "timm" else nn.LayerNorm(C, **kwargs)
    back.load_state_dict(perturbed(ours).state_dict(), strict=True)
    assert list(back.state_dict()) == list(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("kind", ["torch", "timm"])
def test_from_layer_norm_shares_parameters(kind):
    ref = nn.LayerNorm(16, eps=1e-6, bias=False) if kind == "torch" else timm_layer_norm(16)
    ref.eval()
    ours = MonitoredLayerNorm.from_layer_norm(ref, backend="reference")
    assert ours.weight is ref.weight and ours.bias is ref.bias
    assert ours.eps == ref.eps and ours.normalized_shape == (16,) and not ours.training
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    with torch.no_grad():
        ref.weight.mul_(2)
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    plain = nn.LayerNorm(16, elementwise_affine=False)
    assert MonitoredLayerNorm.from_layer_norm(plain)._parameters == plain._parameters == {"weight": None, "bias": None}
    timm = pytest.importorskip("timm")
    for other in (nn.BatchNorm1d(16), timm.layers.LayerNorm2d(16), ours):
        with pytest.raises(TypeError, match="ln: expected a torch.nn.LayerNorm or timm.layers.LayerNorm"):
            MonitoredLayerNorm.from_layer_norm(other)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("affine", ["wb", "none"])
def test_module_matches_layer_norm_and_sink_gets_token_norms(backend, affine):
    torch.manual_seed(0)
    ref = perturbed(nn.LayerNorm(40, elementwise_affine=affine == "wb")).to(DEVICE)
    ours = MonitoredLayerNorm.from_layer_norm(ref, backend=backend)
    assert ours.backend_name == backend
    x = torch.randn(2, 7, 40, device=DEVICE) * 3 + 1
    received = []
    ours.norm_sink = received.append
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = ref(xr), ours(xo)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(received) == 1
    norms = received[0]
    assert norms.shape == (2, 7) and norms.dtype == torch.float32 and not norms.requires_grad
    torch.testing.assert_close(norms, x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    params = list(ref.parameters())
    want_grads = torch.autograd.grad(want, [xr] + params, g)
    got_grads = torch.autograd.grad(got, [xo] + params, g)
    for a, c in zip(got_grads, want_grads):
        torch.testing.assert_close(a, c, atol=3e-5, rtol=3e-5)
    ours.norm_sink = None
    torch.testing.assert_close(ours(x), want.detach(), atol=1e-5, rtol=1e-5)
    assert len(received) == 1


class _Block(nn.Module):
    """A ViT block's attention half with norm1 monitored: x + proj(norm1(x))."""

    def __init__(self, C):
        super().__init__()
        self.norm1 = MonitoredLayerNorm(C, eps=1e-6, backend="triton")
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        return x + self.proj(self.norm1(x))


def test_torch_compile_fullgraph_without_graph_breaks():
    torch.manual_seed(0)
    block = _Block(32).to(DEVICE)
    perturbed(block.norm1)
    seen = []
    block.norm1.norm_sink = seen.append
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out = compiled(x)
    eager = block(x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seen[0], x.detach().norm(dim=-1), atol=1e-5, rtol=1e-5)
    params = [x] + list(block.parameters())
    g = torch.randn_like(out)
    for a, c in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(eager, params, g)):
        torch.testing.assert_close(a, c, atol=3e-5, rtol=3e-5)
    block.norm1.norm_sink = None  # a new guard, still one graph
    torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)
