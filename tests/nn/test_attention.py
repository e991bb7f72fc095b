"""RegisterViTAttention / RegisterEvaAttention as drop-ins for timm's Attention / EvaAttention (CPU, fp32).

Every numeric check compares against timm's own module or an independent float64 computation written here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.eva import EvaAttention

import regkern
from regkern import RegisterEvaAttention, RegisterViTAttention

TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=3e-5, rtol=3e-5)
B, N = 2, 17


# ----------------------------------------------------------------------------------------------------- helpers


def perturb_(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Make every parameter non-trivial (LayerNorm weight != 1, biases != 0) so that no path can hide."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def sd_layout(module: nn.Module):
    return [(k, tuple(v.shape), v.dtype) for k, v in module.state_dict().items()]


def named_layout(items):
    return sorted((k, tuple(v.shape)) for k, v in items)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def forward_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor | None = None, **kwargs):
    """Run module on a fresh leaf copy of x and backpropagate grad_out (fresh random if None).

    Returns output, dx, {param name: grad} and the grad_out used."""
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    y = module(xi, **kwargs)
    if grad_out is None:
        grad_out = torch.randn_like(y)
    y.backward(grad_out)
    grads = {n: p.grad for n, p in module.named_parameters()}
    return y.detach(), xi.grad, grads, grad_out


def compare_forward_backward(ref: nn.Module, ours: nn.Module, x: torch.Tensor, **kwargs) -> None:
    y_ref, dx_ref, g_ref, grad_out = forward_backward(ref, x, **kwargs)
    y, dx, g, _ = forward_backward(ours, x, grad_out, **kwargs)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **GRAD_TOL)
    assert sorted(g) == sorted(g_ref)
    for name in g_ref:
        assert g_ref[name] is not None, name
        assert g[name] is not None, name
        torch.testing.assert_close(g[name], g_ref[name], **GRAD_TOL, msg=lambda m, n=name: f"grad {n}: {m}")


def cfg_id(cfg: dict) -> str:
    parts = [f"dim{cfg['dim']}", f"H{cfg['num_heads']}"]
    flags = [
        ("qkv_bias", "qkvbias"),
        ("qk_norm", "qknorm"),
        ("scale_norm", "scalenorm"),
        ("gated", "gated"),
    ]
    parts += [tag for key, tag in flags if cfg.get(key)]
    if cfg.get("proj_bias") is False:
        parts.append("noprojbias")
    if cfg.get("attn_head_dim") is not None:
        parts.append(f"hd{cfg['attn_head_dim']}")
    if cfg.get("dim_out") is not None:
        parts.append(f"out{cfg['dim_out']}")
    return "-".join(parts)


LN = dict(norm_layer=nn.LayerNorm)
VIT_CONFIGS = [
    dict(dim=96, num_heads=4),
    dict(dim=96, num_heads=4, qkv_bias=True),
    dict(dim=96, num_heads=4, qk_norm=True, **LN),
    dict(dim=96, num_heads=4, scale_norm=True, **LN),
    dict(dim=96, num_heads=4, proj_bias=False),
    dict(dim=96, num_heads=4, gated=True),
    dict(dim=96, num_heads=4, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True, **LN),
    dict(dim=96, num_heads=4, attn_head_dim=16),  # attn_dim 64 != dim
    dict(dim=96, num_heads=4, attn_head_dim=32, qkv_bias=True, scale_norm=True, **LN),  # attn_dim 128 != dim
    dict(dim=96, num_heads=4, dim_out=64),
    dict(dim=96, num_heads=4, attn_head_dim=16, dim_out=40, qk_norm=True, gated=True, proj_bias=False, **LN),
    dict(dim=64, num_heads=8, qkv_bias=True),
    dict(dim=48, num_heads=1),
]
VIT_IDS = [cfg_id(c) for c in VIT_CONFIGS]


def vit_pair(cfg: dict, seed: int = 0):
    """timm Attention (seeded, perturbed) and our module loaded from its state_dict with strict=True."""
    torch.manual_seed(seed)
    ref = perturb_(Attention(**cfg))
    torch.manual_seed(seed + 100)
    ours = RegisterViTAttention(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


# ------------------------------------------------------------------------------------ RegisterViTAttention


@pytest.mark.parametrize("cfg", VIT_CONFIGS, ids=VIT_IDS)
def test_vit_state_dict_round_trip(cfg):
    torch.manual_seed(0)
    ref = perturb_(Attention(**cfg))
    torch.manual_seed(1)
    ours = RegisterViTAttention(**cfg)
    assert sd_layout(ours) == sd_layout(ref)
    assert named_layout(ours.named_parameters()) == named_layout(ref.named_parameters())
    assert named_layout(ours.named_buffers()) == named_layout(ref.named_buffers())
    # timm -> ours
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_same_state(ours, ref)
    # ours -> timm (fresh timm module, different init)
    perturb_(ours)
    torch.manual_seed(2)
    ref2 = Attention(**cfg)
    ref2.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(ref2, ours)
    x = torch.randn(B, N, cfg["dim"])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref2.eval()(x), **TOL)


@pytest.mark.parametrize("timm_fused", [True, False], ids=["timm-sdpa", "timm-manual"])
@pytest.mark.parametrize("cfg", VIT_CONFIGS, ids=VIT_IDS)
def test_vit_forward_and_grads_match_timm(cfg, timm_fused):
    ref, ours = vit_pair(cfg)
    ref.fused_attn = timm_fused
    x = torch.randn(B, N, cfg["dim"])
    compare_forward_backward(ref, ours, x)
    assert ours(x).shape == (B, N, cfg.get("dim_out") or cfg["dim"])


@pytest.mark.parametrize("cfg", VIT_CONFIGS, ids=VIT_IDS)
def test_vit_from_timm_reuses_parameters_and_submodules(cfg):
    torch.manual_seed(0)
    ref = perturb_(Attention(**cfg)).eval()
    ours = RegisterViTAttention.from_timm(ref)
    assert isinstance(ours, RegisterViTAttention)
    ref_params = dict(ref.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert sorted(ours_params) == sorted(ref_params)
    for name, p in ref_params.items():
        assert ours_params[name] is p, name
    for name, child in ref.named_children():
        assert getattr(ours, name) is child, name
    assert getattr(ours, "gate", None) is getattr(ref, "gate", None)
    assert sd_layout(ours) == sd_layout(ref)
    assert ours.training is False
    x = torch.randn(B, N, cfg["dim"])
    compare_forward_backward(ref, ours, x)


def test_vit_from_timm_keeps_training_mode_and_rejects_other_modules():
    ref = Attention(dim=32, num_heads=4).train()
    assert RegisterViTAttention.from_timm(ref).training is True
    with pytest.raises(TypeError, match="Attention"):
        RegisterViTAttention.from_timm(nn.Linear(4, 4))
    with pytest.raises(TypeError):
        RegisterViTAttention.from_timm(EvaAttention(32, num_heads=4, norm_layer=nn.LayerNorm))


def _masks(heads: int):
    """(id, kwargs) pairs: bool masks (diagonal always allowed) and additive float masks of several shapes."""
    g = torch.Generator().manual_seed(7)
    eye = torch.eye(N, dtype=torch.bool)
    bool_bhnn = (torch.rand(B, heads, N, N, generator=g) > 0.4) | eye
    bool_b1nn = (torch.rand(B, 1, N, N, generator=g) > 0.5) | eye
    bool_nn = (torch.rand(N, N, generator=g) > 0.3) | eye
    bool_keys = torch.rand(B, 1, 1, N, generator=g) > 0.3
    bool_keys[..., 0] = True  # at least one key per row
    float_bhnn = torch.randn(B, heads, N, N, generator=g)
    float_1hnn = torch.randn(1, heads, N, N, generator=g)
    float_nn = torch.randn(N, N, generator=g)
    float_inf = torch.zeros(B, 1, N, N).masked_fill(~bool_b1nn, float("-inf"))
    return [
        ("bool-BHNN", dict(attn_mask=bool_bhnn)),
        ("bool-B1NN", dict(attn_mask=bool_b1nn)),
        ("bool-NN", dict(attn_mask=bool_nn)),
        ("bool-B11N-keypad", dict(attn_mask=bool_keys)),
        ("float-BHNN", dict(attn_mask=float_bhnn)),
        ("float-1HNN", dict(attn_mask=float_1hnn)),
        ("float-NN", dict(attn_mask=float_nn)),
        ("float-B1NN-neginf", dict(attn_mask=float_inf)),
        ("causal", dict(is_causal=True)),
    ]


MASK_IDS = [i for i, _ in _masks(4)]


@pytest.mark.parametrize("timm_fused", [True, False], ids=["timm-sdpa", "timm-manual"])
@pytest.mark.parametrize("mask_id", MASK_IDS)
def test_vit_attn_mask_matches_timm(mask_id, timm_fused):
    cfg = dict(dim=96, num_heads=4, qkv_bias=True)
    ref, ours = vit_pair(cfg)
    ref.fused_attn = timm_fused
    kwargs = dict(_masks(4))[mask_id]
    x = torch.randn(B, N, cfg["dim"])
    compare_forward_backward(ref, ours, x, **kwargs)
    # the mask really changes the result
    with torch.no_grad():
        assert not torch.allclose(ours(x, **kwargs), ours(x), atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_vit_attn_mask_with_backends(backend):
    cfg = dict(dim=96, num_heads=4, qk_norm=True, **LN)
    ref, ours = vit_pair(cfg)
    ours.set_backend(backend)
    x = torch.randn(B, N, cfg["dim"])
    with torch.no_grad():
        for _, kwargs in _masks(4):
            torch.testing.assert_close(ours(x, **kwargs), ref(x, **kwargs), **TOL)


@pytest.mark.parametrize("cls", ["vit", "eva"])
def test_is_causal_with_attn_mask_raises(cls):
    if cls == "vit":
        m = RegisterViTAttention(dim=32, num_heads=4)
    else:
        m = RegisterEvaAttention(dim=32, num_heads=4, num_prefix_tokens=0)
    x = torch.randn(B, N, 32)
    mask = torch.ones(N, N, dtype=torch.bool)
    with pytest.raises(ValueError, match="is_causal"):
        m(x, attn_mask=mask, is_causal=True)


# --------------------------------------------------------------------------------------------- KV registers


def naive_vit_attention(m: RegisterViTAttention, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """softmax(q [reg_k; k]^T * scale + mask) [reg_v; v] in float64, by hand from m's parameters."""
    P = {k: v.detach().double() for k, v in m.state_dict().items()}
    x = x.double()
    b, n, _ = x.shape
    H, d = m.num_heads, m.head_dim
    qkv = x @ P["qkv.weight"].T
    if "qkv.bias" in P:
        qkv = qkv + P["qkv.bias"]
    q, k, v = qkv.reshape(b, n, 3, H, d).permute(2, 0, 3, 1, 4)  # each (b, H, n, d)
    if "q_norm.weight" in P:
        q = F.layer_norm(q, (d,), P["q_norm.weight"], P["q_norm.bias"], m.q_norm.eps)
        k = F.layer_norm(k, (d,), P["k_norm.weight"], P["k_norm.bias"], m.k_norm.eps)
    R = 0
    if m.reg_k is not None:
        R = m.reg_k.shape[0]
        rk = P["reg_k"].permute(1, 0, 2).unsqueeze(0).expand(b, H, R, d)  # (R, H, d) -> (b, H, R, d)
        rv = P["reg_v"].permute(1, 0, 2).unsqueeze(0).expand(b, H, R, d)
        k = torch.cat([rk, k], dim=2)
        v = torch.cat([rv, v], dim=2)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5  # (b, H, n, R + n)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=torch.float64).masked_fill(~attn_mask, float("-inf"))
        else:
            bias = attn_mask.double()
        bias = torch.broadcast_to(bias, (b, H, n, n))
        reg_bias = torch.zeros(b, H, n, R, dtype=torch.float64)  # register keys are never masked
        scores = scores + torch.cat([reg_bias, bias], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, H * d)
    if "norm.weight" in P:
        out = F.layer_norm(out, (H * d,), P["norm.weight"], P["norm.bias"], m.norm.eps)
    if m.gate is not None:
        g = x @ P["gate.weight"].T
        if "gate.bias" in P:
            g = g + P["gate.bias"]
        out = out * torch.sigmoid(g)
    out = out @ P["proj.weight"].T
    if "proj.bias" in P:
        out = out + P["proj.bias"]
    return out


