"""Register attention: attention over [KV-only registers, tokens] with optional statistics.

function.py        ``register_attention`` (input checks, dispatch), ``run_attention`` (a chosen backend)
backends.py        triton / cuda / torch / reference backends, ``AttentionRequest``, the dispatcher
op.py              ``regkern::attention_fwd`` / ``attention_bwd`` (fakes, the one autograd; impls triton, cuda,
                   reference)
triton_kernels.py  the Triton kernels and launchers (imported on first use)
cuda.py            the CUDA implementation: the extension's ``regkern::cuda_attention_fwd`` (csrc/attention.cu)
"""

from .backends import (
    AUTO_ORDER,
    BACKENDS,
    DISPATCHER,
    AttentionBackend,
    AttentionRequest,
    get_backend,
    is_key_mask,
    key_bias_from_mask,
    resolve_backend,
)
from .function import check_attention_inputs, register_attention, run_attention
from .op import attention_bwd, attention_fwd
from .varlen import VARLEN_BACKENDS, attention_varlen_bwd, attention_varlen_fwd, register_attention_varlen

__all__ = [
    "register_attention",
    "run_attention",
    "check_attention_inputs",
    "is_key_mask",
    "key_bias_from_mask",
    "register_attention_varlen",
    "attention_varlen_fwd",
    "attention_varlen_bwd",
    "VARLEN_BACKENDS",
    "attention_fwd",
    "attention_bwd",
    "AttentionRequest",
    "AttentionBackend",
    "BACKENDS",
    "AUTO_ORDER",
    "DISPATCHER",
    "get_backend",
    "resolve_backend",
]
