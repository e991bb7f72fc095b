"""Model level: timm register ViTs, bf16 inference images/s (unpatched vs patched with auto dispatch vs patched with
the CUDA backend, eager and torch.compile) and one training step (forward + backward + AdamW) patched vs unpatched.
Tiny models on the CPU, eager only."""

import statistics
import time

import pytest
import torch

import regkern
from benchmarks.common import cuda_backend_unavailable, on_gpu, record, sync
from tests.helpers import naflex_batch

timm = pytest.importorskip("timm")

# (id, timm name, image size, batch)
GPU_MODELS = [
    ("vitb14reg4-224", "vit_base_patch14_reg4_dinov2", 224, 256),
    ("vitl14reg4-518", "vit_large_patch14_reg4_dinov2", 518, 32),
]
CPU_MODELS = [("vits14reg4-cpu", "vit_small_patch14_reg4_dinov2", 56, 2)]
MODELS = GPU_MODELS if on_gpu() else CPU_MODELS
VARIANTS = [
    "unpatched-eager",
    "patched-eager",
    "patched-cuda-eager",
    "unpatched-compiled",
    "patched-compiled",
    "patched-cuda-compiled",
]


def build(name, img_size, device, dtype, patched, backend=None):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=img_size).to(device=device, dtype=dtype)
    return regkern.patch_timm(model, backend=backend) if patched else model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("spec", MODELS, ids=[m[0] for m in MODELS])
def test_model_inference(benchmark, device, spec, variant):
    label, name, img_size, batch = spec
    if variant.endswith("compiled") and device.type != "cuda":
        pytest.skip("torch.compile model benchmarks run on the GPU only")
    backend = None
    if variant.startswith("patched-cuda"):
        reason = cuda_backend_unavailable(device)
        if reason:
            pytest.skip(f"patched-cuda: {reason}")
        backend = "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(name, img_size, device, dtype, variant.startswith("patched"), backend).eval()
    if variant.endswith("compiled"):
        model = torch.compile(model)
    x = torch.randn(batch, 3, img_size, img_size, device=device, dtype=dtype)

    def run():
        with torch.inference_mode():
            y = model(x)
        sync(device)
        return y

    run()
    run()  # compile and autotune outside the timed region
    benchmark.pedantic(run, rounds=10 if device.type == "cuda" else 3, warmup_rounds=1)
    params = sum(p.numel() for p in model.parameters())
    tokens = (
        batch * (model.patch_embed.num_patches + model.num_prefix_tokens) if hasattr(model, "patch_embed") else batch
    )
    record(
        benchmark,
        device,
        flops=2 * params * tokens,
        bytes_moved=x.numel() * x.element_size(),
        model=name,
        variant=variant,
        batch=batch,
        img_size=img_size,
        label=label,
        images_per_s=(batch / benchmark.stats.stats.median) if benchmark.stats is not None else None,
    )


