"""``regkern inspect``: run a patched, monitored timm ViT over images and write what the fused path observed.

Outputs under ``--out`` (default ``inspect-out``):
    norms.json               the per-layer, per-group norm table (``NormReport.to_dict()``), also printed
    norm_histograms.png      a log-scale histogram of token norms per layer (CLS, registers, patches), threshold line
    norm_map_<image>.png     the image as the model saw it (its resize and crop) beside its last-layer patch-norm map
    attention_<image>.png    the CLS/register attention maps of the last layer, per head, with colour bars
Unreadable image files are reported and skipped (they still advance the progress bar); the run goes on.

Files are read in order (files as given, folders' image files sorted) by DataLoader workers (``--workers``). Under
torchrun (``torchrun --nproc_per_node N -m regkern inspect ...``) each rank reads a disjoint shard of that list (file i
on rank i mod N), runs its own monitored model on ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo), and the monitors are
combined with ``NormMonitor.all_reduce`` before rank 0 alone prints and writes: ``norms.json`` holds the statistics
of every rank's images, its top patches name their files; the per-image figures are those of rank 0's shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from ..monitor import NormMonitor
from .demo import (
    IMAGE_SUFFIXES,
    OFFLINE_NOTE,
    PLANT_FACTOR,
    create_model,
    load_checkpoint,
    patch_or_refuse,
    plant_artifacts,
)
from .distributed import RankContext, default_workers, join
from .images import model_view, to_rgb
from .plotting import pyplot

__all__ = ["add_inspect_arguments", "run_inspect", "collect_image_files", "ImageFiles", "DisjointShardSampler"]


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGES_OR_DIR", help="image files and/or folders")
    p.add_argument("--model", default="vit_small_patch14_reg4_dinov2", help="timm model name (default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, help="local timm state_dict (.pth, .bin, .pt) or .safetensors file")
    p.add_argument("--out", type=Path, default=Path("inspect-out"), help="output folder (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threshold", type=float, default=150.0, help="outlier threshold on token norms (default: 150)")
    p.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="read at most this many files (>= 1; over all ranks under torchrun)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers decoding images, per rank (0: in the main process; default: up to 4 per rank)",
    )
    p.add_argument(
        "--max-figures",
        type=int,
        default=None,
        help="per-image figures for at most this many images (default: every image rank 0 reads; 0: none)",
    )
    p.add_argument(
        "--plant",
        type=int,
        metavar="LAYER",
        help="synthetic artifact for demonstrations without trained weights (as in regkern demo)",
    )


def collect_image_files(paths: Sequence[Path]) -> list[Path]:
    """Files given directly plus the image files of given folders (sorted); missing paths raise."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"IMAGES_OR_DIR: no such file or folder: {path}")
    if not files:
        raise ValueError(f"IMAGES_OR_DIR: no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in paths]}")
    return files


class ImageFiles(Dataset):
    """The image files as a map-style dataset: item i is (i, transformed image (3, H, W) or None, error text or None).

    Decoding (PIL, ``to_rgb``, the model's transform) runs in the DataLoader's workers; an unreadable file gives its
    error instead of raising, so one broken file never aborts the run."""

    def __init__(self, files: Sequence[Path], transform):
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        # lazy import of PIL: importing regkern does not import it
        from PIL import Image

        try:
            with Image.open(self.files[index]) as im:
                return index, self.transform(to_rgb(im)), None
        except Exception as err:  # reported by the caller, with the file's name
            return index, None, str(err)


def collate_images(items) -> tuple[Optional[torch.Tensor], torch.Tensor, list[tuple[int, str]]]:
    """(images (B, 3, H, W) or None, file indices (B,) int64, [(file index, error)] of the unreadable files)."""
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return images, torch.tensor([i for i, _ in good], dtype=torch.int64), bad


