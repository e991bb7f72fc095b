"""The CUDA extension (csrc/) as CI sees it without a GPU: it builds, loads, registers its ops, checks its inputs in
C++, and its CPU implementations (C++ references) agree with ``regkern.reference`` through every Python layer
(fakes, autograd, torch.compile, dispatch). The CUDA kernels themselves are tested in tests/ops/test_gpu_cuda.py.

With ``REGKERN_REQUIRE_CUDA_EXT=1`` a missing extension fails instead of skipping: .ci/run builds it ahead of time
after the README's two set-up commands and runs this file again that way.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import regkern
from regkern import cuda_ext, dispatch_table, reference
from regkern.ops.attention import attention_fwd
from regkern.ops.attention.backends import AttentionRequest, resolve_backend
from regkern.ops.embed_tokens import embed_tokens_op
from regkern.ops.layer_norm import layer_norm_fwd
from tests.helpers import attention_case_id, case_id, dtype_id, max_error, packed_qkv, registers

ROOT = Path(__file__).resolve().parents[2]  # the repository root
# a newcomer (and CI running the README's commands) skips what is missing; .ci/run then requires it
REQUIRED = os.environ.get("REGKERN_REQUIRE_CUDA_EXT") == "1"
OPS = ("cuda_attention_fwd", "cuda_layer_norm_fwd", "cuda_embed_tokens")


@pytest.fixture(scope="module")
def ext():
    status = cuda_ext.load(build=False)  # never a multi-minute just-in-time build inside the test run
    if not status.loaded:
        if REQUIRED:
            pytest.fail(f"the CUDA extension must be built in CI: {status.reason}")
        pytest.skip(f"CUDA extension not built: {status.reason}")
    return status


def test_extension_registers_its_ops_with_cuda_kernels(ext):
    assert ext.with_cuda, "built without REGKERN_WITH_CUDA: the CUDA kernels are missing"
    for name in OPS:
        op = getattr(torch.ops.regkern, name)
        assert op.default._schema.name == f"regkern::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"regkern::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"regkern::{name}", "CUDA")


def test_import_does_not_load_the_extension():
    code = (
        "import sys, regkern; assert 'regkern._C' not in sys.modules; "
        "assert regkern.cuda_ext.status() is None; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("mode, expect", [("off", "REGKERN_CUDA_EXT=off"), ("bogus", "REGKERN_CUDA_EXT")])
def test_extension_mode_env(mode, expect):
    code = (
        "import regkern, torch\n"
        "try:\n s = regkern.cuda_ext.load(); print('status', s.loaded, s.reason)\n"
        "except ValueError as e: print('error', e)\n"
        "q = torch.randn(1, 3, 1, 8)\n"
        "try: regkern.register_attention(q, q, q, backend='cuda')\n"
        "except ValueError as e: print('backend', e)\n"
    )
    env = dict(os.environ, REGKERN_CUDA_EXT=mode)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout
    if mode == "off":
        assert "status False" in out.stdout
        assert "backend 'cuda'" in out.stdout and "not available" in out.stdout


# ------------------------------------------------------------------------------------------ input checks in C++


def _attn_args(**over):
    q, k, v = packed_qkv(2, 9, 3, 16)
    args = dict(q=q, k=k, v=v, reg_k=None, reg_v=None, scale=0.25, num_prefix=1, want_out_norm=False)
    args.update(over)
    return args


BAD_ATTENTION = {
    "q-3d": (dict(q=torch.randn(2, 9, 48)), "q: expected 4 dims"),
    "k-shape": (dict(k=torch.randn(2, 8, 3, 16)), "k: expected the shape of q"),
    "v-dtype": (dict(v=torch.randn(2, 9, 3, 16, dtype=torch.float64)), "v: expected the dtype of q"),
    "q-int": (dict(q=torch.ones(2, 9, 3, 16, dtype=torch.int32)), "q: expected float16, bfloat16 or float32"),
    "reg_v-missing": (dict(reg_k=torch.randn(4, 3, 16)), "reg_v: KV registers need both"),
    "reg_k-heads": (dict(reg_k=torch.randn(4, 2, 16), reg_v=torch.randn(4, 2, 16)), "reg_k: expected (R, 3, 16)"),
    "reg_v-shape": (dict(reg_k=torch.randn(4, 3, 16), reg_v=torch.randn(5, 3, 16)), "reg_v: expected the shape"),
    "scale": (dict(scale=float("nan")), "scale: expected a finite float > 0"),
    "num_prefix": (dict(num_prefix=10), "num_prefix: expected 0 <= num_prefix <= N = 9"),
}


@pytest.mark.parametrize("case", BAD_ATTENTION, ids=list(BAD_ATTENTION))
def test_attention_op_errors_name_the_argument(ext, case):
    over, message = BAD_ATTENTION[case]
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.regkern.cuda_attention_fwd(**_attn_args(**over))


BAD_LAYER_NORM = {
    "weight-shape": (dict(weight=torch.randn(7)), "weight: expected shape (8,)"),
    "bias-int": (dict(bias=torch.ones(8, dtype=torch.int64)), "bias: expected a floating dtype"),
    "eps": (dict(eps=-1.0), "eps: expected a finite float >= 0"),
    "x-int": (dict(x=torch.ones(3, 8, dtype=torch.int32)), "x: expected a floating dtype"),
}


@pytest.mark.parametrize("case", BAD_LAYER_NORM, ids=list(BAD_LAYER_NORM))
def test_layer_norm_op_errors_name_the_argument(ext, case):
    over, message = BAD_LAYER_NORM[case]
    args = dict(x=torch.randn(3, 8), weight=None, bias=None, eps=1e-6)
    args.update(over)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.regkern.cuda_layer_norm_fwd(**args)


BAD_EMBED = {
    "x-2d": (dict(x=torch.randn(4, 8)), "x: expected patch tokens"),
    "pos-len": (dict(pos_embed=torch.randn(1, 7, 8)), "pos_embed: expected shape (1, 6, 8)"),
    "pos-len-no-embed-class": (
        dict(pos_embed=torch.randn(1, 9, 8), no_embed_class=True),
        "pos_embed: expected shape (1, 4, 8)",
    ),
    "cls-shape": (dict(cls_token=torch.randn(1, 2, 8)), "cls_token: expected shape (1, 1, 8)"),
    "reg-dtype": (dict(reg_token=torch.randn(1, 1, 8, dtype=torch.float64)), "reg_token: expected the dtype of x"),
}


@pytest.mark.parametrize("case", BAD_EMBED, ids=list(BAD_EMBED))
def test_embed_tokens_op_errors_name_the_argument(ext, case):
    over, message = BAD_EMBED[case]
    args = dict(
        x=torch.randn(2, 4, 8),
        pos_embed=torch.randn(1, 6, 8),
        cls_token=torch.randn(1, 1, 8),
        reg_token=torch.randn(1, 1, 8),
        no_embed_class=False,
    )
    args.update(over)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.regkern.cuda_embed_tokens(**args)


# ------------------------------------------------------------------------- CPU implementations vs the reference

ATTENTION_CASES = [  # (B, N, H, d, R, shared, P)
    (2, 1, 2, 16, 0, True, 0),
    (2, 17, 3, 16, 4, True, 5),
    (1, 197, 2, 32, 0, True, 1),
    (2, 261, 2, 64, 16, False, 5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=attention_case_id)
def test_attention_op_cpu_matches_reference(ext, case, dtype, monkeypatch):
    monkeypatch.setenv("REGKERN_DEBUG_NAN_FILL", "1")
    B, N, H, d, R, shared, P = case
    q, k, v = packed_qkv(B, N, H, d, dtype=dtype, seed=N)
    reg_k, reg_v = registers(B, R, H, d, shared=shared, dtype=dtype, seed=N + 1)
    out, lse, out_norm = torch.ops.regkern.cuda_attention_fwd(q, k, v, reg_k, reg_v, d**-0.5, P, True)
    want, stats = reference.register_attention(q, k, v, reg_k, reg_v, return_stats=("lse", "out_norm"), num_prefix=P)
    assert out.shape == (B, N, H, d) and out.is_contiguous() and out.dtype == dtype
    assert max_error(out, want) <= 1e-5 + (1e-3 if dtype == torch.float16 else 0)
    torch.testing.assert_close(lse, stats["lse"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_norm, stats["out_norm"], atol=1e-4, rtol=1e-5)


def test_attention_op_out_norm_off_returns_empty(ext):
    out, lse, out_norm = torch.ops.regkern.cuda_attention_fwd(**_attn_args())
    assert out_norm.shape == (0,) and lse.shape == (2, 3, 9)


@pytest.mark.parametrize(
    "shape",
    [(3, 17, 40), (2, 1, 1, 8)],
    ids=lambda s: case_id(B=s[0], N=s[1], C=s[-1]) + ("-4d" if len(s) == 4 else ""),
)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_backend_cuda_cpu_matches_reference(ext, shape, affine):
    x = torch.randn(shape) * 3 + 1
    C = shape[-1]
    w, b = (torch.randn(C), torch.randn(C)) if affine else (None, None)
    y, norms = regkern.layer_norm_with_norms(x, w, b, 1e-5, backend="cuda")
    y_ref, norms_ref = reference.layer_norm_with_norms(x, w, b, 1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norms, norms_ref)
    ln = regkern.MonitoredLayerNorm(C, eps=1e-5, elementwise_affine=affine, backend="cuda")
    assert ln.backend_name == "cuda"
    xg = x.clone().requires_grad_()
    ln(xg).sum().backward()
    xr = x.clone().requires_grad_()
    torch.nn.functional.layer_norm(xr, (C,), ln.weight, ln.bias, 1e-5).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("no_embed_class", [True, False])
@pytest.mark.parametrize("parts", ["cls+reg", "cls", "reg", "none"])
def test_embed_tokens_backend_cuda_cpu_matches_reference_and_grads(ext, no_embed_class, parts):
    B, M, C, R = 2, 6, 8, 3
    x = torch.randn(B, 2, 3, C, requires_grad=True)  # a (B, Hp, Wp, C) grid
    cls = torch.randn(1, 1, C, requires_grad=True) if "cls" in parts else None
    reg = torch.randn(1, R, C, requires_grad=True) if "reg" in parts else None
    P = (cls is not None) + (R if reg is not None else 0)
    pos = torch.randn(1, M if no_embed_class else P + M, C, requires_grad=True)
    got = regkern.embed_tokens(x, pos, cls, reg, no_embed_class=no_embed_class, backend="cuda")
    want = reference.embed_tokens(x, pos, cls, reg, no_embed_class=no_embed_class)
    assert torch.equal(got, want)
    inputs = [t for t in (x, pos, cls, reg) if t is not None]
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b)


def test_embed_tokens_backend_errors_name_backend():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="backend: unknown embed_tokens backend 'trition'"):
        regkern.embed_tokens(x, backend="trition")
    with pytest.raises(ValueError, match="pos_embed is torch.float64"):
        regkern.embed_tokens(x, torch.randn(1, 4, 8, dtype=torch.float64), no_embed_class=True, backend="cuda")


# ------------------------------------------------------------------------------- composition with torch.library


def test_opcheck_attention(ext):
    """The CUDA kernel is the "cuda" implementation of regkern::attention_fwd, whose autograd is the op's one; the C++
    op itself has a fake (checked here without gradients) and no autograd of its own."""
    q, k, v = packed_qkv(2, 9, 2, 16)
    reg_k, reg_v = registers(2, 3, 2, 16, shared=True)
    args = [t.clone().requires_grad_() for t in (q, k, v, reg_k, reg_v)]
    op_args = (*args, None, None, None, None, None, None, 0.25, 1, False, 0.0, False, True, False, False, False, "cuda")
    torch.library.opcheck(attention_fwd, op_args)
    raw = [t.detach() for t in args]
    torch.library.opcheck(
        torch.ops.regkern.cuda_attention_fwd.default,
        (*raw, 0.25, 1, True),
        test_utils=("test_schema", "test_faketensor"),
    )
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("regkern::cuda_attention_fwd", "Autograd")


@pytest.mark.parametrize("impl", ["cuda", "reference"])
def test_opcheck_layer_norm_and_embed(ext, impl):
    x, w, b = torch.randn(3, 5, 8, requires_grad=True), torch.randn(8, requires_grad=True), torch.randn(8)
    torch.library.opcheck(layer_norm_fwd, (x, w, b, 1e-6, impl))
    torch.library.opcheck(
        torch.ops.regkern.cuda_layer_norm_fwd.default,
        (x.detach(), w.detach(), b, 1e-6),
        test_utils=("test_schema", "test_faketensor"),
    )
    args = (
        torch.randn(2, 4, 8, requires_grad=True),
        torch.randn(1, 7, 8, requires_grad=True),
        torch.randn(1, 1, 8, requires_grad=True),
        torch.randn(1, 2, 8, requires_grad=True),
        False,
    )
    torch.library.opcheck(embed_tokens_op, (*args, impl))
    torch.library.opcheck(
        torch.ops.regkern.cuda_embed_tokens.default,
        tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_attention_gradients_through_the_cuda_op(ext):
    q, k, v = packed_qkv(2, 17, 2, 16, seed=3)
    reg_k, reg_v = registers(2, 4, 2, 16, shared=False)
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v, reg_k, reg_v)]
    ref_ins = [t.detach().clone().requires_grad_() for t in (q, k, v, reg_k, reg_v)]
    out = regkern.register_attention(*ins, num_prefix=2, backend="cuda")
    want = reference.register_attention(*ref_ins, num_prefix=2)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(want, ref_ins, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph_with_the_cuda_op(ext):
    q, k, v = packed_qkv(1, 17, 2, 16)
    reg_k, reg_v = registers(1, 2, 2, 16, shared=True)

    def f(q, k, v):
        out, stats = regkern.register_attention(
            q, k, v, reg_k, reg_v, num_prefix=1, backend="cuda", return_stats=("out_norm",)
        )
        return out * 2, stats["out_norm"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, norm = compiled(q, k, v)
    want, want_norm = f(q, k, v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(norm, want_norm)


# ------------------------------------------------------------------------------------------------- dispatch


def test_cuda_backend_not_supported_reasons_in_words(ext):
    cuda = regkern.get_backend("cuda")
    base = AttentionRequest("cuda", torch.float16, 64, capability=(9, 0), seq_len=261)
    assert cuda.not_supported_reasons(base) == []
    assert cuda.not_supported_reasons(AttentionRequest("cpu", torch.float32, 80)) == []  # the C++ reference
    cases = {
        "dtype torch.float32 is not supported by the CUDA kernel": dict(dtype=torch.float32),
        "head_dim 80 is not supported by the CUDA kernel (64, 128)": dict(head_dim=80),
        "attn_mask is not supported": dict(has_mask=True),
        "attention dropout is not supported": dict(dropout=True),
        "statistics prefix_rows, received are not computed": dict(stats=frozenset({"prefix_rows", "received"})),
    }
    from dataclasses import replace

    for words, change in cases.items():
        reasons = cuda.not_supported_reasons(replace(base, **change))
        assert any(words in r for r in reasons), (words, reasons)
    with pytest.raises(ValueError, match="backend 'cuda'.*head_dim 80"):
        resolve_backend("cuda", replace(base, head_dim=80))


def _table(tmp_path, backend, **over):
    entry = dict(
        op="attention",
        capability=[9, 0],
        gpu="NVIDIA H100 80GB HBM3",
        dtype="float16",
        dim=64,
        min_len=261,
        max_len=261,
        backend=backend,
        speedup=1.2,
        source="synthetic test table",
    )
    entry.update(over)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"version": 1, "entries": [entry]}))
    return path


def test_auto_defaults_to_triton_without_a_measured_entry(ext):
    request = AttentionRequest("cuda", torch.float16, 64, capability=(9, 0), seq_len=261)
    choice = resolve_backend("auto", request)
    assert choice.name == "triton"
    assert "cuda: no measured entry for attention on sm_90 float16 dim 64 N=261" in choice.reason


def test_auto_follows_the_measured_table(ext, tmp_path, monkeypatch):
    monkeypatch.setenv("REGKERN_DISPATCH_TABLE", str(_table(tmp_path, "cuda")))
    dispatch_table.clear_cache()
    try:
        request = AttentionRequest("cuda", torch.float16, 64, capability=(9, 0), seq_len=261)
        choice = resolve_backend("auto", request)
        assert choice.name == "cuda" and "1.2" in choice.reason and "synthetic test table" in choice.reason
        # another length, GPU or an unsupported request: back to triton, with the reason
        from dataclasses import replace

        assert resolve_backend("auto", replace(request, seq_len=1374)).name == "triton"
        assert resolve_backend("auto", replace(request, capability=(8, 0))).name == "triton"
        masked = resolve_backend("auto", replace(request, stats=frozenset({"received"})))
        assert masked.name == "triton" and "not computed by the CUDA kernel" in masked.reason
    finally:
        dispatch_table.clear_cache()


def test_module_and_explain_with_cuda_backend_on_cpu(ext, one_thread):
    timm = pytest.importorskip("timm")
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, qkv_bias=True).eval()
    mod = regkern.RegisterViTAttention.from_timm(attn, num_prefix_tokens=1, backend="cuda")
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), attn(x), atol=1e-5, rtol=1e-5)
    assert mod.backend_name == "cuda"
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=1)
    regkern.patch_timm(model, backend="cuda")
    text = regkern.explain(model)
    assert "blocks.0.attn: RegisterViTAttention -> cuda (requested by backend argument)" in text
    # the NormMonitor asks attention for statistics the CUDA kernel does not compute: the layer says so, and its
    # MonitoredLayerNorm shows up too
    monitored = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=1)
    regkern.patch_timm(monitored, backend="cuda", monitor=True)
    text = regkern.explain(monitored)
    assert "-> cuda (unavailable)" in text and "are not computed by the CUDA kernel (triton computes them)" in text
    assert "blocks.0.norm1: MonitoredLayerNorm -> reference (auto (default): " in text
    layer = model.blocks[0].attn
    assert layer.expected_seq_len == 1 + 4 + 4  # CLS + 4 registers + a 2x2 grid


@pytest.mark.slow
def test_just_in_time_build_and_cache(tmp_path):
    """The just-in-time path compiles csrc/ with ninja (one architecture to keep it short), caches it, and a second
    process loads the cached build without compiling."""
    problem = cuda_ext.toolkit_problem(cuda_ext.find_toolkit())
    if torch.version.cuda is None or problem:
        pytest.skip(f"needs a CUDA-enabled torch and a CUDA toolkit: {problem or 'torch has no CUDA'}")
    env = dict(
        os.environ,
        REGKERN_CUDA_EXT="jit",
        REGKERN_CACHE_DIR=str(tmp_path),
        TORCH_CUDA_ARCH_LIST="9.0",
        MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
    )
    code = (
        "import time, torch, regkern\n"
        "t = time.time(); s = regkern.cuda_ext.load(); print(s.loaded, s.source, s.with_cuda, s.reason)\n"
        "out, lse, _ = torch.ops.regkern.cuda_attention_fwd(*[torch.randn(1, 5, 2, 8)] * 3, None, None, 0.3, 1,"
        " False)\n"
        "print('seconds', time.time() - t)\n"
    )
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("True jit True"), first.stdout + first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert float(second.stdout.split("seconds")[-1]) < 30, "the cached build was not reused"
    assert list((tmp_path / "ext").iterdir()), "nothing cached"


@pytest.mark.parametrize(
    "mode, expect, rc",
    [("0", "REGKERN_BUILD_CUDA=0, not building", 0), ("maybe", "REGKERN_BUILD_CUDA: expected 'auto', '1' or '0'", 1)],
)
def test_setup_build_switch(mode, expect, rc):
    """setup.py reads REGKERN_BUILD_CUDA before anything is compiled (`--version` builds nothing)."""
    env = dict(os.environ, REGKERN_BUILD_CUDA=mode)
    out = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == rc, out.stderr
    assert expect in out.stderr + out.stdout


def test_setup_without_torch_in_the_build_environment_installs_python_only():
    """pip's isolated build has no torch: setup.py then plans no extension and says how to get one."""
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, REGKERN_BUILD_CUDA="auto"),
    )
    assert out.returncode == 0, out.stderr
    assert "torch is not importable in this build environment" in out.stderr
    assert "built just in time on first use" in out.stderr


