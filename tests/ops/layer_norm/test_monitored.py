"""The norm monitor's reduction inside the LayerNorm pass (``layer_norm_monitored``), against
``reference.norm_statistics``: counts, outliers and histograms exactly, sums to float tolerance, the maxima and the
per-group norms exactly as the plain LayerNorm reports them; y and gradients equal the plain LayerNorm's.

The Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors (fp32 and fp16) or on a GPU; the "cuda" backend runs
the extension's forward (its C++ reference on the CPU) and then the PyTorch reduction.
"""

import math

import pytest
import torch

from regkern import reference
from regkern.ops import cuda_ext
from regkern.ops.layer_norm import NormAccumulators, layer_norm_monitored, layer_norm_with_norms
from tests.helpers import case_id

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ln_kernels = pytest.importorskip("regkern.ops.layer_norm.triton_kernels")
TRITON_RUNS = DEVICE == "cuda" or ln_kernels.INTERPRETED
EDGES = torch.logspace(-2, 4, 49, dtype=torch.float64)[1:-1].float()

# (B, N, C, num_cls, num_prefix, dtype): ragged lengths, no prefix, CLS only, CLS + registers, registers only
CASES = [
    (2, 17, 48, 1, 5, torch.float32),
    (3, 1, 32, 1, 1, torch.float32),
    (1, 197, 64, 1, 1, torch.float16),
    (2, 261, 40, 1, 5, torch.float32),
    (2, 21, 40, 0, 4, torch.float16),
    (4, 37, 64, 0, 0, torch.float32),
]


def monitored_case_id(case):
    B, N, C, num_cls, num_prefix, dtype = case
    return case_id(f"cls{num_cls}", B=B, N=N, C=C, P=num_prefix, dtype=dtype)


def backends():
    names = ["reference"]
    if TRITON_RUNS:
        names.append("triton")
    if not cuda_ext.not_loaded_reasons(DEVICE, build=False):  # never a just-in-time build inside the test run
        names.append("cuda")
    return names


def accumulators(num_cls, num_prefix, threshold, seed=0, top_k=8, write_norms=True):
    """Accumulators already holding earlier batches' values: the kernel must add, not overwrite."""
    g = torch.Generator().manual_seed(seed)
    bins = EDGES.numel() + 1
    acc = NormAccumulators(
        num_cls,
        num_prefix,
        threshold,
        EDGES.to(DEVICE),
        torch.randint(0, 50, (3,), generator=g),
        torch.rand(3, generator=g, dtype=torch.float64) * 100,
        torch.rand(3, generator=g, dtype=torch.float64) * 1000,
        torch.rand(3, generator=g) * 3,
        torch.randint(0, 5, (3,), generator=g),
        torch.randint(0, 5, (3, bins), generator=g),
        top_k,
        write_norms,
    )
    for name in ("count", "total", "total_sq", "maximum", "outliers", "histogram"):
        setattr(acc, name, getattr(acc, name).to(DEVICE))
    return acc


def snapshot(acc):
    return [t.clone() for t in acc.buffers()]


def make_x(B, N, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g) * (torch.rand(B, N, 1, generator=g) * 6 + 0.1)
    x.view(-1, C)[::5] *= 30  # planted high-norm tokens, some above the threshold
    return x.to(DEVICE, dtype)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", CASES, ids=monitored_case_id)
