"""The CUDA kernels of csrc/ executed on the CPU: csrc/emulation/ compiles the very .cu sources (kernels and
launchers) for a host emulator of the CUDA features they use, and these tests compare them with regkern.reference.

What this proves without a GPU: tiling, the two key segments, masking of ragged tails (zero-filled copies), the
double-buffered cp.async pipeline (the emulator defers copies to their wait_group, so a missing wait reads stale
data), shared-memory layout, ldmatrix/mma fragment indexing against the PTX layouts, online softmax, LSE, the
out_norm epilogue, stride/alignment handling and that every output element is written (outputs are NaN-filled
first). What it cannot prove: what the emulator models by assumption (the PTX layouts, warp-synchronous execution),
timing, and the device compiler's code generation; tests/ops/test_gpu_cuda.py covers those on a GPU.

Tolerance: the kernel's error against the float32 reference is at most 2x PyTorch's own eager error in the same
dtype (on the CPU here), as for every kernel.
"""

import copy
import os

import pytest
import torch

import regkern
from regkern import cuda_ext, reference
from tests.helpers import attention_case_id, case_id, dtype_id, eager_attention, max_error, packed_qkv, registers

# a newcomer (and CI running the README's commands) skips what is missing; .ci/run then requires it
REQUIRED = os.environ.get("REGKERN_REQUIRE_CUDA_EXT") == "1"


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    problem = cuda_ext.toolkit_problem(cuda_ext.find_toolkit())
    if problem and not REQUIRED:
        pytest.skip(f"the emulator needs the CUDA toolkit headers: {problem}")
    cuda_ext.load_emulator(str(tmp_path_factory.mktemp("emulator")))
    return torch.ops.regkern_emulated


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    monkeypatch.setenv("REGKERN_DEBUG_NAN_FILL", "1")


CASES = [  # (B, N, H, d, R, shared, P)
    (2, 1, 1, 64, 0, True, 0),
    (1, 17, 2, 64, 4, True, 5),
    (1, 17, 1, 128, 16, False, 1),
    (1, 197, 1, 64, 0, True, 1),
    (1, 261, 1, 64, 0, True, 5),
    (1, 70, 1, 64, 70, True, 0),  # the small segment spans two key tiles
    (1, 130, 1, 128, 3, False, 64),  # prefix of a full tile
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=attention_case_id)
def test_emulated_attention_kernel_matches_reference(emu, case, dtype):
    B, N, H, d, R, shared, P = case
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, seed=N + d)
    reg_k, reg_v = registers(B, R, H, d, shared=shared, dtype=dtype, seed=N + 1)
    out, lse, out_norm = emu.cuda_attention_fwd(q, k, v, reg_k, reg_v, d**-0.5, P, True)
    f32 = [None if t is None else t.float() for t in (q, k, v, reg_k, reg_v)]
    want, stats = reference.register_attention(*f32, num_prefix=P, return_stats=("lse", "out_norm"))
    assert out.shape == (B, N, H, d) and out.is_contiguous() and out.dtype == dtype
    assert not torch.isnan(out).any() and not torch.isnan(lse).any() and not torch.isnan(out_norm).any()
    own = max_error(eager_attention(q, k, v, reg_k, reg_v), want)
    assert max_error(out, want) <= 2 * own + 1e-6
    torch.testing.assert_close(lse, stats["lse"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out_norm, stats["out_norm"], atol=5 * own, rtol=5e-3)


def test_emulated_attention_strided_and_unaligned_inputs(emu):
    B, N, H, d = 1, 40, 2, 64
    dtype = torch.float16
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, seed=7)  # strided views of one packed qkv tensor
    flat = torch.randn(B * N * H * d + 3, dtype=dtype)
    v_odd = flat[3:].view(B, N, H, d)  # 6-byte offset: not 16-byte aligned, copied before the kernel
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, N, d) storage viewed as (B, N, H, d)
    out, lse, _ = emu.cuda_attention_fwd(q, k_t, v_odd, None, None, 0.3, 2, False)
    want = reference.register_attention(q.float(), k.float(), v_odd.float(), scale=0.3)
    assert max_error(out, want) <= 2 * max_error(eager_attention(q, k, v_odd, scale=0.3), want) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "shape",
    [(3, 17, 768), (2, 3, 1536), (2, 2, 2056), (2, 5, 100), (1, 1, 8)],
    ids=[
        case_id("cached4", B=3, N=17, C=768),
        case_id("cached8", B=2, N=3, C=1536),
        case_id("reread", B=2, N=2, C=2056),
        case_id("scalar", B=2, N=5, C=100),
        case_id(B=1, N=1, C=8),
    ],
)
def test_emulated_layer_norm_kernel_matches_reference(emu, shape, dtype):
    C = shape[-1]
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    w, b = torch.randn(C).to(dtype), torch.randn(C).to(dtype)
    y, norms, mean, rstd = emu.cuda_layer_norm_fwd(x, w, b, 1e-6)
    y_ref, norms_ref = reference.layer_norm_with_norms(x.float(), w.float(), b.float(), 1e-6)
    own = max_error(torch.nn.functional.layer_norm(x, (C,), w, b, 1e-6), y_ref) if dtype != torch.float32 else 0
    assert not torch.isnan(y).any()
    assert max_error(y, y_ref) <= 2 * own + 2e-5
    torch.testing.assert_close(norms, norms_ref, atol=1e-4, rtol=1e-5)
    var, mu = torch.var_mean(x.float(), dim=-1, correction=0)
    torch.testing.assert_close(mean, mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-6), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("no_embed_class", [True, False])