class DisjointShardSampler(DistributedSampler):
    """A ``DistributedSampler`` over the file list without its padding: rank r reads files r, r + W, r + 2W,
    ... in order. ``DistributedSampler`` evens the shards out by repeating files, which would count them twice; here
    the shards are disjoint and cover every file once (they differ in length by at most one)."""

    def __init__(self, num_files: int, rank: int = 0, world_size: int = 1):
        super().__init__(range(num_files), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, num_files, world_size))
        self.total_size = num_files

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _plot_histograms(report_dict: dict[str, object], path: Path, threshold: float) -> None:
    plt = pyplot()

    edges = report_dict["bin_edges"]
    layers = sorted({r["layer"] for r in report_dict["rows"]})
    cols = min(4, len(layers))
    rows_n = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.4 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        ax.axis("on")
        for row in (r for r in report_dict["rows"] if r["layer"] == layer and r["count"]):
            ax.stairs(row["histogram"], edges, label=row["group"])
        ax.axvline(threshold, color="red", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
        ax.set_xscale("log")
        ax.set_yscale("symlog")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"token norms entering each block (threshold {report_dict['threshold']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_norm_map(picture, norm_map: torch.Tensor, path: Path, threshold: float) -> None:
    """picture: (H, W, 3) array of what the model received; norm_map (gh, gw) is drawn over the same H x W pixels so
    each cell sits beside the patch it belongs to."""
    plt = pyplot()

    height, width = picture.shape[:2]
    extent = (0, width, height, 0)
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.0), sharex=True, sharey=True)
    axes[0].imshow(picture, extent=extent)
    axes[0].set_title(f"model input ({width}x{height}, resized and cropped)", fontsize=8)
    shown = axes[1].imshow(norm_map.float().cpu().numpy(), cmap="magma", extent=extent)
    axes[1].set_title(f"last-layer patch norms (max {norm_map.max().item():.1f}, threshold {threshold:g})", fontsize=8)
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_attention(maps: torch.Tensor, path: Path, has_cls: bool) -> None:
    """maps (H, P, gh, gw) of one image: a P x H grid, one colour bar per prefix query."""
    plt = pyplot()

    H, P = maps.shape[:2]
    data = maps.float().cpu()
    # constrained layout makes room for a colour bar spanning a row of panels (tight_layout cannot)
    fig, axes = plt.subplots(P, H, figsize=(1.3 * H + 0.8, 1.3 * P), squeeze=False, layout="constrained")
    for p in range(P):
        # one scale per row: the heads of a query compare at a glance
        top = max(data[:, p].max().item(), 1e-12)
        for h in range(H):
            ax = axes[p][h]
            shown = ax.imshow(data[h, p].numpy(), cmap="viridis", vmin=0.0, vmax=top)
            ax.set_xticks([])
            ax.set_yticks([])
            if p == 0:
                ax.set_title(f"head {h}", fontsize=7)
            if h == 0:
                ax.set_ylabel("CLS" if has_cls and p == 0 else f"reg {p + 1 - int(has_cls)}", fontsize=7)
        bar = fig.colorbar(shown, ax=list(axes[p]), fraction=0.02, pad=0.01)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle("last-layer attention of the prefix queries over the patches", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_inspect(args: argparse.Namespace, out: Callable[[str], None] = print) -> dict[str, object]:
    """Run the inspection; returns the report dict (every rank's images) and, on rank 0, the written files."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images: expected >= 1, got {args.max_images}")
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 0:
        raise ValueError(f"--workers: expected >= 0, got {workers}")
    max_figures = getattr(args, "max_figures", None)
    if max_figures is not None and max_figures < 0:
        raise ValueError(f"--max-figures: expected >= 0, got {max_figures}")
    files = collect_image_files(args.images)  # the same list, in the same order, on every rank
    if args.max_images is not None:
        files = files[: args.max_images]  # global: before the shards are cut
    context = join(args.device)
    try:
        return _inspect(args, context, files, out)
    finally:
        context.close()


def _inspect(
    args: argparse.Namespace, context: RankContext, files: list[Path], out: Callable[[str], None]
) -> dict[str, object]:
    # lazy import of timm and tqdm: importing regkern imports neither
    from timm.data import create_transform, resolve_data_config
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    device, main_rank = context.device, context.is_main
    if context.distributed:  # every rank must shard the same list, or files are read twice or never
        listed: list[object] = [None] * context.world_size
        dist.all_gather_object(listed, (len(files), hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()))
        if any(other != listed[0] for other in listed):
            counts = ", ".join(f"rank {r}: {n} files" for r, (n, _) in enumerate(listed))
            raise ValueError(
                f"IMAGES_OR_DIR: the ranks list different files ({counts}); every node must see the same paths"
            )
    say = out if main_rank else (lambda _text: None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(0)  # random weights (no checkpoint) are the same in every run and on every rank
        model = create_model(args.model, img_size=args.img_size)
    weights = load_checkpoint(model, args.checkpoint) if args.checkpoint else OFFLINE_NOTE
    size = args.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    config = resolve_data_config({"input_size": (3, size, size), "crop_pct": 1.0}, model=model)
    transform = create_transform(**config)
    model = patch_or_refuse(model.eval().to(device=device, dtype=dtype), args.model)
    if context.distributed:
        for tensor in model.state_dict().values():  # rank 0's weights everywhere, as DDP does
            dist.broadcast(tensor, 0)
    if args.plant is not None:
        tokens = plant_artifacts(model, args.plant)
        say(
            f"synthetic artifacts: patch tokens {tokens} of every image multiplied by {PLANT_FACTOR:g} before block "
            f"{args.plant}"
        )
    monitor = NormMonitor(model, threshold=args.threshold, norm_maps=True)
    has_cls = bool(monitor.has_cls)
    workers = args.workers if getattr(args, "workers", None) is not None else default_workers(context.local_world_size)
    sampler = DisjointShardSampler(len(files), context.rank, context.world_size)
    loader = DataLoader(
        ImageFiles(files, transform),
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,  # batches decoded ahead while the model runs
    )
    if main_rank:
        args.out.mkdir(parents=True, exist_ok=True)
    scale = f"{context.world_size} ranks ({context.backend}), " if context.distributed else ""
    say(
        f"regkern inspect: {args.model} at {size}px on {device}, {scale}{len(files)} files, decoding workers per "
        f"rank: {workers}; weights: {weights}"
    )
    if monitor.num_prefix and not monitor.has_attention_maps(-1):
        last = monitor.attentions[-1]
        say(f"no attention maps: {type(last).__name__} cannot report them ({last.limits_reason})")
    max_figures = getattr(args, "max_figures", None)
    figures_left = (len(files) if max_figures is None else max_figures) if main_rank else 0
    written: list[Path] = []
    seen = 0
    skipped: list[tuple[str, str]] = []
    desc = f"inspect (rank 0 of {context.world_size})" if context.distributed else "inspect"
    progress = tqdm(total=len(sampler), unit="img", desc=desc, disable=not main_rank)

    start = time.perf_counter()
    waited = 0.0  # seconds blocked on the DataLoader: decoding that did not keep up with the model
    drawing = 0.0  # seconds drawing per-image figures (rank 0): part of the time, not of the model's
    batches = iter(loader)
    while True:
        before = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - before
        if batch is None:
            break
        x, indices, unreadable = batch
        for index, err in unreadable:
            if main_rank:
                progress.write(f"skipping {files[index]}: {err}")
            skipped.append((str(files[index]), err))
        progress.update(len(unreadable))  # the bar counts files, read or not, so it reaches its total
        if x is None:
            continue
        monitor.track_samples(indices)  # the top patches are named by file index
        with torch.inference_mode():
            # to the device first: a copy that also converts would convert on the CPU, from unpinned memory
            model(x.to(device=device, non_blocking=True).to(dtype))
        seen += len(indices)
        if figures_left > 0:
            before = time.perf_counter()
            written += _plot_batch(args, monitor, x, indices[:figures_left].tolist(), files, config, has_cls)
            figures_left -= min(figures_left, len(indices))
            drawing += time.perf_counter() - before
        progress.update(len(indices))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    progress.close()

    mine = {"images": seen, "seconds": elapsed, "waited": waited, "skipped": skipped}
    if context.distributed:
        monitor.all_reduce()
        ranks: list[dict[str, object]] = [{} for _ in range(context.world_size)]
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    for r, other in enumerate(ranks[1:], start=1):
        for name, err in other["skipped"]:
            say(f"rank {r} skipped {name}: {err}")
    images = sum(r["images"] for r in ranks)
    all_skipped = sorted(name for r in ranks for name, _ in r["skipped"])
    if images == 0:
        raise ValueError("IMAGES_OR_DIR: none of the files could be read as an image")
    throughput = {
        "images": images,
        "seconds": max(r["seconds"] for r in ranks),
        "images_per_second": images / max(max(r["seconds"] for r in ranks), 1e-9),
        "per_rank_images_per_second": [r["images"] / max(r["seconds"], 1e-9) for r in ranks],
        "per_rank_seconds_waiting_for_images": [r["waited"] for r in ranks],
        "rank0_seconds_drawing_figures": drawing if main_rank else None,
    }
    report = monitor.report()
    report_dict = report.to_dict()
    report_dict["top_patches"] = _named_top_patches(report.top_patches, files, monitor)
    report_dict["run"] = {
        "model": args.model,
        "image_size": size,
        "files": len(files),
        "images": images,
        "skipped": all_skipped,
        "world_size": context.world_size,
        "throughput": throughput,
    }
    if main_rank:
        (args.out / "norms.json").write_text(json.dumps(report_dict, indent=1))
        _plot_histograms(report_dict, args.out / "norm_histograms.png", args.threshold)
        written = [args.out / "norms.json", args.out / "norm_histograms.png"] + written
    # the report's own top-patch lines name images by index; these name their files
    say(str(dataclasses.replace(report, top_patches=[[] for _ in report.top_patches])))
    for layer in sorted({r["layer"] for r in report.rows if r["outliers"] and report_dict["top_patches"][r["layer"]]}):
        top = ", ".join(
            f"{p['norm']:.1f} ({p['file']}, row {p['row']}, col {p['col']})"
            for p in report_dict["top_patches"][layer][:3]
        )
        say(f"layer {layer}: largest patch norms of all images: {top}")
    per_rank = ", ".join(f"{v:.1f}" for v in throughput["per_rank_images_per_second"])
    waits = ", ".join(f"{w:.1f}" for w in throughput["per_rank_seconds_waiting_for_images"])
    say(
        f"throughput: {throughput['images_per_second']:.1f} images/s in {throughput['seconds']:.1f} s"
        + (f" over {context.world_size} ranks ({per_rank} images/s each)" if context.distributed else "")
        + f"; waiting for decoded images: {waits} s"
        + (" per rank" if context.distributed else "")
        + " (more --workers if large)"
        + (f"; drawing figures: {drawing:.1f} s (--max-figures N to draw fewer)" if drawing else "")
    )
    say(f"{images} images inspected; wrote {len(written)} files to {args.out}")
    return {
        "report": report_dict,
        "files": written,
        "images": images,
        "skipped": [Path(name) for name in all_skipped],
        "throughput": throughput,
    }


def _plot_batch(args, monitor: NormMonitor, x: torch.Tensor, indices: list[int], files, config, has_cls) -> list[Path]:
    """The per-image figures of a batch's first ``len(indices)`` images, named by their index in the file list."""
    norm_maps = monitor.norm_maps(-1)
    attention = monitor.attention_maps(-1) if monitor.has_attention_maps(-1) else None
    written = []
    for i, index in enumerate(indices):
        stem = f"{index:04d}_{files[index].stem}"
        path = args.out / f"norm_map_{stem}.png"
        # the very tensor the model got, un-normalised: the panel shows its resize and crop exactly
        _plot_norm_map(model_view(x[i], config["mean"], config["std"]), norm_maps[i], path, args.threshold)
        written.append(path)
        if attention is not None:
            path = args.out / f"attention_{stem}.png"
            _plot_attention(attention[i], path, has_cls)
            written.append(path)
    return written


def _named_top_patches(top_patches, files: Sequence[Path], monitor: NormMonitor) -> list[list[dict[str, object]]]:
    """The tracked top patches per layer with their file, token index and (row, col) on the patch grid."""
    width = monitor.grid_size[1] if len(monitor.grid_size) == 2 else None
    named = []
    for layer in top_patches:
        entries = []
        for norm, index, token in layer:
            patch = token - monitor.num_prefix
            row, col = (patch // width, patch % width) if width else (None, None)
            entries.append(
                {"norm": norm, "file": str(files[index]), "file_index": index, "token": token, "row": row, "col": col}
            )
        named.append(entries)
    return named


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="regkern inspect")
    add_inspect_arguments(parser)
    run_inspect(parser.parse_args(argv))
    return 0
