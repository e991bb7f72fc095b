"""Image helpers of the apps: any PIL image as RGB, and the picture a model actually received."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["to_rgb", "model_view", "ALPHA_MODES"]

#: PIL modes with an alpha channel; they are composited over white, as image viewers show them
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB.

    16-bit data ("I;16", "I;16B", ..., and "I" images whose values fit in 16 bits) keeps its high byte; other 32-bit
    integer ("I") and float ("F") data is scaled from 0 (or its minimum, when negative) to its maximum; palette ("P",
    "PA") and other images with transparency are composited over white. ``Image.convert("RGB")`` alone clips 16-bit
    and integer data (a white picture) and drops transparency to whatever colour the transparent pixels hold."""
    # lazy import of PIL: importing regkern does not import it
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        data = np.asarray(image)
        # Pillow versions differ in opening a 16-bit PNG as "I;16" or "I": 16-bit data gets the same treatment in both
        sixteen_bit = mode.startswith("I;16") or (
            mode == "I" and data.size and 255 < data.max() <= 65535 and data.min() >= 0
        )
        if sixteen_bit:
            gray = (data.astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        else:
            data = np.nan_to_num(data.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            low, high = min(float(data.min(initial=0.0)), 0.0), float(data.max(initial=0.0))
            scaled = (data - low) / (high - low) if high > low else np.zeros_like(data)
            gray = np.round(scaled * 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def model_view(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The picture a model received: its input ``x`` (3, H, W) with the transform's Normalize undone, as an (H, W, 3)
    uint8 array. Derived from the tensor itself, so it shows exactly the model's resize and crop."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    pixels = (x.detach().float().cpu() * std_t + mean_t).clamp(0, 1)  # bicubic resizing overshoots [0, 1]
    return (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
