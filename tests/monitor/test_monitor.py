"""NormMonitor on the CPU: a planted high-norm fixture is found at the right layers and positions and nowhere else;
statistics equal an independent computation; attention rows equal timm's unfused attention; monitoring changes no
output bit."""

import copy
import json
import math

import pytest
import torch

import regkern

timm = pytest.importorskip("timm")

IMG, DEPTH, PLANT_BEFORE, FACTOR = 56, 4, 2, 60.0
PLANTED = [(0, 3), (1, 7)]  # (batch index, patch index) scaled before block PLANT_BEFORE


def build_model(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=IMG, depth=DEPTH)
    with torch.no_grad():  # distinct, non-zero prefix tokens
        model.cls_token.normal_()
        model.reg_token.normal_()
    return model.eval()


def plant(model):
    """Scale chosen residual tokens by FACTOR before block PLANT_BEFORE (a synthetic high-norm artifact)."""
    P = model.num_prefix_tokens

    def hook(_module, args):
        x = args[0].clone()
        for b, patch in PLANTED:
            x[b, P + patch] *= FACTOR
        return (x,) + args[1:]

    return model.blocks[PLANT_BEFORE].register_forward_pre_hook(hook)


def residual_norms(model, x):
    """Independent reference: float64 norms of the tokens entering each block, via hooks on an unmonitored model."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].double().norm(dim=-1))) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _triton_runs() -> bool:
    from regkern.ops.layer_norm import triton_kernels

    return torch.cuda.is_available() or triton_kernels.INTERPRETED


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_planted_outliers_found_at_the_right_layers_and_positions(images, path):
    """Through the PyTorch reduction, and through the reductions fused into the Triton LayerNorm and attention
    kernels (under the interpreter on the CPU)."""
    if path == "triton" and not _triton_runs():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if path == "triton" and torch.cuda.is_available() else "cpu"
    images = images.to(device)
    model = build_model().to(device)
    reference_model = copy.deepcopy(model)
    plant(model)
    plant(reference_model)
    options = {"threshold": 150.0, "top_k": 4, "norm_backend": path}
    regkern.patch_timm(model, backend="triton" if path == "triton" else None, monitor=options)
    monitor = regkern.get_monitor(model)
    with torch.no_grad():
        model(images)
    report = monitor.report()
    P = model.num_prefix_tokens
    want_norms = residual_norms(reference_model, images)
    for layer in range(DEPTH):
        rows = {r["group"]: r for r in report.rows if r["layer"] == layer}
        expected_outliers = len(PLANTED) if layer >= PLANT_BEFORE else 0
        assert rows["patches"]["outliers"] == expected_outliers, layer
        assert rows["cls"]["outliers"] == 0 and rows["registers"]["outliers"] == 0
        norms = want_norms[layer]
        groups = {"cls": norms[:, :1], "registers": norms[:, 1:P], "patches": norms[:, P:]}
        for group, ref in groups.items():
            row = rows[group]
            assert row["count"] == ref.numel()  # exact
            assert row["outliers"] == int((ref > 150.0).sum())  # exact, from the independent norms
            assert math.isclose(row["mean"], ref.mean().item(), rel_tol=1e-5)
            assert math.isclose(row["max"], ref.max().item(), rel_tol=1e-5)
            assert math.isclose(row["std"], ref.std(unbiased=False).item(), rel_tol=1e-3, abs_tol=1e-4)
            edges = torch.tensor(report.bin_edges[1:-1], dtype=torch.float64)
            want_hist = torch.bincount(torch.bucketize(ref.reshape(-1).contiguous(), edges), minlength=len(edges) + 1)
            assert sum(abs(a - b) for a, b in zip(row["histogram"], want_hist.tolist())) <= 2  # edge ties only
        top = report.top_patches[layer]
        if layer >= PLANT_BEFORE:
            assert {(b, t) for _, b, t in top[:2]} == {(b, P + patch) for b, patch in PLANTED}
            assert top[0][0] > 150 and top[2][0] < 150
    assert "outliers" in str(report) and json.loads(report.to_json())["rows"][0]["layer"] == 0


def test_relative_threshold(images):
    model = build_model()
    plant(model)
    monitor = regkern.NormMonitor(model, relative=5.0)  # patches the model itself
    with torch.no_grad():
        model(images)
    outliers = [r["outliers"] for r in monitor.report().rows if r["group"] == "patches"]
    assert outliers == [0] * PLANT_BEFORE + [len(PLANTED)] * (DEPTH - PLANT_BEFORE)


def test_attention_rows_and_shares_equal_timm_unfused_attention(images):
    model = build_model()
    unfused = copy.deepcopy(model)
    captured = []
    for block in unfused.blocks:
        block.attn.fused_attn = False  # timm materialises softmax(q k^T) and passes it through attn_drop
        block.attn.attn_drop.register_forward_hook(lambda m, a, out: captured.append(a[0]))
    with torch.no_grad():
        unfused(images)
    regkern.patch_timm(model, monitor=True)
    monitor = regkern.get_monitor(model)
    with torch.no_grad():
        model(images)
    P, N = model.num_prefix_tokens, captured[0].shape[-1]
    share = monitor.report().attention_share
    for layer, attn in enumerate(captured):
        torch.testing.assert_close(monitor.last_prefix_rows[layer], attn[:, :, :P, :], atol=1e-5, rtol=1e-4)
        received = attn.sum(2)  # column sums of the materialised matrix, (B, H, N)
        groups = {"cls": received[..., :1], "registers": received[..., 1:P], "patches": received[..., P:]}
        for group, cols in groups.items():
            want = (cols.sum(-1) / N).mean().item()
            assert math.isclose(share[layer][group], want, rel_tol=1e-4, abs_tol=1e-6), (layer, group)
        assert share[layer]["kv_registers"] == 0.0
    maps = monitor.attention_maps(-1)
    assert maps.shape == (2, 6, P, IMG // 14, IMG // 14)
    torch.testing.assert_close(maps.flatten(-2), captured[-1][:, :, :P, P:], atol=1e-5, rtol=1e-4)


def test_monitoring_changes_no_output_bit_and_can_be_toggled(images):
    plain = regkern.patch_timm(build_model())
    monitored = regkern.patch_timm(build_model(), monitor=True)
    monitor = regkern.get_monitor(monitored)
    with torch.no_grad():
        assert torch.equal(monitored(images), plain(images))
        counted = monitor.count.clone()
        monitor.disable()
        assert torch.equal(monitored(images), plain(images))
        assert torch.equal(monitor.count, counted)  # nothing collected while disabled
        monitor.enable()
        monitored(images)
    assert torch.equal(monitor.count, 2 * counted)
    monitor.reset()
    assert monitor.count.sum() == 0 and monitor.report().rows[0]["count"] == 0


def test_unpatch_removes_the_monitor_and_restores_modules():
    model = build_model()
    norms = [b.norm1 for b in model.blocks]
    attns = [b.attn for b in model.blocks]
    regkern.patch_timm(model, monitor=True)
    assert type(model.blocks[0].norm1).__name__ == "MonitoredLayerNorm"
    assert sorted(model.state_dict()) == sorted(build_model().state_dict())
    with pytest.raises(ValueError, match="already has a NormMonitor"):
        regkern.patch_timm(model, monitor=True)
    regkern.unpatch_timm(model)
    assert regkern.get_monitor(model) is None
    assert all(b.norm1 is n and b.attn is a for b, n, a in zip(model.blocks, norms, attns))


def test_bad_monitor_arguments():
    model = build_model()
    with pytest.raises(ValueError, match="threshold"):
        regkern.NormMonitor(model, threshold=-1)
    with pytest.raises(ValueError, match="norm_range"):
        regkern.NormMonitor(model, norm_range=(10, 1))
    with pytest.raises(ValueError, match="no .blocks"):
        regkern.NormMonitor(torch.nn.Linear(2, 2))


def test_triton_path_monitor_matches_the_torch_path(images):
    """The same monitor fed by the Triton kernels' epilogues (interpreter on the CPU) and by the reference."""
    from regkern.ops.attention import triton_kernels as attention_triton

    if not torch.cuda.is_available() and not attention_triton.INTERPRETED:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = images[:, :, :28, :28].to(device)  # 2 x 2 patches: keeps the interpreter quick

    def monitored(backend):
        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=2)
        with torch.no_grad():
            model.cls_token.normal_()
            model.reg_token.normal_()
        options = {"threshold": 5.0, "norm_backend": "triton" if backend == "triton" else "reference"}
        model = regkern.patch_timm(model.eval().to(device), backend=backend, monitor=options)
        with torch.no_grad():
            out = model(small)
        return out, regkern.get_monitor(model)

    out_t, mon_t = monitored("triton")
    out_r, mon_r = monitored("torch")
    assert mon_t.attentions[0].backend_name == "triton"
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=1e-4)
    assert mon_t.blocks[0].norm1.backend_name == "triton"  # the reduction inside the LayerNorm kernel
    rep_t, rep_r = mon_t.report(), mon_r.report()
    for a, b in zip(rep_t.rows, rep_r.rows):
        assert (a["count"], a["outliers"], a["histogram"]) == (b["count"], b["outliers"], b["histogram"])
        assert math.isclose(a["mean"], b["mean"], rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(a["std"], b["std"], rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(a["max"], b["max"], rel_tol=1e-5, abs_tol=1e-6)
    assert sum(r["outliers"] for r in rep_t.rows) > 0  # the threshold of 5 is crossed somewhere
    for a, b in zip(rep_t.top_patches, rep_r.top_patches):
        assert [p[1:] for p in a] == [p[1:] for p in b]
        assert [p[0] for p in a] == pytest.approx([p[0] for p in b], rel=1e-5)
    for a, b in zip(rep_t.attention_share, rep_r.attention_share):
        for group in a:
            assert math.isclose(a[group], b[group], rel_tol=1e-4, abs_tol=1e-6)
    torch.testing.assert_close(mon_t.attention_maps(-1), mon_r.attention_maps(-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "reference", None])
def test_set_backend_keeps_monitoring_and_expected_seq_len(images, backend):
    """Regression: set_backend on a monitored layer once dropped its statistics request, sink and expected N, so
    the report showed 0.000 for that layer's attention share."""
    model = build_model()
    regkern.patch_timm(model, monitor=True)
    layer = model.blocks[1].attn
    before = (layer.monitor_stats, layer.stats_sink, layer.expected_seq_len)
    assert before[0] and before[1] is not None and before[2] == model.num_prefix_tokens + (IMG // 14) ** 2
    layer.set_backend(backend)
    assert (layer.monitor_stats, layer.stats_sink, layer.expected_seq_len) == before
    assert layer.requested_backend == backend
    with torch.no_grad():
        model(images)
    report = regkern.get_monitor(model).report()
    for share in report.attention_share:
        assert sum(share.values()) == pytest.approx(1.0, abs=1e-5)
        assert share["patches"] > 0.0
    regkern.unpatch_timm(model)


# ---------------------------------------------------------------------------------------------- monitor edges


def test_post_norm_blocks_are_refused_naming_the_block_class():
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    model = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, block_fn=ResPostBlock)
    norms = [b.norm1 for b in model.blocks]
    with pytest.raises(ValueError, match="ResPostBlock blocks are post-norm"):
        regkern.NormMonitor(model)
    assert regkern.get_monitor(model) is None
    assert [b.norm1 for b in model.blocks] == norms  # nothing replaced


def test_maps_use_the_grid_of_the_actual_input_with_dynamic_img_size():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=2, dynamic_img_size=True
    ).eval()
    monitor = regkern.NormMonitor(model, norm_maps=True)
    x = torch.randn(2, 3, 28, 70)  # a 2 x 5 patch grid on a model configured for 4 x 4
    seen = []
    handle = model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].norm(dim=-1)))
    with torch.no_grad():
        model(x)
    handle.remove()
    maps = monitor.norm_maps(1)
    assert maps.shape == (2, 2, 5)
    torch.testing.assert_close(maps, seen[0][:, model.num_prefix_tokens :].reshape(2, 2, 5), rtol=1e-5, atol=1e-5)
    assert monitor.attention_maps(1).shape[-2:] == (2, 5)


