"""Attention backends: what each supports, why it does not, and the one-time choice between them.

Every backend implements the semantics of ``regkern.reference.register_attention``. Dispatch is decided once from
an ``AttentionRequest`` (static facts: device, dtype, head dim, requested statistics, ...), never branched on
inside a forward, so the choice is stable under ``torch.compile`` and CUDA-graph capture.

Backends, in the order ``"auto"`` tries them:
    cuda       hand-written CUDA kernels from csrc/ (extension ``regkern._C``, see ``regkern.ops.cuda_ext``): tried
               first only where the measured dispatch table (``regkern.ops.dispatch_table``) says it beats Triton for
               the GPU, dtype, head dim and sequence length; forward on tensor cores, backward by the Triton kernels.
    triton     fused Triton kernels (``regkern.ops.attention.triton_kernels``): registers and prefix as their own KV
               segment, forward + backward, LSE. CUDA tensors; CPU tensors only when named explicitly under
               TRITON_INTERPRET=1.
    torch      PyTorch ``scaled_dot_product_attention`` with registers concatenated to the keys; statistics, when
               requested, from the materialising reference beside it (the output stays SDPA's).
    reference  the materialising float32 reference; supports everything, slow; serves statistics and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ... import reference
from .. import cuda_ext
from ..dispatch import Backend, BackendChoice, Dispatcher, device_capability
from . import op

__all__ = [
    "AttentionRequest",
    "AttentionBackend",
    "BackendChoice",
    "BACKENDS",
    "AUTO_ORDER",
    "DISPATCHER",
    "ENV_VAR",
    "get_backend",
    "resolve_backend",
    "requested_backend_name",
    "is_key_mask",
    "key_bias_from_mask",
]

ENV_VAR = "REGKERN_BACKEND"


def is_key_mask(attn_mask: torch.Tensor) -> bool:
    """Whether an SDPA-style mask (broadcastable to (B, H, N, N)) depends on the batch and the key only, i.e. is
    broadcastable to (B, 1, 1, N): decided from its shape (no data read)."""
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    return shape[1] == 1 and shape[2] == 1


def key_bias_from_mask(attn_mask: torch.Tensor, B: int, N: int) -> torch.Tensor:
    """A key mask (``is_key_mask``) as the (B, N) float32 additive bias over the token keys that the fused kernels
    take: 0 / -inf for a boolean mask (True = attend), the values of an additive one."""
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device).masked_fill(
            ~attn_mask, float("-inf")
        )
    else:
        bias = attn_mask.float()
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    return bias.reshape(shape[0], shape[3]).expand(B, N).contiguous()


@dataclass(frozen=True)
class AttentionRequest:
    """The static facts a backend needs to say whether it can run an attention call."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    stats: frozenset[str] = frozenset()
    has_mask: bool = False
    dropout: bool = False
    #: (major, minor) compute capability of the CUDA device; None elsewhere (the dispatch table is keyed on it)
    capability: Optional[tuple[int, int]] = None
    #: sequence length N when known (functional calls; modules of patched models with a fixed image size)
    seq_len: Optional[int] = None
    #: the mask depends on the batch and the key only (broadcastable to (B, 1, 1, N)): a key mask
    key_mask: bool = False

    @classmethod
    def from_tensors(cls, q: torch.Tensor, stats=(), attn_mask=None, dropout_p: float = 0.0) -> AttentionRequest:
        return cls(
            q.device.type,
            q.dtype,
            q.shape[-1],
            frozenset(stats),
            attn_mask is not None,
            dropout_p > 0,
            device_capability(q.device),
            q.shape[1],
            attn_mask is not None and is_key_mask(attn_mask),
        )

    def describe(self) -> str:
        return "this call"

    @property
    def dim(self) -> int:
        """What the measured dispatch table is keyed on: the head dim."""
        return self.head_dim

    @property
    def features(self) -> frozenset[str]:
        """Requested statistics, plus "attn_mask" and "dropout" when the call has them."""
        return self.stats | {name for name, on in (("attn_mask", self.has_mask), ("dropout", self.dropout)) if on}


class AttentionBackend(Backend):
    """One implementation of ``register_attention``. Subclasses set ``name``, ``description`` and what they
    support, and implement ``attention``."""

    features = frozenset(reference.STAT_NAMES) | {"attn_mask", "dropout"}
    #: whether ``attention_with_prologue`` (qk_norm + RoPE inside the op, as its pre-pass) is available
    fuses_qk_prologue: bool = False

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        """Same contract as ``reference.register_attention`` (inputs already checked)."""
        raise NotImplementedError


