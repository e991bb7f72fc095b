"""Give an existing timm ViT more registers, and fine-tune only those: ``add_registers``, ``register_parameters``,
``freeze_all_but_registers``.

Two kinds of registers (Darcet et al., "Vision Transformers Need Registers"):

* ``mode="tokens"``: extra learnable prefix tokens, exactly as timm's ``reg_tokens`` / ``num_reg_tokens``
  constructor argument builds them: ``[CLS?, old registers, new registers, patches]``. The sequence grows by ``num``.
* ``mode="kv"``: regkern's KV-only registers: ``num`` learnable keys/values per attention layer (``reg_k``/``reg_v``,
  (num, H, d)) that every query can attend to but that are not tokens. The sequence length is unchanged; the model is
  patched with ``regkern.patch_timm`` first if needed.

Both replace or add ``nn.Parameter`` objects, so build the optimizer (and wrap in DistributedDataParallel) *after*
calling ``add_registers``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..nn import RegisterAttentionBase
from .patching import get_monitor, patch_attention, prefix_counters, supported_attention_classes

__all__ = ["add_registers", "register_parameters", "freeze_all_but_registers", "REGISTER_PARAMETER_NAMES"]

#: leaf parameter names that ``register_parameters`` collects
REGISTER_PARAMETER_NAMES = ("reg_token", "reg_k", "reg_v")

_MODES = ("tokens", "kv")


def add_registers(model: nn.Module, num: int = 4, mode: str = "tokens", *, std: float = 1e-2) -> nn.Module:
    """Add ``num`` registers to a timm ViT, in place, and return the model.

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` (``vit_*``, ``deit3_*``, DINOv2/v3, ``vit_*_rope_*``, ...),
            patched with ``regkern.patch_timm`` or not. It must have ``blocks`` and ``patch_embed``.
        num: how many registers to add (int >= 1).
        mode: ``"tokens"`` or ``"kv"``.

            ``"tokens"``: new learnable register tokens (1, num, C) appended after any existing registers:
            ``model.reg_token`` becomes a new ``nn.Parameter`` holding the old values followed by the new ones,
            ``model.num_prefix_tokens`` (and ``model.num_reg_tokens`` where timm has it) grows by ``num``. When
            ``model.pos_embed`` covers the prefix (``no_embed_class=False``), zero rows are inserted right after the
            existing prefix rows, so every patch keeps its position embedding and the new registers start from their
            token values alone. Every submodule that counts prefix tokens (regkern attention, timm ``EvaAttention`` /
            ``AttentionRope`` so that RoPE still rotates exactly the patches, patch dropout, and the original timm
            modules a patched model keeps for ``unpatch_timm``) is updated. The result is the model timm builds with
            ``reg_tokens=old + num`` (``num_reg_tokens`` for Eva): its state_dict loads there with ``strict=True``.

            ``"kv"``: patches the model with ``regkern.patch_timm`` when it still has timm attention modules, then
            gives every regkern attention module ``num`` KV-only registers (``add_kv_registers``). The sequence
            length is unchanged. ``unpatch_timm`` drops them again.
        std: initialisation of the new registers: truncated normal with this std (``nn.init.trunc_normal_``;
            0 = zeros), on the device and dtype of the model's parameters. Small, so the new registers start
            close to "nothing learned yet"; they are not zero so that different registers are not symmetric.

    Raises:
        ValueError: unknown ``mode``; ``num`` not an int >= 1; ``mode="kv"`` on a model whose attention modules
            already have KV registers, or with no attention module regkern can patch; ``mode="tokens"`` on a model
            with a NormMonitor attached (its token counts would go stale: attach the monitor afterwards) or whose
            ``pos_embed`` length matches neither layout.
        TypeError: ``model`` is not an ``nn.Module``, has no ``blocks``/``patch_embed``, or (``mode="tokens"``) is
            not a ``VisionTransformer``/``Eva`` (a subclass that overrides ``_pos_embed`` is refused: its token
            layout is unknown).

    Build the optimizer and any DistributedDataParallel wrapper after this call: parameters are replaced/added.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected an int >= 1, got {num!r}")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
        raise ValueError(f"std: expected a float >= 0, got {std!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    missing = [name for name in ("blocks", "patch_embed") if not isinstance(getattr(model, name, None), nn.Module)]
    if missing:
        raise TypeError(
            f"model: expected a timm ViT with `blocks` and `patch_embed`; {type(model).__name__} has no "
            + " / ".join(f"`{m}`" for m in missing)
        )
    if mode == "tokens":
        _add_token_registers(model, num, float(std))
    else:
        _add_kv_registers(model, num, float(std))
    return model


# ------------------------------------------------------------------------------------------------ tokens


def _token_model_base(model: nn.Module) -> type:
    """The timm class whose token layout ``model`` follows, or TypeError naming ``model``."""
    # lazy import of timm: importing regkern does not import timm
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    for base in (VisionTransformer, Eva):
        if isinstance(model, base) and type(model)._pos_embed is base._pos_embed:
            return base
    raise TypeError(
        f"model: mode='tokens' needs a timm VisionTransformer or Eva (or a subclass keeping their token layout), "
        f"got {type(model).__module__}.{type(model).__qualname__}; mode='kv' works on any model patch_timm supports"
    )


def _add_token_registers(model: nn.Module, num: int, std: float) -> None:
    _token_model_base(model)
    if get_monitor(model) is not None:
        raise ValueError(
            "model: has a NormMonitor attached (patch_timm(monitor=...)), whose token counts would go "
            "stale; add registers first, then attach the monitor"
        )
    old_prefix = int(model.num_prefix_tokens)
    reg_old = model.reg_token
    pos_old = model.pos_embed
    ref = next(t for t in (reg_old, model.cls_token, pos_old, *model.parameters()) if t is not None)
    embed_dim = int(getattr(model, "embed_dim", 0) or ref.shape[-1])

    insert_pos = False
    if pos_old is not None and not model.no_embed_class:
        num_patches = int(model.patch_embed.num_patches)
        if pos_old.shape[1] == old_prefix + num_patches:
            insert_pos = True
        elif pos_old.shape[1] != num_patches:  # no_embed_class=False but pos_embed covering only patches: unknown
            raise ValueError(
                f"model: pos_embed has {pos_old.shape[1]} rows, expected {old_prefix} prefix + "
                f"{num_patches} patch rows (no_embed_class=False)"
            )
    # check everything before changing anything
    counters = list(prefix_counters(model))
    stale = [obj for obj in counters if obj.num_prefix_tokens != old_prefix]
    if stale:
        names = sorted({f"{type(o).__qualname__}={o.num_prefix_tokens}" for o in stale})
        warnings.warn(
            f"regkern.add_registers: modules counting a prefix other than the model's {old_prefix} tokens "
            f"were left as they are: {', '.join(names)}",
            stacklevel=3,
        )

    with torch.no_grad():
        new = torch.empty(1, num, embed_dim, device=ref.device, dtype=ref.dtype)
        if std > 0:
            nn.init.trunc_normal_(new, std=std)
        else:
            new.zero_()
        if reg_old is not None:
            tokens = torch.cat([reg_old.detach(), new.to(reg_old.dtype)], dim=1)
            requires_grad = reg_old.requires_grad
        else:
            tokens, requires_grad = new, True
        model.reg_token = nn.Parameter(tokens, requires_grad=requires_grad)
        if insert_pos:
            zeros = pos_old.new_zeros(pos_old.shape[0], num, pos_old.shape[2])
            rows = torch.cat([pos_old[:, :old_prefix], zeros, pos_old[:, old_prefix:]], dim=1)
            model.pos_embed = nn.Parameter(rows, requires_grad=pos_old.requires_grad)

    _reorder_like_timm(model)
    model.num_prefix_tokens = old_prefix + num
    if hasattr(model, "num_reg_tokens"):  # VisionTransformer (Eva has no such attribute)
        model.num_reg_tokens = int(model.num_reg_tokens) + num
    if hasattr(model, "cls_embed"):  # Eva: "class token and no registers"
        model.cls_embed = False
    for obj in counters:
        if obj.num_prefix_tokens == old_prefix:
            obj.num_prefix_tokens = old_prefix + num


def _reorder_like_timm(model: nn.Module) -> None:
    """A newly registered ``reg_token`` goes where timm's constructor puts it (after ``cls_token``, before
    ``pos_embed``), so the state_dict key order equals that of the model timm builds with the registers."""
    params = model._parameters
    if "reg_token" not in params:
        return
    order = [k for k in params if k != "reg_token"]
    at = order.index("cls_token") + 1 if "cls_token" in order else 0
    order.insert(at, "reg_token")
    if order != list(params):
        items = [(k, params[k]) for k in order]
        params.clear()
        params.update(items)


# ------------------------------------------------------------------------------------------------ kv


def _add_kv_registers(model: nn.Module, num: int, std: float) -> None:
    already = [name for name, m in model.named_modules() if isinstance(m, RegisterAttentionBase) and m.num_kv_registers]
    if already:
        raise ValueError(
            f"model: attention modules already have KV registers ({', '.join(already[:3])}"
            f"{', ...' if len(already) > 3 else ''}); KV registers can be added once"
        )
    supported = tuple(supported_attention_classes())
    if any(type(m) in supported for m in model.modules()):
        patch_attention(model)
    modules = [m for m in model.modules() if isinstance(m, RegisterAttentionBase)]
    if not modules:
        raise ValueError(f"model: no attention module that regkern can patch in {type(model).__name__}")
    for m in modules:
        m.add_kv_registers(num, std=std)


# ------------------------------------------------------------------------------------------------ fine-tuning


def register_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The register parameters of ``model``: register tokens (``reg_token``) and every attention module's KV
    registers (``reg_k``/``reg_v``), in ``named_parameters`` order, each once. Works through wrappers
    (DistributedDataParallel, nn.Sequential, ...). Position-embedding rows of registers (all zero after
    ``add_registers``) are part of ``pos_embed`` and not included: the token values absorb them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return [p for name, p in model.named_parameters() if name.rpartition(".")[2] in REGISTER_PARAMETER_NAMES]


def freeze_all_but_registers(model: nn.Module) -> list[nn.Parameter]:
    """Set ``requires_grad=False`` on every parameter except the register parameters (``register_parameters``),
    which get ``requires_grad=True``, for a registers-only fine-tune. Returns those parameters (pass them to the
    optimizer). ValueError when the model has no register parameters (nothing would train; call ``add_registers``)."""
    params = register_parameters(model)
    if not params:
        raise ValueError(
            f"model: {type(model).__name__} has no register parameters (reg_token, reg_k, reg_v); "
            "call regkern.add_registers(model) first"
        )
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params
