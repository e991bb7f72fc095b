"""LayerNorm with norm capture: Triton kernels, ops and dispatch, against independent references.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (fp32 and fp16; the interpreter
mis-computes bf16). Tolerance: kernel error <= 2x PyTorch's own error at the same precision against a float64
computation written here (3x for gradients), floored at a few units of float32 rounding.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from regkern import reference
from tests.helpers import case_id, dtype_id, max_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ln_kernels = pytest.importorskip("regkern.ops.layer_norm.triton_kernels")
if DEVICE == "cpu" and not ln_kernels.INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from regkern.nn import MonitoredLayerNorm  # noqa: E402
from regkern.ops.layer_norm import layer_norm_bwd, layer_norm_fwd, layer_norm_with_norms  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EPS = 1e-6
F32_EPS = torch.finfo(torch.float32).eps

# (shape, dtype, affine): affine "wb" = weight and bias, "w" = weight only, "none"
CASES = [
    ((2, 17, 384), "fp32", "wb"),
    ((2, 17, 384), "fp16", "wb"),
    ((1, 261, 1000), "fp16", "wb"),
    ((1, 261, 1000), "fp32", "none"),
    ((3, 1, 64), "fp32", "w"),
    ((3, 1, 64), "fp16", "none"),
    ((1, 197, 768), "fp32", "wb"),
    ((1, 197, 768), "fp16", "w"),
    ((4, 1), "fp32", "wb"),
]


def layer_norm_case_id(case):
    shape, dt, affine = case
    *lead, C = shape
    B, N = ([None] * (2 - len(lead)) + lead)[-2:] if len(lead) <= 2 else (None, None)
    flags = [] if len(lead) <= 2 else ["x".join(map(str, lead))]
    return case_id(*flags, affine, B=B, N=N, C=C, dtype=dt)


def make_inputs(shape, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    # a non-zero mean and a few high-norm rows, like a residual stream with artifacts
    x = torch.randn(shape, generator=g) * 2 + 0.5
    x.view(-1, C)[::7] *= 8
    w = torch.randn(C, generator=g) * 0.5 + 1 if affine in ("wb", "w") else None
    b = torch.randn(C, generator=g) if affine == "wb" else None

    def cast(t):
        return None if t is None else t.to(DEVICE, dtype)

    return cast(x), cast(w), cast(b)


def float64_layer_norm(x, w, b, eps=EPS):
    """The textbook formula in float64, differentiable: an oracle independent of F.layer_norm and the kernels."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def floor(ref):
    return 4 * F32_EPS * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("case", CASES, ids=layer_norm_case_id)
def test_forward_matches_float64(case):
    shape, dt, affine = case
    x, w, b = make_inputs(shape, DTYPES[dt], affine, seed=shape[-1])
    nan = float("nan")
    y = torch.full(shape, nan, dtype=x.dtype, device=DEVICE)
    norms = torch.full(shape[:-1], nan, dtype=torch.float32, device=DEVICE)
    got_y, got_norms, mean, rstd = ln_kernels.layer_norm_forward(x, w, b, EPS, y=y, norms=norms)
    assert got_y is y and got_norms is norms
    for name, t in (("y", y), ("norms", norms), ("mean", mean), ("rstd", rstd)):
        assert not t.isnan().any(), name
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == shape[:-1]

    def f64(t):
        return None if t is None else t.double()

    x64 = x.double()
    want_y = float64_layer_norm(x64, f64(w), f64(b))
    own_y = max_error(F.layer_norm(x, (shape[-1],), w, b, EPS), want_y)  # PyTorch at x's precision
    assert max_error(y, want_y) <= 2 * max(own_y, floor(want_y)), (max_error(y, want_y), own_y)

    want_norms = torch.sqrt((x64 * x64).sum(-1))
    own_norms = max_error(torch.linalg.vector_norm(x.float(), dim=-1), want_norms)
    assert max_error(norms, want_norms) <= 2 * max(own_norms, floor(want_norms))

    want_mean = x64.mean(-1)
    want_rstd = 1 / torch.sqrt(((x64 - want_mean[..., None]) ** 2).mean(-1) + EPS)
    var32, mean32 = torch.var_mean(x.float(), dim=-1, correction=0)
    own_mean, own_rstd = max_error(mean32, want_mean), max_error(torch.rsqrt(var32 + EPS), want_rstd)
    assert max_error(mean, want_mean) <= 2 * max(own_mean, floor(want_mean))
    assert max_error(rstd, want_rstd) <= 2 * max(own_rstd, floor(want_rstd))