class ReferenceBackend(AttentionBackend):
    name = "reference"
    description = "materialising float32 PyTorch reference (slow; every feature)"
    device_types = None

    def not_supported_reasons(self, request: AttentionRequest) -> list[str]:
        return []  # any device, any floating dtype, every feature

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        return reference.register_attention(
            q,
            k,
            v,
            reg_k,
            reg_v,
            scale=scale,
            return_stats=return_stats,
            num_prefix=num_prefix,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
        )


class TorchBackend(AttentionBackend):
    name = "torch"
    device_types = None
    description = (
        "PyTorch scaled_dot_product_attention, registers concatenated to the keys; statistics, when requested, "
        "from one scores matmul and softmax beside it (only the rows they need; out stays SDPA's, bit for bit)"
    )

    def not_supported_reasons(self, request: AttentionRequest) -> list[str]:
        reasons = []
        if request.stats and request.dropout:
            reasons.append("statistics with attention dropout need the reference (one pass for both)")
        return reasons

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        out = self._sdpa(q, k, v, reg_k, reg_v, scale=scale, attn_mask=attn_mask, dropout_p=dropout_p)
        if not return_stats:
            return out
        with torch.no_grad():  # statistics are observations: no graph through the materialised matrix
            stats = self._statistics(q, k, v, reg_k, reg_v, scale, tuple(return_stats), num_prefix, attn_mask)
        return out, stats

    @staticmethod
    def _statistics(q, k, v, reg_k, reg_v, scale, requested, num_prefix, attn_mask) -> reference.AttentionStats:
        """``reference.register_attention``'s statistics computing only what they need: a scores matmul (only the
        prefix query rows when prefix_rows is all that is asked for) and a softmax, a few images at a time so that
        the scores stay small (on the CPU: in cache, no fresh pages per call); P @ V in float32 only for out_norm
        (the norm of the float32 output, as the reference defines it)."""
        B, N, H, d = q.shape
        cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = d**-0.5 if scale is None else float(scale)
        wanted = set(requested)
        rows = N if {"lse", "received", "received_groups", "out_norm"} & wanted else num_prefix
        R = 0 if reg_k is None else reg_k.shape[-3]
        keys = R + N
        bias = reference.token_mask_to_bias(attn_mask, R, cdtype)
        if bias is not None:
            while bias.dim() < 4:
                bias = bias.unsqueeze(0)
            if bias.shape[-2] == N:
                bias = bias[..., :rows, :]
        shapes = {
            "lse": (B, H, N),
            "out_norm": (B, N),
            "received": (B, H, keys),
            "received_groups": (B, H, 4),
            "prefix_rows": (B, H, num_prefix, keys),
        }
        stats = {name: torch.empty(shapes[name], dtype=torch.float32, device=q.device) for name in requested}
        budget = (1 << 20) if q.device.type == "cpu" else (1 << 27)  # score elements per chunk
        chunk = max(1, budget // max(1, H * rows * keys))
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            qf = q[b0:b1, :rows].transpose(1, 2).to(cdtype)  # (b, H, rows, d)
            kf = k[b0:b1].transpose(1, 2).to(cdtype)
            if reg_k is not None:
                regs = reference.batched_registers(reg_k, B)[b0:b1].transpose(1, 2).to(cdtype)
                kf = torch.cat([regs, kf], dim=2)
            scores = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)  # (b, H, rows, R + N)
            if bias is not None:
                scores = scores + (bias[b0:b1] if bias.shape[0] == B else bias)
            if "lse" in wanted:
                stats["lse"][b0:b1] = torch.logsumexp(scores, dim=-1)
            if not {"received", "received_groups", "prefix_rows", "out_norm"} & wanted:
                continue
            probs = torch.softmax(scores, dim=-1)
            if "received" in wanted or "received_groups" in wanted:
                received = probs.sum(dim=2)
                if "received" in wanted:
                    stats["received"][b0:b1] = received
                if "received_groups" in wanted:
                    stats["received_groups"][b0:b1] = reference.received_groups(received, R, num_prefix)
            if "prefix_rows" in wanted:
                stats["prefix_rows"][b0:b1] = probs[:, :, :num_prefix, :]
            if "out_norm" in wanted:
                vf = v[b0:b1].transpose(1, 2).to(cdtype)
                if reg_v is not None:
                    vf = torch.cat([reference.batched_registers(reg_v, B)[b0:b1].transpose(1, 2).to(cdtype), vf], 2)
                out_f = torch.matmul(probs, vf).transpose(1, 2)  # (b, N, H, d)
                stats["out_norm"][b0:b1] = torch.linalg.vector_norm(out_f.reshape(b1 - b0, N, H * d), dim=-1)
        return reference.AttentionStats(stats)

    @staticmethod
    def _sdpa(q, k, v, reg_k, reg_v, *, scale, attn_mask, dropout_p):
        B = q.shape[0]
        if reg_k is not None:
            R = reg_k.shape[-3]
            k = torch.cat([reference.batched_registers(reg_k, B).to(k.dtype), k], dim=1)
            v = torch.cat([reference.batched_registers(reg_v, B).to(v.dtype), v], dim=1)
            # register keys are never masked
            attn_mask = reference.token_mask_to_bias(attn_mask, R, q.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            scale=scale,
        )
        # same reshape as timm: (B, H, N, d) -> (B, N, H, d) contiguous
        return out.transpose(1, 2).contiguous()


