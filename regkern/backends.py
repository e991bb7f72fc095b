"""Attention backends: what each supports, why it does not, and the one-time choice between them.

Every backend implements the semantics of ``regkern.reference.register_attention``. Dispatch is decided once from
an ``AttentionRequest`` (static facts: device, dtype, head dim, requested statistics, ...), never branched on
inside a forward, so the choice is stable under ``torch.compile`` and CUDA-graph capture.

Backends, in the order ``"auto"`` tries them:
    torch      PyTorch ``scaled_dot_product_attention`` with registers concatenated to the keys; no statistics.
    reference  the materialising float32 reference; supports everything, slow; serves statistics and tests.
Later issues add "triton" and "cuda" in front of these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference

__all__ = [
    "AttentionRequest",
    "AttentionBackend",
    "BackendChoice",
    "BACKENDS",
    "AUTO_ORDER",
    "ENV_VAR",
    "get_backend",
    "resolve_backend",
]

ENV_VAR = "REGKERN_BACKEND"


@dataclass(frozen=True)
class AttentionRequest:
    """The static facts a backend needs to say whether it can run an attention call."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    stats: FrozenSet[str] = frozenset()
    has_mask: bool = False
    dropout: bool = False

    @classmethod
    def from_tensors(cls, q: torch.Tensor, stats=(), attn_mask=None, dropout_p: float = 0.0) -> "AttentionRequest":
        return cls(q.device.type, q.dtype, q.shape[-1], frozenset(stats), attn_mask is not None, dropout_p > 0)


class AttentionBackend:
    """One implementation of ``register_attention``. Subclasses set ``name`` and ``description``."""

    name: str = ""
    description: str = ""

    def not_supported_reasons(self, request: AttentionRequest) -> List[str]:
        """Reasons, in words, why this backend cannot serve ``request``; empty when it can."""
        return []

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        """Same contract as ``reference.register_attention`` (inputs already checked)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<regkern backend {self.name!r}: {self.description}>"


class ReferenceBackend(AttentionBackend):
    name = "reference"
    description = "materialising float32 PyTorch reference (slow; every feature)"

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        return reference.register_attention(
            q, k, v, reg_k, reg_v, scale=scale, return_stats=return_stats, num_prefix=num_prefix,
            attn_mask=attn_mask, dropout_p=dropout_p,
        )


class TorchBackend(AttentionBackend):
    name = "torch"
    description = "PyTorch scaled_dot_product_attention, registers concatenated to the keys"

    def not_supported_reasons(self, request: AttentionRequest) -> List[str]:
        reasons = []
        if request.stats:
            reasons.append(
                f"statistics {sorted(request.stats)} need the materialising reference or a fused kernel; "
                "SDPA does not expose them"
            )
        return reasons

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        B = q.shape[0]
        if reg_k is not None:
            R = reg_k.shape[-3]
            k = torch.cat([reference._batched_registers(reg_k, B).to(k.dtype), k], dim=1)
            v = torch.cat([reference._batched_registers(reg_v, B).to(v.dtype), v], dim=1)
            # register keys are never masked
            attn_mask = reference.token_mask_to_bias(attn_mask, R, q.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
        )
        # same reshape as timm: (B, H, N, d) -> (B, N, H, d) contiguous
        return out.transpose(1, 2).contiguous()


BACKENDS: Dict[str, AttentionBackend] = {b.name: b for b in (TorchBackend(), ReferenceBackend())}

#: The order in which ``"auto"`` tries backends; the first that supports the request wins.
AUTO_ORDER: Tuple[str, ...] = ("torch", "reference")


@dataclass(frozen=True)
class BackendChoice:
    """A resolved backend and, in words, why it was chosen (and why the ones before it were not)."""

    backend: AttentionBackend
    reason: str
    skipped: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.backend.name


def get_backend(name: str) -> AttentionBackend:
    """The backend registered under ``name``; ValueError naming the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {['auto', *BACKENDS]}") from None


def requested_backend_name(backend: Optional[str]) -> Tuple[str, str]:
    """The backend name to use and where it came from: the argument, else $REGKERN_BACKEND, else 'auto'."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend: expected a string such as 'auto' or 'reference', got {type(backend).__name__}")
        return backend, "backend argument"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env, f"${ENV_VAR}"
    return "auto", "default"


def resolve_backend(backend: Optional[str], request: AttentionRequest) -> BackendChoice:
    """Choose the backend for ``request`` once.

    An explicit name (argument or $REGKERN_BACKEND) must support the request, else ValueError with the reasons:
    nothing falls back silently. ``"auto"`` takes the first supporting backend in ``AUTO_ORDER``.
    """
    name, source = requested_backend_name(backend)
    if name != "auto":
        chosen = get_backend(name)
        reasons = chosen.not_supported_reasons(request)
        if reasons:
            raise ValueError(f"backend {name!r} (from {source}) cannot run this call: " + "; ".join(reasons))
        return BackendChoice(chosen, f"requested by {source}")
    skipped: Dict[str, List[str]] = {}
    for candidate in AUTO_ORDER:
        reasons = BACKENDS[candidate].not_supported_reasons(request)
        if not reasons:
            why = f"auto ({source}): first supporting backend for {request.device_type}/{str(request.dtype)[6:]}"
            if skipped:
                why += "; skipped " + "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped.items())
            return BackendChoice(BACKENDS[candidate], why, skipped)
        skipped[candidate] = reasons
    raise ValueError("backend 'auto': no backend supports this call: " + str(skipped))  # reference supports all