NAIVE_TOL = dict(atol=2e-5, rtol=1e-4)
REG_CONFIGS = [
    dict(dim=96, num_heads=4, qkv_bias=True),
    dict(dim=96, num_heads=4, qk_norm=True, scale_norm=True, gated=True, **LN),
    dict(dim=96, num_heads=4, attn_head_dim=16, dim_out=40),
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("R", [1, 4], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("cfg", REG_CONFIGS, ids=[cfg_id(c) for c in REG_CONFIGS])
def test_vit_kv_registers_match_naive(cfg, R, backend):
    torch.manual_seed(0)
    m = perturb_(RegisterViTAttention(**cfg, num_kv_registers=R, backend=backend)).eval()
    H, d = m.num_heads, m.head_dim
    assert m.num_kv_registers == R
    assert tuple(m.reg_k.shape) == (R, H, d) and tuple(m.reg_v.shape) == (R, H, d)
    params = dict(m.named_parameters())
    assert params["reg_k"] is m.reg_k and params["reg_v"] is m.reg_v
    sd = m.state_dict()
    assert tuple(sd["reg_k"].shape) == (R, H, d) and tuple(sd["reg_v"].shape) == (R, H, d)
    with torch.no_grad():  # registers large enough to matter
        m.reg_k.normal_()
        m.reg_v.normal_()
    x = torch.randn(B, N, cfg["dim"])
    y = m(x)
    torch.testing.assert_close(y.double(), naive_vit_attention(m, x), **NAIVE_TOL)
    # without the registers the result is different: they really take part
    m_plain = RegisterViTAttention(**cfg)
    m_plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("reg_")}, strict=True)
    assert not torch.allclose(m_plain.eval()(x), y, atol=1e-3)
    # gradients reach the registers
    y.square().sum().backward()
    assert m.reg_k.grad is not None and m.reg_k.grad.abs().sum() > 0
    assert m.reg_v.grad is not None and m.reg_v.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("mask_id", [i for i in MASK_IDS if i != "causal"] + ["causal"])
