"""Instance-level patching of timm models: ``patch_attention`` (what ``regkern.patch_timm`` does before it attaches
a monitor) and ``unpatch_timm``, plus what regkern keeps on a patched model.

Only the given model's modules are swapped (timm's classes are never replaced globally). Each replacement reuses the
original module's submodules and Parameter objects, so the state_dict keys and tensors are unchanged, and remembers
the original object so ``unpatch_timm`` can put it back.

A monitor (``regkern.NormMonitor``, a higher layer) is attached to the model with ``attach_monitor`` and found with
``get_monitor``; this layer only stores it and, in ``unpatch_timm``, calls its ``remove()``.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Optional

import torch.nn as nn

from ..nn import (
    RegisterAttentionBase,
    RegisterDiffAttention,
    RegisterDiffParallelScalingBlock,
    RegisterEvaAttention,
    RegisterParallelScalingBlock,
    RegisterRopeAttention,
    RegisterViTAttention,
)
from .embedding import restore_pos_embed, route_pos_embed

__all__ = [
    "patch_attention",
    "unpatch_timm",
    "get_monitor",
    "attach_monitor",
    "detach_monitor",
    "supported_attention_classes",
    "KNOWN_UNSUPPORTED",
    "patched_modules",
    "prefix_counters",
    "original_module",
]

_ORIGINAL = "_regkern_original"
_MONITOR = "_regkern_monitor"


def supported_attention_classes() -> dict[type, type]:
    """timm class -> regkern replacement (attention modules, and the parallel blocks that compute attention
    themselves); classes the installed timm does not have yet are left out."""
    # lazy import of timm: importing regkern does not import timm
    import timm.layers
    import timm.models.eva
    import timm.models.vision_transformer

    wanted = [
        (timm.layers, "Attention", RegisterViTAttention),
        (timm.models.eva, "EvaAttention", RegisterEvaAttention),
        (timm.layers, "AttentionRope", RegisterRopeAttention),
        (timm.layers, "DiffAttention", RegisterDiffAttention),
        (timm.models.vision_transformer, "ParallelScalingBlock", RegisterParallelScalingBlock),
        (timm.models.vision_transformer, "DiffParallelScalingBlock", RegisterDiffParallelScalingBlock),
    ]
    return {getattr(where, name): ours for where, name, ours in wanted if hasattr(where, name)}


#: timm classes that compute attention but are left to timm on purpose, with the reason (named in the warning)
KNOWN_UNSUPPORTED = {
    "AttentionPoolLatent": "the attention-pooling head (learned latent queries over the tokens, cross-attention); "
    "not the blocks' register self-attention, and a few queries only",
    "HaloAttn": "blocked local (halo) attention of a convolutional network, not ViT attention",
}


def _looks_like_attention(module: nn.Module) -> bool:
    """A module that computes attention itself: a MultiheadAttention, one named so, or one that owns the attention
    math inline (``num_heads`` and a qkv/in_proj projection, as timm's parallel blocks); never a block around such a
    module (its attention child is the one to name). Position-bias helpers with a ``num_heads`` are not attention."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    name = type(module).__name__.lower()
    inline = isinstance(getattr(module, "num_heads", None), int) and any(
        isinstance(getattr(module, proj, None), nn.Linear) for proj in ("qkv", "in_proj", "q_proj")
    )
    if not (inline or "attention" in name or "attn" in name):
        return False
    return not any(_looks_like_attention(child) for child in module.children())


def _describe_class(module: nn.Module) -> str:
    cls = type(module)
    reason = KNOWN_UNSUPPORTED.get(cls.__name__)
    return f"{cls.__module__}.{cls.__qualname__}" + (f" [{reason}]" if reason else "")


def patched_modules(model: nn.Module) -> list[str]:
    """Qualified names of the regkern modules in ``model`` (empty when nothing was patched)."""
    return [name for name, module in model.named_modules() if isinstance(module, RegisterAttentionBase)]


def _set_child(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def patch_attention(
    model: nn.Module,
    *,
    backend: Optional[str] = None,
    num_kv_registers: int = 0,
) -> nn.Module:
    """Swap every supported attention module of a timm model for its regkern drop-in, in place (``regkern.patch_timm``
    without its ``monitor`` option).

    Args:
        model: a timm model (``VisionTransformer``, ``Eva``, ...) or any module tree holding timm attention layers.
        backend: backend for every patched layer ("auto", "torch", "reference", ...); default $REGKERN_BACKEND/auto.
        num_kv_registers: add R learnable KV-only registers to every patched layer (new ``reg_k``/``reg_v``
            parameters, initialised small; 0 = none).

    Returns:
        The same model object. Unsupported attention classes are left untouched with one warning that names them.
        The number of prefix tokens (CLS + registers) is read from ``model.num_prefix_tokens``. A timm
        ``VisionTransformer`` also gets its token embedding (``_pos_embed``) routed through ``regkern.embed_tokens``
        (``regkern.timm.embedding``), on the backend matching ``backend`` ("auto" when None).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    supported = supported_attention_classes()
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    replacements: list[tuple[str, nn.Module]] = []
    unsupported: Counter = Counter()
    unsupported_names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, RegisterAttentionBase) or _inside_patched(name, replacements):
            continue
        target = supported.get(type(module))
        if target is None:
            if name and _looks_like_attention(module) and not _inside_unsupported(name, unsupported_names):
                unsupported[_describe_class(module)] += 1
                unsupported_names.append(name)
            continue
        if not name:
            raise TypeError("model: the model itself is an attention module; wrap it in a container to patch it")
        if target in (RegisterEvaAttention, RegisterRopeAttention):  # they know their own prefix length
            new = target.from_timm(module, num_kv_registers=num_kv_registers, backend=backend)
        else:
            new = target.from_timm(
                module, num_kv_registers=num_kv_registers, num_prefix_tokens=num_prefix, backend=backend
            )
        object.__setattr__(new, _ORIGINAL, module)  # plain attribute: not a submodule, not in state_dict
        replacements.append((name, new))
    seq_len = _fixed_seq_len(model, num_prefix)
    for name, new in replacements:
        _set_child(model, name, new)
        if seq_len is not None:
            new.set_expected_seq_len(seq_len)
    if replacements:  # the token embedding: [CLS, registers, patches] + position embeddings in one regkern op
        route_pos_embed(model, backend=_EMBED_BACKENDS.get(backend, None))
        _use_key_masks(model)
    if unsupported:
        listed = ", ".join(f"{cls} (x{n})" for cls, n in sorted(unsupported.items()))
        warnings.warn(f"regkern: left unsupported attention modules untouched: {listed}", stacklevel=3)
    return model


#: the token embedding's backend for an attention backend named in patch_timm (None / "auto": auto)
_EMBED_BACKENDS = {"triton": "triton", "cuda": "cuda", "torch": "reference", "reference": "reference"}


#: set on a NaFlex model whose padding mask patch_timm turned into a key mask (read by regkern.explain)
NAFLEX_KEY_MASK = "_regkern_naflex_key_mask"


def _use_key_masks(model: nn.Module) -> None:
    """NaFlex ViTs mask padding tokens with a (B, 1, N, N) mask (query and key valid); as a key mask (B, 1, 1, N)
    (timm's ``use_key_only_attn_mask``) it runs on the fused kernels. The valid tokens' outputs, the pooled output and
    every gradient stay timm's: padding keys are masked either way, and only the padding tokens' own rows, which
    nothing valid reads, attend the valid keys instead of averaging all values."""
    if getattr(model, "use_key_only_attn_mask", True) is False:
        model.use_key_only_attn_mask = True
        object.__setattr__(model, NAFLEX_KEY_MASK, True)  # plain attribute: unpatch_timm restores timm's mask


def _fixed_seq_len(model: nn.Module, num_prefix: int) -> Optional[int]:
    """N of a timm ViT at its configured image size (prefix + patches), or None when it varies or is unknown."""
    patch_embed = getattr(model, "patch_embed", None)
    num_patches = getattr(patch_embed, "num_patches", None)
    if getattr(model, "dynamic_img_size", False) or getattr(patch_embed, "dynamic_img_pad", False):
        return None
    if isinstance(num_patches, int) and num_patches > 0:
        return num_prefix + num_patches
    return None


def get_monitor(model: nn.Module):
    """The ``NormMonitor`` that ``patch_timm(model, monitor=...)`` attached, or None."""
    return model.__dict__.get(_MONITOR)


def attach_monitor(model: nn.Module, monitor) -> None:
    """Remember ``monitor`` (an object with ``remove()``) on ``model``: ``get_monitor`` finds it and
    ``unpatch_timm`` removes it. ValueError when the model already has one."""
    if get_monitor(model) is not None:
        raise ValueError("monitor: the model already has a NormMonitor (regkern.get_monitor(model))")
    object.__setattr__(model, _MONITOR, monitor)  # plain attribute: not a submodule, not in state_dict


def detach_monitor(model: nn.Module):
    """Forget the model's monitor and return it (None when there is none); the caller removes it."""
    return model.__dict__.pop(_MONITOR, None)


def original_module(module: nn.Module) -> Optional[nn.Module]:
    """The timm module a patched regkern module replaced (None for anything else)."""
    if not isinstance(module, RegisterAttentionBase):
        return None
    original = module.__dict__.get(_ORIGINAL)
    return original if isinstance(original, nn.Module) else None


def _inside_unsupported(name: str, names: list[str]) -> bool:
    return any(name.startswith(parent + ".") for parent in names)


def _inside_patched(name: str, replacements: list[tuple[str, nn.Module]]) -> bool:
    return any(name.startswith(parent + ".") for parent, _ in replacements)


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Put the original timm module objects back (in place) and return the model.

    Parameters and buffers that were moved or converted while patched (``.to()``) are handed back to the original
    modules, and their train/eval mode follows the patched module's. KV registers added by ``patch_timm`` are dropped.
    """
    monitor = detach_monitor(model)
    if monitor is not None:
        monitor.remove()
    restore_pos_embed(model)
    if model.__dict__.pop(NAFLEX_KEY_MASK, False):
        model.use_key_only_attn_mask = False
    restores = []
    for name, module in model.named_modules():
        original = getattr(module, _ORIGINAL, None) if isinstance(module, RegisterAttentionBase) else None
        if original is not None:
            restores.append((name, module, original))
    for name, patched, original in restores:
        for pname, param in patched._parameters.items():
            if pname in original._parameters:
                original._parameters[pname] = param
        for bname, buf in patched._buffers.items():
            if bname in original._buffers:
                original._buffers[bname] = buf
        original.train(patched.training)
        for attr in ("lambda_init", "num_prefix_tokens"):  # plain attributes a patched module may have changed
            if hasattr(original, attr) and hasattr(patched, attr):
                setattr(original, attr, getattr(patched, attr))
        if name:
            _set_child(model, name, original)
    return model


def prefix_counters(root: nn.Module) -> list[object]:
    """Every object under ``root`` (``root`` itself excluded) with an int ``num_prefix_tokens``: submodules (regkern
    and timm attention layers, patch dropout, ...) and the original timm modules that patched regkern modules keep for
    ``unpatch_timm`` (not submodules, so not in ``modules()``). Code that changes the number of prefix tokens updates
    them all."""
    found, seen = [], {id(root)}
    for module in root.modules():
        candidates = [module]
        original = original_module(module)
        if original is not None:
            candidates.extend(original.modules())
        for obj in candidates:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            value = getattr(obj, "num_prefix_tokens", None)
            if isinstance(value, int) and not isinstance(value, bool):
                found.append(obj)
    return found
