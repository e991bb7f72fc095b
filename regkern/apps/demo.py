"""``regkern demo``: patch a timm ViT with registers, compare it with the unpatched model, show residual norms."""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..monitor import NormMonitor, patch_timm
from ..nn import explain
from ..timm import patched_modules
from .images import to_rgb
from .plotting import pyplot

__all__ = [
    "add_demo_arguments",
    "run_demo",
    "resolve_device",
    "create_model",
    "load_checkpoint",
    "patch_or_refuse",
    "load_images",
    "residual_norm_table",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
OFFLINE_NOTE = (
    "random initialisation (pretrained weights cannot be downloaded offline; "
    "pass --checkpoint PATH to load a local timm .pth/.bin or .safetensors file)"
)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_small_patch14_reg4_dinov2", help="timm model name (default: %(default)s)")
    p.add_argument("--checkpoint", type=Path, help="local timm state_dict (.pth, .bin, .pt) or .safetensors file")
    p.add_argument("--images", type=Path, help="folder of images (default: a synthetic batch)")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument("--backend", default=None, help="regkern backend (default: $REGKERN_BACKEND or auto)")
    p.add_argument("--repeats", type=int, default=5, help="timed forward passes per model (default: %(default)s)")
    p.add_argument(
        "--monitor",
        action="store_true",
        help="also attach a regkern.NormMonitor and print its report (norm histograms, outliers, attention shares)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=150.0,
        help="outlier threshold on token norms for --monitor (default: %(default)s)",
    )
    p.add_argument(
        "--plant",
        type=int,
        metavar="LAYER",
        help="synthetic artifact for demonstrations without trained weights: multiply two patch tokens "
        "of every image by 50 before block LAYER (both models), so the monitor has outliers to find",
    )
    p.add_argument(
        "--attention-map",
        type=Path,
        metavar="PNG",
        help="with --monitor: save the last layer's CLS/register attention maps of the first image",
    )


def resolve_device(device: Optional[str]) -> torch.device:
    """``--device`` as a torch.device (None: cuda when available, else cpu); ValueError for anything else, or for
    a GPU that is not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device: {name} requested but no CUDA GPU is available (torch.cuda.is_available() is False)"
            )
        count = torch.cuda.device_count()
        if ":" in name and int(name.split(":")[1]) >= count:
            raise ValueError(f"--device: {name} requested but torch sees {count} CUDA GPU(s)")
    return torch.device(name)


def create_model(name: str, img_size: Optional[int] = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False[, img_size=...])``; ValueError naming ``--model`` when timm does
    not know the name (with close matches) or cannot build it."""
    # lazy import of timm: importing regkern does not import timm
    import timm

    kwargs = {"img_size": img_size} if img_size else {}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if str(err).startswith("Unknown model"):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" (close: {', '.join(close)})" if close else " (timm.list_models() lists them)"
            raise ValueError(f"--model: timm has no model named {name!r}{hint}") from None
        raise ValueError(f"--model: timm cannot build {name!r}: {err}") from None
    except Exception as err:  # e.g. TypeError: a model family without img_size
        size = f" at img_size={img_size}" if img_size else ""
        raise ValueError(f"--model: timm cannot build {name!r}{size}: {type(err).__name__}: {err}") from None


def patch_or_refuse(model: nn.Module, name: str, backend: Optional[str] = None) -> nn.Module:
    """``patch_timm(model, backend=...)``; a model in which nothing was patched raises ValueError with patch_timm's
    warning (the unsupported classes) instead of running timm's attention under regkern's name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_timm(model, backend=backend)
    notes = [str(w.message) for w in caught if "regkern" in str(w.message)]
    if not patched_modules(model):
        why = "; ".join(notes) or "it has no attention module of a family regkern supports"
        raise ValueError(f"--model: regkern patched nothing in {name} ({why})")
    for w in caught:  # patched: pass the warnings on as they came
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def _brief(err: BaseException, limit: int = 300) -> str:
    """An exception in one line of at most ``limit`` characters (torch's messages span many lines)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_error(err: BaseException) -> str:
    """Why a checkpoint could not be read, in one line."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:  # torch.load(weights_only=True) wraps the actual reason in a page of advice
        reason = text.split(marker, 1)[1].split("Check the documentation of torch.load")[0]
        return f"torch.load(weights_only=True) refused it: {_brief(reason)}"
    if isinstance(err, EOFError):
        return "the file is empty or truncated (EOFError)"
    return f"{type(err).__name__}: {_brief(err)}"


def load_checkpoint(model: nn.Module, path: Path) -> str:
    """Load a local checkpoint into ``model`` (strict). Returns a one-line description.

    Accepts a plain state_dict or one nested under 'state_dict'/'model', in torch or safetensors format. Original
    (non-timm) layouts such as the DINOv2 release are converted with the model family's ``checkpoint_filter_fn``.
    A file that cannot be read, or does not fit the model, raises ValueError naming ``--checkpoint``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            # lazy import of safetensors: only .safetensors checkpoints need it
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, safetensors header errors...: each library raises its own kinds
        raise ValueError(f"--checkpoint: cannot read {path}: {_read_error(err)}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"--checkpoint: {path} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state, strict=True)
        return f"loaded {path} ({len(state)} tensors)"
    except RuntimeError as first_error:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is None:
            raise ValueError(f"--checkpoint: {path} does not match the model: {_brief(first_error)}") from None
        try:
            model.load_state_dict(filter_fn(state, model), strict=True)
        except Exception as err:  # the converted layout still does not fit: report both
            raise ValueError(
                f"--checkpoint: {path} does not match the model: {_brief(first_error, 200)}; converting it with "
                f"{type(model).__module__}.checkpoint_filter_fn failed too: {type(err).__name__}: {_brief(err, 150)}"
            ) from None
        return f"loaded {path} ({len(state)} tensors, converted with {type(model).__module__}.checkpoint_filter_fn)"


def load_images(folder: Path, model: nn.Module, img_size: int, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Up to ``limit`` images from ``folder`` with the model's eval transform; unreadable files are skipped with a
    note."""
    # lazy import of PIL and timm: importing regkern imports neither
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: not a folder: {folder}")
    config = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    config["crop_pct"] = 1.0
    transform = create_transform(**config)
    tensors, names = [], []
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(f) as im:
                tensors.append(transform(to_rgb(im)))
            names.append(f.name)
        except Exception as err:
            print(f"skipping {f.name}: {err}")
        if len(tensors) == limit:
            break
    if not tensors:
        raise ValueError(f"--images: no readable images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return torch.stack(tensors), names


def _time_forwards(
    models: Sequence[nn.Module], x: torch.Tensor, repeats: int
) -> tuple[list[torch.Tensor], list[float]]:
    """Median seconds per forward for each model, runs interleaved (so drifting machine load hits all alike),
    after one warm-up pass each. Returns the outputs too."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        outs = [m(x) for m in models]
        for _ in range(max(1, repeats)):
            for i, m in enumerate(models):
                sync()
                t0 = time.perf_counter()
                outs[i] = m(x)
                sync()
                times[i].append(time.perf_counter() - t0)
    return outs, [statistics.median(t) for t in times]


def _token_groups(model: nn.Module) -> tuple[int, int]:
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    has_cls = 1 if getattr(model, "cls_token", None) is not None else 0
    return has_cls, num_prefix - has_cls


def _blocks(model: nn.Module) -> Sequence[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"--model: {type(model).__name__} has no .blocks; the demo needs a timm ViT")
    return list(blocks)


def residual_norm_table(model: nn.Module, x: torch.Tensor) -> list[dict[str, float]]:
    """Per block, the L2 norms of the residual-stream tokens entering it (and leaving the last), by token group.

    Returns one dict per row with keys layer, cls, reg_mean, reg_max, patch_mean, patch_max, patch_median.
    """
    has_cls, num_reg = _token_groups(model)
    captured: list[torch.Tensor] = []

    def grab(_module, args):
        captured.append(torch.linalg.vector_norm(args[0].float(), dim=-1).cpu())

    blocks = _blocks(model)
    handles = [b.register_forward_pre_hook(grab) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(lambda m, a, out: grab(m, (out,))))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    rows = []
    start = has_cls + num_reg
    for i, norms in enumerate(captured):
        patch = norms[:, start:]
        reg = norms[:, has_cls:start]
        rows.append(
            {
                "layer": str(i) if i < len(blocks) else "out",
                "cls": norms[:, 0].mean().item() if has_cls else float("nan"),
                "reg_mean": reg.mean().item() if num_reg else float("nan"),
                "reg_max": reg.max().item() if num_reg else float("nan"),
                "patch_mean": patch.mean().item(),
                "patch_median": patch.median().item(),
                "patch_max": patch.max().item(),
            }
        )
    return rows


def format_norm_table(rows: list[dict[str, float]]) -> str:
    cols = [
        ("layer", "layer"),
        ("cls", "CLS"),
        ("reg_mean", "reg mean"),
        ("reg_max", "reg max"),
        ("patch_mean", "patch mean"),
        ("patch_median", "patch median"),
        ("patch_max", "patch max"),
    ]
    header = " | ".join(f"{title:>12}" for _, title in cols)
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = [f"{r['layer']:>12}"] + [f"{'-':>12}" if r[key] != r[key] else f"{r[key]:12.2f}" for key, _ in cols[1:]]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def run_demo(args: argparse.Namespace, out: Callable[[str], None] = print) -> dict[str, object]:
    """Run the demo; returns what it printed as numbers (for tests and scripts)."""
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.batch_size < 1 or args.img_size < 1:
        raise ValueError("--batch-size and --img-size must be >= 1")
    if args.attention_map and not args.monitor:
        raise ValueError("--attention-map needs --monitor")
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.img_size)
    weights = load_checkpoint(model, args.checkpoint) if args.checkpoint else OFFLINE_NOTE
    model = model.eval()

    if args.images:
        x, names = load_images(args.images, model, args.img_size, args.batch_size)
        source = f"{len(names)} images from {args.images}"
    else:
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
        source = f"synthetic batch of {args.batch_size} images"
    x = x.to(device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)

    patched = patch_or_refuse(copy.deepcopy(model), args.model, backend=args.backend)
    planted = []
    if args.plant is not None:
        for m in (model, patched):
            planted = plant_artifacts(m, args.plant)
    (base_out, patched_out), (base_time, patched_time) = _time_forwards([model, patched], x, args.repeats)
    max_diff = (patched_out.float() - base_out.float()).abs().max().item()
    rows = residual_norm_table(patched, x)
    attention_lines = [line for line in explain(patched).splitlines() if "-> " in line and "_pos_embed" not in line]
    backends = sorted({line.split("-> ")[1].split(" ")[0] for line in attention_lines})
    has_cls, num_reg = _token_groups(patched)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out(f"regkern demo: {args.model} at {args.img_size}px, {source}")
    out(f"weights: {weights}")
    out(f"device: {device} ({device_name}), dtype {str(dtype)[6:]}, backend {', '.join(backends)}")
    out(f"tokens: {x.shape[0]} x ({has_cls} CLS + {num_reg} registers + patches)")
    out(
        f"forward (median of {args.repeats}, interleaved): unpatched {base_time * 1e3:.2f} ms, "
        f"patched {patched_time * 1e3:.2f} ms, ratio {base_time / patched_time:.2f}x"
        + ("" if device.type == "cuda" else " (CPU: indicative only; speed claims come from the GPU benchmarks)")
    )
    out(f"max |patched - unpatched| output difference: {max_diff:.3e}")
    out("residual-stream token norms entering each block (L2, mean over batch; 'out' = after the last block):")
    out(format_norm_table(rows))
    if planted:
        out(
            f"synthetic artifacts: patch tokens {planted} of every image multiplied by {PLANT_FACTOR:g} "
            f"before block {args.plant}"
        )
    elif not args.checkpoint:
        out("(random weights: no high-norm artifacts are expected; load a trained checkpoint to see them)")
    if args.monitor:
        monitor = NormMonitor(patched, threshold=args.threshold)
        if args.attention_map and not monitor.has_attention_maps(-1):
            last = monitor.attentions[-1]
            raise ValueError(
                f"--attention-map: {type(last).__name__} cannot report attention maps ({last.limits_reason})"
            )
        with torch.inference_mode():
            patched(x)
        out("")
        out(str(monitor.report()))
        if args.attention_map:
            save_attention_map(
                monitor.attention_maps(-1)[0], args.attention_map, f"{args.model}, last layer", has_cls=bool(has_cls)
            )
            out(f"attention maps written to {args.attention_map}")
    return {
        "max_diff": max_diff,
        "unpatched_s": base_time,
        "patched_s": patched_time,
        "rows": rows,
        "backends": backends,
        "weights": weights,
    }


PLANT_FACTOR = 50.0


def plant_artifacts(model: nn.Module, layer: int) -> list[int]:
    """Register a hook that multiplies two patch tokens of every image by PLANT_FACTOR before block ``layer``
    (a synthetic stand-in for the high-norm artifacts of trained ViTs). Returns their token indices."""
    blocks = _blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"--plant: expected a block index in [0, {len(blocks) - 1}], got {layer}")
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    num_patches = int(model.patch_embed.num_patches)
    tokens = [num_prefix + num_patches // 3, num_prefix + (2 * num_patches) // 3]

    def hook(_module, args):
        x = args[0].clone()
        x[:, tokens] *= PLANT_FACTOR
        return (x,) + tuple(args[1:])

    blocks[layer].register_forward_pre_hook(hook)
    return tokens


def save_attention_map(maps: torch.Tensor, path: Path, title: str, has_cls: bool = True) -> None:
    """maps (H, P, gh, gw) of one image -> a PNG with one panel per prefix query (CLS, registers), head mean."""
    plt = pyplot()

    mean = maps.float().mean(0).cpu()  # (P, gh, gw)
    P = mean.shape[0]
    fig, axes = plt.subplots(1, P, figsize=(2.2 * P, 2.4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(mean[i].numpy(), cmap="viridis")
        ax.set_title("CLS" if has_cls and i == 0 else f"register {i + 1 - int(has_cls)}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"attention of the prefix queries over the patches ({title}; mean over heads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="regkern demo")
    add_demo_arguments(parser)
    run_demo(parser.parse_args(argv))
    return 0
