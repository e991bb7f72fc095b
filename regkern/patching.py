"""Instance-level patching of timm models: ``patch_timm``, ``unpatch_timm`` and ``explain``.

Only the given model's modules are swapped (timm's classes are never replaced globally). Each replacement reuses the
original module's submodules and Parameter objects, so the state_dict keys and tensors are unchanged, and remembers
the original object so ``unpatch_timm`` can put it back.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from .modules import RegisterEvaAttention, RegisterViTAttention, _RegisterAttentionBase
from .monitored_layer_norm import MonitoredLayerNorm

__all__ = ["patch_timm", "unpatch_timm", "get_monitor", "explain", "supported_attention_classes", "prefix_counters"]

_ORIGINAL = "_regkern_original"
_MONITOR = "_regkern_monitor"


def supported_attention_classes() -> Dict[type, type]:
    """timm attention class -> regkern replacement (imported lazily: importing regkern does not import timm)."""
    from timm.layers import Attention
    from timm.models.eva import EvaAttention

    return {Attention: RegisterViTAttention, EvaAttention: RegisterEvaAttention}


def _looks_like_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() or isinstance(module, nn.MultiheadAttention)


def _set_child(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def patch_timm(
    model: nn.Module,
    *,
    backend: Optional[str] = None,
    num_kv_registers: int = 0,
    monitor=False,
) -> nn.Module:
    """Swap every supported attention module of a timm model for its regkern drop-in, in place.

    Args:
        model: a timm model (``VisionTransformer``, ``Eva``, ...) or any module tree holding timm attention layers.
        backend: backend for every patched layer ("auto", "torch", "reference", ...); default $REGKERN_BACKEND/auto.
        num_kv_registers: add R learnable KV-only registers to every patched layer (new ``reg_k``/``reg_v``
            parameters, initialised small; 0 = none).
        monitor: True, or a dict of ``NormMonitor`` options, attaches a ``regkern.NormMonitor`` (then reachable as
            ``regkern.get_monitor(model)``).

    Returns:
        The same model object. Unsupported attention classes are left untouched with one warning that names them.
        The number of prefix tokens (CLS + registers) is read from ``model.num_prefix_tokens``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    supported = supported_attention_classes()
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    replacements: List[Tuple[str, nn.Module]] = []
    unsupported: Counter = Counter()
    for name, module in model.named_modules():
        if isinstance(module, _RegisterAttentionBase) or _inside_patched(name, replacements):
            continue
        target = supported.get(type(module))
        if target is None:
            if name and _looks_like_attention(module):
                unsupported[f"{type(module).__module__}.{type(module).__qualname__}"] += 1
            continue
        if not name:
            raise TypeError("model: the model itself is an attention module; wrap it in a container to patch it")
        if target is RegisterViTAttention:
            new = RegisterViTAttention.from_timm(
                module, num_kv_registers=num_kv_registers, num_prefix_tokens=num_prefix, backend=backend
            )
        else:
            new = RegisterEvaAttention.from_timm(module, num_kv_registers=num_kv_registers, backend=backend)
        object.__setattr__(new, _ORIGINAL, module)  # plain attribute: not a submodule, not in state_dict
        replacements.append((name, new))
    seq_len = _fixed_seq_len(model, num_prefix)
    for name, new in replacements:
        _set_child(model, name, new)
        if seq_len is not None:
            new.set_expected_seq_len(seq_len)
    if unsupported:
        listed = ", ".join(f"{cls} (x{n})" for cls, n in sorted(unsupported.items()))
        warnings.warn(f"regkern.patch_timm: left unsupported attention modules untouched: {listed}", stacklevel=2)
    if monitor:
        from .monitor import NormMonitor

        if get_monitor(model) is not None:
            raise ValueError("monitor: the model already has a NormMonitor (regkern.get_monitor(model))")
        options = monitor if isinstance(monitor, dict) else {}
        object.__setattr__(model, _MONITOR, NormMonitor(model, **options))
    return model


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


def _inside_patched(name: str, replacements: List[Tuple[str, nn.Module]]) -> bool:
    return any(name.startswith(parent + ".") for parent, _ in replacements)


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Put the original timm module objects back (in place) and return the model.

    Parameters and buffers that were moved or converted while patched (``.to()``) are handed back to the original
    modules, and their train/eval mode follows the patched module's. KV registers added by ``patch_timm`` are dropped.
    """
    monitor = model.__dict__.pop(_MONITOR, None)
    if monitor is not None:
        monitor.remove()
    restores = []
    for name, module in model.named_modules():
        original = getattr(module, _ORIGINAL, None) if isinstance(module, _RegisterAttentionBase) else None
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
        if name:
            _set_child(model, name, original)
    return model


def explain(module_or_model: nn.Module) -> str:
    """Which backend each regkern attention module (and each ``MonitoredLayerNorm`` a NormMonitor installed) runs,
    and why, one line per module (a string to print)."""
    lines = []
    for name, module in module_or_model.named_modules():
        if isinstance(module, _RegisterAttentionBase):
            line = f"{name or '<root>'}: {type(module).__name__} -> {module.backend_name} ({module.backend_reason})"
            if module.prologue_reason:
                line += f"; {module.prologue_reason}"
            if module.masked_backend_name != module.backend_name:
                line += f"; calls with attn_mask -> {module.masked_backend_name}"
            lines.append(line)
        elif isinstance(module, MonitoredLayerNorm):
            lines.append(f"{name or '<root>'}: MonitoredLayerNorm -> {module.backend_name} ({module.backend_reason})")
    if not lines:
        return "no regkern attention modules (call regkern.patch_timm(model) first)"
    return "\n".join(lines)


def prefix_counters(root: nn.Module) -> List[object]:
    """Every object under ``root`` (``root`` itself excluded) with an int ``num_prefix_tokens``: submodules (regkern
    and timm attention layers, patch dropout, ...) and the original timm modules that patched regkern modules keep for
    ``unpatch_timm`` (not submodules, so not in ``modules()``). Code that changes the number of prefix tokens updates
    them all."""
    found, seen = [], {id(root)}
    for module in root.modules():
        candidates = [module]
        if isinstance(module, _RegisterAttentionBase):
            original = module.__dict__.get(_ORIGINAL)
            if isinstance(original, nn.Module):
                candidates.extend(original.modules())
        for obj in candidates:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            value = getattr(obj, "num_prefix_tokens", None)
            if isinstance(value, int) and not isinstance(value, bool):
                found.append(obj)
    return found