@pytest.mark.parametrize("case", CASES, ids=layer_norm_case_id)
def test_backward_matches_float64(case):
    shape, dt, affine = case
    dtype = DTYPES[dt]
    x, w, b = make_inputs(shape, dtype, affine, seed=shape[-1] + 1)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    _, _, mean, rstd = ln_kernels.layer_norm_forward(x, w, b, EPS)
    dx = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    got_dx, dw, db = ln_kernels.layer_norm_backward(dy, x, w, b, mean, rstd, dx=dx)
    assert got_dx is dx and (dw is None) == (w is None) and (db is None) == (b is None)

    leaves = [t for t in (x, w, b) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64[1:])
    w64 = next(it) if w is not None else None
    b64 = next(it) if b is not None else None
    want = torch.autograd.grad(float64_layer_norm(leaves64[0], w64, b64), leaves64, dy.double())
    own_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    it = iter(own_leaves[1:])
    own_out = F.layer_norm(
        own_leaves[0], (shape[-1],), next(it) if w is not None else None, next(it) if b is not None else None, EPS
    )
    own = torch.autograd.grad(own_out, own_leaves, dy)  # PyTorch's own gradients at x's precision
    names = ["dx"] + (["dweight"] if w is not None else []) + (["dbias"] if b is not None else [])
    got = [dx] + [g for g in (dw, db) if g is not None]
    for name, g, ref, o in zip(names, got, want, own):
        assert g.shape == ref.shape and g.dtype == dtype, name
        assert not g.isnan().any(), name
        bound = 3 * max(max_error(o, ref), floor(ref))
        assert max_error(g, ref) <= bound, (name, max_error(g, ref), bound)


def test_backward_weight_gradient_is_deterministic_and_strided_inputs_work():
    x, w, b = make_inputs((2, 40, 96), torch.float32, "wb", seed=5)
    x = x[:, 3:]  # rows of a non-uniform stride: the launcher copies
    dy = torch.randn(x.shape, device=DEVICE).transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    _, _, mean, rstd = ln_kernels.layer_norm_forward(x, w, b, EPS)
    first = ln_kernels.layer_norm_backward(dy, x, w, b, mean, rstd)
    second = ln_kernels.layer_norm_backward(dy, x, w, b, mean, rstd)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    xt = torch.randn(96, 6, device=DEVICE).t()  # last stride != 1
    y, norms, _, _ = ln_kernels.layer_norm_forward(xt, w, b, EPS)
    want_y, want_norms = reference.layer_norm_with_norms(xt, w, b, EPS)
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norms, want_norms, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ ops


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("affine", ["wb", "none"])
def test_opcheck(impl, affine):
    x, w, b = make_inputs((2, 3, 8), torch.float32, affine, seed=1)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    assert leaves
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(layer_norm_fwd, (x, w, b, 1e-5, impl), test_utils=tests)
    y, norms, mean, rstd = layer_norm_fwd(x, w, b, 1e-5, impl)
    assert not norms.requires_grad and not mean.requires_grad and not rstd.requires_grad

    def detach(t):
        return None if t is None else t.detach()

    bwd_args = (torch.randn_like(y), x.detach(), detach(w), detach(b), mean, rstd, 1e-5, impl)
    torch.library.opcheck(layer_norm_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))
    dx, dw, db = layer_norm_bwd(*bwd_args)
    assert dx.shape == x.shape
    assert dw.shape == ((8,) if w is not None else (0,)) and db.shape == ((8,) if b is not None else (0,))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layer_norm_with_norms_function(backend):
    x, w, b = make_inputs((2, 5, 48), torch.float32, "wb", seed=2)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y, norms = layer_norm_with_norms(x, w, b, 1e-5, backend=backend)
    want_y, want_norms = reference.layer_norm_with_norms(*leaves, 1e-5)
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norms, want_norms, atol=1e-5, rtol=1e-5)
    assert norms.dtype == torch.float32 and not norms.requires_grad
    g = torch.randn_like(y)
    for a, c in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(want_y, leaves, g)):
        torch.testing.assert_close(a, c, atol=3e-5, rtol=3e-5)


def test_reference_op_gradcheck_in_float64():
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: layer_norm_with_norms(*t, 1e-5, backend="reference")[0], (x, w, b))


