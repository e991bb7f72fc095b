"""The modules layer: drop-ins for timm's attention and LayerNorm that run regkern's ops.

attention.py    RegisterAttentionBase, RegisterViTAttention (timm Attention), RegisterEvaAttention (EvaAttention)
layer_norm.py   MonitoredLayerNorm (nn.LayerNorm that hands token norms to a sink)
timm_families.py  RegisterRopeAttention (AttentionRope), RegisterDiffAttention (DiffAttention),
                RegisterParallelScalingBlock, RegisterDiffParallelScalingBlock (timm's parallel blocks)
explain.py      explain(model): the backend of every regkern module and why
"""

from .attention import RegisterAttentionBase, RegisterEvaAttention, RegisterViTAttention
from .explain import explain
from .layer_norm import MonitoredLayerNorm
from .timm_families import (
    RegisterDiffAttention,
    RegisterDiffParallelScalingBlock,
    RegisterParallelScalingBlock,
    RegisterRopeAttention,
)

__all__ = [
    "RegisterAttentionBase",
    "RegisterViTAttention",
    "RegisterEvaAttention",
    "RegisterRopeAttention",
    "RegisterDiffAttention",
    "RegisterParallelScalingBlock",
    "RegisterDiffParallelScalingBlock",
    "MonitoredLayerNorm",
    "explain",
]
