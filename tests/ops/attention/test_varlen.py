"""regkern.register_attention_varlen: packed sequences of different lengths against each sequence run alone
(reference), on the Triton kernels (under TRITON_INTERPRET=1 on the CPU), the torch and reference backends; forward,
statistics and gradients; bad cu_seqlens and the other arguments named in the errors.

Tolerance: error <= 2x PyTorch's own (eager, same precision) error against float64 (3x for gradients); outputs of the
launcher NaN-prefilled."""

import pytest
import torch

import regkern
from regkern import reference
from regkern.ops.attention import attention_varlen_bwd, attention_varlen_fwd
from tests.helpers import case_id, eager_attention, max_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_kernels = pytest.importorskip("regkern.ops.attention.triton_kernels")
TRITON = DEVICE == "cuda" or triton_kernels.INTERPRETED
BACKENDS = ["reference", "torch"] + (["triton"] if TRITON else [])
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

PACKS = [  # lengths, H, d, R, P, per-sequence registers, dtype
    ((1, 5, 17), 2, 32, 0, 0, False, "fp32"),
    ((17, 1, 5, 261, 197), 1, 64, 4, 1, False, "fp16"),
    ((5, 17, 197, 5), 1, 64, 4, 5, True, "fp32"),
    ((261, 17), 2, 32, 0, 5, False, "fp16"),
]


def pack_id(case):
    lengths, H, d, R, P, per_seq, dt = case
    return case_id("perseq" if per_seq else "shared", "S" + "_".join(map(str, lengths)), H=H, D=d, R=R, P=P, dtype=dt)


