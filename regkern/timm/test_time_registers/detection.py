"""Detection of register neurons (Jiang et al., 2025): ``find_register_neurons`` finds the outlier patch tokens by
their residual norm and ranks every MLP neuron (the hidden activation that the MLP's ``fc2`` consumes) by its mean
|activation| at those positions. Nothing here changes the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .model_structure import StopForward, check_int, check_model, first_arg, hidden_size, prefix_tokens

__all__ = ["RegisterNeurons", "find_register_neurons"]


@dataclass
class RegisterNeurons:
    """What ``find_register_neurons`` returns.

    neurons: the top (layer, neuron) pairs, best first; ``neuron`` indexes the hidden activation that the block's
        ``mlp.fc2`` consumes.
    scores: their scores: mean |activation| over the outlier positions of an image, averaged over the images that
        have outliers.
    outlier_positions: every outlier found, as (image index, token index); token indices count the prefix tokens.
    outlier_factor, num_images, max_layer: the settings and how many images were run.
    images_with_outliers: how many images had at least one outlier; num_prefix_tokens: the model's prefix count.
    """

    neurons: list[tuple[int, int]]
    scores: list[float]
    outlier_positions: list[tuple[int, int]]
    outlier_factor: float
    num_images: int
    max_layer: int
    images_with_outliers: int = 0
    num_prefix_tokens: int = 0

    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self):
        return iter(self.neurons)

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: [neuron, ...]} (what ``apply_test_time_registers`` uses)."""
        out: dict[int, list[int]] = {}
        for layer, neuron in self.neurons:
            out.setdefault(layer, []).append(neuron)
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "neurons": [[int(layer), int(n)] for layer, n in self.neurons],
            "scores": [float(s) for s in self.scores],
            "outlier_positions": [[int(b), int(t)] for b, t in self.outlier_positions],
            "outlier_factor": float(self.outlier_factor),
            "num_images": int(self.num_images),
            "images_with_outliers": int(self.images_with_outliers),
            "max_layer": int(self.max_layer),
            "num_prefix_tokens": int(self.num_prefix_tokens),
        }

    def __str__(self) -> str:
        lines = [
            f"register neurons (outliers: patch norm > {self.outlier_factor:g} x median patch norm entering the "
            f"last block; {len(self.outlier_positions)} in {self.images_with_outliers}/{self.num_images} images)"
        ]
        for (layer, n), s in zip(self.neurons, self.scores):
            lines.append(f"  layer {layer:>3}  neuron {n:>6}  score {s:.4g}")
        return "\n".join(lines)


def _set_eval(model: nn.Module) -> dict[nn.Module, bool]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    return modes


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


