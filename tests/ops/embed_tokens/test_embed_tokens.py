"""regkern::embed_tokens: the op behind regkern.embed_tokens (fake, the one autograd), its "reference" implementation
and its dispatch, on the CPU. (The "cuda" implementation: tests/ops/test_cuda_ext.py and test_cuda_emulated.py.)"""

import pytest
import torch

import regkern
from regkern import reference
from regkern.ops.embed_tokens import DISPATCHER, embed_tokens_op
from regkern.ops.embed_tokens.backends import EmbedTokensRequest
from tests.helpers import case_id

# (B, grid, C, cls, R, no_embed_class, pos)
CASES = [
    (2, (4,), 8, True, 4, True, True),
    (3, (2, 3), 16, True, 0, False, True),
    (1, (5,), 8, False, 2, False, True),
    (2, (3,), 8, True, 1, False, False),
    (1, (1,), 4, False, 0, True, True),
]


def case_name(c):
    B, grid, C, cls, R, no_embed_class, pos = c
    flags = ["cls" if cls else "nocls", "noembedclass" if no_embed_class else "", "" if pos else "nopos"]
    return case_id(*flags, "x".join(map(str, grid)), B=B, C=C, R=R)


def make(case, dtype=torch.float32, seed=0):
    B, grid, C, cls, R, no_embed_class, pos = case
    g = torch.Generator().manual_seed(seed)
    M = 1
    for s in grid:
        M *= s
    P = int(cls) + R

    def t(*shape):
        return (torch.randn(*shape, generator=g) + 0.5).to(dtype).requires_grad_()

    x = t(B, *grid, C)
    pos_embed = t(1, M if no_embed_class else P + M, C) if pos else None
    return x, pos_embed, t(1, 1, C) if cls else None, t(1, R, C) if R else None, no_embed_class


@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_op_matches_plain_autograd_of_the_reference(case):
    x, pos, cls, reg, nec = make(case)
    got = embed_tokens_op(x, pos, cls, reg, nec, "reference")
    want = reference.embed_tokens(x, pos, cls, reg, no_embed_class=nec)
    assert torch.equal(got, want)
    inputs = [t for t in (x, pos, cls, reg) if t is not None]
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES[:3], ids=case_name)
def test_opcheck_and_gradcheck(case):
    x, pos, cls, reg, nec = make(case, dtype=torch.float64)
    torch.library.opcheck(embed_tokens_op, (x, pos, cls, reg, nec, "reference"))
    inputs = tuple(t for t in (x, pos, cls, reg) if t is not None)

    def f(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in (x, pos, cls, reg)]
        return embed_tokens_op(*args, nec, "reference")

    assert torch.autograd.gradcheck(f, inputs)


def test_fake_matches_real_dtype_and_shape_under_compile():
    x, pos, cls, reg, nec = make(CASES[0])
    compiled = torch.compile(lambda *a: embed_tokens_op(*a, nec, "reference"), fullgraph=True, backend="aot_eager")
    got = compiled(x.half(), pos, cls.half(), reg.half())
    want = reference.embed_tokens(x.half(), pos, cls.half(), reg.half(), no_embed_class=nec)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)


def triton_runs() -> bool:
    try:
        from regkern.ops.embed_tokens import triton_kernels
    except ImportError:
        return False
    return torch.cuda.is_available() or triton_kernels.INTERPRETED


