"""Key masks (broadcastable to (B, 1, 1, N): padding) in the Triton kernels: forward, statistics and backward
against the reference, which applies the same mask to the token keys (registers are never masked).

Under TRITON_INTERPRET=1 on the CPU (fp32, fp16). Tolerance: error <= 2x PyTorch's own error at the same precision
against a float64 reference (3x for gradients), with every output NaN-prefilled.
"""

import pytest
import torch

import regkern
from regkern import reference
from regkern.ops.attention import is_key_mask, key_bias_from_mask
from tests.helpers import case_id, max_error, packed_qkv, registers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_kernels = pytest.importorskip("regkern.ops.attention.triton_kernels")
if DEVICE == "cpu" and not triton_kernels.INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
STATS = ("out_norm", "received", "received_groups")
CASES = [  # B, N, H, d, R, P, shared registers, dtype, mask kind
    (2, 1, 1, 32, 4, 0, True, "fp32", "bool"),
    (2, 17, 2, 64, 0, 1, True, "fp16", "bool"),
    (2, 17, 1, 64, 4, 5, False, "fp32", "additive"),
    (2, 70, 1, 32, 4, 5, True, "fp16", "bool-first-tile"),
    (1, 130, 2, 64, 3, 0, False, "fp32", "additive"),
    (2, 197, 1, 64, 4, 5, True, "fp16", "bool"),
]


def mask_case_id(case):
    B, N, H, d, R, P, shared, dt, kind = case
    return case_id(kind, "shared" if shared else "perbatch", B=B, N=N, H=H, D=d, R=R, P=P, dtype=dt)


def make_mask(kind: str, B: int, N: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, N, generator=g) > 0.35
    valid[:, -1] = True  # every row keeps a key (rows with none are tested on their own)
    if kind == "bool-first-tile":
        valid[0, : min(N - 1, 64)] = False  # whole leading key tiles masked: the running max starts at -inf
    if kind == "additive":
        bias = torch.randn(B, N, generator=g).masked_fill(~valid, float("-inf"))
        return bias[:, None, None, :].to(DEVICE)
    return valid[:, None, None, :].to(DEVICE)


def float64_masked(q, k, v, reg_k, reg_v, mask, P, stats=()):
    def to64(t):
        return None if t is None else t.double()

    mask64 = mask if mask.dtype == torch.bool else mask.double()
    return reference.register_attention(
        to64(q), to64(k), to64(v), to64(reg_k), to64(reg_v), num_prefix=P, attn_mask=mask64,
        return_stats=("lse",) + stats,
    )  # fmt: skip


def eager_masked(q, k, v, reg_k, reg_v, mask, scale):
    """PyTorch eager attention at the inputs' precision (the yardstick of the 2x rule)."""
    bias = reference.token_mask_to_bias(mask, 0 if reg_k is None else reg_k.shape[-3], q.dtype)
    if reg_k is not None:
        B = q.shape[0]
        k = torch.cat([reference.batched_registers(reg_k, B), k], 1)
        v = torch.cat([reference.batched_registers(reg_v, B), v], 1)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale + bias
    return torch.einsum("bhnm,bmhd->bnhd", s.float().softmax(-1).to(q.dtype), v)