def test_backend_choice_and_errors(monkeypatch):
    x = torch.randn(2, 8, device=DEVICE)
    if DEVICE == "cpu":  # kernels not interpreted: explicit triton is refused with the reason, modules still build
        with monkeypatch.context() as patch:
            patch.setattr(ln_kernels, "INTERPRETED", False)
            m = MonitoredLayerNorm(8, backend="triton")
            assert m.backend_name == "triton (unavailable)" and "TRITON_INTERPRET=1" in m.backend_reason
            with pytest.raises(ValueError, match="backend: 'triton' cannot run .*TRITON_INTERPRET=1"):
                layer_norm_with_norms(x, None, None, backend="triton")
    if DEVICE == "cpu":
        assert MonitoredLayerNorm(8).backend_name == "reference"
        assert "cuda only" in MonitoredLayerNorm(8).backend_reason
    else:
        assert MonitoredLayerNorm(8, device=DEVICE).backend_name == "triton"
    with pytest.raises(ValueError, match="backend: unknown LayerNorm backend 'torch'"):
        layer_norm_with_norms(x, None, None, backend="torch")
    with pytest.raises(ValueError, match="backend: unknown"):
        MonitoredLayerNorm(8, backend="fast")
    with pytest.raises(ValueError, match=r"backend: 'triton' cannot run .*float64"):
        layer_norm_with_norms(x.double(), None, None, backend="triton")
    # an explicit backend that cannot run on the module's dtype: constructible, refuses to run, recovers on a move
    m = MonitoredLayerNorm(8, backend="triton", device=DEVICE).double()
    assert m.backend_name == "triton (unavailable)" and "float64" in m.backend_reason
    with pytest.raises(RuntimeError, match="float64"):
        m(x.double())
    assert m.float().backend_name == "triton"
    m.set_backend("reference")
    assert m.backend_name == "reference" and "requested" in m.backend_reason


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 8, device=DEVICE)
    cases = [
        ((x.long(), None, None, 1e-5), TypeError, "x: expected a floating dtype"),
        ((x[0, 0], None, None, 1e-5), ValueError, "x: expected at least 1 dim"),
        ((x[:, :0], None, None, 1e-5), ValueError, "x: expected a last dim C >= 1"),
        ((x, torch.ones(7, device=DEVICE), None, 1e-5), ValueError, r"weight: expected shape \(8,\)"),
        ((x, None, torch.ones(8, device="meta"), 1e-5), ValueError, "bias: expected the device of x"),
        ((x, None, torch.ones(8, dtype=torch.int32, device=DEVICE), 1e-5), TypeError, "bias: expected a floating"),
        ((x, None, None, -1.0), ValueError, "eps: expected a finite float >= 0"),
        (("x", None, None, 1e-5), TypeError, "x: expected a torch.Tensor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            layer_norm_with_norms(*args, backend="reference")
    with pytest.raises(ValueError, match="impl: expected one of"):
        layer_norm_fwd(x, None, None, 1e-5, "fast")
    with pytest.raises(ValueError, match="normalized_shape: MonitoredLayerNorm normalises over the last dim only"):
        MonitoredLayerNorm((4, 8))
    with pytest.raises(ValueError, match="x: expected a last dim of 16"):
        MonitoredLayerNorm(16, device=DEVICE)(x)


def perturbed(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_triton_on_gpu_at_vit_shapes_and_autocast(dtype):
    ref = perturbed(nn.LayerNorm(768, eps=1e-6)).cuda()
    ours = MonitoredLayerNorm.from_layer_norm(ref)
    assert ours.backend_name == "triton"
    x = torch.randn(64, 197, 768, device="cuda", dtype=dtype) * 2
    w, b = ref.weight.detach().to(dtype), ref.bias.detach().to(dtype)
    y, norms = layer_norm_with_norms(x, w, b, 1e-6, backend="triton")
    want_y = float64_layer_norm(x.double(), w.double(), b.double())
    own = max_error(F.layer_norm(x, (768,), w, b, 1e-6), want_y)
    assert max_error(y, want_y) <= 2 * own + 1e-6
    torch.testing.assert_close(norms, x.double().norm(dim=-1).float(), atol=1e-3, rtol=1e-5)
    with torch.autocast("cuda", dtype=dtype):  # layer_norm autocasts to float32; so does the op
        assert ours(x).dtype == ref(x).dtype == torch.float32
