"""Test-time registers (regkern.timm.test_time_registers) on tiny CPU models with planted register neurons.

The planted model (``planted_vit``) is a random-init DINOv2-style ViT (CLS + 4 trained registers, 4x4 patches of
14 px, 4 blocks) whose weights are edited so that it has register neurons, as a trained ViT does:

* "Background" patches of the images are flat (constant value ``FLAT``); the patch embedding gets an extra term
  ``ALPHA * u * mean(patch pixels)`` along a fixed zero-mean unit direction ``u``. Flat patches therefore carry a
  large ``u`` component (their norm is ~4x the median, far from an outlier), noise patches almost none.
* Block 1 has two neurons whose fc1 rows read ``u`` (after norm2, a LayerNorm, a flat patch has <LN(x), u> ~ 17,
  another patch ~ N(0, 1)); a bias of ``-THETA`` keeps them silent elsewhere (GELU(-7) ~ 0). Their fc2 columns write
  ``GAMMA * v`` (``v`` another unit direction): from block 1 on the flat patches have norms ~150x the median.
* Block 2 has a neuron that reads ``v`` and writes ``v`` again (register neurons across layers, as in the paper).
* LayerScale gammas are set to 1 (timm's DINOv2 init, 1e-5, would mute every block).

Everything else keeps timm's random init, so attention is nearly uniform and only the planted neurons write large
vectors.
"""

import copy
import json

import pytest
import timm
import torch

import regkern
from regkern.timm.test_time_registers import (
    RegisterNeurons,
    TestTimeRegisters,
    apply_test_time_registers,
    find_register_neurons,
)

ALPHA, FLAT, BETA, THETA, GAMMA = 20.0, 2.0, 1.0, 8.0, 100.0
GRID, PATCH = 4, 14
PLANTED = [(1, 7), (1, 300), (2, 1000)]
# flat ("background") patches per image; different per image so batch elements differ
MARKS = [[0, 5], [3, 10, 15], [12]]


def _unit(g, dim, orth=None):
    x = torch.randn(dim, generator=g)
    x -= x.mean()
    if orth is not None:
        x -= (x @ orth) * orth
    return x / x.norm()


def planted_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=GRID * PATCH, depth=4)
    model.eval()
    g = torch.Generator().manual_seed(0)
    u = _unit(g, model.embed_dim)
    v = _unit(g, model.embed_dim, orth=u)
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
        w = model.patch_embed.proj.weight  # (D, 3, 14, 14)
        w += ALPHA * u[:, None, None, None] / w[0].numel()
        for layer, neuron in PLANTED:
            mlp = model.blocks[layer].mlp
            mlp.fc1.weight[neuron] = BETA * (u if layer == 1 else v)
            mlp.fc1.bias[neuron] = -BETA * THETA
            mlp.fc2.weight[:, neuron] = GAMMA * v
    return model


