"""Triton register attention (forward, backward, ops, dispatch) against the reference.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (fp32 and fp16; the interpreter
mis-computes bf16), with tiny B*H so the suite stays fast. Tolerance: kernel error <= 2x PyTorch's own error at the
same precision against a float64 reference (3x for gradients).
"""

import math

import pytest
import torch

import regkern
from regkern import reference
from tests.helpers import case_id, eager_attention, max_error, packed_qkv, registers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_kernels = pytest.importorskip("regkern.ops.attention.triton_kernels")
if DEVICE == "cpu" and not triton_kernels.INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from regkern.ops.attention.op import attention_bwd, attention_fwd  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def triton_case_id(case):
    B, N, H, d, R, P, shared, dt = case
    return case_id("shared" if shared else "perbatch", B=B, N=N, H=H, D=d, R=R, P=P, dtype=dt)


# a covering set of N x d x R x P x registers x dtype (every value of each appears)
FORWARD_CASES = [
    (1, 1, 2, 64, 0, 0, True, "fp32"),
    (2, 1, 1, 32, 4, 1, False, "fp16"),
    (1, 2, 2, 72, 1, 1, True, "fp32"),
    (2, 17, 1, 64, 4, 5, True, "fp16"),
    (1, 17, 2, 128, 16, 0, False, "fp32"),
    (1, 64, 1, 32, 16, 5, True, "fp32"),
    (2, 64, 1, 72, 0, 1, True, "fp16"),
    (1, 197, 1, 64, 1, 1, False, "fp32"),
    (1, 197, 1, 128, 4, 0, True, "fp16"),
    (1, 261, 1, 64, 4, 5, True, "fp16"),
    (1, 261, 1, 72, 16, 5, False, "fp32"),
]


def float64_reference(q, k, v, reg_k, reg_v, scale=None):
    def to64(t):
        return None if t is None else t.double()

    out, stats = reference.register_attention(
        to64(q), to64(k), to64(v), to64(reg_k), to64(reg_v), scale=scale, return_stats=("lse",)
    )
    return out, stats.lse


def own_error(q, k, v, reg_k, reg_v, ref):
    """PyTorch's error at the inputs' precision (eager attention), floored at a few units of float32 rounding."""
    return max(max_error(eager_attention(q, k, v, reg_k, reg_v), ref), 4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=triton_case_id)
