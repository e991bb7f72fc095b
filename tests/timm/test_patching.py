"""patch_timm / unpatch_timm / explain on real timm architectures (random init, tiny images, CPU, fp32).

Each model is built once per module (seeded) and deep-copied by the tests, so the patched and the unpatched model
start from identical weights. Everything is compared with the unpatched timm model.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.eva import EvaAttention

import regkern
from regkern import RegisterAttentionBase, RegisterEvaAttention, RegisterViTAttention, explain, patch_timm, unpatch_timm
from regkern.timm.patching import supported_attention_classes
from tests.helpers import perturb_

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [
    "vit_small_patch14_reg4_dinov2",  # VisionTransformer, CLS + 4 registers, patch 14
    "vit_base_patch16_reg4_gap_256",  # VisionTransformer, 4 registers, no CLS
    "vit_small_patch16_dinov3",  # Eva, RoPE (DINOv3), rotate_half, CLS + 4 registers
    "vit_betwixt_patch16_rope_reg4_gap_256",  # Eva, RoPE, q/v bias with k_bias buffer, 4 registers
    "deit3_small_patch16_224",  # VisionTransformer, layer scale, no_embed_class
    "vit_tiny_patch16_224",  # plain VisionTransformer
    "vit_pe_spatial_tiny_patch16_512",  # Eva blocks with timm AttentionRope (Perception Encoder), CLS
    "vit_dwee_patch16_reg1_gap_256",  # timm DiffAttention (two maps per head), 1 register
    "vit_pwee_patch16_reg1_gap_256",  # ParallelScalingBlock (attention inside the block), 1 register
    "vit_dpwee_patch16_reg1_gap_256",  # DiffParallelScalingBlock
]
IMG = 32  # every model above accepts 32 px (patch 14 -> 2x2 grid, patch 16 -> 2x2 grid)
BATCH = 2
SUPPORTED = supported_attention_classes()  # timm class -> regkern class
TIMM_ATTN = tuple(SUPPORTED)
REGKERN_ATTN = (RegisterAttentionBase,)
OUT_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=IMG)
    return perturb_(model, seed).eval()


@pytest.fixture(scope="module", params=MODELS)
def pristine(request):
    """(name, model): the unpatched model; tests must deepcopy it, never modify it."""
    return request.param, build(request.param)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, IMG, IMG, generator=g)


def timm_attention_modules(model: nn.Module):
    return {n: m for n, m in model.named_modules() if type(m) in TIMM_ATTN}


def regkern_modules(model: nn.Module):
    return {n: m for n, m in model.named_modules() if isinstance(m, REGKERN_ATTN)}


def snapshot(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(sd_a, sd_b):
    assert list(sd_a) == list(sd_b)
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], atol=0, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


# ------------------------------------------------------------------------------------------------ per model


def test_patched_forward_matches(pristine, images):
    name, base = pristine
    original = copy.deepcopy(base)
    patched = patch_timm(copy.deepcopy(base))
    assert regkern_modules(patched), name
    y_ref = run(original, images)
    y = run(patched, images)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **OUT_TOL)
    # forward_features (token-level output, all prefix tokens included) too
    with torch.no_grad():
        torch.testing.assert_close(patched.forward_features(images), original.forward_features(images), **OUT_TOL)


def test_patched_gradients_match(pristine, images):
    name, base = pristine
    original = copy.deepcopy(base).train()
    patched = patch_timm(copy.deepcopy(base)).train()
    for m in original.modules():  # gradient comparison needs a deterministic train mode
        assert not (isinstance(m, nn.Dropout) and m.p > 0), name
        assert getattr(m, "drop_prob", 0.0) == 0.0, name
    grads = []
    for model in (original, patched):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # identical RNG state in case the model draws anything in train mode
        out = model(images)
        out.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    g_ref, g = grads
    assert list(g) == list(g_ref)
    n_nonzero = 0
    for pname, gr in g_ref.items():
        if gr is None:
            assert g[pname] is None, pname
            continue
        assert g[pname] is not None, pname
        torch.testing.assert_close(g[pname], gr, **GRAD_TOL, msg=lambda m, p=pname: f"{name} grad {p}: {m}")
        n_nonzero += int(gr.abs().sum() > 0)
    assert n_nonzero > len(g_ref) // 2  # the comparison is not between zeros
    # every attention layer received gradients
    for mname, m in regkern_modules(patched).items():
        projection = m.in_proj if hasattr(m, "in_proj") else m.qkv  # parallel blocks: one fused input projection
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0, mname


def test_state_dict_round_trip(pristine, images):
    name, base = pristine
    model = copy.deepcopy(base)
    original_sd = snapshot(model)
    patch_timm(model)
    patched_sd = model.state_dict()
    assert_state_equal(patched_sd, original_sd)
    # the patched model loads the original state_dict strictly ...
    result = model.load_state_dict(original_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # ... and a fresh unpatched model (different init) loads the patched one strictly
    fresh = perturb_(copy.deepcopy(base), seed=1)  # a new unpatched instance with other weights
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in original_sd.items())
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert_state_equal(fresh.state_dict(), original_sd)
    torch.testing.assert_close(run(fresh, images), run(model, images), **OUT_TOL)


def test_every_attention_is_replaced_and_explained(pristine):
    name, base = pristine
    model = copy.deepcopy(base)
    before = timm_attention_modules(model)
    assert len(before) == len(model.blocks), name  # one per block
    patch_timm(model)
    assert timm_attention_modules(model) == {}
    after = regkern_modules(model)
    assert sorted(after) == sorted(before)
    for mname, m in after.items():
        assert type(m) is SUPPORTED[type(before[mname])], mname
        assert m.num_prefix_tokens == base.num_prefix_tokens, mname
        assert m.backend_name == "torch"
    text = explain(model)
    lines = [line for line in text.splitlines() if not line.startswith("_pos_embed: ")]
    assert len(text.splitlines()) - len(lines) == int(type(model).__name__ == "VisionTransformer")
    assert len(lines) == len(before)
    assert sorted(line.split(":", 1)[0] for line in lines) == sorted(after)
    for line in lines:
        assert "torch" in line, line
    # explain on an unpatched model says so instead of listing nothing
    assert "patch_timm" in explain(copy.deepcopy(base))


def test_unpatch_restores_original_objects(pristine, images):
    name, base = pristine
    model = copy.deepcopy(base)
    originals = timm_attention_modules(model)
    y_ref = run(model, images)
    sd_ref = snapshot(model)
    patch_timm(model)
    for mname in originals:
        assert model.get_submodule(mname) is not originals[mname]
    assert unpatch_timm(model) is model
    for mname, orig in originals.items():
        assert model.get_submodule(mname) is orig, mname
    assert regkern_modules(model) == {}
    torch.testing.assert_close(run(model, images), y_ref, **OUT_TOL)
    assert_state_equal(model.state_dict(), sd_ref)


def test_double_while_patched_then_unpatch(pristine, images):
    name, base = pristine
    model = copy.deepcopy(base)
    originals = timm_attention_modules(model)
    patch_timm(model)
    model.double()
    for mname, m in regkern_modules(model).items():
        assert "float64" in m.backend_reason, mname
    y_patched = run(model, images.double())
    unpatch_timm(model)
    for mname, orig in originals.items():
        assert model.get_submodule(mname) is orig
        for pname, p in orig.named_parameters():
            assert p.dtype == torch.float64, f"{mname}.{pname}"
        for bname, b in orig.named_buffers():
            assert b.dtype == torch.float64, f"{mname}.{bname}"
        if getattr(orig, "k_bias", None) is not None:
            assert orig.k_bias.dtype == torch.float64
    for pname, p in model.named_parameters():
        assert p.dtype == torch.float64, pname
    for bname, b in model.named_buffers():
        assert b.dtype == torch.float64, bname
    y = run(model, images.double())
    assert y.dtype == torch.float64
    y_ref = run(copy.deepcopy(base).double(), images.double())
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y_patched, y_ref, atol=1e-10, rtol=1e-10)


def test_kv_registers_added_per_layer(pristine, images):
    name, base = pristine
    if any(not SUPPORTED[type(m)].supports_kv_registers for m in timm_attention_modules(base).values()):
        with pytest.raises(ValueError, match="num_kv_registers: RegisterDiff.*takes no KV registers"):
            patch_timm(copy.deepcopy(base), num_kv_registers=2)
        return
    model = patch_timm(copy.deepcopy(base), num_kv_registers=2)
    mods = regkern_modules(model)
    assert len(mods) == len(model.blocks)
    sd = model.state_dict()
    for mname, m in mods.items():
        assert m.num_kv_registers == 2
        assert tuple(m.reg_k.shape) == (2, m.num_heads, m.head_dim), mname
        assert tuple(m.reg_v.shape) == (2, m.num_heads, m.head_dim), mname
        assert f"{mname}.reg_k" in sd and f"{mname}.reg_v" in sd
    n_new = len(set(sd) - set(base.state_dict()))
    assert n_new == 2 * len(mods)
    y = run(model, images)
    y_ref = run(base, images)
    assert y.shape == y_ref.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, y_ref, atol=1e-5)  # the registers take part
    # they are trainable
    model.train()
    model(images).square().sum().backward()
    for mname, m in mods.items():
        assert m.reg_k.grad is not None and m.reg_k.grad.abs().sum() > 0, mname
    # unpatching drops them again
    unpatch_timm(model)
    assert set(model.state_dict()) == set(base.state_dict())


def test_patch_twice_is_idempotent(pristine, images):
    name, base = pristine
    model = copy.deepcopy(base)
    originals = timm_attention_modules(model)
    patch_timm(model)
    first = regkern_modules(model)
    patch_timm(model)
    second = regkern_modules(model)
    assert sorted(second) == sorted(first)
    for mname, m in second.items():
        assert m is first[mname], mname  # not re-wrapped
        assert not any(isinstance(c, REGKERN_ATTN) for c in m.children()), mname
    attention_lines = [line for line in explain(model).splitlines() if not line.startswith("_pos_embed: ")]
    assert len(attention_lines) == len(originals)
    torch.testing.assert_close(run(model, images), run(base, images), **OUT_TOL)
    unpatch_timm(model)
    for mname, orig in originals.items():
        assert model.get_submodule(mname) is orig, mname


# -------------------------------------------------------------------------------------------- model-agnostic


def test_unsupported_attention_warns_once_and_patches_the_rest():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    attn = Attention(dim=32, num_heads=4, qkv_bias=True)
    model = nn.Sequential(mha, attn).eval()
    x = torch.randn(BATCH, 9, 32)
    y_ref = run(attn, x)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        patch_timm(model)
    user = [w for w in record if issubclass(w.category, UserWarning)]
    assert len(user) == 1, [str(w.message) for w in user]
    assert "MultiheadAttention" in str(user[0].message)
    assert model[0] is mha
    assert isinstance(model[1], RegisterViTAttention)
    assert model[1].qkv is attn.qkv
    torch.testing.assert_close(run(model[1], x), y_ref, **OUT_TOL)
    # and pytest.warns sees it as well
    model2 = nn.Sequential(nn.MultiheadAttention(32, 4), Attention(dim=32, num_heads=4))
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        patch_timm(model2)


def test_unsupported_attention_counted_in_one_warning():
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.MultiheadAttention(16, 2), Attention(dim=16, num_heads=2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        patch_timm(model)
    user = [w for w in record if issubclass(w.category, UserWarning)]
    assert len(user) == 1
    assert "MultiheadAttention" in str(user[0].message) and "x2" in str(user[0].message)


def test_supported_only_model_emits_no_warning():
    model = nn.Sequential(Attention(dim=16, num_heads=2), EvaAttention(16, num_heads=2, norm_layer=nn.LayerNorm))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_timm(model)
    assert isinstance(model[0], RegisterViTAttention) and isinstance(model[1], RegisterEvaAttention)


@pytest.mark.parametrize("bad", ["not a model", None, 3, torch.zeros(3)], ids=["str", "None", "int", "tensor"])
def test_patch_timm_rejects_non_modules(bad):
    with pytest.raises(TypeError, match="model"):
        patch_timm(bad)


def test_patch_timm_rejects_bare_attention_module():
    with pytest.raises(TypeError):
        patch_timm(Attention(dim=16, num_heads=2))


def test_patch_timm_backend_argument():
    torch.manual_seed(0)
    model = nn.Sequential(Attention(dim=32, num_heads=4), Attention(dim=32, num_heads=4)).eval()
    x = torch.randn(BATCH, 9, 32)
    y_ref = run(model, x)
    patch_timm(model, backend="reference")
    assert all(m.backend_name == "reference" for m in regkern_modules(model).values())
    assert explain(model).count("reference") >= 2
    torch.testing.assert_close(run(model, x), y_ref, **OUT_TOL)


def test_patch_timm_is_per_instance():
    """Patching one model does not touch another model or timm's classes."""
    torch.manual_seed(0)
    a = nn.Sequential(Attention(dim=16, num_heads=2))
    b = nn.Sequential(Attention(dim=16, num_heads=2))
    patch_timm(a)
    assert isinstance(a[0], RegisterViTAttention)
    assert type(b[0]) is Attention
    assert regkern.timm.supported_attention_classes()[Attention] is RegisterViTAttention