def marked_images(marks=MARKS, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(marks), 3, GRID * PATCH, GRID * PATCH, generator=g)
    for i, patches in enumerate(marks):
        for p in patches:
            r, c = divmod(p, GRID)
            x[i, :, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = FLAT
    return x


def block_outputs(model, x):
    """Every block's output tokens (B, N, C)."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone())) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def prefix_counts(model):
    """Every num_prefix_tokens attribute reachable from the model (also patched modules' kept timm originals)."""
    counts = {"model": model.num_prefix_tokens}
    for name, m in model.named_modules():
        if name and isinstance(getattr(m, "num_prefix_tokens", None), int):
            counts[name] = m.num_prefix_tokens
        original = m.__dict__.get("_regkern_original")
        if isinstance(getattr(original, "num_prefix_tokens", None), int):  # timm EvaAttention (Attention has none)
            counts[name + "/original"] = original.num_prefix_tokens
    return counts


@pytest.fixture(scope="module")
def planted():
    return planted_vit()


@pytest.fixture(scope="module")
def images():
    return marked_images()


def _marked_mask(marks=MARKS):
    mask = torch.zeros(len(marks), GRID * GRID, dtype=torch.bool)
    for i, patches in enumerate(marks):
        mask[i, patches] = True
    return mask


# ------------------------------------------------------------------------------------------------ the planted model


def test_planted_model_has_outliers_on_flat_patches(planted, images):
    P = planted.num_prefix_tokens
    outs = block_outputs(planted, images)
    for layer, out in enumerate(outs):
        patches = out[:, P:].norm(dim=-1)
        median = patches.median(dim=1, keepdim=True).values
        outlier = patches > 10 * median
        if layer == 0:
            assert not outlier.any()  # flat patches are not outliers before the planted neurons write
        else:
            assert torch.equal(outlier, _marked_mask()), layer


# ------------------------------------------------------------------------------------------------ detection


def test_detection_finds_the_planted_neurons(planted, images):
    found = find_register_neurons(planted, images, top_k=10)
    assert isinstance(found, RegisterNeurons)
    assert len(found.neurons) == 10 and found.scores == sorted(found.scores, reverse=True)
    assert set(found.neurons[:3]) == set(PLANTED)
    # clear margin: the planted neurons fire ~10 at the outliers, the others ~1 or less
    assert found.scores[2] > 4 * found.scores[3]
    P = planted.num_prefix_tokens
    expected = {(i, P + p) for i, patches in enumerate(MARKS) for p in patches}
    assert set(found.outlier_positions) == expected
    assert found.images_with_outliers == 3 and found.num_images == 3
    d = json.loads(json.dumps(found.to_dict()))
    assert d["neurons"][:3] == [list(p) for p in found.neurons[:3]]
    assert "layer" in str(found)


def test_detection_batch_size_and_max_layer(planted, images):
    whole = find_register_neurons(planted, images, top_k=5)
    chunked = find_register_neurons(planted, images, top_k=5, batch_size=2)
    assert chunked.neurons[:3] == whole.neurons[:3]
    torch.testing.assert_close(torch.tensor(chunked.scores), torch.tensor(whole.scores), rtol=1e-5, atol=1e-6)
    assert chunked.outlier_positions == whole.outlier_positions
    early = find_register_neurons(planted, images, top_k=2, max_layer=1)
    assert set(early.neurons) == {(1, 7), (1, 300)} and early.max_layer == 1
    assert find_register_neurons(planted, images, top_k=2, max_layer=-3).max_layer == 1


def test_detection_keeps_train_mode_and_params(planted, images):
    model = copy.deepcopy(planted).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_register_neurons(model, images, top_k=3)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_no_outliers_names_outlier_factor(images):
    torch.manual_seed(0)
    plain = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=2).eval()
    with pytest.raises(ValueError, match="outlier_factor"):
        find_register_neurons(plain, images)


# ------------------------------------------------------------------------------------------------ application


def test_outliers_move_into_the_register(planted, images):
    """After applying the registers, no patch token exceeds the outlier threshold at any layer, the register token
    carries the large norm, and the other tokens change by little.

    Tolerance for the other tokens: tokens interact only through attention, which in this model has random-init
    weights (std 0.02), so it is nearly uniform over the ~22 tokens and its values are LayerNorm-bounded. Moving
    the v-aligned value from the flat patches to the register (and adding one token) changes a token's attention read
    by ~2/N of a value vector per block, which sums to ~5% of the median patch norm over the blocks after the
    outliers form (measured: <= 6%). We allow 15% of the median patch norm: 2x margin, and ~1000x below the
    ~2000-3000 that the outlier tokens lose or the register gains.
    """
    P = planted.num_prefix_tokens
    base = block_outputs(planted, images)
    with apply_test_time_registers(planted, PLANTED) as handle:
        assert handle.register_slice == slice(P, P + 1)
        edited = block_outputs(planted, images)
    marked = _marked_mask()
    for layer in range(1, 4):
        b, e = base[layer], edited[layer]
        assert e.shape[1] == b.shape[1] + 1
        patch_norm = e[:, P + 1 :].norm(dim=-1)
        median = patch_norm.median(dim=1, keepdim=True).values
        assert (patch_norm < 10 * median).all(), layer  # no outlier left among the patches
        assert (e[:, P].norm(dim=-1) > 100 * median.squeeze(1)).all(), layer  # the register is the outlier
        assert (b[:, P:].norm(dim=-1)[marked] > 100 * median.repeat_interleave(marked.sum(1), 0).squeeze(1)).all()
        without_register = torch.cat([e[:, :P], e[:, P + 1 :]], dim=1)
        change = (without_register - b).norm(dim=-1)  # (B, N)
        other = torch.cat([torch.ones(len(MARKS), P, dtype=torch.bool), ~marked], dim=1)
        assert (change[other] < 0.15 * median.expand_as(change)[other]).all(), layer


def test_activation_edit_is_per_batch_element(planted, images):
    """At each listed neuron the register gets the max over (register, patches), patches get 0, per element."""
    P = planted.num_prefix_tokens
    raw, seen = {}, {}
    fc2 = planted.blocks[1].mlp.fc2
    h1 = fc2.register_forward_pre_hook(lambda m, a: raw.__setitem__("h", a[0].clone()))
    try:
        with apply_test_time_registers(planted, {1: [7, 300]}, num=2):
            h2 = fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].clone()))
            with torch.no_grad():
                planted(images)
            h2.remove()
    finally:
        h1.remove()
    before, after = raw["h"], seen["h"]
    assert before.shape[1] == P + 2 + GRID * GRID
    idx = [7, 300]
    top = before[:, P:, idx].amax(dim=1)  # (B, 2) per element
    assert (top > 5).all()  # each element's own flat patches fire
    for b in range(len(MARKS)):
        for r in range(2):
            assert torch.equal(after[b, P + r, idx], top[b])
        assert torch.equal(after[b, P + 2 :, idx], torch.zeros_like(after[b, P + 2 :, idx]))
    keep = [n for n in range(before.shape[-1]) if n not in idx]
    assert torch.equal(after[..., keep], before[..., keep])
    assert torch.equal(after[:, :P], before[:, :P])  # CLS and trained registers untouched