def test_vit_kv_registers_with_mask_match_naive(mask_id, backend):
    cfg = dict(dim=96, num_heads=4, qkv_bias=True)
    torch.manual_seed(0)
    m = perturb_(RegisterViTAttention(**cfg, num_kv_registers=3, backend=backend)).eval()
    with torch.no_grad():
        m.reg_k.normal_()
        m.reg_v.normal_()
    kwargs = dict(_masks(4))[mask_id]
    x = torch.randn(B, N, cfg["dim"])
    with torch.no_grad():
        y = m(x, **kwargs)
    if kwargs.get("is_causal"):
        mask = torch.ones(N, N, dtype=torch.bool).tril()
    else:
        mask = kwargs["attn_mask"]
    torch.testing.assert_close(y.double(), naive_vit_attention(m, x, mask), **NAIVE_TOL)


def test_vit_kv_registers_fully_masked_tokens_still_attend_registers():
    """A row whose token keys are all masked still has the (unmasked) registers: finite, equals naive."""
    torch.manual_seed(0)
    m = perturb_(RegisterViTAttention(dim=32, num_heads=2, num_kv_registers=2)).eval()
    mask = torch.ones(B, 1, N, N, dtype=torch.bool)
    mask[:, :, 3, :] = False
    x = torch.randn(B, N, 32)
    with torch.no_grad():
        y = m(x, attn_mask=mask)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), naive_vit_attention(m, x, mask), **NAIVE_TOL)


