"""Drop-in attention modules for timm ViTs. They hold parameters only; the math lives in the ops.

``RegisterViTAttention`` replaces ``timm.layers.Attention`` and ``RegisterEvaAttention`` replaces
``timm.models.eva.EvaAttention`` (RoPE on patch tokens: DINOv3, ``vit_*_rope_reg*``). Both keep timm's parameter
and buffer names and shapes, so state_dicts load with ``strict=True`` in both directions, and both can be built
from an existing timm module reusing its Parameter objects (``from_timm``).

The attention backend is chosen once, at construction and again whenever the module moves (``.to()``,
``.cuda()``, ``.half()``), never inside forward.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import DISPATCHER, AttentionRequest, check_attention_inputs, is_key_mask, run_attention
from ..ops.dispatch import BackendChoice, device_capability
from ..reference import apply_rope

__all__ = ["RegisterAttentionBase", "RegisterViTAttention", "RegisterEvaAttention"]


def causal_mask(attn_mask: Optional[torch.Tensor], is_causal: bool, n: int, device) -> Optional[torch.Tensor]:
    if not is_causal:
        return attn_mask
    if attn_mask is not None:
        raise ValueError("attn_mask: must be None when is_causal=True (as in scaled_dot_product_attention)")
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class RegisterAttentionBase(nn.Module):
    """Backend choice, monitoring hooks and KV-register parameters shared by the drop-in modules.

    One code path chooses the backend: ``_choose_backend()``, called at construction, by ``.to()`` / ``.cuda()`` /
    ``.half()`` (``_apply``), ``set_backend``, ``set_monitoring``, ``set_expected_seq_len`` and
    ``add_kv_registers``. It reads the module's state (requested backend, monitoring statistics, expected sequence
    length, parameters' device and dtype) and never changes it."""

    num_heads: int
    head_dim: int
    #: RoPE layout of the module (Eva); plain ViT attention has no RoPE
    uses_rope: bool = False
    rotate_half: bool = False
    #: whether the module can hand attention statistics to a monitor (``set_monitoring``)
    supports_statistics: bool = True

    @property
    def kernel_head_dim(self) -> int:
        """Head dim of the attention calls this module makes (what the backend is chosen for)."""
        return self.head_dim

    def _setup_registers_and_backend(
        self, num_kv_registers: int, num_prefix_tokens: int, backend: Optional[str], device=None, dtype=None
    ) -> None:
        if isinstance(num_kv_registers, bool) or not isinstance(num_kv_registers, int) or num_kv_registers < 0:
            raise ValueError(f"num_kv_registers: expected an int >= 0, got {num_kv_registers!r}")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens: expected an int >= 0, got {num_prefix_tokens!r}")
        if num_kv_registers and not self.supports_kv_registers:
            raise ValueError(f"num_kv_registers: {type(self).__name__} takes no KV registers ({self.limits_reason})")
        self.num_prefix_tokens = num_prefix_tokens
        self.num_kv_registers = num_kv_registers
        if num_kv_registers:
            shape = (num_kv_registers, self.num_heads, self.head_dim)
            self.reg_k = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            self.reg_v = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            self.reset_kv_registers()
        else:
            # no parameter, no state_dict key, no cost
            self.register_parameter("reg_k", None)
            self.register_parameter("reg_v", None)
        DISPATCHER.check_name(backend)  # unknown names (argument or $REGKERN_BACKEND) fail now, not at forward
        self.requested_backend = backend
        # sequence length the model runs at, when fixed (patch_timm sets it): keys the measured dispatch table
        self.expected_seq_len = None
        # statistics requested by a NormMonitor and where they go; () / None = plain attention
        self.monitor_stats = ()
        self.stats_sink = None
        self._choose_backend()

    @classmethod
    def _adopt(cls, attn: nn.Module, expected: type, projections: tuple):
        """A new instance holding ``attn``'s submodules (the same objects, in timm's registration order)."""
        if type(attn) is not expected:
            raise TypeError(
                f"attn: expected a {expected.__module__}.{expected.__name__}, "
                f"got {type(attn).__module__}.{type(attn).__name__}"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.num_heads = attn.num_heads
        # timm 1.0.20's EvaAttention does not store head_dim: the output projection reads the heads' concatenation
        self.head_dim = getattr(attn, "head_dim", None) or attn.proj.in_features // attn.num_heads
        self.attn_dim = attn.num_heads * self.head_dim
        self.scale = attn.scale
        self.fused_attn = True
        for name in projections + ("q_norm", "k_norm", "attn_drop", "norm"):
            setattr(self, name, getattr(attn, name))
        self.gate = getattr(attn, "gate", None)  # timm >= 1.0.21
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.train(attn.training)
        return self

    #: why ``supports_statistics`` / ``supports_kv_registers`` is False, in words
    limits_reason: str = ""
    supports_kv_registers: bool = True

    def add_kv_registers(self, num: int, std: float = 0.02) -> None:
        """Give a module without KV-only registers ``num`` of them (parameters ``reg_k``/``reg_v``, (num, H, d),
        truncated normal init on the module's device and dtype). Re-chooses the backend once."""
        if not self.supports_kv_registers:
            raise ValueError(f"num: {type(self).__name__} takes no KV registers ({self.limits_reason})")
        if self.reg_k is not None:
            raise ValueError(f"module: already has {self.num_kv_registers} KV registers (add them once)")
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num: expected an int >= 1, got {num!r}")
        p = self._reference_param()
        shape = (num, self.num_heads, self.head_dim)
        self.reg_k = nn.Parameter(torch.empty(shape, device=p.device, dtype=p.dtype))
        self.reg_v = nn.Parameter(torch.empty(shape, device=p.device, dtype=p.dtype))
        self.num_kv_registers = num
        self.reset_kv_registers(std)
        self._choose_backend()

    def reset_kv_registers(self, std: float = 0.02) -> None:
        """Re-initialise the KV-only registers (truncated normal, like timm's token init)."""
        if self.reg_k is not None:
            with torch.no_grad():
                nn.init.trunc_normal_(self.reg_k, std=std)
                nn.init.trunc_normal_(self.reg_v, std=std)

    def _reference_param(self) -> torch.Tensor:
        for p in self.parameters():
            return p
        for b in self.buffers():
            return b
        return torch.empty(0)

    def _resolve(self, request: AttentionRequest) -> BackendChoice:
        return DISPATCHER.resolve_or_unavailable(self.requested_backend, request)

    def _choose_backend(self) -> None:
        p = self._reference_param()
        dropout = float(self.attn_drop.p) > 0
        request = AttentionRequest(
            p.device.type,
            p.dtype,
            self.kernel_head_dim,
            frozenset(self.monitor_stats),
            False,
            dropout,
            capability=device_capability(p.device),
            seq_len=self.expected_seq_len,
        )
        self._backend_choice = self._resolve(request)
        self._attention_backend = self._backend_choice.backend
        # calls with an attn_mask use the first backend that supports masks (identical semantics); key masks
        # (broadcastable to (B, 1, 1, N): padding) are a feature of their own, which the fused kernels have
        self._masked_backend_choice = self._resolve(replace(request, has_mask=True))
        self._masked_attention_backend = self._masked_backend_choice.backend
        self._key_masked_backend_choice = self._resolve(replace(request, has_mask=True, key_mask=True))
        self._key_masked_attention_backend = self._key_masked_backend_choice.backend
        self._fuse_prologue, self.prologue_reason = self._prologue_fusion()

    def _prologue_fusion(self):
        """Whether q_norm/k_norm and RoPE run inside the attention op (its prologue pre-pass), and why (not)."""
        if not getattr(self._attention_backend, "fuses_qk_prologue", False):
            return False, f"backend {self.backend_name!r} runs q_norm/k_norm/RoPE as separate PyTorch ops"
        norms = (self.q_norm, self.k_norm)
        rope = " and RoPE" if self.uses_rope else ""
        if all(isinstance(n, nn.Identity) for n in norms):
            return (
                True,
                "no q_norm/k_norm; RoPE inside the attention op (its prologue pre-pass)"
                if rope
                else "no q_norm/k_norm",
            )
        if all(_is_plain_layer_norm(n, self.head_dim) for n in norms) and self.q_norm.eps == self.k_norm.eps:
            return True, f"q_norm/k_norm (LayerNorm){rope} inside the attention op (its prologue pre-pass)"
        return False, (
            f"q_norm/k_norm of type {type(self.q_norm).__name__} cannot be fused; they run as separate PyTorch ops"
        )

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._choose_backend()  # device or dtype may have changed
        return result

    @property
    def backend_name(self) -> str:
        """Name of the backend this module runs."""
        return self._backend_choice.name

    @property
    def backend_reason(self) -> str:
        """Why this backend was chosen, in words."""
        return self._backend_choice.reason

    def set_monitoring(self, stats=(), sink=None) -> None:
        """Request attention statistics (names from ``reference.STAT_NAMES``) on every call and hand them, as an
        ``AttentionStats``, to ``sink(stats)``; ``set_monitoring()`` turns it off. Re-chooses the backend once."""
        stats = tuple(stats)
        if stats and not self.supports_statistics:
            raise ValueError(f"stats: {type(self).__name__} cannot report attention statistics ({self.limits_reason})")
        if bool(stats) != (sink is not None):
            raise ValueError("sink: statistics and a sink go together (both given or both empty)")
        if "prefix_rows" in stats and self.num_prefix_tokens == 0:
            raise ValueError("stats: 'prefix_rows' needs num_prefix_tokens >= 1 (the model has no CLS/registers)")
        self.monitor_stats, self.stats_sink = stats, sink
        self._choose_backend()

    def set_expected_seq_len(self, seq_len: Optional[int]) -> None:
        """The sequence length N this layer runs at (None: varies); auto consults the dispatch table with it.
        Re-chooses the backend once."""
        if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"seq_len: expected None or an int >= 1, got {seq_len!r}")
        self.expected_seq_len = seq_len
        self._choose_backend()

    def set_backend(self, backend: Optional[str]) -> None:
        """Choose another backend ("auto", "triton", "cuda", "torch", "reference"); decided now, not in forward.
        Monitoring (``set_monitoring``) and the expected sequence length are kept."""
        DISPATCHER.check_name(backend)  # unknown names (argument or $REGKERN_BACKEND) fail now, not at forward
        self.requested_backend = backend
        self._choose_backend()

    @property
    def masked_backend_name(self) -> str:
        """Name of the backend used for calls that pass an ``attn_mask`` varying over queries or heads."""
        return self._masked_backend_choice.name

    @property
    def masked_backend_reason(self) -> str:
        """Why calls with such an ``attn_mask`` run on ``masked_backend_name``, in words."""
        return self._masked_backend_choice.reason

    @property
    def key_masked_backend_name(self) -> str:
        """Name of the backend used for calls whose ``attn_mask`` is a key mask (broadcastable to (B, 1, 1, N))."""
        return self._key_masked_backend_choice.name

    def _backend_for(self, attn_mask):
        """The backend chosen (before any call) for a call with this ``attn_mask``: none, a key mask, or another
        mask; decided from the mask's shape alone, so the same call always takes the same path."""
        if attn_mask is None:
            return self._attention_backend
        return self._key_masked_attention_backend if is_key_mask(attn_mask) else self._masked_attention_backend

    def _attend(self, q, k, v, attn_mask, rope=None):
        """q, k, v (B, N, H, d) straight from the projection -> out (B, N, H, d): q_norm/k_norm and RoPE (on tokens
        >= num_prefix_tokens), then register attention; the first two inside the attention op when it can."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        stats = self.monitor_stats if attn_mask is None else ()
        key_mask = attn_mask is not None and is_key_mask(attn_mask)  # from the shape: the same path every call
        backend = self._backend_for(attn_mask)
        if (attn_mask is None or (key_mask and backend is self._attention_backend)) and self._fuse_prologue:
            check_attention_inputs(
                q, k, v, self.reg_k, self.reg_v, self.scale, stats, self.num_prefix_tokens, attn_mask, dropout_p
            )
            qk_norm = not isinstance(self.q_norm, nn.Identity)
            result = self._attention_backend.attention_with_prologue(
                q,
                k,
                v,
                self.reg_k,
                self.reg_v,
                scale=self.scale,
                num_prefix=self.num_prefix_tokens,
                q_norm=(self.q_norm.weight, self.q_norm.bias) if qk_norm else None,
                k_norm=(self.k_norm.weight, self.k_norm.bias) if qk_norm else None,
                norm_eps=self.q_norm.eps if qk_norm else 0.0,
                rope=rope,
                rotate_half=self.rotate_half,
                return_stats=stats,
                attn_mask=attn_mask,
            )
        else:
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q = apply_rope(q, rope, self.num_prefix_tokens, rotate_half=self.rotate_half).type_as(v)
                k = apply_rope(k, rope, self.num_prefix_tokens, rotate_half=self.rotate_half).type_as(v)
            result = run_attention(
                backend,
                q,
                k,
                v,
                self.reg_k,
                self.reg_v,
                scale=self.scale,
                num_prefix=self.num_prefix_tokens,
                return_stats=stats,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
            )
        if not stats:
            return result
        out, attention_stats = result
        self.stats_sink(attention_stats)
        return out

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_prefix_tokens={self.num_prefix_tokens}, "
            f"num_kv_registers={self.num_kv_registers}, backend={self.backend_name!r}"
        )


def _is_plain_layer_norm(module: nn.Module, size: int) -> bool:
    # torch's LayerNorm or timm's (same math) over the head dim; subclasses with other forwards are not fused
    plain = type(module) is nn.LayerNorm or (
        type(module).__name__ == "LayerNorm" and type(module).__module__.startswith("timm.layers")
    )
    return plain and tuple(module.normalized_shape) == (size,)


def _norm_or_identity(enabled: bool, norm_layer, size: int, dd) -> nn.Module:
    return (norm_layer or nn.LayerNorm)(size, **dd) if enabled else nn.Identity()


class RegisterViTAttention(RegisterAttentionBase):
    """Drop-in for ``timm.layers.Attention`` running regkern's register attention.

    Same constructor arguments as timm (1.0.20 and newer; pass them by keyword, as timm does), same parameter names,
    same forward signature and result. regkern-only options:

    Args:
        num_kv_registers: R learnable KV-only registers, parameters ``reg_k``/``reg_v`` of shape (R, H, d); they are
            extra keys/values, not tokens. 0 (default) adds no parameter and no cost.
        num_prefix_tokens: leading tokens that are CLS/registers (used by statistics; ``patch_timm`` sets it).
        backend: "auto" (default: $REGKERN_BACKEND or auto), "torch", "reference", ...

    Shapes: ``forward(x)`` takes x (B, N, dim) and returns (B, N, dim_out).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[type[nn.Module]] = None,
        device=None,
        dtype=None,
        num_kv_registers: int = 0,
        num_prefix_tokens: int = 0,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if attn_head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
            attn_head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = _norm_or_identity(qk_norm, norm_layer, attn_head_dim, dd)
        self.k_norm = _norm_or_identity(qk_norm, norm_layer, attn_head_dim, dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = _norm_or_identity(scale_norm, norm_layer, self.attn_dim, dd)
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._setup_registers_and_backend(num_kv_registers, num_prefix_tokens, backend, **dd)

    @classmethod
    def from_timm(
        cls,
        attn: nn.Module,
        *,
        num_kv_registers: int = 0,
        num_prefix_tokens: int = 0,
        backend: Optional[str] = None,
    ) -> RegisterViTAttention:
        """Build from a ``timm.layers.Attention``, reusing its submodules and Parameter objects (no copies)."""
        # lazy import of timm: importing regkern does not import timm
        from timm.layers import Attention

        self = cls._adopt(attn, Attention, ("qkv",))
        p = attn.qkv.weight
        self._setup_registers_and_backend(num_kv_registers, num_prefix_tokens, backend, device=p.device, dtype=p.dtype)
        return self

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """x (B, N, dim) -> (B, N, dim_out). ``attn_mask``: bool/additive, broadcastable to (B, H, N, N)."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        attn_mask = causal_mask(attn_mask, is_causal, N, x.device)
        x = self._attend(q, k, v, attn_mask).view(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


class RegisterEvaAttention(RegisterAttentionBase):
    """Drop-in for ``timm.models.eva.EvaAttention``: RoPE on patch tokens only (prefix tokens are not rotated).

    Same constructor arguments, parameters (``qkv``, ``q_bias``, ``v_bias``, non-persistent buffer ``k_bias``, or
    ``q_proj``/``k_proj``/``v_proj``) and forward ``(x, rope=None, attn_mask=None, is_causal=False)`` as timm.
    regkern-only options as in ``RegisterViTAttention``. x (B, N, dim) -> (B, N, dim); ``rope`` is timm's
    concatenated [sin, cos] table broadcastable to (B, H, N - num_prefix_tokens, 2 * head_dim).
    """

    uses_rope = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        qkv_fused: bool = True,
        qkv_bias_separate: bool = False,
        num_prefix_tokens: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_head_dim: Optional[int] = None,
        norm_layer: Optional[type[nn.Module]] = None,
        qk_norm: bool = False,
        scale_norm: bool = True,
        rotate_half: bool = False,
        gated: bool = False,
        device=None,
        dtype=None,
        num_kv_registers: int = 0,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = attn_head_dim if attn_head_dim is not None else dim // num_heads
        attn_dim = self.head_dim * num_heads
        self.attn_dim = attn_dim
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.qkv_bias_separate = qkv_bias_separate
        self.rotate_half = rotate_half
        if qkv_fused:
            self.qkv = nn.Linear(dim, attn_dim * 3, bias=False, **dd)
            self.q_proj = self.k_proj = self.v_proj = None
            if qkv_bias:
                self.q_bias = nn.Parameter(torch.zeros(attn_dim, **dd))
                self.register_buffer("k_bias", torch.zeros(attn_dim, **dd), persistent=False)
                self.v_bias = nn.Parameter(torch.zeros(attn_dim, **dd))
            else:
                self.q_bias = self.k_bias = self.v_bias = None
        else:
            self.q_proj = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd)
            self.k_proj = nn.Linear(dim, attn_dim, bias=False, **dd)
            self.v_proj = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd)
            self.qkv = None
            self.q_bias = self.k_bias = self.v_bias = None
        self.q_norm = _norm_or_identity(qk_norm, norm_layer, self.head_dim, dd)
        self.k_norm = _norm_or_identity(qk_norm, norm_layer, self.head_dim, dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = _norm_or_identity(scale_norm, norm_layer, attn_dim, dd)
        self.gate = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._setup_registers_and_backend(num_kv_registers, num_prefix_tokens, backend, **dd)

    def init_non_persistent_buffers(self) -> None:
        """As timm: fill the non-persistent ``k_bias`` buffer (zeros) after materialising from meta."""
        if self.k_bias is not None:
            self.k_bias.zero_()

    @classmethod
    def from_timm(
        cls, attn: nn.Module, *, num_kv_registers: int = 0, backend: Optional[str] = None
    ) -> RegisterEvaAttention:
        """Build from a ``timm.models.eva.EvaAttention``, reusing its submodules, Parameters and buffers."""
        # lazy import of timm: importing regkern does not import timm
        from timm.models.eva import EvaAttention

        self = cls._adopt(attn, EvaAttention, ("qkv", "q_proj", "k_proj", "v_proj"))
        self.qkv_bias_separate = attn.qkv_bias_separate
        self.rotate_half = getattr(attn, "rotate_half", False)
        # Parameters and buffers owned by the timm module itself: register the same tensor objects
        for name in ("q_bias", "v_bias"):
            setattr(self, name, getattr(attn, name))
        if attn.k_bias is None:
            self.k_bias = None
        else:
            self.register_buffer("k_bias", attn.k_bias, persistent=False)
        p = next(attn.parameters())
        self._setup_registers_and_backend(
            num_kv_registers, attn.num_prefix_tokens, backend, device=p.device, dtype=p.dtype
        )
        return self

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        H = self.num_heads
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                if self.qkv_bias_separate:
                    qkv = self.qkv(x)
                    qkv += qkv_bias
                else:
                    qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
            q, k, v = qkv.reshape(B, N, 3, H, self.head_dim).unbind(2)
        else:
            q = self.q_proj(x).reshape(B, N, H, self.head_dim)
            k = self.k_proj(x).reshape(B, N, H, self.head_dim)
            v = self.v_proj(x).reshape(B, N, H, self.head_dim)
        attn_mask = causal_mask(attn_mask, is_causal, N, x.device)
        x = self._attend(q, k, v, attn_mask, rope).view(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)