@pytest.mark.parametrize("variant", ["unpatched", "patched"])
def test_training_step(benchmark, device, variant):
    label, name, img_size, batch = (
        ("vitb14reg4-224", "vit_base_patch14_reg4_dinov2", 224, 64)
        if on_gpu()
        else ("vits14reg4-cpu", "vit_small_patch14_reg4_dinov2", 56, 2)
    )
    model = build(name, img_size, device, torch.float32, variant == "patched").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    target = torch.randint(0, model.num_classes or 1, (batch,), device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        sync(device)
        return loss

    step()
    benchmark.pedantic(step, rounds=10 if device.type == "cuda" else 2, warmup_rounds=1)
    params = sum(p.numel() for p in model.parameters())
    record(
        benchmark,
        device,
        flops=6 * params * batch * (model.patch_embed.num_patches + model.num_prefix_tokens),
        bytes_moved=16 * params,
        model=name,
        variant=variant,
        batch=batch,
        img_size=img_size,
        label=label,
        images_per_s=(batch / benchmark.stats.stats.median) if benchmark.stats is not None else None,
    )


# (id, timm name, image size, batch, dtype): the monitor's overhead, issue 13's shapes
MONITOR_SPEC = (
    ("vitb14reg4-224", "vit_base_patch14_reg4_dinov2", 224, 256, torch.bfloat16)
    if on_gpu()
    else ("vits14reg4-224-cpu", "vit_small_patch14_reg4_dinov2", 224, 8, torch.float32)
)
MONITOR_VARIANTS = {
    "patched": None,
    "monitored-norms": {"attention_share": False, "attention_maps": False},
    "monitored-full": True,  # norms, attention shares and maps
}


def test_monitor_overhead(benchmark, device):
    """Patched vs monitored (norms only; norms + attention shares + maps), timed interleaved in one loop so the
    ratios share the machine's state; recorded as ``monitored-*/patched`` (median of the interleaved rounds)."""
    label, name, img_size, batch, dtype = MONITOR_SPEC
    models = {}
    for variant, options in MONITOR_VARIANTS.items():
        model = build(name, img_size, device, dtype, patched=options is None).eval()
        models[variant] = model if options is None else regkern.patch_timm(model, monitor=options)
    x = torch.randn(batch, 3, img_size, img_size, device=device, dtype=dtype)
    times = {variant: [] for variant in models}

    def forward(model):
        with torch.inference_mode():
            model(x)
        sync(device)

    def interleaved_round():
        for variant, model in models.items():
            start = time.perf_counter()
            forward(model)
            times[variant].append(time.perf_counter() - start)

    interleaved_round()  # warm-up, not kept
    for t in times.values():
        t.clear()
    benchmark.pedantic(interleaved_round, rounds=10 if device.type == "cuda" else 9, warmup_rounds=0)
    median = {variant: statistics.median(t) for variant, t in times.items()}
    ratios = {f"{v}/patched": median[v] / median["patched"] for v in median if v != "patched"}
    params = sum(p.numel() for p in models["patched"].parameters())
    tokens = batch * (models["patched"].patch_embed.num_patches + models["patched"].num_prefix_tokens)
    record(
        benchmark,
        device,
        flops=3 * 2 * params * tokens,
        bytes_moved=3 * x.numel() * x.element_size(),
        model=name,
        variant="monitor-overhead",
        batch=batch,
        img_size=img_size,
        label=label,
        variant_median_s=median,
        ratios=ratios,
    )


# NaFlex ViT-B at mixed resolutions: one batch of images at their own patch grids, padded to the longest
NAFLEX_SPEC = (
    ("naflexvit-b16-mixed", "naflexvit_base_patch16_gap", [(14, 14), (16, 20), (24, 12), (32, 32)] * 8, torch.bfloat16)
    if on_gpu()
    else ("naflexvit-tiny-mixed-cpu", "naflexvit_base_patch16_gap", [(3, 4), (2, 3), (4, 4)], torch.float32)
)


def naflex_inputs(grids, device, dtype, patch=16):
    """``tests.helpers.naflex_batch`` on ``device``, its patches in ``dtype``."""
    batch = naflex_batch(grids, patch=patch)
    return {
        "patches": batch["patches"].to(device, dtype),
        **{k: batch[k].to(device) for k in ("patch_coord", "patch_valid")},
    }


@pytest.mark.parametrize("variant", ["unpatched", "patched"])
def test_naflex_mixed_resolutions(benchmark, device, variant):
    """NaFlex ViT-B over a batch of mixed aspect ratios and sizes (padding masked): timm vs patched (key masks on
    the fused kernels)."""
    label, name, grids, dtype = NAFLEX_SPEC
    kwargs = {} if on_gpu() else {"depth": 2, "embed_dim": 64, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).to(device=device, dtype=dtype).eval()
    if variant == "patched":
        model = regkern.patch_timm(model)
    batch = naflex_inputs(grids, device, dtype)

    def run():
        with torch.inference_mode():
            y = model(batch)
        sync(device)
        return y

    run()
    benchmark.pedantic(run, rounds=10 if device.type == "cuda" else 3, warmup_rounds=1)
    tokens = int(batch["patch_valid"].sum())
    params = sum(p.numel() for p in model.parameters())
    record(
        benchmark,
        device,
        flops=2 * params * tokens,
        bytes_moved=batch["patches"].numel() * batch["patches"].element_size(),
        model=name,
        variant=variant,
        batch=len(grids),
        label=label,
        valid_tokens=tokens,
        padded_tokens=batch["patch_valid"].numel(),
        images_per_s=(len(grids) / benchmark.stats.stats.median) if benchmark.stats is not None else None,
    )