def test_register_keeps_its_own_activation_at_a_later_neuron(planted, images):
    """Block 2's neuron reads the outlier direction: once block 1's neurons moved the outlier into the register, it
    fires on the register and no longer on the patches. The max includes the register itself, so it keeps firing
    (a max over the patches alone would overwrite it with ~0)."""
    P = planted.num_prefix_tokens
    seen = {}
    with apply_test_time_registers(planted, PLANTED):
        hook = planted.blocks[2].mlp.fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
        with torch.no_grad():
            planted(images)
        hook.remove()
    h = seen["h"][..., 1000]
    assert (h[:, P] > 5).all()  # ~ sqrt(384) - THETA = 11.6
    assert torch.equal(h[:, P + 1 :], torch.zeros_like(h[:, P + 1 :]))


@pytest.mark.parametrize("num", [1, 3], ids=["one-register", "three-registers"])
def test_batch_matches_each_element_alone(planted, images, num):
    with apply_test_time_registers(planted, PLANTED, num=num):
        with torch.no_grad():
            batched = planted.forward_features(images)
            alone = torch.cat([planted.forward_features(images[i : i + 1]) for i in range(len(images))])
            logits = planted(images)
    with torch.no_grad():
        assert logits.shape == planted(images).shape  # the head sees the same pooled layout
    assert batched.shape[1] == planted.patch_embed.num_patches + planted.num_prefix_tokens + num
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_remove_restores_exactly(planted, images):
    with torch.no_grad():
        ref_logits = planted(images)
        ref_feats = planted.forward_features(images)
    counts = prefix_counts(planted)
    keys = set(planted.__dict__)
    handle = apply_test_time_registers(planted, PLANTED, num=2)
    try:
        bumped = prefix_counts(planted)
        assert bumped == {k: v + 2 for k, v in counts.items()}
        assert planted.num_reg_tokens == 4 + 2
        with torch.no_grad():
            assert not torch.equal(planted(images), ref_logits)
    finally:
        handle.remove()
    assert not handle.active
    handle.remove()  # idempotent
    assert prefix_counts(planted) == counts and planted.num_reg_tokens == 4
    assert set(planted.__dict__) == keys
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in planted.modules())
    with torch.no_grad():
        assert torch.equal(planted(images), ref_logits)
        assert torch.equal(planted.forward_features(images), ref_feats)


