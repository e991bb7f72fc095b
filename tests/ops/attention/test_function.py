"""Input checks, statistics container and backend dispatch of regkern.register_attention."""

import pytest
import torch

import regkern
from regkern.ops.attention.backends import AttentionRequest, resolve_backend
from tests.helpers import packed_qkv, registers

B, N, H, d = 2, 17, 2, 32


@pytest.fixture
def qkv():
    return packed_qkv(B, N, H, d)


def test_returns_out_only_without_stats(qkv):
    out = regkern.register_attention(*qkv)
    assert isinstance(out, torch.Tensor) and out.shape == (B, N, H, d)
    out2, stats = regkern.register_attention(*qkv, return_stats=("lse",))
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
    assert list(stats) == ["lse"] and stats.lse.shape == (B, H, N)
    with pytest.raises(AttributeError, match="out_norm.*not requested"):
        _ = stats.out_norm
    with pytest.raises(KeyError, match="received"):
        stats["received"]


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, r"q: expected 4 dims"),
        (lambda a: a.update(k=a["k"][:, :5]), ValueError, r"k: expected the shape of q"),
        (lambda a: a.update(v=a["v"].double()), TypeError, r"v: expected the dtype of q"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError, r"q: expected a floating"),
        (lambda a: a.update(q="nope"), TypeError, r"q: expected a torch.Tensor"),
        (lambda a: a.update(k=a["k"].to("meta")), ValueError, r"k: expected the device of q"),
        (lambda a: a.update(reg_k=torch.randn(3, H, d)), ValueError, r"reg_v: KV registers need both"),
        (lambda a: a.update(reg_v=torch.randn(3, H, d)), ValueError, r"reg_k: KV registers need both"),
        (
            lambda a: a.update(reg_k=torch.randn(3, H + 1, d), reg_v=torch.randn(3, H + 1, d)),
            ValueError,
            r"reg_k: expected \(R, 2, 32\)",
        ),
        (
            lambda a: a.update(reg_k=torch.randn(B + 1, 3, H, d), reg_v=torch.randn(B + 1, 3, H, d)),
            ValueError,
            r"reg_k: expected .*per batch element",
        ),
        (
            lambda a: a.update(reg_k=torch.randn(3, H, d), reg_v=torch.randn(4, H, d)),
            ValueError,
            r"reg_v: expected the shape of reg_k",
        ),
        (
            lambda a: a.update(reg_k=torch.randn(3, H, d).half(), reg_v=torch.randn(3, H, d).half()),
            TypeError,
            r"reg_k: expected the dtype of q",
        ),
        (lambda a: a.update(num_prefix=N + 1), ValueError, r"num_prefix: expected at most N = 17"),
        (lambda a: a.update(num_prefix=-1), ValueError, r"num_prefix: expected an int >= 0"),
        (lambda a: a.update(return_stats=("lse", "maps")), ValueError, r"return_stats: unknown statistic 'maps'"),
        (lambda a: a.update(return_stats=("prefix_rows",)), ValueError, r"num_prefix: 'prefix_rows' was requested"),
        (lambda a: a.update(backend="cudnn"), ValueError, r"backend: unknown backend 'cudnn'"),
        (lambda a: a.update(backend=3), TypeError, r"backend: expected a string"),
        (lambda a: a.update(scale=-1.0), ValueError, r"scale: expected a finite float > 0"),
        (
            lambda a: a.update(attn_mask=torch.ones(N, N + 1, dtype=torch.bool)),
            ValueError,
            r"attn_mask: expected a shape broadcastable to \(B, H, N, N\)",
        ),
        (lambda a: a.update(attn_mask=torch.ones(N, N, dtype=torch.int64)), TypeError, r"attn_mask: expected dtype"),
        (lambda a: a.update(dropout_p=1.5), ValueError, r"dropout_p: expected a float in \[0, 1\)"),
        (
            lambda a: a.update(return_stats=("lse",), dropout_p=0.1, backend="torch"),
            ValueError,
            r"backend 'torch' \(from backend argument\) cannot run this call: statistics",
        ),
    ],
    ids=[
        "rank",
        "k-shape",
        "v-dtype",
        "int-dtype",
        "not-tensor",
        "k-device",
        "reg_k-alone",
        "reg_v-alone",
        "reg-heads",
        "reg-batch",
        "reg-mismatch",
        "reg-dtype",
        "prefix-too-long",
        "prefix-negative",
        "unknown-stat",
        "prefix-rows-without-prefix",
        "unknown-backend",
        "backend-type",
        "bad-scale",
        "mask-shape",
        "mask-dtype",
        "dropout",
        "explicit-backend-unsupported",
    ],
)
def test_bad_input_names_the_argument(qkv, mutate, exc, match):
    q, k, v = qkv
    args = dict(q=q, k=k, v=v, reg_k=None, reg_v=None)
    mutate(args)
    kwargs = {key: args.pop(key) for key in list(args) if key not in ("q", "k", "v", "reg_k", "reg_v")}
    with pytest.raises(exc, match=match):
        regkern.register_attention(args["q"], args["k"], args["v"], args["reg_k"], args["reg_v"], **kwargs)