def _stats_from_op(return_stats, out, lse, out_norm=None, prefix_rows=None, received=None, received_groups=None):
    if not return_stats:
        return out
    found = {
        "lse": lse,
        "out_norm": out_norm,
        "prefix_rows": prefix_rows,
        "received": received,
        "received_groups": received_groups,
    }
    return out, reference.AttentionStats({name: found[name] for name in return_stats})


class TritonBackend(AttentionBackend):
    name = "triton"
    description = "fused Triton kernels: registers and CLS/register prefix as their own KV segment"
    device_types = ("cuda", "cpu")
    auto_device_types = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim = 128
    features = frozenset(reference.STAT_NAMES)
    #: this backend can apply timm's qk_norm (LayerNorm) and RoPE while loading Q/K tiles
    fuses_qk_prologue = True

    def not_supported_reasons(self, request: AttentionRequest) -> list[str]:
        reasons = []
        problem = op.triton_problem(request.device_type)
        if problem:
            reasons.append(problem)
        elif request.device_type not in self.device_types:
            reasons.append(f"device type {request.device_type!r} is not supported (CUDA, or CPU under the interpreter)")
        if request.dtype not in self.dtypes:
            reasons.append(f"dtype {request.dtype} is not supported (float16, bfloat16, float32)")
        if request.head_dim > self.max_head_dim:
            reasons.append(f"head_dim {request.head_dim} > {self.max_head_dim}")
        if request.has_mask and not request.key_mask:
            reasons.append(
                "attn_mask varies over queries or heads; the fused kernel takes key masks only (broadcastable to "
                "(B, 1, 1, N))"
            )
        if request.dropout:
            reasons.append("attention dropout is not supported by the fused kernel")
        return reasons

    @staticmethod
    def _run(
        q, k, v, reg_k, reg_v, norms, rope, scale, num_prefix, qk_norm, norm_eps, rotate_half, return_stats, mask=None
    ):
        flags = tuple(name in return_stats for name in op.OP_STATS)
        key_bias = None if mask is None else key_bias_from_mask(mask, q.shape[0], q.shape[1])
        out, lse, *stats = op.attention_fwd(
            q,
            k,
            v,
            reg_k,
            reg_v,
            *norms,
            rope,
            key_bias,
            scale,
            num_prefix,
            qk_norm,
            float(norm_eps),
            bool(rotate_half),
            *flags,
            "triton",
        )
        return _stats_from_op(return_stats, out, lse, *stats)

    def attention_with_prologue(
        self,
        q,
        k,
        v,
        reg_k,
        reg_v,
        *,
        scale,
        num_prefix,
        q_norm,
        k_norm,
        norm_eps,
        rope,
        rotate_half,
        return_stats=(),
        attn_mask=None,
    ):
        """Attention over ``reference.qk_prologue``-transformed q and k, the prologue inside the op (a pre-pass kernel).

        q_norm, k_norm: (weight, bias) pairs (either may be None) or None when qk_norm is off. attn_mask: a key mask
        (``is_key_mask``) or None."""
        qk_norm = q_norm is not None
        norms = (*q_norm, *k_norm) if qk_norm else (None,) * 4
        return self._run(
            q,
            k,
            v,
            reg_k,
            reg_v,
            norms,
            rope,
            scale,
            num_prefix,
            qk_norm,
            norm_eps,
            rotate_half,
            tuple(return_stats),
            attn_mask,
        )

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        return self._run(
            q,
            k,
            v,
            reg_k,
            reg_v,
            (None,) * 4,
            None,
            scale,
            num_prefix,
            False,
            0.0,
            False,
            tuple(return_stats),
            attn_mask,
        )


