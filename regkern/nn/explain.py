"""``regkern.explain``: which backend each regkern module of a model runs, and why."""

from __future__ import annotations

import torch.nn as nn

from .attention import RegisterAttentionBase
from .layer_norm import MonitoredLayerNorm

__all__ = ["explain"]


def explain(module_or_model: nn.Module) -> str:
    """Which backend each regkern attention module (and each ``MonitoredLayerNorm`` a NormMonitor installed, and the
    token embedding ``patch_timm`` routes through ``regkern.embed_tokens``) runs, and why, one line per module (a
    string to print)."""
    lines = []
    embedding = module_or_model.__dict__.get("_pos_embed")  # regkern.timm.embedding.RegisterTokenEmbedding
    if hasattr(embedding, "backend_name"):
        lines.append(f"_pos_embed: regkern.embed_tokens -> {embedding.backend_name} ({embedding.backend_reason})")
    attention = [m for m in module_or_model.modules() if isinstance(m, RegisterAttentionBase)]
    if module_or_model.__dict__.get("_regkern_naflex_key_mask") and attention:  # set by regkern.timm.patching
        backends = sorted({m.key_masked_backend_name for m in attention})
        lines.append(
            f"attn_mask: NaFlex padding as a key mask (B, 1, 1, N) -> {', '.join(backends)} (valid tokens' outputs "
            f"are timm's; padding tokens' own rows attend the valid keys)"
        )
    for name, module in module_or_model.named_modules():
        if isinstance(module, RegisterAttentionBase):
            line = f"{name or '<root>'}: {type(module).__name__} -> {module.backend_name} ({module.backend_reason})"
            if module.prologue_reason:
                line += f"; {module.prologue_reason}"
            if module.key_masked_backend_name != module.backend_name:
                line += f"; key masks -> {module.key_masked_backend_name}"
            if module.masked_backend_name != module.backend_name:
                why = module.masked_backend_reason.split("; ")[-1]  # the last reason: the skipped backend's
                line += f"; other attn_mask -> {module.masked_backend_name} ({why})"
            lines.append(line)
        elif isinstance(module, MonitoredLayerNorm):
            lines.append(f"{name or '<root>'}: MonitoredLayerNorm -> {module.backend_name} ({module.backend_reason})")
    if not lines:
        return "no regkern attention modules (call regkern.patch_timm(model) first)"
    return "\n".join(lines)
