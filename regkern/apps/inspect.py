"""``regkern inspect``: run a patched, monitored timm ViT over images and write what the fused path observed.

Outputs under ``--out`` (default ``inspect-out``):
    norms.json               the per-layer, per-group norm table (``NormReport.to_dict()``), also printed
    norm_histograms.png      a log-scale histogram of token norms per layer (CLS, registers, patches), threshold line
    norm_map_<image>.png     the image as the model saw it (its resize and crop) beside its last-layer patch-norm map
    attention_<image>.png    the CLS/register attention maps of the last layer, per head, with colour bars
Unreadable image files are reported and skipped (they still advance the progress bar); the run goes on.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, Optional

import torch

from ..monitor import NormMonitor
from .demo import (
    IMAGE_SUFFIXES,
    OFFLINE_NOTE,
    PLANT_FACTOR,
    create_model,
    load_checkpoint,
    patch_or_refuse,
    plant_artifacts,
    resolve_device,
)
from .images import model_view, to_rgb
from .plotting import pyplot

__all__ = ["add_inspect_arguments", "run_inspect", "collect_image_files"]


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGES_OR_DIR", help="image files and/or folders")
    p.add_argument("--model", default="vit_small_patch14_reg4_dinov2", help="timm model name (default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, help="local timm state_dict (.pth, .bin, .pt) or .safetensors file")
    p.add_argument("--out", type=Path, default=Path("inspect-out"), help="output folder (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threshold", type=float, default=150.0, help="outlier threshold on token norms (default: 150)")
    p.add_argument("--max-images", type=int, default=None, help="read at most this many files (>= 1)")
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


def _batches(
    files: Sequence[Path], transform, batch_size: int, skipped: Callable[[Path, Exception], None]
) -> Iterator[tuple[torch.Tensor, list[Path]]]:
    """Batches of transformed images and their files; ``skipped(file, error)`` hears of each unreadable file."""
    # lazy import of PIL: importing regkern does not import it
    from PIL import Image

    tensors, names = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                tensors.append(transform(to_rgb(im)))
            names.append(f)
        except Exception as err:  # a broken file never aborts the run
            skipped(f, err)
            continue
        if len(tensors) == batch_size:
            yield torch.stack(tensors), names
            tensors, names = [], []
    if tensors:
        yield torch.stack(tensors), names


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
    """Run the inspection; returns the report dict and the written files."""
    # lazy import of timm and tqdm: importing regkern imports neither
    from timm.data import create_transform, resolve_data_config
    from tqdm import tqdm

    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images: expected >= 1, got {args.max_images}")
    device = resolve_device(args.device)
    files = collect_image_files(args.images)
    if args.max_images is not None:
        files = files[: args.max_images]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = create_model(args.model, img_size=args.img_size)
    weights = load_checkpoint(model, args.checkpoint) if args.checkpoint else OFFLINE_NOTE
    size = args.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    config = resolve_data_config({"input_size": (3, size, size), "crop_pct": 1.0}, model=model)
    transform = create_transform(**config)
    model = patch_or_refuse(model.eval().to(device=device, dtype=dtype), args.model)
    if args.plant is not None:
        tokens = plant_artifacts(model, args.plant)
        out(
            f"synthetic artifacts: patch tokens {tokens} of every image multiplied by {PLANT_FACTOR:g} before block "
            f"{args.plant}"
        )
    monitor = NormMonitor(model, threshold=args.threshold, norm_maps=True)
    has_cls = bool(monitor.has_cls)
    args.out.mkdir(parents=True, exist_ok=True)
    out(f"regkern inspect: {args.model} at {size}px on {device}, {len(files)} files; weights: {weights}")
    if monitor.num_prefix and not monitor.has_attention_maps(-1):
        last = monitor.attentions[-1]
        out(f"no attention maps: {type(last).__name__} cannot report them ({last.limits_reason})")
    written: list[Path] = []
    seen = 0
    skipped: list[Path] = []
    progress = tqdm(total=len(files), unit="img", desc="inspect")

    def skip(f: Path, err: Exception) -> None:
        progress.write(f"skipping {f}: {err}")
        skipped.append(f)
        progress.update(1)  # the bar counts files, read or not, so it reaches its total

    for x, names in _batches(files, transform, args.batch_size, skip):
        with torch.inference_mode():
            model(x.to(device=device, dtype=dtype))
        norm_maps = monitor.norm_maps(-1)
        attention = monitor.attention_maps(-1) if monitor.has_attention_maps(-1) else None
        for i, name in enumerate(names):
            stem = f"{seen:04d}_{name.stem}"
            path = args.out / f"norm_map_{stem}.png"
            # the very tensor the model got, un-normalised: the panel shows its resize and crop exactly
            _plot_norm_map(model_view(x[i], config["mean"], config["std"]), norm_maps[i], path, args.threshold)
            written.append(path)
            if attention is not None:
                path = args.out / f"attention_{stem}.png"
                _plot_attention(attention[i], path, has_cls)
                written.append(path)
            seen += 1
        progress.update(len(names))
    progress.close()
    if seen == 0:
        raise ValueError("IMAGES_OR_DIR: none of the files could be read as an image")
    report = monitor.report()
    report_dict = report.to_dict()
    (args.out / "norms.json").write_text(json.dumps(report_dict, indent=1))
    _plot_histograms(report_dict, args.out / "norm_histograms.png", args.threshold)
    written = [args.out / "norms.json", args.out / "norm_histograms.png"] + written
    out(str(report))
    out(f"{seen} images inspected; wrote {len(written)} files to {args.out}")
    return {"report": report_dict, "files": written, "images": seen, "skipped": skipped}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="regkern inspect")
    add_inspect_arguments(parser)
    run_inspect(parser.parse_args(argv))
    return 0