def test_norm_monitor_attaches_itself_and_is_removed_with_its_layer_norms():
    model = build_model()
    originals = [b.norm1 for b in model.blocks]
    monitor = regkern.NormMonitor(model)
    assert regkern.get_monitor(model) is monitor
    assert all(isinstance(b.norm1, regkern.MonitoredLayerNorm) for b in model.blocks)
    with pytest.raises(ValueError, match="already has a NormMonitor"):
        regkern.NormMonitor(model)
    monitor.remove()
    monitor.remove()  # idempotent
    assert regkern.get_monitor(model) is None
    assert [b.norm1 for b in model.blocks] == originals
    regkern.NormMonitor(model)  # a new one may attach now
    regkern.unpatch_timm(model)
    assert regkern.get_monitor(model) is None
    assert [b.norm1 for b in model.blocks] == originals
    assert not any(isinstance(m, regkern.MonitoredLayerNorm) for m in model.modules())


def test_unsupported_attention_is_refused_naming_its_class():
    class HomeMadeAttention(torch.nn.Module):
        def forward(self, x):
            return x

    model = build_model()
    model.blocks[1].attn = HomeMadeAttention()
    with pytest.warns(UserWarning, match="HomeMadeAttention"):  # patch_timm's own warning
        with pytest.raises(ValueError, match=r"model.blocks\[1\].attn: .*HomeMadeAttention is not an attention class"):
            regkern.patch_timm(model, monitor=True)
    assert regkern.get_monitor(model) is None
    assert not any(isinstance(m, regkern.MonitoredLayerNorm) for m in model.modules())


