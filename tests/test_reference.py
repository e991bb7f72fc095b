"""The reference semantics against an independent naive float64 computation that materialises attention."""

import math

import pytest
import torch

import regkern
from regkern import reference
from tests.helpers import case_id, packed_qkv, registers


def naive_attention(q, k, v, reg_k=None, reg_v=None, scale=None, num_prefix=0):
    """Loop over (batch, head) in float64: scores, softmax by hand, weighted sum. Returns out and all stats."""
    B, N, H, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    R = 0 if reg_k is None else reg_k.shape[-3]
    out = torch.empty(B, N, H, d, dtype=torch.float64)
    lse = torch.empty(B, H, N, dtype=torch.float64)
    received = torch.empty(B, H, R + N, dtype=torch.float64)
    rows = torch.empty(B, H, num_prefix, R + N, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            keys, vals = k[b, :, h].double(), v[b, :, h].double()
            if R:
                rk = reg_k[:, h] if reg_k.dim() == 3 else reg_k[b, :, h]
                rv = reg_v[:, h] if reg_v.dim() == 3 else reg_v[b, :, h]
                keys, vals = torch.cat([rk.double(), keys]), torch.cat([rv.double(), vals])
            s = (q[b, :, h].double() @ keys.T) * scale
            m = s.max(dim=1, keepdim=True).values
            e = torch.exp(s - m)
            z = e.sum(dim=1, keepdim=True)
            p = e / z
            out[b, :, h] = p @ vals
            lse[b, h] = (m + torch.log(z)).squeeze(1)
            received[b, h] = p.sum(dim=0)
            rows[b, h] = p[:num_prefix]
    out_norm = out.reshape(B, N, H * d).norm(dim=-1)
    return out, {"lse": lse, "out_norm": out_norm, "received": received, "prefix_rows": rows}


CASES = [
    # (B, N, H, d, R, shared)
    (2, 1, 2, 64, 0, True),
    (1, 2, 3, 64, 1, True),
    (2, 17, 2, 72, 4, False),
    (1, 197, 2, 64, 4, True),
    (1, 261, 2, 72, 1, False),
    (2, 17, 1, 32, 0, True),
]


def reference_case_id(c):
    B, N, H, d, R, shared = c
    return case_id("shared" if shared else "perbatch", B=B, N=N, H=H, D=d, R=R)


@pytest.mark.parametrize("case", CASES, ids=reference_case_id)
def test_reference_matches_naive(case):
    B, N, H, d, R, shared = case
    q, k, v = packed_qkv(B, N, H, d, seed=N + R)
    assert not q.is_contiguous()  # strided views straight from the packed tensor
    reg_k, reg_v = registers(B, R, H, d, shared, seed=d)
    P = min(N, 5)
    out, stats = regkern.register_attention(
        q, k, v, reg_k, reg_v, return_stats=reference.STAT_NAMES, num_prefix=P, backend="reference"
    )
    want, want_stats = naive_attention(q, k, v, reg_k, reg_v, num_prefix=P)
    assert out.shape == (B, N, H, d) and out.is_contiguous() and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    assert set(stats) == set(reference.STAT_NAMES)
    for name, value in want_stats.items():
        assert stats[name].dtype == torch.float32
        assert getattr(stats, name) is stats[name]
        torch.testing.assert_close(stats[name].double(), value, atol=2e-5, rtol=2e-5, msg=name)
    # probabilities: every full row sums to one; received sums to N per head
    torch.testing.assert_close(stats.prefix_rows.sum(-1), torch.ones(B, H, P), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.received.sum(-1), torch.full((B, H), float(N)), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=reference_case_id)
def test_torch_backend_matches_reference(case):
    B, N, H, d, R, shared = case
    q, k, v = packed_qkv(B, N, H, d, seed=3 * N + R)
    reg_k, reg_v = registers(B, R, H, d, shared)
    fast = regkern.register_attention(q, k, v, reg_k, reg_v, backend="torch")
    ref = regkern.register_attention(q, k, v, reg_k, reg_v, backend="reference")
    assert fast.shape == (B, N, H, d) and fast.is_contiguous()
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradients_match_naive(backend):
    B, N, H, d, R = 2, 17, 2, 72, 4
    q, k, v = (t.clone().requires_grad_() for t in packed_qkv(B, N, H, d, seed=11))
    reg_k, reg_v = (t.requires_grad_() for t in registers(B, R, H, d, shared=True))
    inputs = (q, k, v, reg_k, reg_v)
    grad_out = torch.randn(B, N, H, d, generator=torch.Generator().manual_seed(5))
    out = regkern.register_attention(*inputs, scale=0.3, backend=backend)
    got = torch.autograd.grad(out, inputs, grad_out)

    def naive(q, k, v, rk, rv):  # float64 autograd of the textbook formula
        keys = torch.cat([rk.unsqueeze(0).expand(B, -1, -1, -1), k], 1).transpose(1, 2)
        vals = torch.cat([rv.unsqueeze(0).expand(B, -1, -1, -1), v], 1).transpose(1, 2)
        p = torch.softmax(q.transpose(1, 2) @ keys.transpose(-1, -2) * 0.3, dim=-1)
        return (p @ vals).transpose(1, 2)

    doubles = [t.detach().double().requires_grad_() for t in inputs]
    want = torch.autograd.grad(naive(*doubles), doubles, grad_out.double())
    for name, g, w in zip(["q", "k", "v", "reg_k", "reg_v"], got, want):
        torch.testing.assert_close(g.double(), w, atol=3e-5, rtol=3e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attn_mask_applies_to_tokens_only(backend, kind):
    B, N, H, d, R = 2, 9, 2, 32, 3
    q, k, v = packed_qkv(B, N, H, d, seed=21)
    reg_k, reg_v = registers(B, R, H, d, shared=False)
    keep = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(2)) > 0.4
    mask = keep if kind == "bool" else torch.where(keep, 0.0, -1e4) + torch.randn(B, 1, N, N) * 0.1
    out = regkern.register_attention(q, k, v, reg_k, reg_v, attn_mask=mask, backend=backend)
    bias = torch.where(keep, 0.0, float("-inf")) if kind == "bool" else mask
    keys = torch.cat([reg_k, k], 1).transpose(1, 2).double()
    vals = torch.cat([reg_v, v], 1).transpose(1, 2).double()
    s = q.transpose(1, 2).double() @ keys.transpose(-1, -2) * d**-0.5
    s = s + torch.nn.functional.pad(bias.double(), (R, 0))
    want = (torch.softmax(s, -1) @ vals).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_half_precision_reference_accumulates_in_fp32():
    B, N, H, d = 1, 197, 2, 64
    q, k, v = packed_qkv(B, N, H, d, dtype=torch.float16, seed=4)
    out = regkern.register_attention(q, k, v, backend="reference")
    want, _ = naive_attention(q, k, v)
    assert out.dtype == torch.float16
    # one rounding to fp16 at the end: error within half an fp16 ulp of the exact result (plus fp32 noise)
    err = (out.double() - want).abs()
    assert (err <= want.abs() * 2**-11 + 1e-4).all()


def test_layer_norm_with_norms():
    x = torch.randn(2, 17, 72) * 3 + 1
    w, b = torch.randn(72), torch.randn(72)
    y, norms = regkern.layer_norm_with_norms(x, w, b, 1e-6)
    xd = x.double()
    mu, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(
        y.double(), (xd - mu) / torch.sqrt(var + 1e-6) * w.double() + b.double(), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(norms.double(), xd.pow(2).sum(-1).sqrt(), atol=1e-5, rtol=1e-6)
    assert norms.shape == (2, 17) and norms.dtype == torch.float32
    y2, n2 = regkern.layer_norm_with_norms(x.half(), None, None, 1e-5)
    assert y2.dtype == torch.float16 and n2.dtype == torch.float32
    torch.testing.assert_close(n2, x.half().float().norm(dim=-1), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "name",
    [
        "vit_small_patch14_reg4_dinov2",
        "vit_base_patch16_reg4_gap_256",
        "deit3_small_patch16_224",
        "vit_tiny_patch16_224",
    ],
)
def test_embed_tokens_matches_timm_pos_embed(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32).eval()
    with torch.no_grad():  # make every prefix token and position distinct and non-zero
        for t in (model.cls_token, model.reg_token, model.pos_embed):
            if t is not None:
                t.normal_()
    patches = model.patch_embed(torch.randn(2, 3, 32, 32))
    want = model._pos_embed(patches)
    got = regkern.embed_tokens(
        patches, model.pos_embed, model.cls_token, model.reg_token, no_embed_class=model.no_embed_class
    )
    assert got.shape == want.shape == (2, model.num_prefix_tokens + patches.shape[1], model.embed_dim)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_embed_tokens_without_pos_embed_and_grid_input():
    x = torch.randn(2, 3, 4, 8)
    cls, reg = torch.randn(1, 1, 8), torch.randn(1, 2, 8)
    out = regkern.embed_tokens(x, None, cls, reg)
    torch.testing.assert_close(out, torch.cat([cls.expand(2, -1, -1), reg.expand(2, -1, -1), x.reshape(2, 12, 8)], 1))


def test_apply_rope_matches_timm():
    pytest.importorskip("timm")
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    B, N, H, d, P = 2, 13, 3, 16, 5
    t = torch.randn(B, N, H, d)
    rope = torch.randn(N - P, 2 * d)
    for half in (False, True):
        got = reference.apply_rope(t, rope, P, rotate_half=half)
        th = t.transpose(1, 2)
        want = torch.cat([th[:, :, :P], apply_rot_embed_cat(th[:, :, P:], rope, half=half)], 2).transpose(1, 2)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_norm_statistics_equals_a_per_group_loop():
    """The vectorised monitor reduction against a plain per-group computation (empty groups included)."""
    g = torch.Generator().manual_seed(0)
    edges = torch.logspace(-2, 4, 49, dtype=torch.float64)[1:-1].float()
    for num_cls, num_prefix in ((1, 5), (0, 0), (0, 4), (1, 1)):
        norms = torch.rand(3, 23, generator=g) * 300
        stats = reference.norm_statistics(norms, num_cls, num_prefix, 150.0, edges)
        parts = (norms[:, :num_cls], norms[:, num_cls:num_prefix], norms[:, num_prefix:])
        for i, part in enumerate(parts):
            x = part.reshape(-1)
            assert int(stats.count[i]) == x.numel()
            assert int(stats.outliers[i]) == int((x > 150.0).sum())
            assert float(stats.maximum[i]) == (float(x.max()) if x.numel() else 0.0)
            assert float(stats.total[i]) == pytest.approx(float(x.double().sum()), rel=1e-12)
            assert float(stats.total_sq[i]) == pytest.approx(float(x.double().square().sum()), rel=1e-12)
            hist = torch.bincount(torch.bucketize(x, edges), minlength=edges.numel() + 1)
            assert torch.equal(stats.histogram[i], hist)
