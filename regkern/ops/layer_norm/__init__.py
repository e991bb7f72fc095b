"""LayerNorm with norm capture: y = LayerNorm(x) and each row's input L2 norm from the same pass.

function.py        ``layer_norm_with_norms``, ``layer_norm_monitored`` (the norm monitor's reduction in the same pass)
backends.py        triton / cuda / reference backends, the dispatcher
op.py              ``regkern::layer_norm_fwd`` / ``layer_norm_bwd`` (fakes, the one autograd), input checks
triton_kernels.py  the Triton kernels and launchers (imported on first use)
cuda.py            the CUDA implementation: the extension's ``regkern::cuda_layer_norm_fwd``
"""

from .backends import (
    BACKEND_NAMES,
    DISPATCHER,
    check_layer_norm_backend_name,
    choose_layer_norm_backend,
    layer_norm_not_supported_reasons,
    layer_norm_request,
    resolve_layer_norm_backend,
)
from .function import apply_layer_norm_monitored, layer_norm_monitored, layer_norm_with_norms
from .op import NormAccumulators, check_layer_norm_inputs, layer_norm_bwd, layer_norm_fwd, layer_norm_fwd_monitored

__all__ = [
    "layer_norm_with_norms",
    "layer_norm_monitored",
    "apply_layer_norm_monitored",
    "layer_norm_fwd_monitored",
    "NormAccumulators",
    "layer_norm_fwd",
    "layer_norm_bwd",
    "check_layer_norm_inputs",
    "check_layer_norm_backend_name",
    "choose_layer_norm_backend",
    "resolve_layer_norm_backend",
    "layer_norm_request",
    "layer_norm_not_supported_reasons",
    "BACKEND_NAMES",
    "DISPATCHER",
]