def test_unmeasured_attention_shares_print_as_not_available(images):
    model = build_model()
    monitor = regkern.NormMonitor(model)
    monitor.attentions[1].set_monitoring()  # layer 1's attention is not measured, its norms are
    with torch.no_grad():
        model(images)
    report = monitor.report()
    assert all(v is None for v in report.attention_share[1].values())
    assert report.attention_share[0]["patches"] > 0
    layer1 = [line for line in str(report).splitlines() if line.split("|")[0].strip() == "1"]
    assert layer1 and all(line.rstrip().endswith("n/a") for line in layer1)
    json.loads(report.to_json())  # None is JSON null


def test_attention_shares_of_a_model_without_cls_go_to_its_registers():
    """received_groups' "prefix token 0" is a register when the model has no CLS token."""
    torch.manual_seed(0)
    model = timm.create_model("vit_medium_patch16_reg1_gap_256", pretrained=False, img_size=32, depth=2)
    model = regkern.patch_timm(model.eval(), monitor=True)
    assert model.cls_token is None and model.num_prefix_tokens == 1
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for share in regkern.get_monitor(model).report().attention_share:
        assert share["cls"] == 0.0 and share["registers"] > 0.0
        assert sum(share.values()) == pytest.approx(1.0, abs=1e-6)