@pytest.mark.parametrize("cls", ["vit", "eva"])
def test_no_kv_registers_means_no_parameters(cls):
    if cls == "vit":
        m = RegisterViTAttention(dim=32, num_heads=4)
        ref = Attention(dim=32, num_heads=4)
    else:
        m = RegisterEvaAttention(dim=32, num_heads=4, norm_layer=nn.LayerNorm)
        ref = EvaAttention(dim=32, num_heads=4, norm_layer=nn.LayerNorm)
    assert m.num_kv_registers == 0
    assert m.reg_k is None and m.reg_v is None
    names = [n for n, _ in m.named_parameters()]
    assert "reg_k" not in names and "reg_v" not in names
    assert not any("reg_" in k for k in m.state_dict())
    assert sorted(m.state_dict()) == sorted(ref.state_dict())


def test_from_timm_with_kv_registers_adds_parameters_only():
    torch.manual_seed(0)
    ref = perturb_(Attention(dim=64, num_heads=4, qkv_bias=True)).eval()
    ours = RegisterViTAttention.from_timm(ref, num_kv_registers=2)
    assert ours.qkv is ref.qkv and ours.proj is ref.proj
    assert tuple(ours.reg_k.shape) == (2, 4, 16)
    assert set(ours.state_dict()) == set(ref.state_dict()) | {"reg_k", "reg_v"}
    with torch.no_grad():
        ours.reg_k.normal_()
        ours.reg_v.normal_()
    x = torch.randn(B, N, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).double(), naive_vit_attention(ours, x), **NAIVE_TOL)


def test_eva_from_timm_with_kv_registers():
    torch.manual_seed(0)
    ref = perturb_(EvaAttention(dim=64, num_heads=4, num_prefix_tokens=1, norm_layer=nn.LayerNorm)).eval()
    ours = RegisterEvaAttention.from_timm(ref, num_kv_registers=3)
    assert tuple(ours.reg_k.shape) == (3, 4, 16) and tuple(ours.reg_v.shape) == (3, 4, 16)
    assert ours.q_bias is ref.q_bias
    assert set(ours.state_dict()) == set(ref.state_dict()) | {"reg_k", "reg_v"}


