"""``regkern.embed_tokens``: the entry sequence [CLS, registers, patches] + position embeddings, on a chosen backend
(``regkern.ops.embed_tokens.backends``): the "reference" backend is the PyTorch reference itself, the "cuda" one
runs through the op ``regkern::embed_tokens`` (its one autograd)."""

from __future__ import annotations

from typing import Optional

import torch

from ... import reference
from .backends import choose_embed_tokens_backend
from .op import embed_tokens_op

__all__ = ["embed_tokens", "check_embed_tokens_inputs"]


def check_embed_tokens_inputs(x, pos_embed, cls_token, reg_token, no_embed_class: bool) -> None:
    """ValueError naming the argument unless the shapes fit ``embed_tokens`` (every backend: the kernels read
    exactly these extents)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected patch tokens (B, M, C) or (B, Hp, Wp, C), got {got}")
    B, C = x.shape[0], x.shape[-1]
    M = x.shape[1] if x.dim() == 3 else x.shape[1] * x.shape[2]
    if cls_token is not None and tuple(cls_token.shape) != (1, 1, C):
        raise ValueError(f"cls_token: expected shape (1, 1, {C}), got {tuple(cls_token.shape)}")
    if reg_token is not None and (reg_token.dim() != 3 or reg_token.shape[0] != 1 or reg_token.shape[2] != C):
        raise ValueError(f"reg_token: expected shape (1, R, {C}), got {tuple(reg_token.shape)}")
    for name, t in (("pos_embed", pos_embed), ("cls_token", cls_token), ("reg_token", reg_token)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected the device of x ({x.device}), got {t.device}")
    if pos_embed is not None:
        P = (cls_token is not None) + (0 if reg_token is None else reg_token.shape[1])
        tokens = M if no_embed_class else P + M
        what = "M" if no_embed_class else "P + M"
        if pos_embed.dim() != 3 or tuple(pos_embed.shape[1:]) != (tokens, C):
            raise ValueError(
                f"pos_embed: expected ({'1 or B'}, {what} = {tokens}, {C}) for no_embed_class={bool(no_embed_class)}, "
                f"got {tuple(pos_embed.shape)}"
            )
        if pos_embed.shape[0] not in (1, B) and B != 1:
            raise ValueError(f"pos_embed: expected a batch of 1 or B = {B}, got {pos_embed.shape[0]}")


def embed_tokens(
    x: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
    cls_token: Optional[torch.Tensor] = None,
    reg_token: Optional[torch.Tensor] = None,
    *,
    no_embed_class: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The entry sequence [CLS, registers, patches] with position embeddings, as timm's
    ``VisionTransformer._pos_embed``.

    Args:
        x: (B, M, C) patch tokens, or (B, Hp, Wp, C) (flattened row-major to M = Hp * Wp).
        pos_embed: (1, M, C) when ``no_embed_class`` (added to patches only), else (1, P + M, C) covering the prefix
            too; None for models without absolute position embeddings. Resample it to the grid first
            (``timm.layers.resample_abs_pos_embed``) for dynamic image sizes.
        cls_token: (1, 1, C) or None. reg_token: (1, R, C) or None.
        no_embed_class: timm's flag: position embeddings skip the prefix tokens (DeiT-3, DINOv2 with registers).
        backend: None / "auto", "reference" or "cuda" (see the module docstring).

    Returns:
        (B, P + M, C) with P = (cls_token is not None) + R. Position embeddings are added in float32 and rounded once
        (identical to timm in float32). Differentiable in every tensor input.
    """
    check_embed_tokens_inputs(x, pos_embed, cls_token, reg_token, no_embed_class)
    name, _ = choose_embed_tokens_backend(backend, x, pos_embed, cls_token, reg_token)
    if name == "reference":
        # plain PyTorch ops: autograd (and torch.func transforms) straight through the reference
        return reference.embed_tokens(x, pos_embed, cls_token, reg_token, no_embed_class=no_embed_class)
    return embed_tokens_op(x, pos_embed, cls_token, reg_token, bool(no_embed_class), name)
