"""regkern: fused attention kernels for Vision Transformers with register tokens.

Public API (see README.md):
    register_attention      attention over [KV-only registers, tokens] with optional statistics, backend dispatch
    register_attention_varlen  the same over sequences of different lengths packed as (T, H, d)
    reference               the pure-PyTorch semantics every kernel is tested against
    layer_norm_with_norms   LayerNorm that also returns each token's input L2 norm (Triton or CUDA kernels)
    MonitoredLayerNorm      drop-in nn.LayerNorm that hands those norms to a sink (a block's norm1)
    embed_tokens            [CLS, registers, patches] + position embeddings, as timm builds them (one CUDA pass)
    cuda_ext                the CUDA extension (csrc/): prebuilt or just-in-time, and why it is unavailable
    dispatch_table          the measured triton-vs-cuda table behind backend="auto"
    RegisterViTAttention    drop-in for timm.layers.Attention
    RegisterEvaAttention    drop-in for timm's EvaAttention (RoPE on patch tokens)
    RegisterRopeAttention, RegisterDiffAttention, RegisterParallelScalingBlock, RegisterDiffParallelScalingBlock:
                            drop-ins for timm's AttentionRope, DiffAttention and parallel blocks
    patch_timm / unpatch_timm / explain / get_monitor
    NormMonitor             residual-norm and attention statistics of a patched ViT, on the device
    add_registers / register_parameters / freeze_all_but_registers   registers for a model that has none
    find_register_neurons / apply_test_time_registers   test-time registers (Jiang et al., 2025)

The package is layered, imports going one way (checked by import-linter, see pyproject.toml):
    reference <- ops (op folders, dispatch, extension loader) <- nn <- timm <- monitor <- apps

Importing regkern never touches a GPU, xformers or a compiled extension.
"""

import sys

from . import nn, ops, reference
from .monitor import NormMonitor, NormReport, patch_timm
from .nn import (
    MonitoredLayerNorm,
    RegisterAttentionBase,
    RegisterDiffAttention,
    RegisterDiffParallelScalingBlock,
    RegisterEvaAttention,
    RegisterParallelScalingBlock,
    RegisterRopeAttention,
    RegisterViTAttention,
    explain,
)
from .ops import cuda_ext, dispatch_table
from .ops.attention import (
    AUTO_ORDER,
    BACKENDS,
    AttentionRequest,
    get_backend,
    register_attention,
    register_attention_varlen,
    resolve_backend,
)
from .ops.embed_tokens import embed_tokens
from .ops.layer_norm import layer_norm_with_norms
from .reference import STAT_NAMES, AttentionStats
from .timm import (
    RegisterNeurons,
    TestTimeRegisters,
    add_registers,
    apply_test_time_registers,
    find_register_neurons,
    freeze_all_but_registers,
    get_monitor,
    register_parameters,
    unpatch_timm,
)
from .version import __version__

# Import paths of the flat package before it was layered (0.1.0), kept as aliases of the modules that replaced
# them: ``import regkern.cuda_ext`` keeps working, and pickles of whole models that name ``regkern.modules`` or
# ``regkern.monitored_layer_norm`` classes still load.
_MOVED_MODULES = {
    "cuda_ext": ops.cuda_ext,
    "dispatch_table": ops.dispatch_table,
    "modules": nn.attention,
    "monitored_layer_norm": nn.layer_norm,
}
for _old, _module in _MOVED_MODULES.items():
    sys.modules.setdefault(f"{__name__}.{_old}", _module)
    globals().setdefault(_old, _module)  # `import regkern.modules as m` reads the attribute
del _old, _module

__all__ = [
    "__version__",
    "reference",
    "cuda_ext",
    "dispatch_table",
    "register_attention",
    "register_attention_varlen",
    "layer_norm_with_norms",
    "embed_tokens",
    "AttentionStats",
    "STAT_NAMES",
    "RegisterAttentionBase",
    "RegisterViTAttention",
    "RegisterEvaAttention",
    "RegisterRopeAttention",
    "RegisterDiffAttention",
    "RegisterParallelScalingBlock",
    "RegisterDiffParallelScalingBlock",
    "patch_timm",
    "unpatch_timm",
    "explain",
    "get_monitor",
    "NormMonitor",
    "MonitoredLayerNorm",
    "add_registers",
    "register_parameters",
    "freeze_all_but_registers",
    "find_register_neurons",
    "apply_test_time_registers",
    "RegisterNeurons",
    "TestTimeRegisters",
    "NormReport",
    "BACKENDS",
    "AUTO_ORDER",
    "AttentionRequest",
    "get_backend",
    "resolve_backend",
]