@pytest.mark.parametrize("case", CASES, ids=mask_case_id)
def test_masked_forward_and_statistics_match_the_reference(case):
    B, N, H, d, R, P, shared, dt, kind = case
    dtype = DTYPES[dt]
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device=DEVICE, seed=N + d)
    reg_k, reg_v = registers(B, R, H, d, shared, dtype=dtype, device=DEVICE, seed=R + 5)
    mask = make_mask(kind, B, N, seed=N)
    assert is_key_mask(mask)
    out = torch.full((B, N, H, d), float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full((B, H, N), float("nan"), device=DEVICE)
    key_bias = key_bias_from_mask(mask, B, N)
    _, _, stats = triton_kernels.attention_forward(
        q, k, v, reg_k, reg_v, d**-0.5, P, out=out, lse=lse, stats=STATS, key_bias=key_bias
    )
    ref, ref_stats = float64_masked(q, k, v, reg_k, reg_v, mask, P, STATS)
    own = max(max_error(eager_masked(q, k, v, reg_k, reg_v, mask, d**-0.5), ref), 4 * torch.finfo(torch.float32).eps)
    assert not out.isnan().any() and not lse.isnan().any()
    assert max_error(out, ref) <= 2 * own
    torch.testing.assert_close(lse.double(), ref_stats.lse.double(), atol=2e-3, rtol=1e-3)
    for name in STATS:
        torch.testing.assert_close(stats[name].double(), ref_stats[name].double(), atol=2e-3, rtol=2e-3, msg=name)
    masked_keys = ~key_bias.isfinite()
    assert (stats["received"][:, :, R:].permute(0, 2, 1)[masked_keys] == 0).all()  # masked keys receive nothing
    # the group shares alone (NormMonitor's request) take only the small segment; the patches get the rest of each row
    _, _, alone = triton_kernels.attention_forward(
        q, k, v, reg_k, reg_v, d**-0.5, P, stats=("received_groups",), key_bias=key_bias
    )
    torch.testing.assert_close(
        alone["received_groups"].double(), ref_stats["received_groups"].double(), atol=2e-3, rtol=2e-3
    )


@pytest.mark.parametrize("case", CASES[1:5], ids=mask_case_id)
def test_masked_backward_matches_the_reference(case):
    B, N, H, d, R, P, shared, dt, kind = case
    dtype = DTYPES[dt]
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device=DEVICE, seed=N + d + 1)
    reg_k, reg_v = registers(B, R, H, d, shared, dtype=dtype, device=DEVICE, seed=R + 6)
    mask = make_mask(kind, B, N, seed=N + 1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((reg_k, reg_v) if R else ())]
    regs = leaves[3:] if R else [None, None]
    out = regkern.register_attention(*leaves[:3], *regs, num_prefix=P, attn_mask=mask, backend="triton")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    regs64 = leaves64[3:] if R else [None, None]
    mask64 = mask if mask.dtype == torch.bool else mask.double()
    ref = reference.register_attention(*leaves64[:3], *regs64, num_prefix=P, attn_mask=mask64)
    want = torch.autograd.grad(ref, leaves64, g.double())
    low = [t.detach().clone().requires_grad_() for t in leaves]
    eager = eager_masked(*low[:3], *(low[3:] if R else [None, None]), mask, d**-0.5)
    eager_grads = torch.autograd.grad(eager, low, g)
    for name, a, b, e in zip(["dq", "dk", "dv", "dreg_k", "dreg_v"], got, want, eager_grads):
        own = max(max_error(e, b), 8 * torch.finfo(torch.float32).eps)
        assert max_error(a, b) <= 3 * own, name


@pytest.mark.parametrize("R", [0, 3])
def test_a_row_whose_keys_are_all_masked_attends_the_registers_or_is_nan_as_in_the_reference(R):
    B, N, H, d = 2, 17, 1, 32
    q, k, v = packed_qkv(B, N, H, d, device=DEVICE, seed=1)
    reg_k, reg_v = registers(B, R, H, d, True, device=DEVICE, seed=2)
    mask = torch.ones(B, 1, 1, N, dtype=torch.bool, device=DEVICE)
    mask[1] = False  # every token key of batch row 1
    out = regkern.register_attention(q, k, v, reg_k, reg_v, attn_mask=mask, backend="triton")
    ref = reference.register_attention(q, k, v, reg_k, reg_v, attn_mask=mask)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    if R:
        torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)  # the registers only
    else:
        assert out[1].isnan().all() and ref[1].isnan().all()


