"""``MonitoredLayerNorm``: a drop-in for a ViT block's ``norm1`` that also observes the residual stream's token norms.

The LayerNorm before attention reads every token of the residual stream anyway, so the fused kernel
(``regkern.ops.layer_norm``) records each token's input L2 norm in the same pass, where high-norm artifacts
show, at no extra read of x. The norms go to ``module.norm_sink(norms)`` when a sink is set; the module's output
is LayerNorm's, unchanged. With ``norm_accumulators`` set (what ``regkern.NormMonitor`` does), the same pass also
reduces the norms per token group into the monitor's device buffers (``regkern.ops.layer_norm.layer_norm_monitored``).

The LayerNorm backend is chosen once, at construction and again whenever the module moves (``.to()``, ``.cuda()``,
``.half()``), never inside forward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..ops.layer_norm import (
    DISPATCHER,
    NormAccumulators,
    apply_layer_norm_monitored,
    check_layer_norm_backend_name,
    layer_norm_fwd,
    layer_norm_request,
)

__all__ = ["MonitoredLayerNorm"]


def _is_timm_layer_norm(module: nn.Module) -> bool:
    # lazy import of timm: importing regkern does not import timm
    try:
        from timm.layers import LayerNorm as TimmLayerNorm
    except ImportError:
        return False
    return type(module) is TimmLayerNorm


class MonitoredLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim that hands each token's input L2 norm to ``norm_sink``.

    Same constructor, parameters (``weight``, ``bias``) and state_dict as ``nn.LayerNorm`` (and timm's LayerNorm),
    so state_dicts load with ``strict=True`` in both directions. regkern-only:

    Args:
        backend: None / "auto" ("triton" for CUDA parameters, else "reference"), "triton" (CUDA, or CPU under
            TRITON_INTERPRET=1) or "reference". An explicit backend that cannot run on the module's device/dtype
            leaves the module constructible (e.g. on the CPU before ``.cuda()``); calling it raises the reasons.

    Attributes:
        norm_sink: None (default) or a callable; ``forward(x)`` then calls ``norm_sink(norms)`` with the float32
            norms ``||x[..., :]||_2`` of shape x.shape[:-1], computed in the same pass (no host sync).
        norm_accumulators: None (default) or a ``regkern.ops.layer_norm.NormAccumulators``; x must then be
            (B, N, C), and each forward adds its token-norm statistics per group (CLS, registers, patches) to them in
            the same pass (on "triton", inside the kernel).
        group_norm_sink: None or a callable; with ``norm_accumulators`` set, ``forward`` calls
            ``group_norm_sink(candidates, prefix_norms, patch_norms, N, B)``: the top-k candidates (int64 packed keys,
            ``reference.patch_norm_keys``), the (B, P) and (B, N - P) float32 norms ((0,) unless
            ``norm_accumulators.write_norms``), the tokens per image and the images in the batch.
        backend_name, backend_reason: the backend forward runs and why.

    Shapes: ``forward(x)`` takes x (..., C) and returns y of x's shape and dtype.
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype
        )
        self._setup(backend, device, dtype)

    @staticmethod
    def check_convertible(ln: object, name: str = "ln") -> None:
        """TypeError naming ``name`` unless ``ln`` is a ``torch.nn.LayerNorm`` or ``timm.layers.LayerNorm``."""
        if not (type(ln) is nn.LayerNorm or _is_timm_layer_norm(ln)):
            raise TypeError(
                f"{name}: expected a torch.nn.LayerNorm or timm.layers.LayerNorm, "
                f"got {type(ln).__module__}.{type(ln).__name__}"
            )

    @classmethod
    def from_layer_norm(cls, ln: nn.Module, *, backend: Optional[str] = None) -> MonitoredLayerNorm:
        """Build from a ``torch.nn.LayerNorm`` or ``timm.layers.LayerNorm``, reusing its Parameter objects."""
        cls.check_convertible(ln)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.elementwise_affine = ln.elementwise_affine
        # the same Parameter objects (or None), registered under the same names
        self.register_parameter("weight", ln.weight)
        self.register_parameter("bias", ln.bias)
        self.train(ln.training)
        p = ln.weight if ln.weight is not None else ln.bias
        self._setup(backend, None if p is None else p.device, None if p is None else p.dtype)
        return self

    def _setup(self, backend: Optional[str], device, dtype) -> None:
        if len(self.normalized_shape) != 1:
            raise ValueError(
                f"normalized_shape: MonitoredLayerNorm normalises over the last dim only; expected an "
                f"int or a 1-tuple, got {tuple(self.normalized_shape)}"
            )
        check_layer_norm_backend_name(backend)  # unknown names fail now, not on .cuda()
        self.requested_backend = backend
        self.norm_sink: Optional[Callable[[torch.Tensor], object]] = None
        self.norm_accumulators: Optional[NormAccumulators] = None
        self.group_norm_sink: Optional[Callable[..., object]] = None
        # a module without parameters has no device to follow: the constructor's device/dtype (default CPU)
        self._default_device = torch.device(device if device is not None else "cpu")
        self._default_dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._choose_backend()

    def _choose_backend(self) -> None:
        """The one place the backend is chosen (construction, ``.to()``, ``set_backend``)."""
        p = self.weight if self.weight is not None else self.bias
        device = p.device if p is not None else self._default_device
        dtype = p.dtype if p is not None else self._default_dtype
        request = layer_norm_request(device.type, dtype, self.normalized_shape[0], device)
        self._backend_choice = DISPATCHER.resolve_or_unavailable(self.requested_backend, request)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._choose_backend()  # device or dtype may have changed
        return result

    def set_backend(self, backend: Optional[str]) -> None:
        """Choose another backend (None / "auto", "triton", "cuda", "reference"); decided now, not in
        forward."""
        check_layer_norm_backend_name(backend)  # unknown names raise here
        self.requested_backend = backend
        self._choose_backend()

    @property
    def backend_name(self) -> str:
        """Name of the backend this module runs ("triton", "cuda", "reference", or "<name> (unavailable)")."""
        return self._backend_choice.name

    @property
    def backend_reason(self) -> str:
        """Why this backend was chosen, in words."""
        return self._backend_choice.reason

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._backend_choice.available:
            raise RuntimeError(self._backend_choice.backend.message)
        if x.dim() == 0 or x.shape[-1] != self.normalized_shape[0]:
            raise ValueError(
                f"x: expected a last dim of {self.normalized_shape[0]} (normalized_shape), got shape {tuple(x.shape)}"
            )
        if self.norm_accumulators is not None:
            acc = self.norm_accumulators
            acc.check(x)
            if self.norm_sink is not None and not acc.write_norms:
                raise ValueError("norm_sink: needs the per-token norms; set norm_accumulators.write_norms")
            y, prefix_norms, patch_norms, candidates = apply_layer_norm_monitored(
                x, self.weight, self.bias, float(self.eps), acc, self._backend_choice.name
            )
            if self.group_norm_sink is not None:
                self.group_norm_sink(candidates, prefix_norms, patch_norms, x.shape[1], x.shape[0])
            if self.norm_sink is not None:
                self.norm_sink(torch.cat((prefix_norms, patch_norms), dim=1))
            return y
        y, norms, _, _ = layer_norm_fwd(x, self.weight, self.bias, float(self.eps), self._backend_choice.name)
        if self.norm_sink is not None:
            self.norm_sink(norms)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend_name!r}"