# ------------------------------------------------------------------ the token embedding through regkern.embed_tokens

# (timm name, options): CLS + registers without class position (DINOv2-reg), CLS with class position, no CLS
# (SigLIP), registers without CLS (reg1 gap), dynamic image size
EMBEDDING_MODELS = [
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
    ("vit_small_patch16_224", dict(img_size=32)),
    ("vit_base_patch16_siglip_224", dict(img_size=32)),
    ("vit_medium_patch16_reg1_gap_256", dict(img_size=64)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56, dynamic_img_size=True)),
]


def embedding_id(spec):
    name, options = spec
    return name + ("-dynamic" if options.get("dynamic_img_size") else "")


@pytest.mark.parametrize("spec", EMBEDDING_MODELS, ids=embedding_id)
def test_patched_models_run_embed_tokens_identically_to_timm(spec):
    name, options = spec
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention pools of the gap models are not patched
        model = timm.create_model(name, pretrained=False, depth=2, **options).eval()
        perturb_(model, 0)  # distinct, non-zero CLS and register tokens
        reference_model = copy.deepcopy(model)
        keys = list(model.state_dict())
        patch_timm(model)
    assert "_pos_embed" in model.__dict__ and list(model.state_dict()) == keys
    assert explain(model).splitlines()[0].startswith("_pos_embed: regkern.embed_tokens -> reference")
    size = options["img_size"]
    x = torch.randn(2, 3, size, size + (2 * 14 if options.get("dynamic_img_size") else 0))
    with torch.no_grad():
        tokens = model.patch_embed(x)
        assert torch.equal(model._pos_embed(tokens), reference_model._pos_embed(tokens))
        assert torch.equal(model.forward_features(x), reference_model.forward_features(x))
        copied = copy.deepcopy(model)  # the routed embedding follows the copy
        assert copied._pos_embed.model is copied
        assert torch.equal(copied.forward_features(x), reference_model.forward_features(x))
    unpatch_timm(model)
    assert "_pos_embed" not in model.__dict__


