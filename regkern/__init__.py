"""regkern: fused attention kernels for Vision Transformers with register tokens.

Public API (see README.md):
    register_attention      attention over [KV-only registers, tokens] with optional statistics, backend dispatch
    reference               the pure-PyTorch semantics every kernel is tested against
    layer_norm_with_norms   LayerNorm that also returns each token's input L2 norm (Triton or CUDA kernels)
    MonitoredLayerNorm      drop-in nn.LayerNorm that hands those norms to a sink (a block's norm1)
    embed_tokens            [CLS, registers, patches] + position embeddings, as timm builds them (one CUDA pass)
    cuda_ext                the CUDA extension (csrc/): prebuilt or just-in-time, and why it is unavailable
    RegisterViTAttention    drop-in for timm.layers.Attention
    RegisterEvaAttention    drop-in for timm's EvaAttention (RoPE on patch tokens)
    patch_timm / unpatch_timm / explain / get_monitor
    NormMonitor             residual-norm and attention statistics of a patched ViT, on the device
    add_registers / register_parameters / freeze_all_but_registers   registers for a model that has none
    find_register_neurons / apply_test_time_registers   test-time registers (Jiang et al., 2025)

Importing regkern never touches a GPU, xformers or a compiled extension.
"""

from . import cuda_ext, reference
from .attention import register_attention
from .backends import AUTO_ORDER, BACKENDS, AttentionRequest, get_backend, resolve_backend
from .modules import RegisterEvaAttention, RegisterViTAttention
from .monitor import NormMonitor, NormReport
from .patching import explain, get_monitor, patch_timm, unpatch_timm
from .layer_norm_op import layer_norm_with_norms
from .monitored_layer_norm import MonitoredLayerNorm
from .embed_tokens_op import embed_tokens
from .reference import STAT_NAMES, AttentionStats
from .registers import add_registers, freeze_all_but_registers, register_parameters
from .test_time_registers import (
    RegisterNeurons,
    TestTimeRegisters,
    apply_test_time_registers,
    find_register_neurons,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "reference",
    "cuda_ext",
    "register_attention",
    "layer_norm_with_norms",
    "embed_tokens",
    "AttentionStats",
    "STAT_NAMES",
    "RegisterViTAttention",
    "RegisterEvaAttention",
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
