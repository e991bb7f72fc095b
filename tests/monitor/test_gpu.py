"""GPU checks of monitoring: no output bit changes, CUDA-graph capture (marker ``gpu``)."""

import copy

import pytest
import torch

import regkern

pytestmark = pytest.mark.gpu


def test_monitored_model_matches_unmonitored_bits_and_captures_in_cuda_graph():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224).cuda().eval()
    base = base.to(torch.bfloat16)
    plain = regkern.patch_timm(copy.deepcopy(base))
    monitored = regkern.patch_timm(copy.deepcopy(base), monitor=True)
    monitor = regkern.get_monitor(monitored)
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(monitored(x), plain(x))
        # capture the monitored forward in a CUDA graph: no host sync inside, accumulators keep their addresses
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            monitored(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        monitor.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            monitored(static_x)
        monitor.reset()
        for _ in range(3):
            graph.replay()
    report = monitor.report()
    assert report.rows[0]["count"] == 3 * 8  # 3 replays x 8 CLS tokens in layer 0
    assert monitor.attention_maps(-1).shape == (8, 6, 5, 16, 16)


def test_fused_norm_reductions_agree_on_gpu():
    """The norm reduction inside the Triton LayerNorm kernel, inside its CUDA twin, and the PyTorch reference: the
    same counts, outliers and histograms, sums to float tolerance (bf16 model, planted high-norm tokens)."""
    timm = pytest.importorskip("timm")
    if regkern.cuda_ext.not_loaded_reasons("cuda"):
        pytest.skip("the CUDA extension is not available")
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=112).cuda().eval()
    x = torch.randn(4, 3, 112, 112, device="cuda") * 20
    reports = {}
    for norm_backend in ("triton", "cuda", "reference"):
        model = regkern.patch_timm(copy.deepcopy(base), monitor={"norm_backend": norm_backend, "threshold": 50.0})
        with torch.no_grad():
            model(x)
        reports[norm_backend] = regkern.get_monitor(model).report()
    for name in ("triton", "cuda"):
        for got, want in zip(reports[name].rows, reports["reference"].rows):
            assert (got["count"], got["outliers"]) == (want["count"], want["outliers"]), name
            assert sum(abs(a - b) for a, b in zip(got["histogram"], want["histogram"])) <= 2, name  # edge ties
            assert got["mean"] == pytest.approx(want["mean"], rel=1e-5, abs=1e-6), name


def test_all_reduce_and_tracked_samples_on_an_nccl_group_of_one(tmp_path):
    """The NCCL path of all_reduce (device tensors; one rank: the report must not change, however often called)."""
    import torch.distributed as dist

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56).cuda().eval()
    monitor = regkern.NormMonitor(model, top_k=4)
    for step in range(2):
        monitor.track_samples(torch.arange(4) + 4 * step)
        with torch.no_grad():
            model(torch.randn(4, 3, 56, 56, device="cuda"))
    before = monitor.report()
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        monitor.all_reduce()
        monitor.all_reduce()
        after = monitor.report()
    finally:
        dist.destroy_process_group()
    assert [r["count"] for r in after.rows] == [r["count"] for r in before.rows]
    assert [r["histogram"] for r in after.rows] == [r["histogram"] for r in before.rows]
    assert [[(i, t) for _, i, t in layer] for layer in after.top_patches] == [
        [(i, t) for _, i, t in layer] for layer in before.top_patches
    ]
    assert all(0 <= i < 8 for layer in after.top_patches for _, i, _ in layer)