def test_layer_norm_auto_follows_the_measured_table(ext, tmp_path, monkeypatch):
    from regkern.ops import dispatch
    from regkern.ops.layer_norm import choose_layer_norm_backend

    monkeypatch.setattr(dispatch, "cuda_capability", lambda index: (9, 0))  # a pretend H100
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    impl, why = choose_layer_norm_backend(None, "cuda", torch.bfloat16, 768)
    assert impl == "triton" and "no measured entry for layer_norm on sm_90 bfloat16 dim 768" in why
    path = _table(tmp_path, "cuda", op="layer_norm", dtype="bfloat16", dim=768, min_len=0, max_len=None)
    monkeypatch.setenv("REGKERN_DISPATCH_TABLE", str(path))
    dispatch_table.clear_cache()
    try:
        impl, why = choose_layer_norm_backend(None, "cuda", torch.bfloat16, 768)
        assert impl == "cuda" and "synthetic test table" in why
        assert choose_layer_norm_backend(None, "cuda", torch.bfloat16, 1024)[0] == "triton"
    finally:
        dispatch_table.clear_cache()


@pytest.mark.parametrize("impl", ["cuda", "reference"])
def test_opcheck_monitored_layer_norm(ext, impl):
    """The monitored forward mutates its accumulators: its schema says so (test_schema compares the declared and the
    observed mutations), and its fakes match."""
    from regkern.ops.layer_norm import layer_norm_fwd_monitored

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 7, 16, generator=g) * 5, torch.randn(16, generator=g)
    edges = torch.logspace(-2, 4, 49, dtype=torch.float64)[1:-1].float()

    def accumulators():
        return (
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.float64),
            torch.zeros(3),
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(3, 48, dtype=torch.int64),
        )

    utils = ("test_schema", "test_faketensor")
    args = (x, w, None, 1e-6, impl, 1, 3, 10.0, edges, 8, True, *accumulators())
    torch.library.opcheck(layer_norm_fwd_monitored, args, test_utils=utils)
    raw = (x, w, None, 1e-6, 1, 3, 10.0, edges, 8, False, *accumulators())
    torch.library.opcheck(torch.ops.regkern.cuda_layer_norm_fwd_monitored.default, raw, test_utils=utils)


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("// fake\n")
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho fake nvcc\n")
    (root / "bin" / "nvcc").chmod(0o755)
    return root