def test_masks_that_vary_over_queries_stay_on_a_backend_that_has_them_and_explain_says_so():
    module = regkern.RegisterViTAttention(64, 2, backend="triton")
    assert module.key_masked_backend_name == "triton"
    assert "other attn_mask -> triton (unavailable)" in regkern.explain(module)
    auto = regkern.RegisterViTAttention(64, 2)  # on the CPU: torch for everything
    auto.load_state_dict(module.state_dict())
    assert auto.key_masked_backend_name == auto.masked_backend_name == "torch"
    x = torch.randn(2, 9, 64)
    key_mask = torch.rand(2, 1, 1, 9) > 0.3
    key_mask[..., 0] = True
    with torch.no_grad():
        torch.testing.assert_close(module(x, attn_mask=key_mask), auto(x, attn_mask=key_mask), atol=1e-5, rtol=1e-5)
    request = regkern.AttentionRequest.from_tensors(x.view(2, 9, 2, 32), attn_mask=torch.ones(9, 9, dtype=torch.bool))
    assert not request.key_mask
    reasons = regkern.get_backend("triton").not_supported_reasons(request)
    assert any("key masks only" in r for r in reasons)


@pytest.mark.parametrize("shape", [(9,), (1, 9), (1, 1, 9), (2, 1, 1, 9)], ids=lambda s: "x".join(map(str, s)))
def test_key_mask_shapes_broadcast_like_sdpa(shape):
    B, N = 2, 9
    mask = torch.rand(shape) > 0.3
    assert is_key_mask(mask)
    bias = key_bias_from_mask(mask, B, N)
    full = reference.token_mask_to_bias(mask, 0, torch.float32)
    assert bias.shape == (B, N) and torch.equal(bias, full.expand(B, 1, N, N)[:, 0, 0])
    assert not is_key_mask(torch.ones(2, 9, 9, dtype=torch.bool))  # varies over queries
    assert not is_key_mask(torch.ones(2, 3, 1, 9, dtype=torch.bool))  # varies over heads
    assert not is_key_mask(torch.ones(2, 1, 9, dtype=torch.bool))  # SDPA reads 3 dims as (H, N, N): over heads


@pytest.mark.parametrize("fill", ["finfo-min", "minus-inf"])
def test_timm_style_additive_masks_with_every_key_masked_match_the_reference(fill):
    """timm masks with finfo(float32).min, not -inf: a row whose keys all carry it averages them (the reference's
    answer), which the kernels keep by not letting bias / scale overflow to -inf."""
    B, N, H, d = 2, 17, 1, 32
    q, k, v = packed_qkv(B, N, H, d, device=DEVICE, seed=3)
    value = torch.finfo(torch.float32).min if fill == "finfo-min" else float("-inf")
    mask = torch.zeros(B, 1, 1, N, device=DEVICE)
    mask[1] = value  # every key of batch row 1
    mask[0, ..., :5] = value
    out = regkern.register_attention(q, k, v, attn_mask=mask, scale=0.1, backend="triton")
    ref = reference.register_attention(q, k, v, attn_mask=mask, scale=0.1)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    if fill == "finfo-min":
        torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    else:
        assert out[1].isnan().all() and ref[1].isnan().all()


def test_key_mask_argument_is_a_per_image_key_validity_vector():
    B, N, H, d = 2, 17, 1, 32
    q, k, v = packed_qkv(B, N, H, d, device=DEVICE, seed=4)
    valid = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    valid[1, 9:] = False  # image 1 has 9 tokens, padded to 17
    out = regkern.register_attention(q, k, v, key_mask=valid, backend="triton")
    want = regkern.register_attention(q, k, v, attn_mask=valid[:, None, None, :], backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    alone = reference.register_attention(q[1:, :9], k[1:, :9], v[1:, :9])  # image 1 by itself
    torch.testing.assert_close(out[1:, :9], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="key_mask: expected a \\(B, N\\) = \\(2, 17\\) tensor"):
        regkern.register_attention(q, k, v, key_mask=valid[:, :5])
    with pytest.raises(ValueError, match="key_mask: pass either attn_mask or key_mask"):
        regkern.register_attention(q, k, v, key_mask=valid, attn_mask=valid[:, None, None, :])
