"""Attention backends: what each supports, why it does not, and the one-time choice between them.

Every backend implements the semantics of ``regkern.reference.register_attention``. Dispatch is decided once from
an ``AttentionRequest`` (static facts: device, dtype, head dim, requested statistics, ...), never branched on
inside a forward, so the choice is stable under ``torch.compile`` and CUDA-graph capture.

Backends, in the order ``"auto"`` tries them:
    cuda       hand-written CUDA kernels from csrc/ (extension ``regkern._C``, see ``regkern.cuda_ext``): tried first
               only where the measured dispatch table (``regkern.dispatch_table``) says it beats Triton for the
               GPU, dtype, head dim and sequence length; forward on tensor cores, backward by the Triton kernels.
    triton     fused Triton kernels (``regkern.attention_triton``): registers and prefix as their own KV segment,
               forward + backward, LSE. CUDA tensors; CPU tensors only when named explicitly under TRITON_INTERPRET=1.
    torch      PyTorch ``scaled_dot_product_attention`` with registers concatenated to the keys; statistics, when
               requested, from the materialising reference beside it (the output stays SDPA's).
    reference  the materialising float32 reference; supports everything, slow; serves statistics and tests.
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
    #: (major, minor) compute capability of the CUDA device; None elsewhere (the dispatch table is keyed on it)
    capability: Optional[Tuple[int, int]] = None
    #: sequence length N when known (functional calls; modules of patched models with a fixed image size)
    seq_len: Optional[int] = None

    @classmethod
    def from_tensors(cls, q: torch.Tensor, stats=(), attn_mask=None, dropout_p: float = 0.0) -> "AttentionRequest":
        return cls(q.device.type, q.dtype, q.shape[-1], frozenset(stats), attn_mask is not None, dropout_p > 0,
                   device_capability(q.device), q.shape[1])


def device_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """Compute capability of a CUDA device (a query made when a backend is chosen, never at import)."""
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    return _cuda_capability(index)


@torch.compiler.assume_constant_result  # traced calls (register_attention under torch.compile) see a constant
def _cuda_capability(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


class AttentionBackend:
    """One implementation of ``register_attention``. Subclasses set ``name`` and ``description``."""

    name: str = ""
    description: str = ""
    #: device types ``"auto"`` may pick this backend for (None: any the backend supports)
    auto_device_types: Optional[Tuple[str, ...]] = None
    #: whether ``attention_with_prologue`` (qk_norm + RoPE fused into the kernel) is available
    fuses_qk_prologue: bool = False

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
    description = (
        "PyTorch scaled_dot_product_attention, registers concatenated to the keys; statistics, when requested, "
        "from the materialising reference beside it (out stays SDPA's, bit for bit)"
    )

    def not_supported_reasons(self, request: AttentionRequest) -> List[str]:
        reasons = []
        if request.stats and request.dropout:
            reasons.append("statistics with attention dropout need the reference (one pass for both)")
        return reasons

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        out = self._sdpa(q, k, v, reg_k, reg_v, scale=scale, attn_mask=attn_mask, dropout_p=dropout_p)
        if not return_stats:
            return out
        with torch.no_grad():  # statistics are observations: no graph through the materialised matrix
            _, stats = reference.register_attention(
                q, k, v, reg_k, reg_v, scale=scale, return_stats=return_stats, num_prefix=num_prefix,
                attn_mask=attn_mask,
            )
        return out, stats

    @staticmethod
    def _sdpa(q, k, v, reg_k, reg_v, *, scale, attn_mask, dropout_p):
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


class TritonBackend(AttentionBackend):
    name = "triton"
    description = "fused Triton kernels: registers and CLS/register prefix as their own KV segment"
    auto_device_types = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim = 128
    stats = frozenset(reference.STAT_NAMES)

    def not_supported_reasons(self, request: AttentionRequest) -> List[str]:
        reasons = []
        try:
            from . import attention_triton
        except ImportError as err:  # triton missing or broken
            return [f"triton cannot be imported ({err})"]
        if request.device_type == "cpu":
            if not attention_triton.INTERPRETED:
                reasons.append("CPU tensors need TRITON_INTERPRET=1 set before regkern's Triton kernels are imported")
        elif request.device_type != "cuda":
            reasons.append(f"device type {request.device_type!r} is not supported (CUDA, or CPU under the interpreter)")
        if request.dtype not in self.dtypes:
            reasons.append(f"dtype {request.dtype} is not supported (float16, bfloat16, float32)")
        if request.head_dim > self.max_head_dim:
            reasons.append(f"head_dim {request.head_dim} > {self.max_head_dim}")
        if request.has_mask:
            reasons.append("attn_mask is not supported by the fused kernel")
        if request.dropout:
            reasons.append("attention dropout is not supported by the fused kernel")
        return reasons

    #: this backend can apply timm's qk_norm (LayerNorm) and RoPE while loading Q/K tiles
    fuses_qk_prologue = True

    @staticmethod
    def _run(q, k, v, reg_k, reg_v, norms, rope, scale, num_prefix, qk_norm, norm_eps, rotate_half, return_stats):
        from .attention_op import attention_fwd

        flags = tuple(name in return_stats for name in ("out_norm", "prefix_rows", "received"))
        out, lse, *stats = attention_fwd(q, k, v, reg_k, reg_v, *norms, rope, scale, num_prefix, qk_norm,
                                         float(norm_eps), bool(rotate_half), *flags, "triton")
        if not return_stats:
            return out
        found = dict(zip(("out_norm", "prefix_rows", "received"), stats), lse=lse)
        return out, reference.AttentionStats({name: found[name] for name in return_stats})

    def attention_with_prologue(self, q, k, v, reg_k, reg_v, *, scale, num_prefix, q_norm, k_norm, norm_eps,
                                rope, rotate_half, return_stats=()):
        """Attention over ``reference.qk_prologue``-transformed q and k, the prologue fused into the kernel.

        q_norm, k_norm: (weight, bias) pairs (either may be None) or None when qk_norm is off."""
        qk_norm = q_norm is not None
        norms = (*q_norm, *k_norm) if qk_norm else (None,) * 4
        return self._run(q, k, v, reg_k, reg_v, norms, rope, scale, num_prefix, qk_norm, norm_eps, rotate_half,
                         tuple(return_stats))

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        return self._run(q, k, v, reg_k, reg_v, (None,) * 4, None, scale, num_prefix, False, 0.0, False,
                         tuple(return_stats))


class CudaBackend(AttentionBackend):
    name = "cuda"
    description = ("hand-written CUDA kernels (csrc/, mma.sync tensor cores): registers and prefix as their own KV "
                   "segment, out_norm epilogue; backward by the Triton kernels")
    auto_device_types = ("cuda",)
    cuda_dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128)
    stats = frozenset(("lse", "out_norm"))

    def not_supported_reasons(self, request: AttentionRequest) -> List[str]:
        reasons = []
        if request.device_type == "cuda":
            if request.dtype not in self.cuda_dtypes:
                reasons.append(f"dtype {request.dtype} is not supported by the CUDA kernel (float16, bfloat16; "
                               "the backend is chosen from the parameters' dtype, so autocast is not seen)")
            if request.head_dim not in self.head_dims:
                reasons.append(f"head_dim {request.head_dim} is not supported by the CUDA kernel (64, 128)")
        elif request.device_type != "cpu":
            reasons.append(f"device type {request.device_type!r} is not supported (CUDA; CPU runs the extension's "
                           "C++ reference implementation)")
        elif request.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {request.dtype} is not supported (float16, bfloat16, float32 on the CPU)")
        if request.has_mask:
            reasons.append("attn_mask is not supported by the CUDA kernel")
        if request.dropout:
            reasons.append("attention dropout is not supported by the CUDA kernel")
        missing = sorted(set(request.stats) - self.stats)
        if missing:
            reasons.append(f"statistics {', '.join(missing)} are not computed by the CUDA kernel (triton computes "
                           "them)")
        from . import cuda_ext

        reasons += cuda_ext.not_loaded_reasons(request.device_type, build=not reasons)  # no build for a refused call
        return reasons

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        want_norm = "out_norm" in return_stats
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        out, lse, out_norm = torch.ops.regkern.cuda_attention_fwd(q, k, v, reg_k, reg_v, scale, num_prefix,
                                                                  want_norm)
        if not return_stats:
            return out
        found = {"lse": lse, "out_norm": out_norm}
        return out, reference.AttentionStats({name: found[name] for name in return_stats})


BACKENDS: Dict[str, AttentionBackend] = {
    b.name: b for b in (TritonBackend(), CudaBackend(), TorchBackend(), ReferenceBackend())
}

#: The order in which ``"auto"`` tries backends after the dispatch table's word on triton vs cuda; the first that
#: supports the request wins. "cuda" is not in it: auto picks it only where the measured table says it is faster.
AUTO_ORDER: Tuple[str, ...] = ("triton", "torch", "reference")


def _table_choice(request: AttentionRequest) -> Tuple[str, str]:
    """("cuda" or "triton", why) from the measured dispatch table, for CUDA requests."""
    from . import dispatch_table

    return dispatch_table.choose("attention", request.capability, request.dtype, request.head_dim, request.seq_len)


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
    if request.device_type == "cuda" and request.capability is not None:
        preferred, why = _table_choice(request)
        if preferred == "cuda":
            reasons = BACKENDS["cuda"].not_supported_reasons(request)
            if not reasons:
                return BackendChoice(BACKENDS["cuda"], f"auto ({source}): {why}")
            skipped["cuda"] = [why] + reasons
        else:
            skipped["cuda"] = [why]
    for candidate in AUTO_ORDER:
        allowed = BACKENDS[candidate].auto_device_types
        if allowed is not None and request.device_type not in allowed:
            skipped[candidate] = [f"auto uses it on {'/'.join(allowed)} only (name it explicitly otherwise)"]
            continue
        reasons = BACKENDS[candidate].not_supported_reasons(request)
        if not reasons:
            why = f"auto ({source}): first supporting backend for {request.device_type}/{str(request.dtype)[6:]}"
            if skipped:
                why += "; skipped " + "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped.items())
            return BackendChoice(BACKENDS[candidate], why, skipped)
        skipped[candidate] = reasons
    raise ValueError("backend 'auto': no backend supports this call: " + str(skipped))  # reference supports all