def test_toolkit_found_behind_an_nvcc_wrapper_script_and_a_symlink(tmp_path):
    """A newcomer's nvcc may be a wrapper script (`exec /opt/cuda/bin/nvcc "$@"`) or a symlink: the toolkit is the
    folder above the real nvcc, not above the wrapper (where torch would look)."""
    from regkern.ops.cuda_build import nvcc_wrapper_target

    toolkit = _fake_toolkit(tmp_path / "cuda-x")
    wrapper = tmp_path / "wrap" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    assert nvcc_wrapper_target(str(wrapper)) == toolkit
    link = tmp_path / "link" / "nvcc"
    link.parent.mkdir()
    link.symlink_to(toolkit / "bin" / "nvcc")
    assert nvcc_wrapper_target(str(link)) == toolkit
    stray = tmp_path / "stray" / "nvcc"
    stray.parent.mkdir()
    stray.write_text("#!/bin/sh\necho not a toolkit\n")
    assert nvcc_wrapper_target(str(stray)) is None
    assert cuda_ext.toolkit_problem(str(toolkit)) == ""
    assert "has no include/cuda_runtime.h" in cuda_ext.toolkit_problem(str(tmp_path / "wrap"))


def test_without_any_toolkit_the_reason_is_given_and_toolkit_tests_skip(tmp_path):
    """No nvcc on PATH and no CUDA_HOME: regkern says so (what the toolkit-dependent tests skip with) instead of
    failing, and the just-in-time build reports it without raising."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + "/usr/bin:/bin"
    env["REGKERN_CUDA_EXT"] = "jit"
    env["REGKERN_CACHE_DIR"] = str(tmp_path)
    code = (
        "import torch.utils.cpp_extension as c, regkern\n"
        "c.CUDA_HOME = None  # what torch finds on a machine without /usr/local/cuda\n"
        "from regkern import cuda_ext\n"
        "problem = cuda_ext.toolkit_problem(cuda_ext.find_toolkit())\n"
        "print('PROBLEM', problem)\n"
        "s = cuda_ext.load()\n"
        "print('LOADED', s.loaded, s.reason)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    problem = out.stdout.split("PROBLEM ", 1)[1].splitlines()[0]
    assert problem.startswith("no CUDA toolkit found"), out.stdout
    assert "LOADED False" in out.stdout and "just-in-time build failed" in out.stdout