def test_differential_attention_models_measure_norms_and_print_shares_as_not_available():
    """vit_dwee (timm DiffAttention): norms are measured in every block; attention shares of two mixed softmax maps
    are not defined, so they print as n/a instead of a number that would mislead."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, img_size=32, depth=2).eval()
    monitor = regkern.NormMonitor(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    report = monitor.report()
    assert int(monitor.count.sum()) == 2 * 2 * (1 + 4)  # layers x images x (register + 2x2 patches)
    assert all(v is None for layer in report.attention_share for v in layer.values())
    assert "n/a" in str(report)


def test_parallel_blocks_are_refused_with_the_reason():
    import timm

    model = timm.create_model("vit_pwee_patch16_reg1_gap_256", pretrained=False, img_size=32, depth=2).eval()
    with pytest.raises(ValueError, match=r"model.blocks\[0\]: RegisterParallelScalingBlock feeds attention and MLP"):
        regkern.NormMonitor(model)
    assert regkern.get_monitor(model) is None


def test_tracked_samples_keep_the_largest_patches_over_every_batch(images):
    """With track_samples, top_patches are the largest since reset over all batches, named by the caller's ids."""
    model = build_model()
    plant(model)  # batch index 0, patch 3 and batch index 1, patch 7 of every batch
    monitor = regkern.NormMonitor(model, top_k=3)
    P = model.num_prefix_tokens
    batches = [(images, torch.tensor([10, 11])), (images.flip(0) * 1.5, torch.tensor([20, 21]))]
    expected = []
    for x, ids in batches:
        monitor.track_samples(ids)
        with torch.no_grad():
            model(x)
        assert monitor.report().top_patches_scope == "since reset"
    monitor.track_samples(None)
    last = monitor.report()
    assert last.top_patches_scope == "last batch"
    monitor.track_samples(torch.tensor([0, 1]))  # tracking again: the tracked values are still there
    tracked = monitor.report().top_patches
    # the independent answer: every batch's norms per layer, named by sample id
    for x, ids in batches:
        fresh = build_model()
        plant(fresh)
        for layer, norms in enumerate(residual_norms(fresh, x)):
            for b in range(norms.shape[0]):
                for t in range(P, norms.shape[1]):
                    expected.append((layer, norms[b, t].item(), int(ids[b]), t))
    for layer in range(DEPTH):
        want = sorted((e for e in expected if e[0] == layer), key=lambda e: -e[1])[:3]
        got = tracked[layer]
        assert [(i, t) for _, i, t in got] == [(i, t) for _, _, i, t in want], layer
        assert all(math.isclose(v, w[1], rel_tol=1e-5) for (v, _, _), w in zip(got, want))
    assert "since reset" in str(monitor.report())
    monitor.reset()
    assert monitor.report().top_patches == [[] for _ in range(DEPTH)]


def test_track_samples_checks_its_argument(images):
    monitor = regkern.NormMonitor(build_model())
    with pytest.raises(TypeError, match="sample_ids"):
        monitor.track_samples([1, 2])
    with pytest.raises(ValueError, match="sample_ids: expected a 1-D int64"):
        monitor.track_samples(torch.tensor([1.0, 2.0]))
    monitor.track_samples(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="3 sample ids were given for a batch of 2"):
        with torch.no_grad():
            monitor.model(images)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        monitor.all_reduce()


def test_all_reduce_on_two_gloo_ranks_equals_one_monitor_over_all_data():
    """tests/monitor/dist_all_reduce.py under torchrun: sums, maxima, histograms and tracked top patches combined;
    repeated calls count nothing twice."""
    from pathlib import Path

    from tests.helpers import torchrun

    result = torchrun(Path(__file__).with_name("dist_all_reduce.py"))
    assert "ALL_REDUCE OK" in result.stdout, result.stdout[-4000:]