# ------------------------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("cls", ["vit", "eva"])
def test_dropout_train_runs_and_eval_is_deterministic(cls, backend):
    torch.manual_seed(0)
    if cls == "vit":
        cfg = dict(dim=64, num_heads=4, qkv_bias=True, attn_drop=0.5, proj_drop=0.1)
        ref = perturb_(Attention(**cfg))
        ours = RegisterViTAttention(**cfg, backend=backend)
        extra = {}
    else:
        cfg = dict(dim=64, num_heads=4, num_prefix_tokens=1, attn_drop=0.5, proj_drop=0.1, norm_layer=nn.LayerNorm)
        ref = perturb_(EvaAttention(**cfg))
        ours = RegisterEvaAttention(**cfg, backend=backend)
        extra = dict(rope=torch.randn(N - 1, 32))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(B, N, 64)
    ours.train()
    y1 = ours(x, **extra)
    y2 = ours(x, **extra)
    assert y1.shape == (B, N, 64)
    assert torch.isfinite(y1).all()
    assert not torch.allclose(y1, y2), "dropout in train mode should be random"
    y1.sum().backward()
    ours.eval()
    ref.eval()
    with torch.no_grad():
        e1 = ours(x, **extra)
        e2 = ours(x, **extra)
        torch.testing.assert_close(e1, e2, atol=0, rtol=0)
        torch.testing.assert_close(e1, ref(x, **extra), **TOL)
        assert not torch.allclose(e1, y1.detach(), atol=1e-4)


# ----------------------------------------------------------------------------------------- constructor errors


def test_dim_not_divisible_by_heads_raises():
    with pytest.raises(ValueError, match="dim"):
        RegisterViTAttention(dim=30, num_heads=4)
    # an explicit head dim makes any dim valid, as in timm
    m = RegisterViTAttention(dim=30, num_heads=4, attn_head_dim=8)
    assert m(torch.randn(B, N, 30)).shape == (B, N, 30)


@pytest.mark.parametrize(
    "build",
    [
        lambda: RegisterViTAttention(96, 4, 24),
        lambda: RegisterViTAttention(96, 4, None, 64),
        lambda: RegisterEvaAttention(96, 4, True),
    ],
    ids=["vit-attn_head_dim-positional", "vit-dim_out-positional", "eva-qkv_bias-positional"],
)
def test_positional_args_past_num_heads_raise(build):
    with pytest.raises(TypeError):
        build()


@pytest.mark.parametrize("value", [-1, -5], ids=["neg1", "neg5"])
@pytest.mark.parametrize("cls", ["vit", "eva"])
def test_negative_num_kv_registers_raises(cls, value):
    with pytest.raises(ValueError, match="num_kv_registers"):
        if cls == "vit":
            RegisterViTAttention(dim=32, num_heads=4, num_kv_registers=value)
        else:
            RegisterEvaAttention(dim=32, num_heads=4, norm_layer=nn.LayerNorm, num_kv_registers=value)


@pytest.mark.parametrize("value", [True, 1.5, "2"], ids=["bool", "float", "str"])
@pytest.mark.parametrize("cls", ["vit", "eva"])
def test_non_int_num_kv_registers_raises(cls, value):
    with pytest.raises((TypeError, ValueError), match="num_kv_registers"):
        if cls == "vit":
            RegisterViTAttention(dim=32, num_heads=4, num_kv_registers=value)
        else:
            RegisterEvaAttention(dim=32, num_heads=4, norm_layer=nn.LayerNorm, num_kv_registers=value)


def test_negative_num_kv_registers_in_from_timm_raises():
    with pytest.raises(ValueError, match="num_kv_registers"):
        RegisterViTAttention.from_timm(Attention(dim=32, num_heads=4), num_kv_registers=-1)


# ------------------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("cls", ["vit", "eva"])
def test_default_backend_is_torch_on_cpu(cls):
    m = RegisterViTAttention(dim=32, num_heads=4) if cls == "vit" else RegisterEvaAttention(dim=32, num_heads=4)
    assert m.backend_name == "torch"
    assert isinstance(m.backend_reason, str) and m.backend_reason
    assert "torch" in repr(m)


BACKEND_CONFIGS = [VIT_CONFIGS[0], VIT_CONFIGS[3], VIT_CONFIGS[6], VIT_CONFIGS[8]]


