"""Drop-ins for the other attention families of timm's register ViTs.

``RegisterRopeAttention``            timm.layers.AttentionRope (Perception Encoder ``vit_pe_*``): RoPE on patch tokens,
                                     biases in the projections, grouped-query K/V heads
``RegisterDiffAttention``            timm.layers.DiffAttention (``vit_dwee``/``vit_dlittle``): two softmax maps per
                                     head, ``A1 V - lambda A2 V``, then a sub-RMSNorm
``RegisterParallelScalingBlock``     timm's ParallelScalingBlock (``vit_pwee``): the attention part of a parallel block
``RegisterDiffParallelScalingBlock`` timm's DiffParallelScalingBlock (``vit_dpwee``): the same with differential
                                     attention

Each is built from the timm module (``from_timm``, reusing its submodules and Parameter objects, so state_dict keys
and tensors are timm's) or with timm's constructor arguments (the timm module is built, then adopted). The parallel
blocks replace the whole block (attention and MLP read one fused input projection); their MLP stays timm's math.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import run_attention
from .attention import RegisterAttentionBase, causal_mask

__all__ = [
    "RegisterRopeAttention",
    "RegisterDiffAttention",
    "RegisterParallelScalingBlock",
    "RegisterDiffParallelScalingBlock",
]


def _timm_class(name: str) -> type:
    # lazy import of timm: importing regkern does not import timm
    if name in ("AttentionRope", "DiffAttention"):
        import timm.layers as where
    else:
        import timm.models.vision_transformer as where
    return getattr(where, name)


class _AdoptsTimm(RegisterAttentionBase):
    """Adoption of a timm module's submodules, Parameters and buffers, shared by the classes below."""

    timm_class_name: str = ""
    #: submodules and Parameters taken from the timm module, in timm's registration order (None entries kept)
    adopted: tuple[str, ...] = ()
    #: plain attributes copied from the timm module
    copied: tuple[str, ...] = ()

    def __init__(self, *args, num_kv_registers: int = 0, backend: Optional[str] = None, **kwargs) -> None:
        """timm's constructor arguments (the timm module is built and adopted), plus regkern's ``num_kv_registers``
        and ``backend``; ``num_prefix_tokens`` is timm's argument where timm has one, else regkern's (default 0)."""
        timm_class = _timm_class(self.timm_class_name)
        num_prefix = kwargs.pop("num_prefix_tokens", None) if not self._timm_takes_prefix() else None
        self._adopt_timm(timm_class(*args, **kwargs), num_kv_registers, num_prefix, backend)

    @classmethod
    def _timm_takes_prefix(cls) -> bool:
        return cls.timm_class_name == "AttentionRope"

    @classmethod
    def from_timm(
        cls,
        module: nn.Module,
        *,
        num_kv_registers: int = 0,
        num_prefix_tokens: Optional[int] = None,
        backend: Optional[str] = None,
    ):
        """Build from the timm module, reusing its submodules, Parameters and buffers (no copies).
        ``num_prefix_tokens``: CLS + registers (default: the module's own, else 0)."""
        self = cls.__new__(cls)
        self._adopt_timm(module, num_kv_registers, num_prefix_tokens, backend)
        return self

    def _adopt_timm(self, module, num_kv_registers, num_prefix_tokens, backend) -> None:
        expected = _timm_class(self.timm_class_name)
        if type(module) is not expected:
            raise TypeError(
                f"module: expected a {expected.__module__}.{expected.__name__}, "
                f"got {type(module).__module__}.{type(module).__name__}"
            )
        nn.Module.__init__(self)
        for name in self.adopted:
            if name in module._parameters:
                self.register_parameter(name, module._parameters[name])
            else:
                setattr(self, name, getattr(module, name, None))
        for name in self.copied:
            setattr(self, name, getattr(module, name))
        self._derive_attributes(module)
        self.fused_attn = True
        self.train(module.training)
        if num_prefix_tokens is None:
            num_prefix_tokens = int(getattr(module, "num_prefix_tokens", 0) or 0)
        p = self._reference_param()
        self._setup_registers_and_backend(num_kv_registers, num_prefix_tokens, backend, device=p.device, dtype=p.dtype)

    def _derive_attributes(self, module: nn.Module) -> None:
        """Attributes older timm versions do not store, derived from the adopted modules."""

    def _reference_param(self) -> torch.Tensor:
        # the input projection's weight: the lambda parameters of differential attention are float32 in any model
        for name in ("qkv", "q_proj", "in_proj"):
            projection = getattr(self, name, None)
            if projection is not None:
                return projection.weight
        return super()._reference_param()

    def _dropout_p(self) -> float:
        return self.attn_drop.p if self.training else 0.0