def make_pack(lengths, H, d, R, per_seq, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, S = sum(lengths), len(lengths)
    qkv = torch.randn(T, 3, H, d, generator=g).to(DEVICE, dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    regs = (None, None)
    if R:
        shape = (S, R, H, d) if per_seq else (R, H, d)
        regs = tuple(torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    return (*qkv.unbind(1), cu, *regs)


def per_sequence(fn, q, k, v, cu, reg_k, reg_v):
    """fn(q, k, v, reg_k, reg_v) on each sequence alone ((1, n, H, d) views), outputs concatenated over tokens."""
    outs = []
    bounds = cu.tolist()
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rk = rv = None
        if reg_k is not None:
            rk, rv = (reg_k[s], reg_v[s]) if reg_k.dim() == 4 else (reg_k, reg_v)
        outs.append(fn(q[None, a:b], k[None, a:b], v[None, a:b], rk, rv)[0])
    return torch.cat(outs)


@pytest.mark.parametrize("case", PACKS, ids=pack_id)
def test_triton_launcher_matches_each_sequence_alone(case):
    if not TRITON:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    lengths, H, d, R, P, per_seq, dt = case
    q, k, v, cu, reg_k, reg_v = make_pack(lengths, H, d, R, per_seq, DTYPES[dt])
    T = q.shape[0]
    out = torch.full((T, H, d), float("nan"), dtype=q.dtype, device=DEVICE)
    lse = torch.full((H, T), float("nan"), device=DEVICE)
    _, _, out_norm = triton_kernels.attention_forward_varlen(
        q, k, v, cu, max(lengths), reg_k, reg_v, d**-0.5, P, True, out=out, lse=lse
    )
    to64 = [None if t is None else t.double() for t in (q, k, v, reg_k, reg_v)]
    want, stats = reference.register_attention_varlen(
        *to64[:3], cu, *to64[3:], num_prefix=P, return_stats=("lse", "out_norm")
    )
    own = per_sequence(eager_attention, q, k, v, cu, reg_k, reg_v)
    assert not out.isnan().any() and not lse.isnan().any()
    assert max_error(out, want) <= 2 * max(max_error(own, want), 4 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(lse.double(), stats.lse.double(), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(out_norm.double(), stats.out_norm.double(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PACKS, ids=pack_id)
def test_backends_forward_statistics_and_gradients_match_each_sequence_alone(case, backend):
    lengths, H, d, R, P, per_seq, dt = case
    inputs = make_pack(lengths, H, d, R, per_seq, DTYPES[dt], seed=1)
    q, k, v, cu, reg_k, reg_v = inputs
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((reg_k, reg_v) if R else ())]
    regs = dict(reg_k=leaves[3], reg_v=leaves[4]) if R else {}
    out, stats = regkern.register_attention_varlen(
        *leaves[:3], cu, num_prefix=P, return_stats=("lse", "out_norm"), backend=backend, **regs
    )
    assert out.shape == q.shape and out.is_contiguous() and stats.lse.shape == (H, q.shape[0])
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    regs64 = leaves64[3:] if R else [None, None]
    want, want_stats = reference.register_attention_varlen(
        *leaves64[:3], cu, *regs64, num_prefix=P, return_stats=("lse", "out_norm")
    )
    want_grads = torch.autograd.grad(want, leaves64, g.double())
    low = [t.detach().clone().requires_grad_() for t in leaves]
    eager = per_sequence(eager_attention, *low[:3], cu, *(low[3:] if R else [None, None]))
    eager_grads = torch.autograd.grad(eager, low, g)
    floor = 8 * torch.finfo(torch.float32).eps
    assert max_error(out, want) <= 2 * max(max_error(eager, want), floor)
    torch.testing.assert_close(stats.lse.double(), want_stats.lse.double(), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(stats.out_norm.double(), want_stats.out_norm.double(), atol=2e-3, rtol=2e-3)
    for name, a, b, e in zip(["dq", "dk", "dv", "dreg_k", "dreg_v"], got, want_grads, eager_grads):
        assert max_error(a, b) <= 3 * max(max_error(e, b), floor), name


def test_empty_sequences_and_sequences_of_one_token():
    lengths = (3, 0, 1, 9, 0)
    q, k, v, cu, reg_k, reg_v = make_pack(lengths, 2, 32, 2, True, torch.float32, seed=2)
    for backend in BACKENDS:
        out = regkern.register_attention_varlen(q, k, v, cu, reg_k=reg_k, reg_v=reg_v, backend=backend)
        want = reference.register_attention_varlen(q, k, v, cu, reg_k, reg_v)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=backend)


def test_opcheck_varlen_ops():
    if not TRITON:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    q, k, v, cu, reg_k, reg_v = make_pack((5, 1, 9), 1, 16, 2, False, torch.float32, seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, reg_k, reg_v)]
    args = (*leaves[:3], cu, *leaves[3:], 9, 0.25, 1, True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(attention_varlen_fwd, args, test_utils=tests)
    out, lse, _ = attention_varlen_fwd(*args)
    bwd = (torch.randn_like(out), q, k, v, cu, reg_k, reg_v, out.detach(), lse, 9, 0.25, 1)
    torch.library.opcheck(attention_varlen_bwd, bwd, test_utils=("test_schema", "test_faketensor"))


def _bad(**over):
    q, k, v, cu, reg_k, reg_v = make_pack((5, 9), 2, 16, 2, False, torch.float32, seed=4)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, num_prefix=1, reg_k=reg_k, reg_v=reg_v)
    args.update(over)
    return args


BAD = {
    "cu_seqlens: expected an int32": dict(cu_seqlens=torch.tensor([0, 5, 14])),
    "cu_seqlens: expected to start at 0": dict(cu_seqlens=torch.tensor([1, 5, 14], dtype=torch.int32)),
    "cu_seqlens: expected non-decreasing": dict(cu_seqlens=torch.tensor([0, 9, 5, 14], dtype=torch.int32)),
    "cu_seqlens: expected to end at T = 14": dict(cu_seqlens=torch.tensor([0, 5, 13], dtype=torch.int32)),
    "cu_seqlens: sequence 1 has 0 tokens, fewer than num_prefix = 1": dict(
        cu_seqlens=torch.tensor([0, 14, 14], dtype=torch.int32)
    ),
    "cu_seqlens: expected the device of q": dict(cu_seqlens=torch.tensor([0, 5, 14], dtype=torch.int32, device="meta")),
    "cu_seqlens: expected an int32 tensor of shape": dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)),
    "reg_k: expected (R, H, d)": dict(reg_k=torch.randn(2, 3, 16), reg_v=torch.randn(2, 3, 16)),
    "reg_k/reg_v: KV registers need both": dict(reg_v=None),
    "k: expected the shape, dtype and device of q": dict(k=torch.randn(13, 2, 16)),
    "q: expected a (T, H, d) tensor": dict(q=torch.randn(1, 14, 2, 16)),
    "return_stats: variable-length attention returns": dict(return_stats=("received",)),
    "max_seqlen: expected an int >= the longest sequence": dict(max_seqlen=5),
    "num_prefix: expected an int >= 0": dict(num_prefix=-1),
    "backend: 'cuda'": dict(backend="cuda"),
}


@pytest.mark.parametrize("expected", list(BAD), ids=[m.split(":")[0] + "-" + str(i) for i, m in enumerate(BAD)])
def test_bad_arguments_are_named(expected):
    with pytest.raises((ValueError, TypeError), match=expected.replace("(", r"\(").replace(")", r"\)")):
        regkern.register_attention_varlen(**_bad(**BAD[expected]))


def test_non_contiguous_cu_seqlens_and_zero_registers():
    q, k, v, cu, _, _ = make_pack((5, 9, 3), 2, 16, 0, False, torch.float32, seed=5)
    strided = torch.stack([cu, torch.full_like(cu, 99)], 1)[:, 0]  # the same offsets with stride 2
    assert not strided.is_contiguous()
    zero = [torch.zeros(0, 2, 16, device=DEVICE, requires_grad=True) for _ in range(2)]
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = regkern.register_attention_varlen(*leaves, strided, reg_k=zero[0], reg_v=zero[1], backend=backend)
        want = reference.register_attention_varlen(q, k, v, cu)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=backend)
        grads = torch.autograd.grad(out.sum(), leaves + zero)
        assert grads[3].shape == (0, 2, 16)


def test_auto_leaves_triton_for_what_its_kernels_do_not_take():
    q, k, v, cu, _, _ = make_pack((5, 9), 1, 16, 0, False, torch.float64, seed=6)
    with pytest.raises(ValueError, match="backend: 'triton'.*cannot run this call: dtype torch.float64"):
        regkern.register_attention_varlen(q, k, v, cu, backend="triton")
    out = regkern.register_attention_varlen(q, k, v, cu)  # auto: torch here
    torch.testing.assert_close(out, reference.register_attention_varlen(q, k, v, cu))