@torch.no_grad()
def find_register_neurons(
    model: nn.Module,
    images: torch.Tensor,
    *,
    top_k: int = 10,
    max_layer: Optional[int] = None,
    outlier_factor: float = 10.0,
    batch_size: Optional[int] = None,
) -> RegisterNeurons:
    """Find the MLP neurons that create the high-norm outlier tokens of a ViT.

    Outliers are patch tokens whose residual-stream norm entering the last block exceeds ``outlier_factor`` x the
    median patch-token norm of their image. Every neuron of blocks ``0 .. max_layer`` (the hidden activation that
    ``mlp.fc2`` consumes) is scored by its mean |activation| over an image's outlier positions, averaged over the
    images that have outliers (as the paper's code does); the ``top_k`` best (layer, neuron) pairs are returned.

    Args:
        model: a timm ``VisionTransformer``/``Eva`` (patched by ``regkern.patch_timm`` or not). Run in eval mode
            (dropout off) whatever its mode; the modes are restored afterwards.
        images: (B, C, H, W) images, preprocessed as the model expects; moved to the model's device and dtype.
        top_k: how many (layer, neuron) pairs to return (fewer if the model has fewer neurons).
        max_layer: last block whose neurons are scored (inclusive; negative counts from the end); default all.
        outlier_factor: a patch token is an outlier above this multiple of its image's median patch norm (> 1).
        batch_size: run the images in chunks of this many (default: all at once).

    Two forward passes per chunk: one up to the last block to find the outliers, one up to ``max_layer``'s MLP
    to score the neurons there (only the activations at outlier positions are kept).

    Raises:
        ValueError: bad arguments (the message names the argument), or no outlier in any image (lower
            ``outlier_factor`` or give more images).
    """
    blocks = check_model(model)
    depth = len(blocks)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a (B, C, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images: expected at least one image, got an empty batch")
    check_int(top_k, "top_k", 1)
    if max_layer is None:
        max_layer = depth - 1
    else:
        check_int(max_layer, "max_layer", -depth, depth - 1)
        max_layer %= depth
    if isinstance(outlier_factor, bool) or not isinstance(outlier_factor, (int, float)) or not outlier_factor > 1:
        raise ValueError(f"outlier_factor: expected a number > 1, got {outlier_factor!r}")
    if batch_size is not None:
        check_int(batch_size, "batch_size", 1)
    hidden = [hidden_size(b) for b in blocks[: max_layer + 1]]

    ref = next(iter(model.parameters()), None)
    num_prefix = prefix_tokens(model)
    chunk = batch_size or images.shape[0]
    score_sums: list[Optional[torch.Tensor]] = [None] * (max_layer + 1)
    positions: list[tuple[int, int]] = []
    images_with_outliers = 0

    modes = _set_eval(model)
    try:
        for start in range(0, images.shape[0], chunk):
            x = images[start : start + chunk]
            if ref is not None:
                x = x.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
            b_idx, t_idx = _find_outliers(model, blocks[-1], x, num_prefix, float(outlier_factor))
            if b_idx.numel() == 0:
                continue
            positions += [(start + int(b), int(t)) for b, t in zip(b_idx.tolist(), t_idx.tolist())]
            per_image = _score_neurons(model, blocks[: max_layer + 1], x, b_idx, t_idx)
            images_with_outliers += per_image[0][0]
            for layer, (_, sums) in enumerate(per_image):
                score_sums[layer] = sums if score_sums[layer] is None else score_sums[layer] + sums
    finally:
        _restore_modes(modes)

    if not positions:
        raise ValueError(
            f"outlier_factor: no patch token of the {images.shape[0]} images has a norm above {outlier_factor:g} x "
            f"its image's median patch norm (entering the last block); lower outlier_factor or give more images"
        )
    for layer, (sums, size) in enumerate(zip(score_sums, hidden)):
        if sums is None or (size is not None and sums.numel() != size):
            raise ValueError(f"model: blocks[{layer}].mlp.fc2 did not receive a (B, N, hidden) activation")
    scores = torch.cat([s.double().cpu() / images_with_outliers for s in score_sums])
    offsets = [0]
    for s in score_sums:
        offsets.append(offsets[-1] + s.numel())
    k = min(top_k, scores.numel())
    values, flat = scores.topk(k)
    pairs = []
    for f in flat.tolist():
        layer = next(i for i in range(len(score_sums)) if offsets[i] <= f < offsets[i + 1])
        pairs.append((layer, f - offsets[layer]))
    return RegisterNeurons(
        neurons=pairs,
        scores=[float(v) for v in values],
        outlier_positions=positions,
        outlier_factor=float(outlier_factor),
        num_images=int(images.shape[0]),
        max_layer=max_layer,
        images_with_outliers=images_with_outliers,
        num_prefix_tokens=num_prefix,
    )


def _find_outliers(model, last_block, x, num_prefix, factor):
    """(image indices, token indices) of the outlier patch tokens entering ``last_block``."""
    captured = {}

    def grab(module, args, kwargs):
        captured["x"] = first_arg(args, kwargs)
        raise StopForward

    handle = last_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(x)
    except StopForward:
        pass
    finally:
        handle.remove()
    if "x" not in captured:
        raise ValueError("model: its forward never called the last block (model.blocks[-1])")
    tokens = captured["x"]
    if tokens.dim() != 3 or tokens.shape[1] <= num_prefix:
        raise ValueError(
            f"model: expected (B, N, C) tokens with N > num_prefix_tokens={num_prefix} entering the "
            f"last block, got {tuple(tokens.shape)}"
        )
    norms = tokens.float().norm(dim=-1)[:, num_prefix:]  # (B, M) patch norms
    median = norms.median(dim=1, keepdim=True).values
    b_idx, p_idx = torch.nonzero(norms > factor * median, as_tuple=True)
    return b_idx, p_idx + num_prefix


def _score_neurons(model, blocks, x, b_idx, t_idx):
    """Per scored block: (number of images with outliers, sum over those images of the mean |activation| at their
    outlier positions), a (hidden,) float64 tensor."""
    B = x.shape[0]
    counts = torch.zeros(B, dtype=torch.float64, device=b_idx.device).index_add_(
        0, b_idx, torch.ones_like(b_idx, dtype=torch.float64)
    )
    has = counts > 0
    results: list[Optional[tuple[int, torch.Tensor]]] = [None] * len(blocks)

    def make_hook(layer):
        def hook(module, args):
            h = args[0]
            if h.dim() != 3 or h.shape[0] != B:
                raise ValueError(
                    f"model: blocks[{layer}].mlp.fc2 expected a (B, N, hidden) activation, got {tuple(h.shape)}"
                )
            acts = h[b_idx.to(h.device), t_idx.to(h.device)].abs().double()  # (K, hidden)
            sums = torch.zeros(B, acts.shape[1], dtype=torch.float64, device=acts.device).index_add_(
                0, b_idx.to(h.device), acts
            )
            per_image = sums[has.to(h.device)] / counts[has].to(h.device).unsqueeze(1)
            results[layer] = (int(has.sum()), per_image.sum(0))
            if layer == len(blocks) - 1:
                raise StopForward

        return hook

    handles = [b.mlp.fc2.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(blocks)]
    try:
        model(x)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise ValueError(f"model: blocks[{missing[0]}].mlp.fc2 was never called in the forward")
    return results


# ------------------------------------------------------------------------------------------------ application