@pytest.mark.skipif(not triton_runs(), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_triton_kernel_equals_the_reference_bit_for_bit(case, dtype):
    """One pass, the same float32 add rounded once: identical to the reference (and to timm in float32), gradients
    through the op's one backward."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, pos, cls, reg, nec = (t.detach().to(device).requires_grad_() if isinstance(t, torch.Tensor) else t
                             for t in make(case, dtype))  # fmt: skip
    with torch.no_grad():
        x.view(-1)[0] = -0.0  # a negative zero is copied, not added to
    got = regkern.embed_tokens(x, pos, cls, reg, no_embed_class=nec, backend="triton")
    want = reference.embed_tokens(x, pos, cls, reg, no_embed_class=nec)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    inputs = [t for t in (x, pos, cls, reg) if t is not None]
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_dispatch_auto_and_errors():
    x, pos, cls, reg, nec = make(CASES[0])
    choice = DISPATCHER.resolve(None, EmbedTokensRequest.from_tensors(x, pos, cls, reg))
    assert choice.name == "reference" and "auto (default)" in choice.reason
    with pytest.raises(ValueError, match="backend: unknown embed_tokens backend 'trition'"):
        regkern.embed_tokens(x, pos, cls, reg, no_embed_class=nec, backend="trition")
    with pytest.raises(ValueError, match="impl: expected one of"):
        embed_tokens_op(x, pos, cls, reg, nec, "bogus")
    if not triton_runs():
        with pytest.raises(
            ValueError, match="backend: 'triton' cannot run embed_tokens: CPU tensors need TRITON_INTERP"
        ):
            regkern.embed_tokens(x, pos, cls, reg, no_embed_class=nec, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        regkern.embed_tokens(x.double(), pos, cls, reg, no_embed_class=nec, backend="triton")


@pytest.mark.parametrize("pos_batch, x_batch", [(2, 2), (2, 1), (1, 3)], ids=["pos2-x2", "pos2-x1", "pos1-x3"])
def test_broadcast_inputs_get_summed_gradients(pos_batch, x_batch):
    """A position embedding with a batch dimension broadcasts against x (as in the reference): the op's fake gives
    the broadcast shape and its backward sums each gradient back to its input's shape."""
    g = torch.Generator().manual_seed(pos_batch * 10 + x_batch)
    x = torch.randn(x_batch, 4, 8, generator=g, dtype=torch.float64).requires_grad_()
    pos = torch.randn(pos_batch, 9, 8, generator=g, dtype=torch.float64).requires_grad_()
    cls = torch.randn(1, 1, 8, generator=g, dtype=torch.float64).requires_grad_()
    reg = torch.randn(1, 4, 8, generator=g, dtype=torch.float64).requires_grad_()
    assert embed_tokens_op(x, pos, cls, reg, False, "reference").shape == (max(pos_batch, x_batch), 9, 8)
    torch.library.opcheck(embed_tokens_op, (x, pos, cls, reg, False, "reference"))
    assert torch.autograd.gradcheck(lambda *a: embed_tokens_op(*a, False, "reference"), (x, pos, cls, reg))


def test_reference_backend_keeps_plain_pytorch_autograd_and_torch_func():
    """backend="reference" runs the reference's own PyTorch ops (no custom op), so torch.func transforms work."""
    x, pos, cls, reg, nec = make(CASES[0], dtype=torch.float64)
    detached = [t.detach() for t in (x, pos, cls, reg)]

    def f(x_):
        return regkern.embed_tokens(x_, *detached[1:], no_embed_class=nec, backend="reference").square().sum()

    grad = torch.func.grad(f)(detached[0])
    torch.testing.assert_close(grad, torch.autograd.grad(f(x), x)[0])


def test_shapes_are_checked_before_any_backend_reads_them():
    x = torch.randn(2, 4, 8)
    cls, reg = torch.randn(1, 1, 8), torch.randn(1, 2, 8)
    for backend in ("reference", "triton") if triton_runs() else ("reference",):
        with pytest.raises(ValueError, match=r"pos_embed: expected \(1 or B, P \+ M = 7, 8\)"):
            regkern.embed_tokens(x, torch.randn(1, 4, 8), cls, reg, backend=backend)  # no_embed_class=False
        with pytest.raises(ValueError, match=r"pos_embed: expected \(1 or B, M = 4, 8\)"):
            regkern.embed_tokens(x, torch.randn(1, 5, 8), cls, reg, no_embed_class=True, backend=backend)
        with pytest.raises(ValueError, match=r"cls_token: expected shape \(1, 1, 8\)"):
            regkern.embed_tokens(x, None, torch.randn(1, 2, 8), reg, backend=backend)
        with pytest.raises(ValueError, match=r"reg_token: expected shape \(1, R, 8\)"):
            regkern.embed_tokens(x, None, cls, torch.randn(2, 8), backend=backend)
        with pytest.raises(ValueError, match="pos_embed: expected a batch of 1 or B = 2"):
            regkern.embed_tokens(x, torch.randn(3, 7, 8), cls, reg, backend=backend)