@pytest.mark.parametrize(
    "C, layout",
    [(40, "grid"), (12, "grid"), (40, "strided")],
    ids=[case_id("grid-vec", C=40), case_id("grid-scalar", C=12), case_id("strided-scalar", C=40)],
)
def test_emulated_embed_tokens_kernel_matches_reference_exactly(emu, dtype, no_embed_class, C, layout):
    B, R = 2, 3
    x = torch.randn(B, 3, 4, C).to(dtype)
    if layout == "strided":  # channels not unit-stride: the one-element path
        x = torch.randn(B, C, 12).to(dtype).transpose(1, 2)
    cls, reg = torch.randn(1, 1, C).to(dtype), torch.randn(1, R, C).to(dtype)
    pos = torch.randn(1, 12 if no_embed_class else 12 + 1 + R, C).to(dtype)
    got = emu.cuda_embed_tokens(x, pos, cls, reg, no_embed_class)
    assert torch.equal(got, reference.embed_tokens(x, pos, cls, reg, no_embed_class=no_embed_class))
    got = emu.cuda_embed_tokens(x, None, None, reg, no_embed_class)
    assert torch.equal(got, reference.embed_tokens(x, None, None, reg, no_embed_class=no_embed_class))


def test_emulated_layer_norm_unaligned_rows_take_the_scalar_path(emu):
    C = 64
    flat = torch.randn(5 * C + 1).to(torch.float16)
    x = flat[1:].view(5, C)  # contiguous, 2 bytes off a 16-byte boundary: no 16-byte loads
    y, norms, _, _ = emu.cuda_layer_norm_fwd(x, None, None, 1e-5)
    y_ref, norms_ref = reference.layer_norm_with_norms(x.float(), None, None, 1e-5)
    assert max_error(y, y_ref) <= 2 * max_error(torch.nn.functional.layer_norm(x, (C,), eps=1e-5), y_ref) + 2e-5
    torch.testing.assert_close(norms, norms_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "B, N, C, num_cls, num_prefix",
    [(2, 21, 64, 1, 5), (3, 17, 100, 0, 4), (2, 9, 768, 1, 1), (1, 1, 32, 0, 0)],
    ids=[
        case_id("cls1", B=2, N=21, C=64, P=5),
        case_id("scalar-cls0", B=3, N=17, C=100, P=4),
        case_id("cached4-cls1", B=2, N=9, C=768, P=1),
        case_id("cls0", B=1, N=1, C=32, P=0),
    ],
)
def test_emulated_monitored_layer_norm_equals_the_reference_reduction(emu, B, N, C, num_cls, num_prefix):
    """The CUDA twin of the fused norm-monitor reduction (two emulated "SMs": each block loops over many rows, the
    warps' and blocks' partial statistics meet in atomics): counts, outliers and histograms exactly, sums to float
    tolerance, added to accumulators that already hold values."""
    g = torch.Generator().manual_seed(B * N + C)
    x = torch.randn(B, N, C, generator=g) * (torch.rand(B, N, 1, generator=g) * 4 + 0.1)
    x.view(-1, C)[::3] *= 20  # planted high-norm tokens
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    edges = torch.logspace(-2, 4, 49, dtype=torch.float64)[1:-1].float()
    acc = [
        torch.randint(0, 9, (3,), generator=g),
        torch.rand(3, generator=g, dtype=torch.float64),
        torch.rand(3, generator=g, dtype=torch.float64),
        torch.rand(3, generator=g),
        torch.randint(0, 9, (3,), generator=g),
        torch.randint(0, 9, (3, 48), generator=g),
    ]
    before = [t.clone() for t in acc]
    y, prefix_norms, patch_norms, candidates, mean, rstd = emu.cuda_layer_norm_fwd_monitored(
        x, w, b, 1e-6, num_cls, num_prefix, 25.0, edges, 8, True, *acc
    )
    y_ref, norms_ref = reference.layer_norm_with_norms(x, w, b, 1e-6)
    assert max_error(y, y_ref) <= 2e-5
    norms = torch.cat((prefix_norms, patch_norms), dim=1)
    torch.testing.assert_close(norms, norms_ref, atol=1e-4, rtol=1e-5)
    want = reference.norm_statistics(norms, num_cls, num_prefix, 25.0, edges)
    count, total, total_sq, maximum, outliers, histogram = acc
    assert torch.equal(count, before[0] + want.count)
    assert torch.equal(outliers, before[4] + want.outliers)
    assert torch.equal(histogram, before[5] + want.histogram)
    assert int(want.outliers.sum()) > 0
    torch.testing.assert_close(total, before[1] + want.total, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(total_sq, before[2] + want.total_sq, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(maximum, torch.maximum(before[3], want.maximum), rtol=0, atol=0)
    var, mu = torch.var_mean(x, dim=-1, correction=0)
    torch.testing.assert_close(mean, mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-6), atol=1e-4, rtol=1e-4)
    # 16 candidates per warp of the grid (2 emulated SMs x 8 blocks at most, 4 warps each): the top 8 among them
    assert candidates.numel() % 16 == 0 and bool((candidates >= -1).all())  # every slot written (NaN fill: -2)
    k = min(8, patch_norms.numel())
    if k:
        values, flat = reference.unpack_norm_keys(torch.topk(candidates, k).values)
        want_values, want_flat = torch.topk(patch_norms.reshape(-1), k)
        assert torch.equal(values, want_values) and torch.equal(flat, want_flat)
    _, no_prefix, no_patch, _, _, _ = emu.cuda_layer_norm_fwd_monitored(
        x, w, b, 1e-6, num_cls, num_prefix, 25.0, edges, 8, False, *[t.clone() for t in acc]
    )
    assert no_prefix.numel() == no_patch.numel() == 0
    with pytest.raises(RuntimeError, match="total: expected a contiguous Double"):
        emu.cuda_layer_norm_fwd_monitored(x, w, b, 1e-6, num_cls, num_prefix, 25.0, edges, 8, True, acc[0],
                                          acc[1].float(), *acc[2:])  # fmt: skip


def test_emulated_monitor_finds_planted_tokens_through_the_cuda_reduction(emu, monkeypatch):
    """A NormMonitor whose LayerNorms run the CUDA twin of the fused reduction (norm_backend="cuda"), with the
    extension's op swapped for the emulated kernel: the planted high-norm patches are found at the right layers and
    positions, and the report equals the PyTorch reduction's (counts, outliers, histograms exactly)."""
    timm = pytest.importorskip("timm")
    from regkern.ops.layer_norm import cuda as layer_norm_cuda

    if cuda_ext.not_loaded_reasons("cpu", build=False):
        pytest.skip("norm_backend='cuda' on CPU tensors needs the built extension")

    calls = []

    def emulated(x, weight, bias, eps, acc):
        calls.append(x.shape)
        return emu.cuda_layer_norm_fwd_monitored(
            x, weight, bias, float(eps), acc.num_cls, acc.num_prefix, float(acc.threshold), acc.inner_edges,
            acc.top_k, acc.write_norms, *acc.buffers(),
        )  # fmt: skip

    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=3).eval()
    P, planted = base.num_prefix_tokens, [(0, 3), (1, 7)]

    def plant(_module, args):
        x = args[0].clone()
        for b, patch in planted:
            x[b, P + patch] *= 60.0
        return (x,) + args[1:]

    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    reports = {}
    for norm_backend in ("cuda", "reference"):
        model = copy.deepcopy(base)
        model.blocks[1].register_forward_pre_hook(plant)
        options = {"norm_backend": norm_backend, "threshold": 150.0, "top_k": 4, "attention_share": False}
        regkern.patch_timm(model, monitor=options)
        with monkeypatch.context() as m:
            m.setattr(layer_norm_cuda, "layer_norm_forward_monitored", emulated)
            with torch.no_grad():
                model(images)
        reports[norm_backend] = regkern.get_monitor(model).report()
    assert len(calls) == 3  # one emulated kernel per block (the "reference" model never calls it)
    got, want = reports["cuda"], reports["reference"]
    for a, b in zip(got.rows, want.rows):
        assert (a["count"], a["outliers"], a["histogram"]) == (b["count"], b["outliers"], b["histogram"])
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-5)
    for layer in (1, 2):
        assert {(b, t) for _, b, t in got.top_patches[layer][:2]} == {(b, P + p) for b, p in planted}
    assert [p[1:] for p in got.top_patches[2]] == [p[1:] for p in want.top_patches[2]]
