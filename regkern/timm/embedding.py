"""The token embedding of a patched timm ViT: ``VisionTransformer._pos_embed`` ([CLS, registers, patches] + position
embeddings) routed through ``regkern.embed_tokens`` on one instance, and put back by ``unpatch_timm``.

Only models whose class keeps timm's own ``VisionTransformer._pos_embed`` are routed (Eva and other classes with an
embedding of their own are left alone). The replacement is an instance attribute, so the class and every other
model are untouched, and the model's parameters and state_dict do not change.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops.embed_tokens import embed_tokens, resolve_embed_tokens_backend

__all__ = ["RegisterTokenEmbedding", "route_pos_embed", "restore_pos_embed", "routed_pos_embed"]

_ATTRIBUTE = "_pos_embed"


class RegisterTokenEmbedding:
    """``model._pos_embed`` of a patched timm VisionTransformer: ``regkern.embed_tokens`` (one pass on CUDA, no
    concatenated intermediate), then timm's ``pos_drop``. Same output as timm's, including ``dynamic_img_size``
    (position embeddings resampled to the input's grid), ``no_embed_class`` and models without CLS.

    The backend is chosen from the model's embedding parameters (device, dtype, width) when they change, not per call;
    ``backend_name`` / ``backend_reason`` say which and why (``regkern.explain``)."""

    def __init__(self, model: nn.Module, backend: Optional[str] = None, *, choose: bool = True):
        self.model = model
        self.requested_backend = backend
        self._key = None
        self._choice = None
        self._reason = ""
        if choose:  # an explicit backend that cannot run is refused now, by patch_timm
            self._choose()

    def _parameters(self) -> tuple[Optional[torch.Tensor], ...]:
        m = self.model
        return m.pos_embed, m.cls_token, m.reg_token

    def _choose(self, x_dtype: Optional[torch.dtype] = None) -> None:
        pos, cls, reg = self._parameters()
        ref = next(t for t in (pos, cls, reg, next(self.model.parameters(), None)) if t is not None)
        x_dtype = ref.dtype if x_dtype is None else x_dtype  # the patch tokens' (autocast may change it)
        key = (ref.device, x_dtype, *(None if t is None else t.dtype for t in (pos, cls, reg)))
        if key == self._key:
            return
        x = _DeviceView(torch.empty((1, 1, self.model.embed_dim), device="meta", dtype=x_dtype), ref.device)
        meta = [None if t is None else torch.empty(t.shape, device="meta", dtype=t.dtype) for t in (pos, cls, reg)]
        try:
            self._choice = resolve_embed_tokens_backend(self.requested_backend, x, *meta)
            self._reason = self._choice.reason
        except ValueError as err:
            # the backend patch_timm derived from the attention backend cannot serve these dtypes (e.g. "cuda"
            # under autocast: fp32 position embeddings, bf16 patches): every backend gives the same bits, so auto
            self._choice = resolve_embed_tokens_backend(None, x, *meta)
            self._reason = f"{self.requested_backend!r} cannot run this call ({err}); {self._choice.reason}"
        self._key = key

    @property
    def backend_name(self) -> str:
        self._choose()
        return self._choice.name

    @property
    def backend_reason(self) -> str:
        self._choose()
        return self._reason

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # routed only while the model has position embeddings (route_pos_embed)
        m = self.model
        self._choose(x.dtype)  # a tuple comparison unless the model moved or the dtypes changed since the last call
        pos_embed = m.pos_embed
        if m.dynamic_img_size:
            # lazy import of timm: importing regkern does not import timm
            from timm.layers import resample_abs_pos_embed

            B, H, W, C = x.shape
            pos_embed = resample_abs_pos_embed(
                m.pos_embed,
                new_size=(H, W),
                old_size=m.patch_embed.grid_size,
                num_prefix_tokens=0 if m.no_embed_class else m.num_prefix_tokens,
            )
        out = embed_tokens(
            x, pos_embed, m.cls_token, m.reg_token, no_embed_class=m.no_embed_class, backend=self._choice.name
        )
        return m.pos_drop(out)

    def __reduce__(self):  # deepcopy / pickle with the model, which may not be rebuilt yet: choose on first use
        return (_rebuild, (self.model, self.requested_backend))


def _rebuild(model: nn.Module, backend: Optional[str]) -> RegisterTokenEmbedding:
    return RegisterTokenEmbedding(model, backend, choose=False)


class _DeviceView:
    """What the embed_tokens request reads of x (shape, dtype, device) without a tensor on that device."""

    def __init__(self, like: torch.Tensor, device: torch.device):
        self.shape, self.dtype, self.device = like.shape, like.dtype, device


def _timm_pos_embed_class(model: nn.Module) -> bool:
    # lazy import of timm: importing regkern does not import timm
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer) and type(model)._pos_embed is VisionTransformer._pos_embed


def route_pos_embed(model: nn.Module, backend: Optional[str] = None) -> bool:
    """Route ``model._pos_embed`` through ``regkern.embed_tokens`` (once); False when the model's class has an
    embedding of its own, or no position embeddings (timm then only concatenates, without ``pos_drop``): left as
    it is."""
    if routed_pos_embed(model) is not None:
        return True
    if not _timm_pos_embed_class(model) or getattr(model, "pos_embed", None) is None:
        return False
    object.__setattr__(model, _ATTRIBUTE, RegisterTokenEmbedding(model, backend))
    return True


def routed_pos_embed(model: nn.Module) -> Optional[RegisterTokenEmbedding]:
    """The model's ``RegisterTokenEmbedding``, or None."""
    found = model.__dict__.get(_ATTRIBUTE)
    return found if isinstance(found, RegisterTokenEmbedding) else None


def restore_pos_embed(model: nn.Module) -> None:
    """Put timm's ``_pos_embed`` back (the class method)."""
    if routed_pos_embed(model) is not None:
        del model.__dict__[_ATTRIBUTE]