def test_forward_matches_reference(case):
    B, N, H, d, R, P, shared, dt = case
    dtype = DTYPES[dt]
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device=DEVICE, seed=N * 7 + d)
    reg_k, reg_v = registers(B, R, H, d, shared, dtype=dtype, device=DEVICE, seed=R + 3)
    assert q.stride(1) == 3 * H * d  # strided views of a packed qkv tensor
    out = torch.full((B, N, H, d), float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full((B, H, N), float("nan"), dtype=torch.float32, device=DEVICE)
    triton_kernels.attention_forward(q, k, v, reg_k, reg_v, d**-0.5, P, out=out, lse=lse)
    assert not out.isnan().any() and not lse.isnan().any()
    ref_out, ref_lse = float64_reference(q, k, v, reg_k, reg_v)
    assert max_error(out, ref_out) <= 2 * own_error(q, k, v, reg_k, reg_v, ref_out)
    assert max_error(lse, ref_lse) <= 1e-5 * max(1.0, ref_lse.abs().max().item())


BACKWARD_CASES = [
    (1, 1, 2, 32, 1, 1, True, "fp32"),
    (2, 17, 1, 64, 4, 5, True, "fp32"),
    (1, 17, 2, 72, 16, 0, False, "fp16"),
    (2, 64, 1, 128, 0, 1, True, "fp32"),
    (1, 197, 1, 64, 4, 5, False, "fp32"),
    (1, 261, 1, 64, 4, 5, True, "fp16"),
]


def naive_float64_grads(q, k, v, reg_k, reg_v, grad_out, scale):
    """Autograd of the textbook formula in float64: an independent oracle for every gradient."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    regs = [None if t is None else t.detach().double().requires_grad_() for t in (reg_k, reg_v)]
    B = q.shape[0]
    keys, vals = leaves[1], leaves[2]
    if regs[0] is not None:
        expand = (lambda r: r.unsqueeze(0).expand(B, -1, -1, -1)) if regs[0].dim() == 3 else (lambda r: r)
        keys, vals = torch.cat([expand(regs[0]), keys], 1), torch.cat([expand(regs[1]), vals], 1)
    p = torch.softmax(leaves[0].transpose(1, 2) @ keys.permute(0, 2, 3, 1) * scale, dim=-1)
    out = (p @ vals.transpose(1, 2)).transpose(1, 2)
    inputs = leaves + [r for r in regs if r is not None]
    return torch.autograd.grad(out, inputs, grad_out.double())


def eager_grads(q, k, v, reg_k, reg_v, grad_out):
    """PyTorch's own gradients at the inputs' precision (autograd of eager attention)."""
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v) + ((reg_k, reg_v) if reg_k is not None else ())]
    regs = inputs[3:] if reg_k is not None else (None, None)
    out = eager_attention(*inputs[:3], *regs)
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=triton_case_id)
def test_backward_matches_reference(case):
    B, N, H, d, R, P, shared, dt = case
    dtype = DTYPES[dt]
    scale = d**-0.5
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device=DEVICE, seed=N + d)
    reg_k, reg_v = registers(B, R, H, d, shared, dtype=dtype, device=DEVICE, seed=R)
    grad_out = torch.randn(B, N, H, d, generator=torch.Generator().manual_seed(N)).to(DEVICE, dtype)
    out, lse = triton_kernels.attention_forward(q, k, v, reg_k, reg_v, scale, P)
    nan = float("nan")
    buffers = tuple(torch.full((B, N, H, d), nan, dtype=dtype, device=DEVICE) for _ in range(3)) + tuple(
        torch.full((B, max(R, 1), H, d), nan, dtype=torch.float32, device=DEVICE) for _ in range(2)
    )
    grads = triton_kernels.attention_backward(grad_out, q, k, v, reg_k, reg_v, out, lse, scale, P, grad_buffers=buffers)
    grads = [g for g in grads if g is not None]
    want = naive_float64_grads(q, k, v, reg_k, reg_v, grad_out, scale)
    own = eager_grads(q, k, v, reg_k, reg_v, grad_out)
    names = ["dq", "dk", "dv", "dreg_k", "dreg_v"]
    for name, g, w, o in zip(names, grads, want, own):
        assert g.shape == w.shape, name
        assert not g.isnan().any(), name
        bound = 3 * max(max_error(o, w), 4 * torch.finfo(torch.float32).eps * max(1.0, w.abs().max().item()))
        assert max_error(g, w) <= bound, (name, max_error(g, w), bound)


def test_autograd_through_the_op_and_registers_shared_gradient_is_batch_sum():
    B, N, H, d, R = 2, 17, 2, 32, 4
    q, k, v = (t.clone().requires_grad_() for t in packed_qkv(B, N, H, d, device=DEVICE, seed=9))
    reg_k, reg_v = (t.requires_grad_() for t in registers(B, R, H, d, True, device=DEVICE))
    out = regkern.register_attention(q, k, v, reg_k, reg_v, num_prefix=5, backend="triton")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, reg_k, reg_v), g)
    ref = regkern.register_attention(q, k, v, reg_k, reg_v, backend="reference")
    want = torch.autograd.grad(ref, (q, k, v, reg_k, reg_v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_lse_statistic_and_unsupported_stats():
    q, k, v = packed_qkv(1, 17, 2, 32, device=DEVICE)
    out, stats = regkern.register_attention(q, k, v, return_stats=("lse",), backend="triton")
    _, ref = regkern.register_attention(q, k, v, return_stats=("lse",), backend="reference")
    torch.testing.assert_close(stats.lse, ref.lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_mask varies over queries or heads"):
        regkern.register_attention(
            q, k, v, attn_mask=torch.ones(17, 17, dtype=torch.bool, device=DEVICE), backend="triton"
        )


def _op_args(
    q,
    k,
    v,
    reg_k=None,
    reg_v=None,
    norms=(None, None, None, None),
    rope=None,
    scale=0.25,
    P=1,
    qk_norm=False,
    eps=1e-6,
    half=False,
    impl="triton",
    stats=(False, False, False, False),
    key_bias=None,
):
    return (q, k, v, reg_k, reg_v, *norms, rope, key_bias, scale, P, qk_norm, eps, half, *stats, impl)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("prologue", ["plain", "qknorm-rope"])
def test_opcheck(impl, prologue):
    B, N, H, d, R, P = 1, 5, 1, 16, 2, 1
    q, k, v = (t.clone().requires_grad_() for t in packed_qkv(B, N, H, d, device=DEVICE))
    reg_k, reg_v = (t.requires_grad_() for t in registers(B, R, H, d, True, device=DEVICE))
    extra = {}
    if prologue != "plain":
        norms = tuple(torch.randn(d, device=DEVICE, requires_grad=True) for _ in range(4))
        extra = dict(norms=norms, rope=torch.randn(N - P, 2 * d, device=DEVICE), qk_norm=True, half=True)
    args = _op_args(q, k, v, reg_k, reg_v, scale=d**-0.5, P=P, impl=impl, **extra)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(attention_fwd, args, test_utils=tests)
    with_stats = _op_args(q, k, v, reg_k, reg_v, scale=d**-0.5, P=P, impl=impl, stats=(True, True, True, True), **extra)
    torch.library.opcheck(attention_fwd, with_stats, test_utils=tests)
    out, lse, *_ = attention_fwd(*args)
    detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    bwd_args = (torch.randn_like(out), *detached[:11], out.detach(), lse, *detached[11:16], detached[-1])
    torch.library.opcheck(attention_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(attention_fwd, _op_args(q, k, v, P=0, impl=impl), test_utils=tests)
    key_bias = torch.zeros(B, N, device=DEVICE).masked_fill(torch.tensor([[False, True, False, True, False]]), -1e9)
    masked = _op_args(q, k, v, reg_k, reg_v, scale=d**-0.5, P=P, impl=impl, key_bias=key_bias, **extra)
    torch.library.opcheck(attention_fwd, masked, test_utils=tests)


PROLOGUE_CASES = [
    # (B, N, H, d, R, P, qk_norm, rope, rotate_half, dtype)
    (1, 17, 2, 64, 4, 5, True, True, False, "fp32"),
    (2, 9, 1, 32, 0, 1, True, False, False, "fp16"),
    (1, 21, 1, 72, 1, 5, False, True, True, "fp32"),
    (1, 13, 2, 16, 2, 0, True, True, True, "fp16"),
    (1, 19, 1, 72, 2, 3, True, True, True, "fp32"),  # padded columns out of the LayerNorm variance
    (1, 23, 1, 72, 0, 2, True, True, False, "fp32"),
]


@pytest.mark.parametrize(
    "case",
    PROLOGUE_CASES,
    ids=lambda c: case_id(
        "qknorm" if c[6] else "noqknorm",
        "rope" if c[7] else "norope",
        "half" if c[8] else "interleaved",
        B=c[0],
        N=c[1],
        H=c[2],
        D=c[3],
        R=c[4],
        P=c[5],
        dtype=c[9],
    ),
)
def test_fused_qk_norm_and_rope_forward_and_backward(case):
    B, N, H, d, R, P, qk_norm, use_rope, half, dt = case
    dtype = DTYPES[dt]
    q, k, v = (t.clone().requires_grad_() for t in packed_qkv(B, N, H, d, dtype=dtype, device=DEVICE, seed=N))
    reg_k, reg_v = registers(B, R, H, d, True, dtype=dtype, device=DEVICE)
    g = torch.Generator().manual_seed(N + d)  # inputs independent of the tests that ran before
    norms = tuple((torch.randn(d, generator=g) * 0.5 + 1).to(DEVICE, dtype).requires_grad_() for _ in range(4))
    rope = torch.randn(N - P, 2 * d, generator=g).to(DEVICE) if use_rope else None
    out = torch.full((B, N, H, d), float("nan"), dtype=dtype, device=DEVICE)
    triton_kernels.attention_forward(
        q.detach(),
        k.detach(),
        v.detach(),
        reg_k,
        reg_v,
        d**-0.5,
        P,
        out=out,
        qk_norm=qk_norm,
        q_norm_weight=norms[0],
        q_norm_bias=norms[1],
        k_norm_weight=norms[2],
        k_norm_bias=norms[3],
        norm_eps=1e-5,
        rope=rope,
        rotate_half=half,
    )
    assert not out.isnan().any()

    def unfused(q, k, v, *norms):  # timm's order of operations in PyTorch, then attention
        qp = reference.qk_prologue(q, norms[0], norms[1], 1e-5, qk_norm, rope, P, half)
        kp = reference.qk_prologue(k, norms[2], norms[3], 1e-5, qk_norm, rope, P, half)
        return qp, kp

    qp, kp = unfused(q, k, v, *norms)

    # the oracle applies the prologue in float64 too, so PyTorch's own error includes its prologue's rounding
    def to64(t):
        return None if t is None else t.detach().double()

    qp64 = reference.qk_prologue(to64(q), to64(norms[0]), to64(norms[1]), 1e-5, qk_norm, to64(rope), P, half)
    kp64 = reference.qk_prologue(to64(k), to64(norms[2]), to64(norms[3]), 1e-5, qk_norm, to64(rope), P, half)
    ref64, _ = float64_reference(qp64, kp64, v.detach(), reg_k, reg_v)
    assert max_error(out, ref64) <= 2 * own_error(qp.detach(), kp.detach(), v.detach(), reg_k, reg_v, ref64)

    # gradients through the op (fused forward, recomputed prologue in backward): within 3x the error of autograd
    # through the unfused PyTorch path, both against autograd of the unfused path in float64 (the pre-pass rounds
    # once where timm rounds after LayerNorm and again after RoPE, so the two half-precision paths differ)
    leaves = [q, k, v] + (list(norms) if qk_norm else [])
    got_out, *_ = attention_fwd(
        *_op_args(q, k, v, reg_k, reg_v, norms if qk_norm else (None,) * 4, rope, d**-0.5, P, qk_norm, 1e-5, half)
    )
    grad_out = torch.randn(got_out.shape, generator=g).to(DEVICE, dtype)
    got = torch.autograd.grad(got_out, leaves, grad_out)
    qp, kp = unfused(q, k, v, *norms)
    want_out = regkern.register_attention(qp, kp, v, reg_k, reg_v, backend="reference")
    want = torch.autograd.grad(want_out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    q64, k64, v64, *norms64 = leaves64
    norms64 = norms64 if qk_norm else [to64(t) for t in norms]
    qp64 = reference.qk_prologue(q64, norms64[0], norms64[1], 1e-5, qk_norm, to64(rope), P, half)
    kp64 = reference.qk_prologue(k64, norms64[2], norms64[3], 1e-5, qk_norm, to64(rope), P, half)
    out64 = regkern.register_attention(qp64, kp64, v64, to64(reg_k), to64(reg_v), backend="reference")
    want64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    for name, a, b, w in zip(["dq", "dk", "dv", "dqw", "dqb", "dkw", "dkb"], got, want, want64):
        if dtype == torch.float32:  # eager float32 is within a few ulps here; the kernels' exp2 softmax is not
            torch.testing.assert_close(a.double(), w, atol=2e-4, rtol=2e-4, msg=name)
        else:
            assert max_error(a, w) <= 3 * max_error(b, w), (name, max_error(a, w), max_error(b, w))


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qknorm", "rope-only"])
@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("table", ["per-head", "per-batch-and-head", "per-batch", "shared"])
@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_prologue_pre_pass_with_rope_tables_per_head_and_per_batch(dt, table, half, qk_norm):
    """The pre-pass folds the sin/cos tile into its coefficients once per program when the table is shared by the
    heads, and applies the affine and then the rotation when each head has its own; both within 2x PyTorch's error
    (timm's prologue) against float64. Ragged N = 17 (16-token tiles)."""
    B, N, H, d, P = 2, 17, 3, 16, 2
    dtype = DTYPES[dt]
    q, k, _ = packed_qkv(B, N, H, d, dtype=dtype, device=DEVICE, seed=N)
    g = torch.Generator().manual_seed(7)
    w, b = (torch.randn(2, d, generator=g) * 0.5 + 1).to(DEVICE, dtype)
    lead = {"per-head": (H,), "per-batch-and-head": (B, H), "per-batch": (B, 1), "shared": ()}[table]
    rope = torch.randn(*lead, N - P, 2 * d, generator=g).to(DEVICE)
    got_q, got_k = triton_kernels.qk_prologue(q, k, w, b, b, w, 1e-5, qk_norm, rope, P, half)
    for t, got, (nw, nb) in ((q, got_q, (w, b)), (k, got_k, (b, w))):
        want = reference.qk_prologue(t, nw, nb, 1e-5, qk_norm, rope, P, half)
        want64 = reference.qk_prologue(t.double(), nw.double(), nb.double(), 1e-5, qk_norm, rope.double(), P, half)
        floor = 4 * torch.finfo(dtype).eps * want64.abs().max().item()
        assert max_error(got, want64) <= 2 * max(max_error(want, want64), floor)


PRE_PASS_RAGGED_CASES = [
    # (B, N, d, P, table, qk_norm, rotate_half): ragged last tiles (the kernel's loads repeat row N - 1 there),
    # power-of-two d (mask-free loads) and padded d = 72 (BLOCK_D = 128; rotate_half permutes the columns)
    (1, 1, 64, 0, "per-head", True, False),
    (2, 17, 64, 5, "per-head", True, True),
    (1, 261, 64, 5, "per-head", True, False),
    (1, 261, 64, 5, "shared", True, True),
    (2, 197, 72, 1, "per-head", True, True),
    (1, 197, 72, 1, "per-head", False, True),
    (1, 197, 72, 1, "shared", True, False),
    (1, 33, 72, 17, "per-head", False, False),
]


def _pre_pass_case_id(case, dt):
    B, N, d, P, table, qk_norm, half = case
    return case_id(
        table,
        "qknorm" if qk_norm else "rope-only",
        "half" if half else "interleaved",
        B=B,
        N=N,
        H=2,
        D=d,
        P=P,
        dtype=dt,
    )


@pytest.mark.parametrize(
    "case, dt",
    [(c, dt) for c in PRE_PASS_RAGGED_CASES for dt in ("fp32", "fp16")],
    ids=[_pre_pass_case_id(c, dt) for c in PRE_PASS_RAGGED_CASES for dt in ("fp32", "fp16")],
)
def test_prologue_pre_pass_ragged_lengths(case, dt):
    """qk_norm / RoPE pre-pass at ViT lengths: every row written (NaN-prefilled outputs), within 2x PyTorch's error
    (timm's prologue) against float64; with a table per head the affine and the rotation are applied in turn, with a
    shared one they are folded into per-program coefficients."""
    B, N, d, P, table, qk_norm, half = case
    H, dtype = 2, DTYPES[dt]
    q, k, _ = packed_qkv(B, N, H, d, dtype=dtype, device=DEVICE, seed=N + d)
    g = torch.Generator().manual_seed(N)
    qw, qb, kw, kb = ((torch.randn(d, generator=g) * 0.5 + 1).to(DEVICE, dtype) for _ in range(4))
    lead = (H,) if table == "per-head" else ()
    rope = torch.randn(*lead, N - P, 2 * d, generator=g).to(DEVICE)
    outputs = tuple(torch.full((B, N, H, d), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
    got_q, got_k = triton_kernels.qk_prologue(q, k, qw, qb, kw, kb, 1e-5, qk_norm, rope, P, half, out=outputs)
    assert got_q is outputs[0] and got_k is outputs[1]
    for t, got, nw, nb in ((q, got_q, qw, qb), (k, got_k, kw, kb)):
        assert not got.isnan().any()
        want = reference.qk_prologue(t, nw, nb, 1e-5, qk_norm, rope, P, half)
        want64 = reference.qk_prologue(t.double(), nw.double(), nb.double(), 1e-5, qk_norm, rope.double(), P, half)
        floor = 4 * torch.finfo(dtype).eps * want64.abs().max().item()
        assert max_error(got, want64) <= 2 * max(max_error(want, want64), floor)


def test_prologue_out_buffers_are_checked():
    q, k, _ = packed_qkv(1, 9, 1, 16, device=DEVICE)

    def run(out):
        triton_kernels.qk_prologue(q, k, None, None, None, None, 1e-5, True, None, 1, False, out=out)

    good = torch.empty(1, 9, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"out\[1\]: expected a contiguous torch.float32 \(1, 9, 1, 16\) tensor"):
        run((good, torch.empty(1, 9, 2, 16, device=DEVICE)))
    with pytest.raises(ValueError, match=r"out\[0\]: .* got a contiguous torch.float16"):
        run((good.half(), good.clone()))
    with pytest.raises(ValueError, match=r"out\[0\]: .* got a non-contiguous torch.float32 \(1, 9, 1, 16\)"):
        run((torch.empty(1, 16, 1, 9, device=DEVICE).transpose(1, 3), good))
    with pytest.raises(ValueError, match="out: expected two tensors of their own storage"):
        run((good, good))
    with pytest.raises(ValueError, match=r"out: expected a \(q_out, k_out\) pair of tensors, got Tensor"):
        run(good)


def test_rope_table_shape_is_checked():
    q, k, v = packed_qkv(1, 9, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"rope: expected a \[sin, cos\] table"):
        triton_kernels.attention_forward(q, k, v, None, None, 0.25, 1, rope=torch.randn(9, 32, device=DEVICE))


@pytest.mark.parametrize("module_kind", ["vit-qknorm", "eva-rope-half", "eva-rope-interleaved"])
def test_modules_with_qk_norm_and_rope_on_triton(module_kind):
    timm = pytest.importorskip("timm")
    from timm.models.eva import EvaAttention

    torch.manual_seed(0)
    dim, H, N, P = 64, 2, 13, 5
    if module_kind == "vit-qknorm":
        ref = timm.layers.Attention(dim, H, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
        ours = regkern.RegisterViTAttention.from_timm(ref, num_prefix_tokens=P, backend="triton")
        extra = {}
    else:
        ref = EvaAttention(
            dim,
            H,
            num_prefix_tokens=P,
            rotate_half=module_kind.endswith("half"),
            qk_norm=True,
            norm_layer=torch.nn.LayerNorm,
        )
        with torch.no_grad():
            ref.q_bias.normal_()
            ref.v_bias.normal_()
        ours = regkern.RegisterEvaAttention.from_timm(ref, backend="triton")
        extra = {"rope": torch.randn(N - P, 2 * dim // H)}
    assert ours.backend_name == "triton" and "inside the attention op" in ours.prologue_reason
    ref, ours = ref.to(DEVICE), ours.to(DEVICE)
    extra = {key: t.to(DEVICE) for key, t in extra.items()}
    x = torch.randn(2, N, dim, device=DEVICE, requires_grad=True)
    want = ref(x, **extra)
    got = ours(x, **extra)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(got)
    params = [p for p in ref.parameters()]
    want_grads = torch.autograd.grad(want, [x] + params, g)
    got_grads = torch.autograd.grad(got, [x] + params, g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_torch_compile_fullgraph_of_patched_block():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    attn = timm.layers.Attention(64, 2, qkv_bias=True)
    module = regkern.RegisterViTAttention.from_timm(attn, num_prefix_tokens=1, num_kv_registers=2, backend="triton")
    module = module.to(DEVICE)
    x = torch.randn(2, 9, 64, device=DEVICE, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    eager_out = module(x)
    out = compiled(x)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, module.reg_k, module.qkv.weight], g)
    want = torch.autograd.grad(eager_out, [x, module.reg_k, module.qkv.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_never_picks_the_interpreter_but_explicit_triton_works_on_cpu():
    if DEVICE != "cpu":
        pytest.skip("CPU-only dispatch rule")
    module = regkern.RegisterViTAttention(64, 2)
    assert module.backend_name == "torch" and "auto uses it on cuda only" in module.backend_reason
    module.set_backend("triton")
    assert module.backend_name == "triton"
    assert "triton" in regkern.explain(module)
    # explicitly named: calls with a mask are refused (no silent switch), and explain says so
    assert module.masked_backend_name == "triton (unavailable)"
    assert "other attn_mask -> triton (unavailable)" in regkern.explain(module)
    assert module.key_masked_backend_name == "triton"  # key masks run on the fused kernel
    x = torch.randn(1, 5, 64)
    with pytest.raises(RuntimeError, match="attn_mask varies over queries or heads"):
        module(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    got = module(x)
    module.set_backend("torch")
    torch.testing.assert_close(got, module(x), atol=1e-5, rtol=1e-5)


def test_auto_masked_calls_use_a_mask_capable_backend():
    module = regkern.RegisterViTAttention(64, 2)
    assert module.masked_backend_name == "torch"
    x = torch.randn(1, 5, 64)
    mask = torch.ones(5, 5, dtype=torch.bool)
    torch.testing.assert_close(module(x, attn_mask=mask), module(x), atol=1e-5, rtol=1e-5)


def test_lse_natural_log_constant():
    assert abs(triton_kernels.LN2 - math.log(2)) < 1e-15 and abs(triton_kernels.LOG2E - 1 / math.log(2)) < 1e-15


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_dinov3"])
def test_torch_compile_fullgraph_of_patched_timm_model(name):
    """No graph breaks through the custom ops (fake kernels + registered autograd), forward and backward."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, depth=2).to(DEVICE)
    regkern.patch_timm(model, backend="triton")
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out = compiled(x)
    eager = model(x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(eager.square().sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


STATS_CASES = [
    # (B, N, H, d, R, P, shared, dtype, prologue)
    (1, 1, 1, 32, 0, 1, True, "fp32", False),
    (2, 17, 2, 64, 4, 5, True, "fp32", False),
    (1, 64, 1, 72, 16, 16, False, "fp16", False),
    (1, 197, 1, 64, 1, 1, True, "fp32", False),
    (1, 261, 1, 64, 4, 5, False, "fp16", False),
    (1, 33, 2, 32, 2, 5, True, "fp32", True),
    (1, 57, 1, 32, 4, 20, True, "fp32", False),  # a 32-row prefix-row launch; the other rows from row 32
]


@pytest.mark.parametrize(
    "case", STATS_CASES, ids=lambda c: "-".join(filter(None, [triton_case_id(c[:8]), "qknorm-rope" if c[8] else ""]))
)
def test_epilogue_statistics_match_reference(case):
    B, N, H, d, R, P, shared, dt, prologue = case
    dtype = DTYPES[dt]
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device=DEVICE, seed=5 * N + R)
    reg_k, reg_v = registers(B, R, H, d, shared, dtype=dtype, device=DEVICE)
    norms = tuple(torch.randn(d, device=DEVICE) for _ in range(4)) if prologue else (None,) * 4
    rope = torch.randn(N - P, 2 * d, device=DEVICE) if prologue else None
    out, lse, stats = triton_kernels.attention_forward(
        q,
        k,
        v,
        reg_k,
        reg_v,
        d**-0.5,
        P,
        qk_norm=prologue,
        q_norm_weight=norms[0],
        q_norm_bias=norms[1],
        k_norm_weight=norms[2],
        k_norm_bias=norms[3],
        rope=rope,
        rotate_half=True,
        stats=("out_norm", "prefix_rows", "received", "received_groups"),
    )
    qp = reference.qk_prologue(q, norms[0], norms[1], 1e-6, prologue, rope, P, True)
    kp = reference.qk_prologue(k, norms[2], norms[3], 1e-6, prologue, rope, P, True)

    def f(t):
        return None if t is None else t.float()

    _, want = reference.register_attention(
        f(qp), f(kp), f(v), f(reg_k), f(reg_v), return_stats=reference.STAT_NAMES, num_prefix=P
    )
    assert set(stats) == {"out_norm", "prefix_rows", "received", "received_groups"}
    for name, got in stats.items():
        assert got.shape == want[name].shape and got.dtype == torch.float32, name
        assert torch.isfinite(got).all(), name
        # statistics are float32 reductions of float32 accumulators: tight tolerances at every precision
        torch.testing.assert_close(got, want[name], atol=2e-5 if dt == "fp32" else 2e-3, rtol=1e-4, msg=name)
    # attention rows of the prefix queries sum to one; received sums to N per head
    torch.testing.assert_close(stats["prefix_rows"].sum(-1), torch.ones(B, H, P, device=DEVICE), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        stats["received"].sum(-1), torch.full((B, H), float(N), device=DEVICE), atol=1e-3 * N, rtol=0
    )


def test_register_attention_statistics_on_triton_backend():
    B, N, H, d, R, P = 2, 17, 2, 32, 3, 5
    q, k, v = packed_qkv(B, N, H, d, device=DEVICE, seed=8)
    reg_k, reg_v = registers(B, R, H, d, True, device=DEVICE)
    out, stats = regkern.register_attention(
        q, k, v, reg_k, reg_v, return_stats=("received", "lse", "out_norm"), num_prefix=P, backend="triton"
    )
    ref, want = regkern.register_attention(
        q, k, v, reg_k, reg_v, return_stats=("received", "lse", "out_norm"), num_prefix=P, backend="reference"
    )
    assert list(stats) == ["received", "lse", "out_norm"]
    for name in stats:
        torch.testing.assert_close(stats[name], want[name], atol=2e-5, rtol=1e-4, msg=name)
    # statistics do not change the output, and asking for them does not break autograd of out
    torch.testing.assert_close(
        out, regkern.register_attention(q, k, v, reg_k, reg_v, num_prefix=P, backend="triton"), atol=0, rtol=0
    )


@pytest.mark.parametrize("R, P, N", [(0, 0, 17), (3, 1, 17), (4, 5, 37), (0, 5, 1 + 5), (2, 0, 9)])
def test_received_groups_alone_equal_the_reference(R, P, N):
    """The per-group reduction inside the received pass (no (B, H, R + N) tensor) against the reference's sums of
    ``received``; with and without the small segment (registers + prefix) and its program."""
    B, H, d = 2, 2, 32
    q, k, v = packed_qkv(B, N, H, d, device=DEVICE, seed=R + 10 * P)
    reg_k, reg_v = registers(B, R, H, d, True, device=DEVICE) if R else (None, None)
    _, stats = regkern.register_attention(
        q, k, v, reg_k, reg_v, return_stats=("received_groups",), num_prefix=P, backend="triton"
    )
    _, want = regkern.register_attention(
        q, k, v, reg_k, reg_v, return_stats=("received_groups", "received"), num_prefix=P, backend="reference"
    )
    assert list(stats) == ["received_groups"] and stats["received_groups"].shape == (B, H, 4)
    torch.testing.assert_close(stats["received_groups"], want["received_groups"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        want["received_groups"], reference.received_groups(want["received"], R, P), atol=0, rtol=0
    )
    torch.testing.assert_close(stats["received_groups"].sum(-1), torch.full((B, H), float(N), device=DEVICE))
    if R == 0:
        assert torch.all(stats["received_groups"][..., 0] == 0)
    if P == 0:
        assert torch.all(stats["received_groups"][..., 1:3] == 0)


RECEIVED_HALF_CASES = [
    # (tile, N, R, masked): 64-row tiles split the query tails of N = 104 and 169 (40 -> 32 + 16, 41 -> 32 + 16);
    # R = 0 puts the prefix and patch keys in one program; Hopper's 128 x 128 tiles split 222 % 128 = 94 into
    # 64 + 32, and a key mask takes 64 keys per program there
    (64, 17, 4, False),
    (64, 104, 4, False),
    (64, 169, 4, False),
    (64, 17, 0, False),
    (128, 222, 4, False),
    (128, 150, 4, True),
]


@pytest.mark.parametrize(
    "case", RECEIVED_HALF_CASES, ids=lambda c: f"tile{c[0]}-" + case_id(N=c[1], R=c[2]) + ("-masked" if c[3] else "")
)
def test_received_in_half_precision_sums_probabilities_on_tensor_cores(case, monkeypatch):
    """In float16 the received pass sums each key's probabilities with a tensor-core product (float16 probabilities
    scaled by 2^15, float32 accumulation): within 2e-3 of the float32 reference, and every query's probabilities still
    sum to 1. One patch key gets probabilities near 4e-7 from every query (below float16's smallest normal number
    unless scaled): its sum is within 2e-3 too."""
    from regkern.ops.attention import configs

    tile, N, R, masked = case
    monkeypatch.setattr(configs, "INTERPRETER_CONFIG", configs.TileConfig(tile, tile, 4, 1))
    B, H, d, P = 2, 2, 32, 5
    q, k, v = packed_qkv(B, N, H, d, dtype=torch.float32, device=DEVICE, seed=N)
    u = torch.ones(d, device=DEVICE)
    q = q + u  # a common direction: the planted key below scores about -10 against every query
    k = k.clone()
    k[:, P] = -1.7 * u
    q, k, v = (t.to(torch.float16) for t in (q, k, v))
    reg_k, reg_v = registers(B, R, H, d, True, dtype=torch.float16, device=DEVICE)
    key_bias = None
    if masked:
        key_bias = torch.zeros(B, N, device=DEVICE)
        key_bias[:, N // 2 :: 3] = float("-inf")
    _, _, stats = triton_kernels.attention_forward(
        q, k, v, reg_k, reg_v, d**-0.5, P, stats=("received", "received_groups"), key_bias=key_bias
    )
    q32, k32, v32 = q.float(), k.float(), v.float()
    rk32, rv32 = (None, None) if R == 0 else (reg_k.float(), reg_v.float())
    if masked:  # reference: the masked keys' scores at -inf, as the float64 oracle of the key-mask tests
        s = torch.einsum("bnhd,bmhd->bhnm", q32, torch.cat([reference.batched_registers(rk32, B), k32], 1))
        s = s * d**-0.5 + torch.cat([torch.zeros(B, R, device=DEVICE), key_bias], 1)[:, None, None, :]
        want = s.softmax(-1).sum(2)
    else:
        _, ref = reference.register_attention(q32, k32, v32, rk32, rv32, return_stats=("received",), num_prefix=P)
        want = ref["received"]
    torch.testing.assert_close(stats["received"], want, atol=1e-4, rtol=2e-3)
    planted = stats["received"][:, :, R + P]
    assert want[:, :, R + P].max() < 1e-3, "the planted key should receive little"
    torch.testing.assert_close(planted, want[:, :, R + P], atol=0, rtol=2e-3)
    torch.testing.assert_close(
        stats["received"].sum(-1), torch.full((B, H), float(N), device=DEVICE), rtol=1e-3, atol=0
    )
    torch.testing.assert_close(stats["received_groups"], reference.received_groups(stats["received"], R, P))


def test_tail_pieces_split_a_ragged_query_tail_only_where_it_saves_rows():
    assert [triton_kernels._tail_pieces(t) for t in (1, 5, 16, 17, 33, 40, 64, 69, 94, 100, 127)] == [
        (0, 16), (0, 16), (0, 16), (0, 32), (32, 16), (32, 16), (0, 64), (64, 16), (64, 32), (0, 128), (0, 128),
    ]  # fmt: skip


@pytest.mark.parametrize("N", [70, 104, 133], ids=lambda n: f"N{n}")
def test_gpu_sized_tiles_peel_their_ragged_tails(N, monkeypatch):
    """With the GPU's 64-row tiles the ragged last tiles are peeled and shrunk (N = 70: a 16-row query tail in the
    key-major passes; N - P = 65: a one-key tail in the forward; N = 104: the received pass's 40-row query tail as
    32 + 16 rows); the interpreter's 16-row tiles never do that."""
    from regkern.ops.attention import configs

    monkeypatch.setattr(configs, "INTERPRETER_CONFIG", configs.TileConfig(64, 64, 4, 1))
    B, H, d, R, P = 1, 1, 32, 4, 5
    q, k, v = packed_qkv(B, N, H, d, device=DEVICE, seed=N)
    reg_k, reg_v = registers(B, R, H, d, True, device=DEVICE)
    out, lse, stats = triton_kernels.attention_forward(
        q, k, v, reg_k, reg_v, d**-0.5, P, stats=("out_norm", "prefix_rows", "received")
    )
    ref_out, want = reference.register_attention(q, k, v, reg_k, reg_v, return_stats=reference.STAT_NAMES, num_prefix=P)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    for name in ("out_norm", "prefix_rows", "received"):
        torch.testing.assert_close(stats[name], want[name], atol=2e-5, rtol=1e-4, msg=name)
    grad_out = torch.randn(B, N, H, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = triton_kernels.attention_backward(grad_out, q, k, v, reg_k, reg_v, out, lse, d**-0.5, P)
    want_grads = naive_float64_grads(q, k, v, reg_k, reg_v, grad_out, d**-0.5)
    for name, g, w in zip(["dq", "dk", "dv", "dreg_k", "dreg_v"], grads, want_grads):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=5e-5, msg=name)