def test_patched_embedding_on_triton_and_not_on_eva():
    from regkern.ops.embed_tokens import triton_kernels as embed_triton

    if not torch.cuda.is_available() and not embed_triton.INTERPRETED:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=1).eval()
    reference_model = copy.deepcopy(model).to(device)
    patch_timm(model.to(device), backend="triton")
    assert model._pos_embed.backend_name == "triton"
    tokens = torch.randn(2, 4, model.embed_dim, device=device)
    with torch.no_grad():
        assert torch.equal(model._pos_embed(tokens), reference_model._pos_embed(tokens))
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1)
    patch_timm(eva)
    assert "_pos_embed" not in eva.__dict__  # Eva embeds (and makes its RoPE) in a method of its own


def test_routed_embedding_serves_mixed_dtypes_as_timm_does():
    """Under autocast the patch tokens come in bf16 while the position embeddings stay fp32: a backend that needs
    one dtype ("cuda") gives way to auto (the same bits), with the reason in explain; models without position
    embeddings keep timm's own concatenation."""
    from regkern.timm.embedding import RegisterTokenEmbedding

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=1).eval()
    embedding = RegisterTokenEmbedding(model, "cuda")
    tokens = torch.randn(2, 4, model.embed_dim).to(torch.bfloat16)
    with torch.no_grad():
        got = embedding(tokens)
        want = type(model)._pos_embed(model, tokens)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert "'cuda' cannot run this call" in embedding.backend_reason or embedding.backend_name == "cuda"
    no_pos = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=1, pos_embed="none")
    patch_timm(no_pos)
    assert no_pos.pos_embed is None and "_pos_embed" not in no_pos.__dict__


