"""The drop-ins for timm's other attention families (AttentionRope, DiffAttention, ParallelScalingBlock,
DiffParallelScalingBlock) against timm's own modules: state_dict, outputs and gradients (CPU, fp32), on the torch
and reference backends and on the Triton kernels under the interpreter."""

from __future__ import annotations

import copy

import pytest
import timm.layers
import torch
import torch.nn as nn
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock

import regkern
from regkern import (
    RegisterDiffAttention,
    RegisterDiffParallelScalingBlock,
    RegisterParallelScalingBlock,
    RegisterRopeAttention,
)
from tests.helpers import perturb_

TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = dict(atol=5e-5, rtol=5e-5)
B, N, DIM, HEADS = 2, 17, 64, 4

triton_kernels = pytest.importorskip("regkern.ops.attention.triton_kernels")
BACKENDS = ["torch", "reference"] + (["triton"] if triton_kernels.INTERPRETED else [])


def _rope(npt: int, head_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(N - npt, 2 * head_dim, generator=g)


CASES = {  # id -> (timm class, regkern class, constructor kwargs, forward kwargs factory)
    "rope-fused-qknorm": (
        timm.layers.AttentionRope,
        RegisterRopeAttention,
        dict(dim=DIM, num_heads=HEADS, qk_norm=True, norm_layer=nn.LayerNorm, num_prefix_tokens=1),
        lambda: {"rope": _rope(1, DIM // HEADS)},
    ),
    "rope-split-gqa2-half": (
        timm.layers.AttentionRope,
        RegisterRopeAttention,
        dict(dim=DIM, num_heads=HEADS, qkv_fused=False, num_kv_heads=2, rotate_half=True, num_prefix_tokens=5),
        lambda: {"rope": _rope(5, DIM // HEADS)},
    ),
    "rope-scalenorm-gated-norope": (
        timm.layers.AttentionRope,
        RegisterRopeAttention,
        dict(dim=DIM, num_heads=HEADS, scale_norm=True, gated=True, norm_layer=nn.LayerNorm, num_prefix_tokens=0),
        lambda: {},
    ),
    "diff-vectors": (timm.layers.DiffAttention, RegisterDiffAttention, dict(dim=DIM, num_heads=2, depth=3), dict),
    "diff-dual-qknorm": (
        timm.layers.DiffAttention,
        RegisterDiffAttention,
        dict(dim=DIM, num_heads=2, dual_lambda=True, qk_norm=True, qkv_bias=True),
        dict,
    ),
    "parallel": (ParallelScalingBlock, RegisterParallelScalingBlock, dict(dim=DIM, num_heads=HEADS), dict),
    "parallel-qknorm": (
        ParallelScalingBlock,
        RegisterParallelScalingBlock,
        dict(dim=DIM, num_heads=HEADS, qk_norm=True),
        dict,
    ),
    "parallel-bias-fusedout": (
        ParallelScalingBlock,
        RegisterParallelScalingBlock,
        dict(dim=DIM, num_heads=HEADS, qkv_bias=True, qk_norm=True, fuse_out_proj=True, init_values=0.5),
        dict,
    ),
    "diffparallel": (DiffParallelScalingBlock, RegisterDiffParallelScalingBlock, dict(dim=DIM, num_heads=2), dict),
    "diffparallel-dual-qknorm": (
        DiffParallelScalingBlock,
        RegisterDiffParallelScalingBlock,
        dict(dim=DIM, num_heads=2, dual_lambda=True, qk_norm=True, depth=2),
        dict,
    ),
}


def pair(case: str, backend: str, seed: int = 0):
    timm_cls, ours_cls, cfg, _ = CASES[case]
    torch.manual_seed(seed)
    ref = perturb_(timm_cls(**cfg), seed).eval()
    ours = ours_cls.from_timm(copy.deepcopy(ref), backend=backend).eval()
    return ref, ours


def forward_backward(module, x, grad_out=None, **kwargs):
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    y = module(xi, **kwargs)
    grad_out = torch.randn_like(y) if grad_out is None else grad_out
    y.backward(grad_out)
    return y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}, grad_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_family_forward_and_gradients_match_timm(case, backend):
    ref, ours = pair(case, backend)
    assert ours.backend_name == backend
    kwargs = CASES[case][3]()
    x = torch.randn(B, N, DIM, generator=torch.Generator().manual_seed(2))
    y_ref, dx_ref, g_ref, grad_out = forward_backward(ref, x, **kwargs)
    y, dx, g, _ = forward_backward(ours, x, grad_out, **kwargs)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **GRAD_TOL)
    assert list(g) == list(g_ref)
    nonzero = 0
    for name, gr in g_ref.items():
        if gr is None:
            assert g[name] is None, name
            continue
        torch.testing.assert_close(g[name], gr, **GRAD_TOL, msg=lambda m, n=name: f"grad {n}: {m}")
        nonzero += int(gr.abs().sum() > 0)
    assert nonzero >= len(g_ref) - 2  # real gradients, not zeros


@pytest.mark.parametrize("case", list(CASES))
def test_family_state_dict_and_constructor_are_timms(case):
    timm_cls, ours_cls, cfg, _ = CASES[case]
    torch.manual_seed(0)
    ref = perturb_(timm_cls(**cfg), 0)
    adopted = ours_cls.from_timm(ref)
    assert list(adopted.state_dict()) == list(ref.state_dict())
    for (name, p), (name_ref, p_ref) in zip(adopted.named_parameters(), ref.named_parameters()):
        assert name == name_ref and p is p_ref  # the same Parameter objects, no copies
    built = ours_cls(**cfg)  # timm's constructor arguments
    assert type(built) is ours_cls and list(built.state_dict()) == list(ref.state_dict())
    built.load_state_dict(ref.state_dict(), strict=True)
    fresh = timm_cls(**cfg)
    fresh.load_state_dict(built.state_dict(), strict=True)
    with pytest.raises(TypeError, match=f"expected a .*{timm_cls.__name__}"):
        ours_cls.from_timm(nn.Linear(4, 4))


def test_family_attn_mask_matches_timm():
    ref, ours = pair("rope-fused-qknorm", "torch")
    x = torch.randn(B, N, DIM)
    mask = torch.rand(B, 1, N, N) > 0.3
    mask[..., 0] = True
    kwargs = CASES["rope-fused-qknorm"][3]()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, attn_mask=mask, **kwargs), ref(x, attn_mask=mask, **kwargs), **TOL)
    ref, ours = pair("diff-vectors", "torch")
    with torch.no_grad():
        torch.testing.assert_close(ours(x, attn_mask=mask), ref(x, attn_mask=mask), **TOL)


def test_rope_attention_takes_kv_registers_and_statistics():
    _, ours = pair("rope-fused-qknorm", "reference")
    ours.add_kv_registers(3)
    assert tuple(ours.reg_k.shape) == (3, HEADS, DIM // HEADS)
    seen = []
    ours.set_monitoring(("out_norm",), seen.append)
    with torch.no_grad():
        ours(torch.randn(B, N, DIM), **CASES["rope-fused-qknorm"][3]())
    assert tuple(seen[0].out_norm.shape) == (B, N)


@pytest.mark.parametrize("case", ["diff-vectors", "diffparallel"])
def test_differential_attention_refuses_statistics_and_kv_registers_with_the_reason(case):
    _, ours = pair(case, "torch")
    with pytest.raises(ValueError, match="stats: RegisterDiff.* two softmax maps"):
        ours.set_monitoring(("out_norm",), print)
    with pytest.raises(ValueError, match="num: RegisterDiff.* takes no KV registers"):
        ours.add_kv_registers(2)
    assert ours.kernel_head_dim == 2 * ours.head_dim  # q/k padded to the value's head dim
    assert "differential attention" in regkern.explain(nn.Sequential(ours))


def test_parallel_block_runs_qk_norm_in_the_prologue_where_the_backend_can():
    _, ours = pair("parallel-qknorm", "torch")
    assert "separate PyTorch ops" in ours.prologue_reason
    if triton_kernels.INTERPRETED:
        ours.set_backend("triton")
        assert ours.prologue_reason == "q_norm/k_norm (LayerNorm) inside the attention op (its prologue pre-pass)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["rope-split-gqa2-half", "diff-dual-qknorm", "parallel-qknorm", "diffparallel"])
def test_family_half_precision_error_within_twice_timms(case, dtype):
    """In bf16/fp16 (torch backend on the CPU) the drop-in's error against a float64 run of timm's module is at most
    twice timm's own error in that dtype."""
    ref, ours = pair(case, "torch")
    kwargs = CASES[case][3]()
    x = torch.randn(B, N, DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(x.double(), **{k: v.double() for k, v in kwargs.items()})
        low = {k: v.to(dtype) for k, v in kwargs.items()}
        timm_error = (copy.deepcopy(ref).to(dtype)(x.to(dtype), **low).double() - exact).abs().max().item()
        ours_low = copy.deepcopy(ours).to(dtype)
        assert ours_low.backend_name == "torch"
        our_error = (ours_low(x.to(dtype), **low).double() - exact).abs().max().item()
    assert 0 < timm_error and our_error <= 2 * timm_error, (our_error, timm_error)


@pytest.mark.parametrize("case", ["rope-fused-qknorm", "diff-vectors", "parallel", "diffparallel"])
def test_family_dropout_in_train_mode_and_none_in_eval(case):
    timm_cls, ours_cls, cfg, make_kwargs = CASES[case]
    torch.manual_seed(0)
    ref = perturb_(timm_cls(**cfg, attn_drop=0.5), 0)
    ours = ours_cls.from_timm(copy.deepcopy(ref), backend="torch").train()
    x, kwargs = torch.randn(B, N, DIM), make_kwargs()
    with torch.no_grad():
        first, second = ours(x, **kwargs), ours(x, **kwargs)
        assert torch.isfinite(first).all() and not torch.allclose(first, second)  # dropout draws masks
        torch.testing.assert_close(ours.eval()(x, **kwargs), ref.eval()(x, **kwargs), **TOL)


def test_older_timm_modules_without_head_dim_attributes_are_adopted():
    """timm 1.0.20's AttentionRope and EvaAttention store neither head_dim nor the K/V head counts: they are read off
    the projections (simulated by deleting the attributes newer timm sets)."""
    from timm.models.eva import EvaAttention

    ref, ours = pair("rope-split-gqa2-half", "torch")
    old = copy.deepcopy(ref)
    for name in ("head_dim", "attn_dim", "kv_dim", "num_kv_heads", "num_kv_groups"):
        delattr(old, name)
    adopted = RegisterRopeAttention.from_timm(old)
    assert (adopted.head_dim, adopted.num_kv_heads, adopted.num_kv_groups) == (ours.head_dim, 2, 2)
    assert adopted.rotate_half
    x, kwargs = torch.randn(B, N, DIM), CASES["rope-split-gqa2-half"][3]()
    with torch.no_grad():
        torch.testing.assert_close(adopted.eval()(x, **kwargs), ref(x, **kwargs), **TOL)
    eva = EvaAttention(DIM, num_heads=HEADS, attn_head_dim=8, norm_layer=nn.LayerNorm)
    del eva.head_dim
    assert regkern.RegisterEvaAttention.from_timm(eva).head_dim == 8
