"""LayerNorm-with-norms backends: what each supports, and the one-time choice between them.

    triton     the Triton kernels (CUDA tensors; CPU tensors only when named, under TRITON_INTERPRET=1)
    cuda       the extension's kernel (csrc/layer_norm.cu); CPU tensors run its C++ reference; backward by Triton
    reference  PyTorch, float32 math (float64 for float64 inputs), any device

``"auto"`` (``regkern.ops.dispatch``): on CUDA "cuda" where the measured dispatch table prefers it, else "triton";
"reference" elsewhere (the interpreter is never picked automatically).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import cuda_ext
from ..dispatch import Backend, BackendChoice, Dispatcher, device_capability, dtype_name
from .op import IMPLS, KERNEL_DTYPES, X_DTYPES, triton_kernels, triton_problem

__all__ = [
    "LayerNormRequest",
    "layer_norm_request",
    "DISPATCHER",
    "BACKEND_NAMES",
    "layer_norm_not_supported_reasons",
    "choose_layer_norm_backend",
    "resolve_layer_norm_backend",
    "check_layer_norm_backend_name",
]


@dataclass(frozen=True)
class LayerNormRequest:
    """The static facts of a LayerNorm call over rows of ``dim`` (C) elements."""

    device_type: str
    dtype: torch.dtype
    dim: int
    capability: Optional[tuple[int, int]] = None
    #: modules choose once without knowing N: table entries for LayerNorm cover every length
    seq_len: Optional[int] = None
    features: frozenset = frozenset()

    def describe(self) -> str:
        return f"LayerNorm on {self.device_type}/{dtype_name(self.dtype)} (C = {self.dim})"


class LayerNormBackend(Backend):
    """A LayerNorm implementation; its ``name`` is the ``impl`` of ``regkern::layer_norm_fwd``."""


class TritonLayerNorm(LayerNormBackend):
    name = "triton"
    description = "Triton kernels: one pass reads each row once for y, its norm, mean and rstd"
    auto_device_types = ("cuda",)
    dtypes = KERNEL_DTYPES

    def not_supported_reasons(self, request: LayerNormRequest) -> list[str]:
        if request.dtype not in X_DTYPES:
            return [f"dtype {request.dtype} is not supported (float16, bfloat16, float32, float64)"]
        reasons = []
        problem = triton_problem(request.device_type)
        if problem:
            return [problem]
        if request.device_type not in ("cuda", "cpu"):
            reasons.append(f"device type {request.device_type!r} is not supported (CUDA, or CPU under the interpreter)")
        if request.dtype not in KERNEL_DTYPES:
            reasons.append(f"dtype {request.dtype} is not supported (float16, bfloat16, float32)")
        max_c = triton_kernels().MAX_C
        if request.dim > max_c:
            reasons.append(f"C = {request.dim} > {max_c} (a row is held in registers)")
        return reasons


class CudaLayerNorm(LayerNormBackend):
    name = "cuda"
    description = "the CUDA kernel of csrc/layer_norm.cu (C++ reference on CPU tensors); backward by Triton"
    auto_device_types = ("cuda",)
    measured = True
    dtypes = X_DTYPES
    device_dtypes = {"cuda": KERNEL_DTYPES, "cpu": X_DTYPES}  # the C++ reference on the CPU

    def not_supported_reasons(self, request: LayerNormRequest) -> list[str]:
        if request.dtype not in X_DTYPES:
            return [f"dtype {request.dtype} is not supported (float16, bfloat16, float32, float64)"]
        reasons = []
        if request.device_type == "cuda":
            if request.dtype not in KERNEL_DTYPES:
                reasons.append(
                    f"dtype {request.dtype} is not supported by the CUDA kernel (float16, bfloat16, float32)"
                )
        elif request.device_type != "cpu":
            reasons.append(f"device type {request.device_type!r} is not supported (CUDA; CPU runs the C++ reference)")
        reasons += cuda_ext.not_loaded_reasons(request.device_type, build=not reasons)  # no build for a refused call
        return reasons


class ReferenceLayerNorm(LayerNormBackend):
    name = "reference"
    description = "PyTorch, float32 math (float64 for float64 inputs)"
    device_types = None
    dtypes = X_DTYPES

    def not_supported_reasons(self, request: LayerNormRequest) -> list[str]:
        if request.dtype not in X_DTYPES:
            return [f"dtype {request.dtype} is not supported (float16, bfloat16, float32, float64)"]
        return []


#: the LayerNorm op's dispatcher; "cuda" only where the measured table prefers it
DISPATCHER = Dispatcher(
    "layer_norm",
    "LayerNorm",
    (TritonLayerNorm(), CudaLayerNorm(), ReferenceLayerNorm()),
    auto_order=("triton", "reference"),
    refusal="backend: {name!r} cannot run {what}: {reasons}",
)

#: names ``layer_norm_with_norms(backend=...)`` and ``MonitoredLayerNorm(backend=...)`` accept (None = "auto")
BACKEND_NAMES = DISPATCHER.names


def layer_norm_request(
    device_type: str, dtype: torch.dtype, C: int, device: Optional[torch.device] = None
) -> LayerNormRequest:
    """The request of LayerNorm over rows of C elements (``device``: the CUDA device whose capability keys the
    measured table; default the current one)."""
    capability = None
    if device_type == "cuda":  # queried when choosing, never at import
        capability = device_capability(torch.device("cuda") if device is None else device)
    return LayerNormRequest(device_type, dtype, C, capability)


def layer_norm_not_supported_reasons(impl: str, device_type: str, dtype: torch.dtype, C: int) -> list[str]:
    """Reasons, in words, why ``impl`` cannot run LayerNorm over rows of C elements of ``dtype`` on
    ``device_type``; empty when it can."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return DISPATCHER.get(impl).not_supported_reasons(LayerNormRequest(device_type, dtype, C))


def check_layer_norm_backend_name(backend: Optional[str]) -> str:
    """The backend name ("auto" for None); TypeError / ValueError naming ``backend`` for anything unknown."""
    return DISPATCHER.check_name(backend)


def resolve_layer_norm_backend(
    backend: Optional[str], device_type: str, dtype: torch.dtype, C: int, device: Optional[torch.device] = None
) -> BackendChoice:
    """The ``BackendChoice`` for LayerNorm over rows of C elements, chosen once (``Dispatcher.resolve``).

    ``device``: the CUDA device whose capability keys the measured table (default: the current one). An explicitly
    named backend must be able to run, else ValueError naming ``backend`` and why."""
    return DISPATCHER.resolve(backend, layer_norm_request(device_type, dtype, C, device))


def choose_layer_norm_backend(
    backend: Optional[str], device_type: str, dtype: torch.dtype, C: int, device: Optional[torch.device] = None
) -> tuple[str, str]:
    """(impl, why): ``resolve_layer_norm_backend`` as the ``impl`` name of ``regkern::layer_norm_fwd``."""
    choice = resolve_layer_norm_backend(backend, device_type, dtype, C, device)
    return choice.name, choice.reason