def test_misspelt_backend_names_fail_at_patch_time(monkeypatch):
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=1)
    with pytest.raises(ValueError, match="backend: unknown backend 'trition'"):
        patch_timm(model, backend="trition")
    monkeypatch.setenv("REGKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="REGKERN_BACKEND: unknown backend 'bogus'"):
        patch_timm(model)
    monkeypatch.delenv("REGKERN_BACKEND")
    patch_timm(model)
    with pytest.raises(ValueError, match="backend: unknown backend 'trition'"):
        model.blocks[0].attn.set_backend("trition")
    assert model.blocks[0].attn.requested_backend is None


# ------------------------------------------------------------------------------- every timm register ViT


def _timm_register_models() -> list[str]:
    names = set()
    for pattern in ("*reg*", "vit_pe_*", "*dinov3*", "naflexvit_*"):
        names.update(timm.list_models(pattern))
    return sorted(names)


def _computes_attention(module: nn.Module) -> bool:
    # independent of regkern's own detection: attention by name, or the blocks that compute it inline
    from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock

    name = type(module).__name__.lower()
    if isinstance(module, (ParallelScalingBlock, DiffParallelScalingBlock)):
        return True
    named = "attention" in name or "attn" in name
    return named and not any(_computes_attention(child) for child in module.children())  # not a block around one


@pytest.mark.slow
def test_every_timm_register_vit_is_fully_patched_or_named_with_its_reason():
    """timm's register ViTs (`*reg*`, `vit_pe_*`, `*dinov3*`, `naflexvit_*`), built on the meta device: every
    attention module is regkern's after patch_timm, except classes in KNOWN_UNSUPPORTED, which the one warning names
    with their reason. Models of those lists without attention (RegNets) are not ViTs and patch nothing, silently."""
    from regkern.timm import KNOWN_UNSUPPORTED, patched_modules

    checked = {"vit": 0, "not a transformer": 0}
    for name in _timm_register_models():
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        attention_before = [n for n, m in model.named_modules() if _computes_attention(m)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patch_timm(model)
        messages = [str(w.message) for w in caught if "regkern" in str(w.message)]
        if not attention_before:
            assert not patched_modules(model) and not messages, name
            checked["not a transformer"] += 1
            continue
        left = {type(m).__name__ for m in model.modules() if _computes_attention(m) and not isinstance(m, REGKERN_ATTN)}
        assert left <= set(KNOWN_UNSUPPORTED), f"{name}: {sorted(left - set(KNOWN_UNSUPPORTED))} left unpatched"
        if left:
            assert len(messages) == 1, (name, messages)
            for cls in left:
                assert cls in messages[0] and KNOWN_UNSUPPORTED[cls] in messages[0], (name, messages[0])
        else:
            assert not messages, (name, messages)
        blocks = getattr(model, "blocks", None)
        if blocks is not None:
            assert len(patched_modules(model)) == len(blocks), name
            checked["vit"] += 1
    assert checked["vit"] >= 70 and checked["not a transformer"] >= 40, checked  # timm 1.0.31: 71 and 50


def test_model_without_any_supported_attention_warns_with_the_classes():
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
    with pytest.warns(UserWarning, match="left unsupported attention modules untouched: .*MultiheadAttention"):
        patch_timm(model)
    from regkern.timm import patched_modules

    assert patched_modules(model) == []


@pytest.mark.parametrize(
    "name, named",
    [
        ("vit_base_patch16_rope_mixed_224", None),  # fully patched: its rotary helper (num_heads) is not attention
        ("vit_relpos_base_patch16_224", "RelPosAttention"),  # not RelPosMlp, the position-bias helper inside it
        ("maxvit_tiny_tf_224", "AttentionCl"),  # not PartitionAttentionCl, the block around it
    ],
)
def test_the_warning_names_the_attention_left_unpatched_not_its_helpers_or_containers(name, named):
    from regkern.timm import patched_modules

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_timm(model)
    messages = [str(w.message) for w in caught if "regkern" in str(w.message)]
    if named is None:
        assert not messages and patched_modules(model)
    else:
        assert len(messages) == 1 and f".{named} (x" in messages[0], messages
        assert "Mlp" not in messages[0] and "Partition" not in messages[0]


def test_unpatch_carries_back_a_changed_lambda_init():
    model = build("vit_dwee_patch16_reg1_gap_256")
    original = model.blocks[0].attn
    patch_timm(model)
    model.blocks[0].attn.set_lambda_init(7)
    unpatch_timm(model)
    assert model.blocks[0].attn is original and original.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-2.1))