class CudaBackend(AttentionBackend):
    name = "cuda"
    description = (
        "hand-written CUDA kernels (csrc/, mma.sync tensor cores): registers and prefix as their own KV "
        "segment, out_norm epilogue; backward by the Triton kernels"
    )
    device_types = ("cuda", "cpu")
    auto_device_types = ("cuda",)
    measured = True  # auto picks it only where the measured dispatch table says it beats triton
    cuda_dtypes = (torch.float16, torch.bfloat16)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    device_dtypes = {"cuda": cuda_dtypes, "cpu": dtypes}  # float32 only on the CPU (the C++ reference)
    head_dims = (64, 128)
    features = frozenset(("lse", "out_norm"))

    def not_supported_reasons(self, request: AttentionRequest) -> list[str]:
        reasons = []
        if request.device_type == "cuda":
            if request.dtype not in self.cuda_dtypes:
                reasons.append(
                    f"dtype {request.dtype} is not supported by the CUDA kernel (float16, bfloat16; "
                    "the backend is chosen from the parameters' dtype, so autocast is not seen)"
                )
            if request.head_dim not in self.head_dims:
                reasons.append(f"head_dim {request.head_dim} is not supported by the CUDA kernel (64, 128)")
        elif request.device_type != "cpu":
            reasons.append(
                f"device type {request.device_type!r} is not supported (CUDA; CPU runs the extension's "
                "C++ reference implementation)"
            )
        elif request.dtype not in self.dtypes:
            reasons.append(f"dtype {request.dtype} is not supported (float16, bfloat16, float32 on the CPU)")
        if request.has_mask:
            reasons.append("attn_mask is not supported by the CUDA kernel")
        if request.dropout:
            reasons.append("attention dropout is not supported by the CUDA kernel")
        missing = sorted(set(request.stats) - self.features)
        if missing:
            reasons.append(
                f"statistics {', '.join(missing)} are not computed by the CUDA kernel (triton computes them)"
            )
        reasons += cuda_ext.not_loaded_reasons(request.device_type, build=not reasons)  # no build for a refused call
        return reasons

    def attention(self, q, k, v, reg_k, reg_v, *, scale, return_stats, num_prefix, attn_mask, dropout_p):
        want_norm = "out_norm" in return_stats
        out, lse, out_norm, *_ = op.attention_fwd(
            q,
            k,
            v,
            reg_k,
            reg_v,
            None,
            None,
            None,
            None,
            None,
            None,
            float(scale),
            num_prefix,
            False,
            0.0,
            False,
            want_norm,
            False,
            False,
            False,
            "cuda",
        )
        return _stats_from_op(return_stats, out, lse, out_norm)


#: The order in which ``"auto"`` tries backends after the dispatch table's word on triton vs cuda; the first that
#: supports the request wins. "cuda" is not in it: auto picks it only where the measured table says it is faster.
AUTO_ORDER: tuple[str, ...] = ("triton", "torch", "reference")

#: the attention op's dispatcher (``regkern.ops.dispatch``); $REGKERN_BACKEND names a backend when none is given
DISPATCHER = Dispatcher(
    "attention", "", (TritonBackend(), CudaBackend(), TorchBackend(), ReferenceBackend()), AUTO_ORDER, env_var=ENV_VAR
)

#: the attention backends by name: the dispatcher's own table (a backend added here is one ``resolve`` can pick)
BACKENDS: dict[str, AttentionBackend] = DISPATCHER.backends


def get_backend(name: str) -> AttentionBackend:
    """The attention backend registered under ``name``; ValueError naming the known ones otherwise."""
    return DISPATCHER.get(name)


def requested_backend_name(backend: Optional[str]) -> tuple[str, str]:
    """The backend name to use and where it came from: the argument, else $REGKERN_BACKEND, else 'auto'."""
    return DISPATCHER.requested_name(backend)


def resolve_backend(backend: Optional[str], request: AttentionRequest) -> BackendChoice:
    """Choose the attention backend for ``request`` once (``Dispatcher.resolve``).

    An explicit name (argument or $REGKERN_BACKEND) must support the request, else ValueError with the reasons:
    nothing falls back silently. ``"auto"`` takes the measured table's word on cuda, then the first supporting
    backend in ``AUTO_ORDER``.
    """
    return DISPATCHER.resolve(backend, request)