def test_auto_dispatch_and_reasons(qkv):
    plain = resolve_backend(None, AttentionRequest.from_tensors(qkv[0]))
    assert plain.name == "torch" and "auto" in plain.reason
    with_stats = resolve_backend("auto", AttentionRequest.from_tensors(qkv[0], stats=("out_norm",)))
    assert with_stats.name == "torch"  # SDPA output, statistics from the reference beside it
    stats_and_dropout = resolve_backend(
        "auto", AttentionRequest.from_tensors(qkv[0], stats=("out_norm",), dropout_p=0.1)
    )
    assert stats_and_dropout.name == "reference"
    assert "statistics with attention dropout" in stats_and_dropout.skipped["torch"][0]
    assert "skipped" in stats_and_dropout.reason and "torch: statistics" in stats_and_dropout.reason
    assert plain.skipped["triton"] == ["auto uses it on cuda only (name it explicitly otherwise)"]
    for backend in regkern.BACKENDS.values():
        assert isinstance(backend.not_supported_reasons(AttentionRequest.from_tensors(qkv[0])), list)


def test_environment_variable_selects_backend(qkv, monkeypatch):
    monkeypatch.setenv("REGKERN_BACKEND", "reference")
    choice = resolve_backend(None, AttentionRequest.from_tensors(qkv[0]))
    assert choice.name == "reference" and "$REGKERN_BACKEND" in choice.reason
    # an explicit argument wins over the environment
    assert resolve_backend("torch", AttentionRequest.from_tensors(qkv[0])).name == "torch"
    monkeypatch.setenv("REGKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        regkern.register_attention(*qkv)


def test_stats_on_the_torch_backend_leave_its_output_bit_identical(qkv):
    plain = regkern.register_attention(*qkv, backend="torch")
    out, stats = regkern.register_attention(*qkv, return_stats=("out_norm", "lse"), backend="torch")
    assert torch.equal(out, plain)
    _, want = regkern.register_attention(*qkv, return_stats=("out_norm", "lse"), backend="reference")
    for name in ("out_norm", "lse"):
        torch.testing.assert_close(stats[name], want[name], atol=1e-6, rtol=1e-6)  # float32 rounding


def test_stats_requested_via_auto(qkv):
    reg_k, reg_v = registers(B, 2, H, d, shared=True)
    out, stats = regkern.register_attention(*qkv, reg_k, reg_v, return_stats=("received", "prefix_rows"), num_prefix=3)
    assert stats.received.shape == (B, H, 2 + N) and stats.prefix_rows.shape == (B, H, 3, 2 + N)
    torch.testing.assert_close(
        out, regkern.register_attention(*qkv, reg_k, reg_v, backend="torch"), atol=1e-5, rtol=1e-5
    )


def test_scale_accepts_real_numbers_and_refuses_non_finite_ones(qkv):
    np = pytest.importorskip("numpy")
    want = regkern.register_attention(*qkv, scale=0.25, backend="reference")
    for scale in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor([0.25])):
        got = regkern.register_attention(*qkv, scale=scale, backend="reference")
        assert torch.equal(got, want), repr(scale)
    for bad in (float("inf"), float("nan"), -0.25, 0.0, np.float32("inf"), torch.tensor(float("inf")), True, "0.25"):
        with pytest.raises(ValueError, match="scale: expected"):
            regkern.register_attention(*qkv, scale=bad)
    with pytest.raises(ValueError, match="scale: expected a one-element real tensor"):
        regkern.register_attention(*qkv, scale=torch.tensor([0.25, 0.5]))