class RegisterRopeAttention(_AdoptsTimm):
    """Drop-in for ``timm.layers.AttentionRope`` (Perception Encoder ViTs): q_norm/k_norm, then RoPE on the tokens
    after the ``num_prefix_tokens`` prefix, then register attention; fused or separate projections (with their
    biases), grouped-query K/V heads (``num_kv_heads``, expanded to the query heads as timm does), scale norm and gate.

    Shapes: ``forward(x, rope=None, attn_mask=None, is_causal=False)``: x (B, N, dim) -> (B, N, dim_out); ``rope``
    is timm's [sin, cos] table broadcastable to (B, H, N - num_prefix_tokens, 2 * head_dim).
    """

    timm_class_name = "AttentionRope"
    uses_rope = True
    adopted = (
        "qkv",
        "q_proj",
        "k_proj",
        "v_proj",
        "q_norm",
        "k_norm",
        "attn_drop",
        "norm",
        "gate",
        "proj",
        "proj_drop",
    )
    copied = ("num_heads", "scale")

    def _derive_attributes(self, module: nn.Module) -> None:
        # older timm (1.0.20) stores neither the head dims nor the K/V head count: read them off the projections
        source = self.qkv if self.qkv is not None else self.q_proj
        self.attn_dim = source.out_features // (3 if self.qkv is not None else 1)
        self.head_dim = self.attn_dim // self.num_heads
        self.kv_dim = self.attn_dim if self.k_proj is None else self.k_proj.out_features
        self.num_kv_heads = self.kv_dim // self.head_dim
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.rotate_half = bool(getattr(module, "rotate_half", False))

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, self.head_dim)
            k = self.k_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim)
            if self.num_kv_groups > 1:  # head h reads K/V head h // groups, as timm (norm and RoPE are per head)
                k = k.repeat_interleave(self.num_kv_groups, dim=2)
                v = v.repeat_interleave(self.num_kv_groups, dim=2)
        attn_mask = causal_mask(attn_mask, is_causal, N, x.device)
        x = self._attend(q, k, v, attn_mask, rope).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class _Differential(_AdoptsTimm):
    """Differential attention (timm's DiffAttention math): per head, two query/key halves of ``head_dim`` each give
    two softmax maps over one value of ``2 * head_dim``; out = A1 V - lambda A2 V, then ``sub_norm`` (RMSNorm) and
    the factor ``1 - lambda_init``. Each map is one register attention call; q and k are zero-padded to the value's
    head dim (the scores are unchanged, ``scale = head_dim ** -0.5``)."""

    supports_statistics = False
    supports_kv_registers = False
    limits_reason = "differential attention mixes two softmax maps per head; statistics and KV registers of one map "
    limits_reason += "would not describe the module"
    lambdas = ("lambda_a", "lambda_b", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")

    @property
    def kernel_head_dim(self) -> int:
        return 2 * self.head_dim

    def _prologue_fusion(self):
        return False, "differential attention: q_norm/k_norm run as PyTorch ops before its two attention calls"

    def compute_lambda(self) -> torch.Tensor:
        """lambda = exp(a) - exp(b) + lambda_init, with a, b scalars or the dot products of the lambda vectors."""
        if self.lambda_a is not None:
            first, second = torch.exp(self.lambda_a), torch.exp(self.lambda_b)
        else:
            first = torch.exp((self.lambda_q1 * self.lambda_k1).sum(-1).float())
            second = torch.exp((self.lambda_q2 * self.lambda_k2).sum(-1).float())
        return first - second + self.lambda_init

    def _differential(self, q, k, v, attn_mask) -> torch.Tensor:
        """q, k (B, N, 2H, hd) (head 2h is map 1 of head h, 2h + 1 map 2), v (B, N, H, 2hd) -> (B, N, H, 2hd), after
        sub_norm and the ``1 - lambda_init`` factor."""
        B, N, H, hd = q.shape[0], q.shape[1], self.num_heads, self.head_dim
        q, k = self.q_norm(q), self.k_norm(k)
        lam = self.compute_lambda().type_as(q)
        # [B, N, H, 2, 2hd]: zeros in the upper half leave every score as it is
        q = F.pad(q.reshape(B, N, H, 2, hd), (0, hd))
        k = F.pad(k.reshape(B, N, H, 2, hd), (0, hd))
        backend = self._backend_for(attn_mask)
        first, second = (
            run_attention(
                backend,
                q[:, :, :, i],
                k[:, :, :, i],
                v,
                scale=self.scale,
                num_prefix=self.num_prefix_tokens,
                attn_mask=attn_mask,
                dropout_p=self._dropout_p(),
            )
            for i in (0, 1)
        )
        x = self.sub_norm(first - lam * second)
        return x * (1 - self.lambda_init)


class RegisterDiffAttention(_Differential):
    """Drop-in for ``timm.layers.DiffAttention`` (``vit_dwee``/``vit_dlittle``): see ``_Differential`` for the math.
    No attention statistics and no KV registers (``limits_reason``).

    Shapes: ``forward(x, attn_mask=None, is_causal=False)``: x (B, N, dim) -> (B, N, dim).
    """

    timm_class_name = "DiffAttention"
    adopted = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop") + _Differential.lambdas
    adopted += ("sub_norm",)
    copied = ("num_heads", "head_dim", "scale", "attn_drop_p", "dual_lambda", "lambda_init")

    def set_lambda_init(self, depth: int) -> None:
        """As timm: lambda_init = 0.8 - 0.6 exp(-0.3 depth)."""
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        B, N, C = x.shape
        H, hd = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=2)
        attn_mask = causal_mask(attn_mask, is_causal, N, x.device)
        x = self._differential(
            q.reshape(B, N, 2 * H, hd), k.reshape(B, N, 2 * H, hd), v.reshape(B, N, H, 2 * hd), attn_mask
        )
        x = self.norm(x.reshape(B, N, C))
        return self.proj_drop(self.proj(x))


