"""GPU checks of the CUDA backend's kernels (csrc/), beside the same checks of the Triton ones (skipped without CUDA).

Tolerance rule: the kernel's error against the float32 reference is at most 2x PyTorch's own error at the same
precision (eager attention in fp16/bf16, ``F.layer_norm`` in the input dtype). Outputs are allocated NaN-filled
(``REGKERN_DEBUG_NAN_FILL=1``) so elements a kernel leaves unwritten show.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import regkern
from regkern import cuda_ext, reference
from tests.helpers import attention_case_id, case_id, dtype_id, eager_attention, max_error, packed_qkv, registers

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]  # the repository root

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _cuda_ext(monkeypatch):
    status = cuda_ext.load()
    if not status.loaded or not status.with_cuda:
        pytest.fail(f"the CUDA extension is needed on a GPU: {status.reason}")
    monkeypatch.setenv("REGKERN_DEBUG_NAN_FILL", "1")


ATTENTION_CASES = [  # (B, N, H, d, R, shared, P)
    (3, 1, 2, 64, 0, True, 0),
    (2, 17, 3, 64, 4, True, 5),
    (2, 197, 4, 64, 0, True, 1),
    (4, 261, 12, 64, 0, True, 5),
    (2, 261, 4, 128, 16, False, 5),
    (1, 1374, 6, 64, 4, True, 5),
    (1, 1374, 4, 128, 0, True, 0),
    (2, 70, 2, 64, 70, True, 0),  # the small segment spans two key tiles
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=attention_case_id)
def test_attention_forward_matches_reference(case, dtype, backend):
    B, N, H, d, R, shared, P = case
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device="cuda", seed=N)
    reg_k, reg_v = registers(B, R, H, d, shared=shared, dtype=dtype, device="cuda", seed=N + 1)
    out, stats = regkern.register_attention(
        q, k, v, reg_k, reg_v, num_prefix=P, backend=backend, return_stats=("lse", "out_norm")
    )
    f32 = [None if t is None else t.float() for t in (q, k, v, reg_k, reg_v)]
    want, want_stats = reference.register_attention(*f32, num_prefix=P, return_stats=("lse", "out_norm"))
    own = max_error(eager_attention(q, k, v, reg_k, reg_v), want)
    assert torch.isfinite(out).all() and torch.isfinite(stats["lse"]).all()
    assert max_error(out, want) <= 2 * own + 1e-6
    torch.testing.assert_close(stats["lse"], want_stats["lse"], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(stats["out_norm"], want_stats["out_norm"], atol=2e-3, rtol=5e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_attention_unaligned_and_strided_inputs(dtype):
    """Inputs at an odd element offset go through a contiguous copy; strided qkv views are read in place."""
    B, N, H, d = 2, 261, 4, 64
    flat = torch.randn(B * N * H * d * 3 + 1, device="cuda", dtype=dtype)
    q = flat[1 : 1 + B * N * H * d].view(B, N, H, d)  # 2-byte offset: not 16-byte aligned
    k, v = packed_qkv(B, N, H, d, dtype=dtype, device="cuda")[1:]
    out = regkern.register_attention(q, k, v, num_prefix=5, backend="cuda")
    want = reference.register_attention(q.float(), k.float(), v.float(), num_prefix=5)
    assert max_error(out, want) <= 2 * max_error(eager_attention(q, k, v), want) + 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_attention_backward_matches_reference(dtype):
    B, N, H, d, R = 2, 261, 4, 64, 4
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, device="cuda")
    reg_k, reg_v = registers(B, R, H, d, shared=True, dtype=dtype, device="cuda")
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, reg_k, reg_v)]
    out = regkern.register_attention(*ins, num_prefix=5, backend="cuda")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    ref_ins = [t.detach().float().requires_grad_() for t in (q, k, v, reg_k, reg_v)]
    want = torch.autograd.grad(reference.register_attention(*ref_ins, num_prefix=5), ref_ins, g.float())
    eager_ins = [t.detach().clone().requires_grad_() for t in (q, k, v, reg_k, reg_v)]
    own = torch.autograd.grad(eager_attention(*eager_ins), eager_ins, g)
    for got, ref, eager in zip(grads, want, own):
        assert max_error(got, ref) <= 3 * max_error(eager, ref) + 1e-5


def test_cuda_attention_is_deterministic_and_uses_the_current_stream():
    q, k, v = packed_qkv(8, 261, 12, 64, dtype=torch.bfloat16, device="cuda")
    first = regkern.register_attention(q, k, v, num_prefix=5, backend="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        second = regkern.register_attention(q, k, v, num_prefix=5, backend="cuda")
    stream.synchronize()
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize(
    "shape", [(64, 261, 768), (7, 17, 1024), (3, 5, 100)], ids=lambda s: case_id(B=s[0], N=s[1], C=s[2])
)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_layer_norm_matches_reference(shape, dtype, backend):
    C = shape[-1]
    x = (torch.randn(shape, device="cuda") * 4 + 2).to(dtype)
    w = torch.randn(C, device="cuda", dtype=dtype)
    b = torch.randn(C, device="cuda", dtype=dtype)
    y, norms = regkern.layer_norm_with_norms(x, w, b, 1e-6, backend=backend)
    y_ref, norms_ref = reference.layer_norm_with_norms(x.float(), w.float(), b.float(), 1e-6)
    own = max_error(torch.nn.functional.layer_norm(x, (C,), w, b, 1e-6), y_ref)
    assert torch.isfinite(y).all()
    assert max_error(y, y_ref) <= 2 * own + 1e-6
    torch.testing.assert_close(norms, norms_ref, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("no_embed_class", [True, False])
def test_embed_tokens_matches_reference_exactly(dtype, no_embed_class):
    B, Hp, Wp, C, R = 4, 16, 16, 768, 4
    x = torch.randn(B, Hp * Wp, C, device="cuda", dtype=dtype)
    cls = torch.randn(1, 1, C, device="cuda", dtype=dtype)
    reg = torch.randn(1, R, C, device="cuda", dtype=dtype)
    pos = torch.randn(1, Hp * Wp + (0 if no_embed_class else 1 + R), C, device="cuda", dtype=dtype)
    got = regkern.embed_tokens(x, pos, cls, reg, no_embed_class=no_embed_class, backend="cuda")
    want = regkern.embed_tokens(x, pos, cls, reg, no_embed_class=no_embed_class, backend="reference")
    assert torch.equal(got, want)


def test_patched_model_with_cuda_backend_matches_timm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=224)
    model = model.cuda().to(torch.bfloat16).eval()
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        regkern.patch_timm(model, backend="cuda")
        assert "-> cuda" in regkern.explain(model)
        got = model(x)
        regkern.unpatch_timm(model)
        model.float()
        exact = model(x.float())
    assert max_error(got, exact) <= 2 * max_error(want, exact) + 1e-3


def test_cuda_ops_compile_and_cuda_graph():
    q, k, v = packed_qkv(4, 261, 12, 64, dtype=torch.bfloat16, device="cuda")

    def f(q, k, v):
        out, stats = regkern.register_attention(q, k, v, num_prefix=5, backend="cuda", return_stats=("out_norm",))
        return out, stats["out_norm"]

    want = f(q, k, v)
    got = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got[0], want[0])
    graph = torch.cuda.CUDAGraph()
    f(q, k, v)  # warm up outside capture
    with torch.cuda.graph(graph):
        captured = f(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured[0], want[0])


def test_compute_sanitizer_is_clean():
    """memcheck over every CUDA kernel at ragged shapes (tests/ops/cuda_sanitizer_workload.py)."""
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        candidate = Path(home) / "bin" / "compute-sanitizer"
        sanitizer = str(candidate) if candidate.exists() else None
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (CUDA toolkit bin/ not on PATH)")
    for tool in ("memcheck", "racecheck", "initcheck"):
        run = subprocess.run(
            [
                sanitizer,
                "--tool",
                tool,
                "--error-exitcode",
                "1",
                sys.executable,
                str(ROOT / "tests" / "ops" / "cuda_sanitizer_workload.py"),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=900,
        )
        assert run.returncode == 0, f"{tool}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
