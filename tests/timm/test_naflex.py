"""NaFlex ViTs (mixed resolutions in one batch, padding masked) on the fused path: patch_timm turns their padding
mask into a key mask, which the Triton kernels take (under the interpreter here); pooled outputs, the valid tokens'
features and all gradients equal timm's."""

import copy

import pytest
import timm
import torch

import regkern
from tests.helpers import naflex_batch, perturb_

triton_kernels = pytest.importorskip("regkern.ops.attention.triton_kernels")
BACKENDS = ["torch"] + (["triton"] if triton_kernels.INTERPRETED else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["naflexvit_base_patch16_gap", "naflexvit_so150m2_patch16_reg1_gap"])
def test_patched_naflex_matches_timm_at_mixed_resolutions(name, backend):
    torch.manual_seed(0)
    base = perturb_(timm.create_model(name, pretrained=False, depth=2, embed_dim=64, num_heads=2), 0).eval()
    batch = naflex_batch([(3, 4), (2, 3), (4, 4)])
    patched = regkern.patch_timm(copy.deepcopy(base), backend=backend)
    text = regkern.explain(patched)
    assert f"attn_mask: NaFlex padding as a key mask (B, 1, 1, N) -> {backend}" in text, text
    with torch.no_grad():
        torch.testing.assert_close(patched(batch), base(batch), atol=1e-5, rtol=1e-5)
        args = (batch["patches"], batch["patch_coord"], batch["patch_valid"])
        ours, theirs = patched.forward_features(*args)["patches"], base.forward_features(*args)["patches"]
    P = base.num_prefix_tokens
    valid = torch.cat([torch.ones(3, P, dtype=torch.bool), batch["patch_valid"]], 1)
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)  # padding rows are nobody's input
    grads = []
    for model in (base, patched):
        model.zero_grad(set_to_none=True)
        model(batch).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert list(grads[0]) == list(grads[1]) and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-4, rtol=1e-4, msg=n)
    regkern.unpatch_timm(patched)
    assert patched.use_key_only_attn_mask is False and "_regkern_naflex_key_mask" not in patched.__dict__


def test_patched_naflex_on_cuda_runs_its_padding_masks_on_triton(monkeypatch):
    """What explain reports for a patched NaFlex model on a GPU (simulated: each module sees a bf16 CUDA parameter
    of an sm_90 device): the key masks go to Triton, other masks would stay on torch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import regkern.nn.attention as nn_attention

    with FakeTensorMode():
        cuda_param = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(nn_attention, "device_capability", lambda device: (9, 0) if device.type == "cuda" else None)
    monkeypatch.setattr(nn_attention.RegisterAttentionBase, "_reference_param", lambda self: cuda_param)
    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=2, embed_dim=64, num_heads=2)
    regkern.patch_timm(model)
    text = regkern.explain(model)
    assert "attn_mask: NaFlex padding as a key mask (B, 1, 1, N) -> triton" in text, text
    for line in text.splitlines()[1:]:
        assert "-> triton (auto" in line and "other attn_mask -> torch" in line, line


def test_patched_naflex_with_an_attention_pooling_head_matches_timm():
    """MAP-head NaFlex models: the pooling head (timm's, it masks padding itself) reads the patched blocks' tokens."""
    torch.manual_seed(0)
    base = perturb_(
        timm.create_model("naflexvit_base_patch16_map", pretrained=False, depth=2, embed_dim=64, num_heads=2), 0
    ).eval()
    batch = naflex_batch([(3, 4), (2, 3)])
    with pytest.warns(UserWarning, match="AttentionPoolLatent"):
        patched = regkern.patch_timm(copy.deepcopy(base), backend=BACKENDS[-1])
    with torch.no_grad():
        torch.testing.assert_close(patched(batch), base(batch), atol=1e-5, rtol=1e-5)