class _ParallelBlock(_AdoptsTimm):
    """A parallel block (ViT-22B style): one ``in_norm`` and one ``in_proj`` feed the MLP and the attention; their
    outputs share the output projection. regkern runs the attention; the rest is timm's math on timm's modules."""

    block_modules = ("in_norm", "in_proj", "mlp_bias", "q_norm", "k_norm", "attn_drop")
    block_tail = ("mlp_drop", "mlp_act", "out_proj", "attn_out_proj", "mlp_out_proj", "ls", "drop_path")
    copied = ("num_heads", "head_dim", "scale", "in_split")

    def _attention(self, q, k, v, attn_mask) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim): x + drop_path(ls(out projection of [attention, MLP]))."""
        B, N, C = x.shape
        x_mlp, q, k, v = torch.split(self.in_proj(self.in_norm(x)), self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        attn_mask = causal_mask(attn_mask, is_causal, N, x.device)
        x_attn = self._attention(q, k, v, attn_mask).reshape(B, N, C)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return x + self.drop_path(self.ls(y))


class RegisterParallelScalingBlock(_ParallelBlock):
    """Drop-in for timm's ``ParallelScalingBlock`` (``vit_pwee``): its attention runs as register attention (with
    q_norm/k_norm in the op's prologue where the backend can), KV registers and statistics as in
    ``RegisterViTAttention``. Shapes: x (B, N, dim) -> (B, N, dim)."""

    timm_class_name = "ParallelScalingBlock"
    adopted = _ParallelBlock.block_modules + _ParallelBlock.block_tail

    def _attention(self, q, k, v, attn_mask) -> torch.Tensor:
        B, N, _ = q.shape
        shape = (B, N, self.num_heads, self.head_dim)
        return self._attend(q.view(shape), k.view(shape), v.view(shape), attn_mask)


class RegisterDiffParallelScalingBlock(_Differential, _ParallelBlock):
    """Drop-in for timm's ``DiffParallelScalingBlock`` (``vit_dpwee``): a parallel block whose attention is
    differential (see ``_Differential``). Shapes: x (B, N, dim) -> (B, N, dim)."""

    timm_class_name = "DiffParallelScalingBlock"
    adopted = _ParallelBlock.block_modules + _Differential.lambdas + ("sub_norm",) + _ParallelBlock.block_tail
    copied = _ParallelBlock.copied + ("attn_drop_p", "dual_lambda", "lambda_init")

    def set_lambda_init(self, depth: int) -> None:
        """As timm: lambda_init = 0.8 - 0.6 exp(-0.3 depth)."""
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)

    def _attention(self, q, k, v, attn_mask) -> torch.Tensor:
        B, N, C = q.shape
        H, hd = self.num_heads, self.head_dim
        return self._differential(
            q.reshape(B, N, 2 * H, hd), k.reshape(B, N, 2 * H, hd), v.reshape(B, N, H, 2 * hd), attn_mask
        )