@pytest.mark.parametrize("cfg", BACKEND_CONFIGS, ids=[cfg_id(c) for c in BACKEND_CONFIGS])
def test_set_backend_switches_and_results_agree(cfg):
    ref, ours = vit_pair(cfg)
    x = torch.randn(B, N, cfg["dim"])
    with torch.no_grad():
        y_torch = ours(x)
        ours.set_backend("reference")
        assert ours.backend_name == "reference"
        y_ref_backend = ours(x)
        torch.testing.assert_close(y_ref_backend, y_torch, **TOL)
        torch.testing.assert_close(y_ref_backend, ref(x), **TOL)
        ours.set_backend("torch")
        assert ours.backend_name == "torch"
        ours.set_backend(None)
        assert ours.backend_name == "torch"
    # gradients agree across backends too
    ours.set_backend("reference")
    compare_forward_backward(ref, ours, x)


def test_unknown_backend_names_fail_at_construction_and_in_set_backend():
    """A misspelt name is refused at once, naming the argument (a known backend that cannot run on the module's
    current device still builds: the module may move to its device later)."""
    with pytest.raises(ValueError, match="backend: unknown backend 'nonsense'"):
        RegisterViTAttention(dim=32, num_heads=4, backend="nonsense")
    with pytest.raises(ValueError, match="backend: unknown backend 'nonsense'"):
        RegisterEvaAttention(dim=32, num_heads=4, backend="nonsense")
    m = RegisterViTAttention(dim=32, num_heads=4, backend="torch")
    with pytest.raises(ValueError, match="backend: unknown backend 'nonsense'"):
        m.set_backend("nonsense")
    assert m.requested_backend == "torch" and m(torch.randn(B, N, 32)).shape == (B, N, 32)


@pytest.mark.parametrize("cls", ["vit", "eva"])
def test_env_var_backend_is_respected(cls, monkeypatch):
    build = (
        (lambda **kw: RegisterViTAttention(dim=32, num_heads=4, **kw))
        if cls == "vit"
        else (lambda **kw: RegisterEvaAttention(dim=32, num_heads=4, **kw))
    )
    before = build()
    assert before.backend_name == "torch"
    monkeypatch.setenv("REGKERN_BACKEND", "reference")
    m = build()
    assert m.backend_name == "reference"
    assert "REGKERN_BACKEND" in m.backend_reason
    assert build(backend="torch").backend_name == "torch"  # the argument wins over the environment
    x = torch.randn(B, N, 32)
    m.load_state_dict(before.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(m(x), before(x), **TOL)


@pytest.mark.parametrize("cls", ["vit", "eva"])
def test_double_rechooses_backend(cls):
    torch.manual_seed(0)
    if cls == "vit":
        cfg = dict(dim=64, num_heads=4, qkv_bias=True, scale_norm=True, norm_layer=nn.LayerNorm)
        ref = perturb_(Attention(**cfg)).eval()
        ours = RegisterViTAttention.from_timm(copy.deepcopy(ref))
        extra = {}
    else:
        cfg = dict(dim=64, num_heads=4, num_prefix_tokens=1, norm_layer=nn.LayerNorm)
        ref = perturb_(EvaAttention(**cfg)).eval()
        ours = RegisterEvaAttention.from_timm(copy.deepcopy(ref))
        extra = dict(rope=torch.randn(N - 1, 32, dtype=torch.float64))
    reason_fp32 = ours.backend_reason
    assert "float32" in reason_fp32
    ours.double()
    ref.double()
    assert "float64" in ours.backend_reason
    assert ours.backend_name == "torch"
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    assert all(b.dtype == torch.float64 for b in ours.buffers())
    x = torch.randn(B, N, 64, dtype=torch.float64)
    with torch.no_grad():
        y = ours(x, **extra)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, ref(x, **extra), atol=1e-12, rtol=1e-10)
    ours.float()
    assert "float32" in ours.backend_reason


def test_double_with_explicit_backend_keeps_it():
    m = RegisterViTAttention(dim=32, num_heads=4, backend="reference").double()
    assert m.backend_name == "reference"
    y = m(torch.randn(B, N, 32, dtype=torch.float64))
    assert y.dtype == torch.float64


# ---------------------------------------------------------------------------------------- RegisterEvaAttention

EVA_DIM, EVA_H = 64, 4
EVA_HD = EVA_DIM // EVA_H


def eva_id(fused, bias, sep, half, npt):
    return "-".join(
        [
            "fused" if fused else "split",
            "bias" if bias else "nobias",
            "sepbias" if sep else "linbias",
            "half" if half else "interleaved",
            f"npt{npt}",
        ]
    )