def test_pooling_and_dense_features_skip_the_registers(planted, images):
    P = planted.num_prefix_tokens
    with apply_test_time_registers(planted, PLANTED, num=2):
        with torch.no_grad():
            final, inter = planted.forward_intermediates(images, indices=[1, 3], return_prefix_tokens=True)
            feats = planted.forward_features(images)
            pooled = planted.forward_head(feats, pre_logits=True)
    for spatial, prefix in inter:
        assert spatial.shape == (len(MARKS), planted.embed_dim, GRID, GRID)
        assert prefix.shape[1] == P + 2
        # the dense maps no longer hold the outliers: they moved into the prefix part (the registers)
        assert spatial.norm(dim=1).amax() < 100 < prefix[:, P].norm(dim=-1).amin()
    torch.testing.assert_close(pooled, feats[:, 0])  # 'token' pooling still reads CLS


def test_patched_model_matches_unpatched(planted, images):
    patched = regkern.patch_timm(copy.deepcopy(planted))
    with torch.no_grad():
        ref = patched(images)
    counts = prefix_counts(patched)
    with apply_test_time_registers(planted, PLANTED, num=2), apply_test_time_registers(patched, PLANTED, num=2):
        assert all(
            m.num_prefix_tokens == planted.num_prefix_tokens
            for m in patched.modules()
            if isinstance(m, regkern.RegisterViTAttention)
        )
        with torch.no_grad():
            torch.testing.assert_close(
                patched.forward_features(images), planted.forward_features(images), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(patched(images), planted(images), rtol=1e-5, atol=1e-5)
    assert prefix_counts(patched) == counts
    with torch.no_grad():
        assert torch.equal(patched(images), ref)


def test_detection_on_patched_model(planted, images):
    patched = regkern.patch_timm(copy.deepcopy(planted))
    found = find_register_neurons(patched, images, top_k=3)
    assert set(found.neurons) == set(PLANTED)


def test_register_neurons_object_is_accepted(planted, images):
    found = find_register_neurons(planted, images, top_k=3)
    with apply_test_time_registers(planted, found) as handle:
        assert handle.neurons == {1: (7, 300), 2: (1000,)}
        assert isinstance(handle, TestTimeRegisters) and "active=True" in repr(handle)


# ------------------------------------------------------------------------------------------------ other timm models


EVA_MODELS = {
    "eva02-glumlp-cls": ("eva02_tiny_patch14_224", dict(img_size=56)),
    "eva02-swiglu-norm": ("eva02_tiny_patch14_224", dict(img_size=56, scale_mlp=True)),
    "rope-reg4-gap-mlp": ("vit_betwixt_patch16_rope_reg4_gap_256", dict(img_size=64)),
}


@pytest.mark.parametrize("name", list(EVA_MODELS), ids=list(EVA_MODELS))
def test_eva_rope_models(name, images):
    arch, kwargs = EVA_MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, depth=2, **kwargs).eval()
    x = torch.nn.functional.interpolate(images, size=kwargs["img_size"], mode="bilinear")
    P = model.num_prefix_tokens
    with torch.no_grad():
        ref = model(x)
    counts = prefix_counts(model)
    patched = regkern.patch_timm(copy.deepcopy(model))
    neurons = {0: [3, 11], 1: [5]}
    seen = {}
    with apply_test_time_registers(model, neurons, num=2), apply_test_time_registers(patched, neurons, num=2):
        # RoPE must rotate exactly the patch tokens: every EvaAttention (and the patched modules' originals) counts
        # the extra tokens as prefix
        assert prefix_counts(model) == {k: v + 2 for k, v in counts.items()}
        assert set(prefix_counts(patched).values()) == {P + 2}
        hook = model.blocks[1].mlp.fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
        with torch.no_grad():
            out = model(x)
            out_patched = patched(x)
        hook.remove()
    assert out.shape == ref.shape
    torch.testing.assert_close(out_patched, out, rtol=1e-5, atol=1e-5)
    h = seen["h"]
    assert torch.equal(h[:, P + 2 :, 5], torch.zeros_like(h[:, P + 2 :, 5]))
    assert torch.equal(h[:, P, 5], h[:, P + 1, 5])
    assert prefix_counts(model) == counts
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_dynamic_img_size_with_embedded_class_token():
    """timm's _pos_embed resamples pos_embed with num_prefix_tokens: it must see the model's own count."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, dynamic_img_size=True
    ).eval()
    assert not model.no_embed_class
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        ref = model(x)
        with apply_test_time_registers(model, {1: [0]}):
            out = model(x)
            assert model.forward_features(x).shape[1] == 1 + 1 + 3 * 5
    assert out.shape == ref.shape
    with torch.no_grad():
        assert torch.equal(model(x), ref)


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(max_layer=4), "max_layer"),
        (dict(max_layer=-5), "max_layer"),
        (dict(outlier_factor=0.5), "outlier_factor"),
        (dict(outlier_factor="10"), "outlier_factor"),
        (dict(batch_size=0), "batch_size"),
    ],
    ids=[
        "top_k-zero",
        "top_k-float",
        "max_layer-too-deep",
        "max_layer-too-negative",
        "outlier_factor-below-one",
        "outlier_factor-string",
        "batch_size-zero",
    ],
)
def test_find_bad_arguments(planted, images, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        find_register_neurons(planted, images, **kwargs)


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 56, 56), torch.zeros(0, 3, 56, 56), [1, 2]], ids=["3d-tensor", "empty-batch", "list"]
)
def test_find_bad_images(planted, bad):
    with pytest.raises(ValueError, match="images"):
        find_register_neurons(planted, bad)


def test_bad_model():
    with pytest.raises(TypeError, match="model"):
        find_register_neurons("vit", torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="model"):
        apply_test_time_registers(torch.nn.Linear(2, 2), [(0, 0)])


@pytest.mark.parametrize(
    "neurons",
    [[(4, 0)], [(-1, 0)], [(0, 1536)], [(0, -1)], [(0,)], [("1", 2)], {9: [1]}, {0: "a"}, 7, torch.tensor([[0, 1]])],
    ids=[
        "layer-too-deep",
        "layer-negative",
        "neuron-too-large",
        "neuron-negative",
        "not-a-pair",
        "layer-string",
        "dict-bad-layer",
        "dict-bad-neurons",
        "int",
        "tensor",
    ],
)
def test_apply_bad_neurons(planted, neurons):
    with pytest.raises(ValueError, match="neurons"):
        apply_test_time_registers(planted, neurons)
    assert not any(m._forward_pre_hooks for m in planted.modules())


@pytest.mark.parametrize("num", [0, -1, 1.0, True], ids=["zero", "negative", "float", "bool"])
def test_apply_bad_num(planted, num):
    with pytest.raises(ValueError, match="num"):
        apply_test_time_registers(planted, PLANTED, num=num)


def test_apply_twice_and_masks_refused(planted, images):
    with apply_test_time_registers(planted, PLANTED):
        with pytest.raises(ValueError, match="model: test-time registers are already applied"):
            apply_test_time_registers(planted, PLANTED)
        mask = torch.ones(1, 1, 22, 22, dtype=torch.bool)
        with pytest.raises(ValueError, match="attn_mask"), torch.no_grad():
            planted(images, attn_mask=mask)
    with torch.no_grad():
        planted(images)  # usable again after the with block


def test_monitored_model_warns(planted):
    monitored = regkern.patch_timm(copy.deepcopy(planted), monitor=True)
    with pytest.warns(UserWarning, match="NormMonitor"):
        handle = apply_test_time_registers(monitored, PLANTED)
    handle.remove()