def test_reduction_equals_the_reference_reduction(case, backend):
    B, N, C, num_cls, num_prefix, dtype = case
    x = make_x(B, N, C, dtype)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(C, generator=g) * 0.5 + 1).to(DEVICE, dtype)
    b = torch.randn(C, generator=g).to(DEVICE, dtype)
    threshold = 40.0
    acc = accumulators(num_cls, num_prefix, threshold)
    before = snapshot(acc)
    y, prefix_norms, patch_norms, candidates = layer_norm_monitored(x, w, b, 1e-6, acc, backend=backend)
    y_plain, norms = layer_norm_with_norms(x, w, b, 1e-6, backend=backend)
    assert torch.equal(y, y_plain)
    assert prefix_norms.shape == (B, num_prefix) and patch_norms.shape == (B, N - num_prefix)
    torch.testing.assert_close(torch.cat((prefix_norms, patch_norms), 1), norms, rtol=1e-6, atol=0)
    expected = reference.norm_statistics(norms, num_cls, num_prefix, threshold, EDGES.to(DEVICE))
    count, total, total_sq, maximum, outliers, histogram = acc.buffers()
    assert torch.equal(count, before[0] + expected.count)
    assert torch.equal(outliers, before[4] + expected.outliers)
    assert torch.equal(histogram, before[5] + expected.histogram)
    assert int(expected.outliers.sum()) > 0 and int(expected.histogram.sum()) == B * N
    torch.testing.assert_close(total, before[1] + expected.total, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(total_sq, before[2] + expected.total_sq, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(maximum, torch.maximum(before[3], expected.maximum), rtol=1e-6, atol=0)
    # the largest patch norms and their positions, from the candidates by one topk
    k = min(8, patch_norms.numel())
    if k:
        values, flat = reference.unpack_norm_keys(torch.topk(candidates, k).values)
        want_values, want_flat = torch.topk(patch_norms.reshape(-1), k)
        assert torch.equal(values, want_values) and torch.equal(flat, want_flat)


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_triton_gradients_equal_the_plain_layer_norm():
    B, N, C = 2, 9, 32
    x = make_x(B, N, C, torch.float32).requires_grad_()
    w = torch.randn(C, device=DEVICE, requires_grad=True)
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    dy = torch.randn(B, N, C, device=DEVICE)
    y, _, _, _ = layer_norm_monitored(x, w, b, 1e-6, accumulators(1, 3, 5.0), backend="triton")
    grads = torch.autograd.grad(y, (x, w, b), dy)
    y_plain, _ = layer_norm_with_norms(x, w, b, 1e-6, backend="triton")
    expected = torch.autograd.grad(y_plain, (x, w, b), dy)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not TRITON_RUNS, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_no_threshold_counts_no_outliers_and_many_row_blocks_per_program():
    # 4 programs under the interpreter: B * N = 600 rows is 38 row blocks, several per program
    x = make_x(3, 200, 32, torch.float32)
    acc = accumulators(1, 5, math.inf)
    before = snapshot(acc)
    _, prefix_norms, patch_norms, candidates = layer_norm_monitored(x, None, None, 1e-6, acc, backend="triton")
    # 4 programs, 8 candidates each: the 8 largest of 585 patch norms are among them
    assert candidates.shape == (4 * 8,)
    values, flat = reference.unpack_norm_keys(torch.topk(candidates, 8).values)
    want_values, want_flat = torch.topk(patch_norms.reshape(-1), 8)
    assert torch.equal(values, want_values) and torch.equal(flat, want_flat)
    lean = accumulators(1, 5, math.inf, write_norms=False, top_k=3)
    _, no_prefix, no_patch, few = layer_norm_monitored(x, None, None, 1e-6, lean, backend="triton")
    assert no_prefix.numel() == no_patch.numel() == 0 and few.shape == (4 * 4,)
    assert torch.equal(reference.unpack_norm_keys(torch.topk(few, 3).values)[0], want_values[:3])
    norms = torch.cat((prefix_norms, patch_norms), 1)
    expected = reference.norm_statistics(norms, 1, 5, math.inf, EDGES.to(DEVICE))
    assert torch.equal(acc.outliers, before[4])
    assert torch.equal(acc.count, before[0] + expected.count)
    assert torch.equal(acc.histogram, before[5] + expected.histogram)


def test_bad_accumulators_are_refused_naming_them():
    x = torch.randn(2, 7, 16)
    acc = accumulators(1, 3, 5.0)
    acc.total = acc.total.float()
    with pytest.raises(ValueError, match="accumulators.total"):
        layer_norm_monitored(x.to(DEVICE), None, None, 1e-6, acc)
    with pytest.raises(ValueError, match=r"x: the norm monitor expects tokens \(B, N, C\)"):
        layer_norm_monitored(torch.randn(14, 16, device=DEVICE), None, None, 1e-6, accumulators(1, 3, 5.0))
    with pytest.raises(ValueError, match="num_prefix"):
        layer_norm_monitored(x.to(DEVICE), None, None, 1e-6, accumulators(1, 9, 5.0))


@pytest.mark.parametrize("backend", backends())
def test_a_nan_token_shows_as_in_the_reference(backend):
    """A diverged token (NaN norm) makes its group's max NaN and lands in the last histogram bin, as
    ``scatter_reduce(amax)`` and ``torch.bucketize`` do; the other groups are untouched."""
    x = make_x(2, 9, 32, torch.float32)
    x[1, 6, 3] = float("nan")  # a patch token (P = 3)
    acc = accumulators(1, 3, 40.0)
    before = snapshot(acc)
    _, prefix_norms, patch_norms, _ = layer_norm_monitored(x, None, None, 1e-6, acc, backend=backend)
    norms = torch.cat((prefix_norms, patch_norms), 1)
    want = reference.norm_statistics(norms, 1, 3, 40.0, EDGES.to(DEVICE))
    assert torch.isnan(want.maximum[2]) and torch.isnan(acc.maximum[2])
    torch.testing.assert_close(acc.maximum[:2], torch.maximum(before[3], want.maximum)[:2])
    assert torch.equal(acc.histogram, before[5] + want.histogram)
    assert torch.equal(acc.count, before[0] + want.count)
