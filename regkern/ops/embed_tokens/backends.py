"""Token-embedding backends: what each supports, and the one-time choice between them.

    reference  ``regkern.reference.embed_tokens`` (PyTorch: concatenation, then one float32 add, rounded once)
    triton     one-pass Triton kernel (CUDA tensors; CPU tensors only when named, under TRITON_INTERPRET=1)
    cuda       the extension's one-pass kernel (csrc/embed_tokens.cu); CPU tensors run its C++ reference; all
               tensors must share x's dtype

``"auto"`` (``regkern.ops.dispatch``) picks "cuda" on CUDA tensors where the measured dispatch table says it is
faster, else "triton" on CUDA tensors, else "reference".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import cuda_ext
from ..dispatch import Backend, BackendChoice, Dispatcher, device_capability, kernels_problem
from .op import triton_kernels

__all__ = [
    "EmbedTokensRequest",
    "DISPATCHER",
    "BACKEND_NAMES",
    "embed_tokens_not_supported_reasons",
    "choose_embed_tokens_backend",
    "resolve_embed_tokens_backend",
]

_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class EmbedTokensRequest:
    """The static facts of a token-embedding call: x's device and dtype, C (``dim``), the sequence length P + M,
    and the dtypes of pos_embed, cls_token and reg_token (None where absent)."""

    device_type: str
    dtype: torch.dtype
    dim: int
    capability: Optional[tuple[int, int]] = None
    seq_len: Optional[int] = None
    param_dtypes: tuple[Optional[torch.dtype], ...] = (None, None, None)
    features: frozenset = frozenset()
    batch: int = 1
    pos_batch: Optional[int] = None

    def describe(self) -> str:
        return "embed_tokens"

    @classmethod
    def from_tensors(cls, x, pos_embed, cls_token, reg_token) -> EmbedTokensRequest:
        num_patches = math.prod(x.shape[1:-1])  # (B, M, C) or (B, Hp, Wp, C)
        seq_len = (cls_token is not None) + (0 if reg_token is None else reg_token.shape[1]) + num_patches
        dtypes = tuple(None if t is None else t.dtype for t in (pos_embed, cls_token, reg_token))
        pos_batch = None if pos_embed is None else pos_embed.shape[0]
        return cls(
            x.device.type,
            x.dtype,
            x.shape[-1],
            device_capability(x.device),
            seq_len,
            dtypes,
            batch=x.shape[0],
            pos_batch=pos_batch,
        )


class ReferenceEmbedTokens(Backend):
    name = "reference"
    description = "PyTorch: concatenation, then one float32 add of the position embeddings, rounded once"
    device_types = None

    def not_supported_reasons(self, request: EmbedTokensRequest) -> list[str]:
        return []


class TritonEmbedTokens(Backend):
    name = "triton"
    description = "one-pass Triton kernel: each output token reads its source row and position row once"
    auto_device_types = ("cuda",)

    def not_supported_reasons(self, request: EmbedTokensRequest) -> list[str]:
        problem = kernels_problem(triton_kernels, request.device_type)
        if problem:
            return [problem]
        reasons = []
        if request.device_type not in ("cuda", "cpu"):
            reasons.append(f"device type {request.device_type!r} is not supported (CUDA, or CPU under the interpreter)")
        for name, dtype in zip(("x", "pos_embed", "cls_token", "reg_token"), (request.dtype, *request.param_dtypes)):
            if dtype is not None and dtype not in _CUDA_DTYPES:
                reasons.append(f"{name} is {dtype}: the kernel computes float16, bfloat16 and float32 inputs")
        if request.pos_batch not in (None, 1, request.batch):
            reasons.append(f"pos_embed has batch {request.pos_batch}, x has {request.batch}: the kernel needs 1 or B")
        if request.dim > triton_kernels().MAX_C:
            reasons.append(f"C = {request.dim} > {triton_kernels().MAX_C} (a token row is held in registers)")
        return reasons


class CudaEmbedTokens(Backend):
    name = "cuda"
    description = "one-pass CUDA kernel (csrc/embed_tokens.cu); C++ reference on CPU tensors"
    auto_device_types = ("cuda",)
    measured = True
    device_dtypes = {"cuda": _CUDA_DTYPES}  # any floating dtype on the CPU (the C++ reference)

    def not_supported_reasons(self, request: EmbedTokensRequest) -> list[str]:
        reasons = []
        if request.device_type == "cuda" and request.dtype not in _CUDA_DTYPES:
            reasons.append(f"dtype {request.dtype} is not supported by the CUDA kernel (float16, bfloat16, float32)")
        elif request.device_type not in ("cuda", "cpu"):
            reasons.append(f"device type {request.device_type!r} is not supported (CUDA; CPU runs the C++ reference)")
        for name, dtype in zip(("pos_embed", "cls_token", "reg_token"), request.param_dtypes):
            if dtype is not None and dtype != request.dtype:
                reasons.append(f"{name} is {dtype}, x is {request.dtype}: the CUDA kernel needs one dtype")
        reasons += cuda_ext.not_loaded_reasons(request.device_type, build=not reasons)  # no build for a refused call
        return reasons


#: the token embedding's dispatcher; "cuda" only where the measured table prefers it, else "triton" on CUDA
DISPATCHER = Dispatcher(
    "embed_tokens",
    "embed_tokens",
    (ReferenceEmbedTokens(), TritonEmbedTokens(), CudaEmbedTokens()),
    auto_order=("triton", "reference"),
    refusal="backend: {name!r} cannot run {what}: {reasons}",
)

#: names ``embed_tokens(backend=...)`` accepts (None = "auto")
BACKEND_NAMES = DISPATCHER.names


def embed_tokens_not_supported_reasons(backend: str, x, pos_embed, cls_token, reg_token) -> list[str]:
    """Reasons, in words, why ``backend`` cannot run this call; empty when it can."""
    request = EmbedTokensRequest.from_tensors(x, pos_embed, cls_token, reg_token)
    return DISPATCHER.get(backend).not_supported_reasons(request)


def resolve_embed_tokens_backend(backend: Optional[str], x, pos_embed, cls_token, reg_token) -> BackendChoice:
    """The ``BackendChoice`` for one call; ValueError naming ``backend`` when an explicitly named one cannot run."""
    return DISPATCHER.resolve(backend, EmbedTokensRequest.from_tensors(x, pos_embed, cls_token, reg_token))


def choose_embed_tokens_backend(backend: Optional[str], x, pos_embed, cls_token, reg_token) -> tuple[str, str]:
    """(backend name, why) for one call (``resolve_embed_tokens_backend``)."""
    choice = resolve_embed_tokens_backend(backend, x, pos_embed, cls_token, reg_token)
    return choice.name, choice.reason