EVA_GRID = [
    (fused, bias, sep, half, npt)
    for fused in (True, False)
    for bias in (True, False)
    for sep in (True, False)
    for half in (True, False)
    for npt in (0, 1, 5)
]
EVA_GRID_IDS = [eva_id(*c) for c in EVA_GRID]


def eva_pair(seed: int = 0, **cfg):
    cfg = dict(dim=EVA_DIM, num_heads=EVA_H, norm_layer=nn.LayerNorm, **cfg)
    torch.manual_seed(seed)
    ref = perturb_(EvaAttention(**cfg))
    torch.manual_seed(seed + 100)
    ours = RegisterEvaAttention(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("fused,bias,sep,half,npt", EVA_GRID, ids=EVA_GRID_IDS)
def test_eva_state_dict_round_trip(fused, bias, sep, half, npt):
    cfg = dict(
        dim=EVA_DIM,
        num_heads=EVA_H,
        qkv_fused=fused,
        qkv_bias=bias,
        qkv_bias_separate=sep,
        rotate_half=half,
        num_prefix_tokens=npt,
        norm_layer=nn.LayerNorm,
    )
    torch.manual_seed(0)
    ref = perturb_(EvaAttention(**cfg))
    torch.manual_seed(1)
    ours = RegisterEvaAttention(**cfg)
    assert ours.num_prefix_tokens == npt
    assert sd_layout(ours) == sd_layout(ref)
    assert named_layout(ours.named_parameters()) == named_layout(ref.named_parameters())
    assert named_layout(ours.named_buffers()) == named_layout(ref.named_buffers())
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_same_state(ours, ref)
    perturb_(ours)
    torch.manual_seed(2)
    ref2 = EvaAttention(**cfg)
    ref2.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(ref2, ours)
    if fused and bias:
        assert "k_bias" in dict(ours.named_buffers())
        assert "k_bias" not in ours.state_dict()
        assert torch.equal(ours.k_bias, torch.zeros(EVA_DIM))


@pytest.mark.parametrize("rope_kind", ["rope-M", "rope-B1M", "norope"])
@pytest.mark.parametrize("fused,bias,sep,half,npt", EVA_GRID, ids=EVA_GRID_IDS)
def test_eva_forward_and_grads_match_timm(fused, bias, sep, half, npt, rope_kind):
    ref, ours = eva_pair(qkv_fused=fused, qkv_bias=bias, qkv_bias_separate=sep, rotate_half=half, num_prefix_tokens=npt)
    M = N - npt
    extra = {}
    if rope_kind == "rope-M":
        extra["rope"] = torch.randn(M, 2 * EVA_HD)
    elif rope_kind == "rope-B1M":
        extra["rope"] = torch.randn(B, 1, M, 2 * EVA_HD)
    x = torch.randn(B, N, EVA_DIM)
    compare_forward_backward(ref, ours, x, **extra)
    if "rope" in extra:  # the rope table really takes part
        with torch.no_grad():
            assert not torch.allclose(ours(x, **extra), ours(x), atol=1e-4)


EVA_EXTRA = [
    dict(qk_norm=True),
    dict(scale_norm=False),
    dict(gated=True),
    dict(qk_norm=True, scale_norm=True, gated=True, qkv_bias_separate=True),
    dict(qkv_fused=False, gated=True, qk_norm=True),
]


@pytest.mark.parametrize(
    "extra_cfg", EVA_EXTRA, ids=["-".join(f"{k}={int(v)}" for k, v in c.items()).replace("_", "") for c in EVA_EXTRA]
)
def test_eva_norm_and_gate_options_match_timm(extra_cfg):
    ref, ours = eva_pair(num_prefix_tokens=1, **extra_cfg)
    x = torch.randn(B, N, EVA_DIM)
    compare_forward_backward(ref, ours, x, rope=torch.randn(N - 1, 2 * EVA_HD))


@pytest.mark.parametrize(
    "fused,bias", [(True, True), (True, False), (False, True)], ids=["fused-bias", "fused-nobias", "split-bias"]
)
def test_eva_from_timm_reuses_parameters_buffers_and_submodules(fused, bias):
    torch.manual_seed(0)
    ref = perturb_(
        EvaAttention(
            EVA_DIM,
            num_heads=EVA_H,
            qkv_fused=fused,
            qkv_bias=bias,
            num_prefix_tokens=5,
            rotate_half=True,
            norm_layer=nn.LayerNorm,
        )
    ).eval()
    ours = RegisterEvaAttention.from_timm(ref)
    assert ours.num_prefix_tokens == 5
    assert ours.rotate_half is True
    ref_params = dict(ref.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert sorted(ours_params) == sorted(ref_params)
    for name, p in ref_params.items():
        assert ours_params[name] is p, name
    ours_buffers = dict(ours.named_buffers())
    for name, b in ref.named_buffers():
        assert ours_buffers[name] is b, name
    if fused and bias:
        assert ours.k_bias is ref.k_bias
        assert "k_bias" not in ours.state_dict()
    for name, child in ref.named_children():
        assert getattr(ours, name) is child, name
    assert sd_layout(ours) == sd_layout(ref)
    x = torch.randn(B, N, EVA_DIM)
    compare_forward_backward(ref, ours, x, rope=torch.randn(N - 5, 2 * EVA_HD))


@pytest.mark.parametrize("mask_id", MASK_IDS)
def test_eva_attn_mask_matches_timm(mask_id):
    ref, ours = eva_pair(num_prefix_tokens=1, qkv_bias=True)
    kwargs = dict(_masks(EVA_H))[mask_id]
    x = torch.randn(B, N, EVA_DIM)
    compare_forward_backward(ref, ours, x, rope=torch.randn(N - 1, 2 * EVA_HD), **kwargs)


def test_eva_k_bias_is_non_persistent_and_zero():
    ref, ours = eva_pair(num_prefix_tokens=1, qkv_bias=True)
    assert "k_bias" not in ours.state_dict()
    assert torch.equal(ours.k_bias, torch.zeros(EVA_DIM))
    ours.k_bias.fill_(3.0)
    ours.init_non_persistent_buffers()
    assert torch.equal(ours.k_bias, torch.zeros(EVA_DIM))
    # loading a state_dict does not touch it and strict loading does not ask for it
    ours.load_state_dict(ref.state_dict(), strict=True)


def naive_eva_attention(m: RegisterEvaAttention, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Fused-qkv EvaAttention (bias, no norms, no gate) with KV registers, float64 by hand."""
    P = {k: v.detach().double() for k, v in m.state_dict().items()}
    x = x.double()
    b, n, _ = x.shape
    H, d = m.num_heads, m.head_dim
    bias = torch.cat([P["q_bias"], torch.zeros_like(P["q_bias"]), P["v_bias"]])
    q, k, v = (x @ P["qkv.weight"].T + bias).reshape(b, n, 3, H, d).permute(2, 0, 3, 1, 4)
    npt = m.num_prefix_tokens
    sin, cos = rope.double().chunk(2, dim=-1)  # (M, d) each

    def rotate(t):
        body = t[:, :, npt:]
        if m.rotate_half:
            rot = torch.cat([-body[..., d // 2 :], body[..., : d // 2]], dim=-1)
        else:
            rot = torch.empty_like(body)
            rot[..., 0::2] = -body[..., 1::2]
            rot[..., 1::2] = body[..., 0::2]
        return torch.cat([t[:, :, :npt], body * cos + rot * sin], dim=2)

    q, k = rotate(q), rotate(k)
    R = m.reg_k.shape[0]
    k = torch.cat([P["reg_k"].permute(1, 0, 2).unsqueeze(0).expand(b, H, R, d), k], dim=2)
    v = torch.cat([P["reg_v"].permute(1, 0, 2).unsqueeze(0).expand(b, H, R, d), v], dim=2)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * d**-0.5, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, H * d)
    return out @ P["proj.weight"].T + P["proj.bias"]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
def test_eva_kv_registers_with_rope_match_naive(half, backend):
    torch.manual_seed(0)
    m = perturb_(
        RegisterEvaAttention(
            EVA_DIM,
            num_heads=EVA_H,
            num_prefix_tokens=5,
            scale_norm=False,
            rotate_half=half,
            num_kv_registers=2,
            backend=backend,
        )
    ).eval()
    assert tuple(m.reg_k.shape) == (2, EVA_H, EVA_HD)
    with torch.no_grad():
        m.reg_k.normal_()
        m.reg_v.normal_()
    x = torch.randn(B, N, EVA_DIM)
    rope = torch.randn(N - 5, 2 * EVA_HD)
    with torch.no_grad():
        y = m(x, rope=rope)
    torch.testing.assert_close(y.double(), naive_eva_attention(m, x, rope), **NAIVE_TOL)


def test_eva_to_double_converts_k_bias():
    ref, ours = eva_pair(num_prefix_tokens=1, qkv_bias=True)
    ours.double()
    assert ours.k_bias.dtype == torch.float64
    assert "float64" in ours.backend_reason


def test_public_api_exports_modules():
    assert regkern.RegisterViTAttention is RegisterViTAttention
    assert regkern.RegisterEvaAttention is RegisterEvaAttention
