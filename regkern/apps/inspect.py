"""``regkern inspect``: run a patched, monitored timm ViT over images and write what the fused path observed.

Outputs under ``--out`` (default ``inspect-out``):
    norms.json               the per-layer, per-group norm table (``NormReport.to_dict()``), also printed
    norm_histograms.png      a log-scale histogram of token norms per layer (CLS, registers, patches)
    norm_map_<image>.png     each image beside its last-layer patch-norm map
    attention_<image>.png    the CLS/register attention maps of the last layer, per head
Unreadable image files are reported and skipped; the run goes on.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, Optional

import torch

from ..monitor import NormMonitor, patch_timm
from .demo import IMAGE_SUFFIXES, OFFLINE_NOTE, PLANT_FACTOR, load_checkpoint, plant_artifacts
from .plotting import pyplot

__all__ = ["add_inspect_arguments", "run_inspect", "collect_image_files"]


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGES_OR_DIR", help="image files and/or folders")
    p.add_argument("--model", default="vit_small_patch14_reg4_dinov2", help="timm model name (default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, help="local timm state_dict (.pth, .bin, .pt) or .safetensors file")
    p.add_argument("--out", type=Path, default=Path("inspect-out"), help="output folder (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threshold", type=float, default=150.0, help="outlier threshold on token norms (default: 150)")
    p.add_argument("--max-images", type=int, default=None, help="stop after this many images")
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
    files: Sequence[Path], transform, batch_size: int, report: Callable[[str], None]
) -> Iterator[tuple[torch.Tensor, list[Path], list]]:
    # lazy import of PIL: importing regkern does not import it
    from PIL import Image

    tensors, names, pictures = [], [], []
    for f in files:
        try:
            with Image.open(f) as im:
                rgb = im.convert("RGB")
            tensors.append(transform(rgb))
            names.append(f)
            pictures.append(rgb)
        except Exception as err:  # a broken file never aborts the run
            report(f"skipping {f}: {err}")
            continue
        if len(tensors) == batch_size:
            yield torch.stack(tensors), names, pictures
            tensors, names, pictures = [], [], []
    if tensors:
        yield torch.stack(tensors), names, pictures


def _plot_histograms(report_dict: dict[str, object], path: Path) -> None:
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
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.0))
    axes[0].imshow(picture)
    axes[0].set_title("image", fontsize=8)
    shown = axes[1].imshow(norm_map.float().cpu().numpy(), cmap="magma")
    axes[1].set_title(f"last-layer patch norms (max {norm_map.max().item():.1f}, threshold {threshold:g})", fontsize=8)
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_attention(maps: torch.Tensor, path: Path, has_cls: bool) -> None:
    """maps (H, P, gh, gw) of one image: a P x H grid."""
    plt = pyplot()

    H, P = maps.shape[:2]
    fig, axes = plt.subplots(P, H, figsize=(1.3 * H, 1.3 * P), squeeze=False)
    for p in range(P):
        for h in range(H):
            ax = axes[p][h]
            ax.imshow(maps[h, p].float().cpu().numpy(), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if p == 0:
                ax.set_title(f"head {h}", fontsize=7)
            if h == 0:
                ax.set_ylabel("CLS" if has_cls and p == 0 else f"reg {p + 1 - int(has_cls)}", fontsize=7)
    fig.suptitle("last-layer attention of the prefix queries over the patches", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_inspect(args: argparse.Namespace, out: Callable[[str], None] = print) -> dict[str, object]:
    """Run the inspection; returns the report dict and the written files."""
    # lazy import of timm and tqdm: importing regkern imports neither
    import timm
    from timm.data import create_transform, resolve_data_config
    from tqdm import tqdm

    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {args.batch_size}")
    files = collect_image_files(args.images)
    if args.max_images is not None:
        files = files[: max(args.max_images, 0)]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    try:
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    except RuntimeError as err:
        raise ValueError(f"--model: timm cannot build {args.model!r}: {err}") from None
    weights = load_checkpoint(model, args.checkpoint) if args.checkpoint else OFFLINE_NOTE
    size = args.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    config = resolve_data_config({"input_size": (3, size, size), "crop_pct": 1.0}, model=model)
    transform = create_transform(**config)
    model = patch_timm(model.eval().to(device=device, dtype=dtype))
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
    written: list[Path] = []
    seen = 0
    progress = tqdm(total=len(files), unit="img", desc="inspect")
    for x, names, pictures in _batches(files, transform, args.batch_size, lambda msg: progress.write(msg)):
        with torch.inference_mode():
            model(x.to(device=device, dtype=dtype))
        norm_maps = monitor.norm_maps(-1)
        attention = monitor.attention_maps(-1) if monitor.num_prefix else None
        for i, (name, picture) in enumerate(zip(names, pictures)):
            stem = f"{seen:04d}_{name.stem}"
            path = args.out / f"norm_map_{stem}.png"
            _plot_norm_map(picture.resize((size, size)), norm_maps[i], path, args.threshold)
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
    _plot_histograms(report_dict, args.out / "norm_histograms.png")
    written = [args.out / "norms.json", args.out / "norm_histograms.png"] + written
    out(str(report))
    out(f"{seen} images inspected; wrote {len(written)} files to {args.out}")
    return {"report": report_dict, "files": written, "images": seen}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="regkern inspect")
    add_inspect_arguments(parser)
    run_inspect(parser.parse_args(argv))
    return 0
