"""Application of test-time registers (Jiang et al., 2025, "Vision Transformers Don't Need Trained Registers").

In a trained ViT a few MLP neurons ("register neurons") fire strongly on a handful of low-information patch tokens
and write the large vectors that make those tokens the high-norm outliers. Test-time registers move that behaviour
into extra tokens without any training:

* ``find_register_neurons(model, images)`` finds the outlier patch tokens by their residual norm and ranks every
  MLP neuron (the hidden activation that the MLP's ``fc2`` consumes) by its mean |activation| at those positions.
* ``apply_test_time_registers(model, neurons, num=1)`` inserts ``num`` zero-initialised tokens right after the prefix
  tokens (CLS, trained registers) and, at each listed neuron, gives the extra tokens the neuron's maximum activation
  and zeros it on the patch tokens, for every batch element. ``handle.remove()`` restores the model exactly.

Works on timm ``VisionTransformer`` and ``Eva`` models (blocks with ``mlp.fc2``: timm ``Mlp``, ``GluMlp``,
``SwiGLU``), patched by ``regkern.patch_timm`` or not. Nothing here touches parameters: only forward hooks and the
prefix-token counts.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import torch
import torch.nn as nn

from ..patching import get_monitor, prefix_counters
from .detection import RegisterNeurons
from .model_structure import check_int, check_model, first_arg, hidden_size, prefix_tokens, with_first_arg

__all__ = ["TestTimeRegisters", "apply_test_time_registers", "NeuronSpec"]

_APPLIED = "_regkern_test_time_registers"

NeuronSpec = Union[RegisterNeurons, Mapping[int, Iterable[int]], Iterable[tuple[int, int]]]


def _prefix_counters(model: nn.Module) -> list[object]:
    """Everything inside ``model.blocks`` with an int ``num_prefix_tokens`` (regkern and timm attention modules: the
    layers that see the token sequence with the extra tokens), and the original timm modules that patched regkern
    modules keep for ``unpatch_timm`` (not submodules). Modules before the blocks (patch dropout) are left alone:
    the extra tokens are inserted after them."""
    return prefix_counters(model.blocks)


def _normalise_neurons(neurons, blocks: Sequence[nn.Module]) -> dict[int, tuple[int, ...]]:
    if isinstance(neurons, RegisterNeurons):
        items = list(neurons.neurons)
    elif isinstance(neurons, Mapping):
        items = []
        for layer, idx in neurons.items():
            if isinstance(idx, int) and not isinstance(idx, bool):
                idx = [idx]
            try:
                items += [(layer, n) for n in idx]
            except TypeError:
                raise ValueError(f"neurons: layer {layer!r} maps to {idx!r}, expected neuron indices") from None
    elif isinstance(neurons, (str, bytes, torch.Tensor)) or not isinstance(neurons, Iterable):
        raise ValueError(
            f"neurons: expected RegisterNeurons, {{layer: [neuron, ...]}} or (layer, neuron) pairs, "
            f"got {type(neurons).__name__}"
        )
    else:
        items = list(neurons)
    depth = len(blocks)
    out: dict[int, list[int]] = {}
    for item in items:
        try:
            layer, neuron = item
        except (TypeError, ValueError):
            raise ValueError(f"neurons: expected (layer, neuron) pairs, got {item!r}") from None
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, neuron))
        if not ok or not 0 <= layer < depth:
            raise ValueError(f"neurons: ({layer!r}, {neuron!r}): layer must be an int in [0, {depth - 1}]")
        size = hidden_size(blocks[layer])
        if neuron < 0 or (size is not None and neuron >= size):
            raise ValueError(
                f"neurons: ({layer}, {neuron}): neuron must be an int in [0, {size - 1 if size else '?'}]"
                f" (blocks[{layer}].mlp.fc2 consumes {size} hidden activations)"
            )
        if neuron not in out.setdefault(layer, []):
            out[layer].append(neuron)
    return {layer: tuple(sorted(idx)) for layer, idx in sorted(out.items())}


class TestTimeRegisters:
    """Handle returned by ``apply_test_time_registers``: ``remove()`` (or leaving a ``with`` block) undoes it.

    Attributes:
        model: the model.
        neurons: {layer: (neuron, ...)} edited.
        num: number of extra tokens.
        base_prefix_tokens: the model's prefix-token count before; the extra tokens are tokens
            ``base_prefix_tokens .. base_prefix_tokens + num - 1`` (``register_slice``).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, model: nn.Module, neurons: dict[int, tuple[int, ...]], num: int):
        self.model = model
        self.neurons = neurons
        self.num = num
        self.base_prefix_tokens = prefix_tokens(model)
        self.active = False
        self._handles = []
        self._counters: list[tuple[object, int]] = []
        self._index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        try:
            self._block_params = list(inspect.signature(model.blocks[0].forward).parameters)
        except (TypeError, ValueError):
            self._block_params = []

    @property
    def register_slice(self) -> slice:
        """Positions of the extra tokens in the sequence the blocks see."""
        return slice(self.base_prefix_tokens, self.base_prefix_tokens + self.num)

    # -------------------------------------------------------------------- install / remove

    def _install(self) -> None:
        model, blocks = self.model, list(self.model.blocks)
        had_attr = "num_prefix_tokens" in model.__dict__
        self._model_prefix = (had_attr, model.__dict__.get("num_prefix_tokens"))
        self._counters = [(obj, obj.num_prefix_tokens) for obj in _prefix_counters(model)]
        self._num_reg = model.__dict__.get("num_reg_tokens")
        try:
            self._handles.append(blocks[0].register_forward_pre_hook(self._insert_tokens, with_kwargs=True))
            for layer in self.neurons:
                self._handles.append(blocks[layer].mlp.fc2.register_forward_pre_hook(self._make_edit(layer)))
            if hasattr(model, "_pos_embed") and "_pos_embed" not in model.__dict__:
                self._wrap_pos_embed()
            model.num_prefix_tokens = self.base_prefix_tokens + self.num
            if isinstance(self._num_reg, int) and not isinstance(self._num_reg, bool):
                model.num_reg_tokens = self._num_reg + self.num
            for obj, value in self._counters:
                obj.num_prefix_tokens = value + self.num
        except BaseException:
            self.remove()
            raise
        object.__setattr__(model, _APPLIED, self)
        self.active = True

    def _wrap_pos_embed(self) -> None:
        """timm's ``_pos_embed`` reads ``num_prefix_tokens`` (resampling ``pos_embed`` with ``dynamic_img_size``):
        it must still see the model's own prefix count, as the extra tokens are inserted only after it."""
        model, base = self.model, self.base_prefix_tokens
        bound = model._pos_embed

        def _pos_embed(*args, **kwargs):
            current = model.num_prefix_tokens
            model.num_prefix_tokens = base
            try:
                return bound(*args, **kwargs)
            finally:
                model.num_prefix_tokens = current

        _pos_embed._regkern_ttr = self
        model.__dict__["_pos_embed"] = _pos_embed

    def remove(self) -> None:
        """Remove the hooks and restore every prefix count: the model is exactly as before (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        model = self.model
        wrapped = model.__dict__.get("_pos_embed")
        if getattr(wrapped, "_regkern_ttr", None) is self:
            del model.__dict__["_pos_embed"]
        if hasattr(self, "_model_prefix"):
            had_attr, value = self._model_prefix
            if had_attr:
                model.num_prefix_tokens = value
            else:
                model.__dict__.pop("num_prefix_tokens", None)
            if self._num_reg is not None:
                model.num_reg_tokens = self._num_reg
            for obj, value in self._counters:
                obj.num_prefix_tokens = value
            del self._model_prefix
        self._counters = []
        if model.__dict__.get(_APPLIED) is self:
            del model.__dict__[_APPLIED]
        self.active = False

    def __enter__(self) -> TestTimeRegisters:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        listed = ", ".join(f"{layer}: {list(idx)}" for layer, idx in self.neurons.items())
        return (
            f"TestTimeRegisters(num={self.num}, tokens {self.base_prefix_tokens}..."
            f"{self.base_prefix_tokens + self.num - 1}, neurons={{{listed}}}, active={self.active})"
        )

    # -------------------------------------------------------------------- hooks

    def _insert_tokens(self, module, args, kwargs):
        x = first_arg(args, kwargs)
        if self._masked(args, kwargs, "attn_mask") is not None or self._masked(args, kwargs, "is_causal"):
            raise ValueError(
                "attn_mask: test-time registers do not support attention masks or causal attention "
                "(the mask does not cover the extra tokens)"
            )
        if x.dim() != 3:
            raise ValueError(f"model: expected (B, N, C) tokens entering the first block, got {tuple(x.shape)}")
        P = self.base_prefix_tokens
        extra = x.new_zeros(x.shape[0], self.num, x.shape[2])
        return with_first_arg(args, kwargs, torch.cat([x[:, :P], extra, x[:, P:]], dim=1))

    def _masked(self, args, kwargs, name: str):
        """The block's ``name`` argument (``attn_mask`` / ``is_causal``), passed by keyword or position."""
        if name in kwargs:
            return kwargs[name]
        if name in self._block_params:
            pos = self._block_params.index(name)
            if pos < len(args):
                return args[pos]
        return None

    def _index(self, layer: int, device) -> torch.Tensor:
        key = (layer, device)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = self._index_cache[key] = torch.tensor(self.neurons[layer], dtype=torch.long, device=device)
        return idx

    def _make_edit(self, layer: int):
        def edit(module, args):
            h = args[0]
            P, R = self.base_prefix_tokens, self.num
            if h.dim() != 3 or h.shape[1] <= P + R:
                raise ValueError(
                    f"model: blocks[{layer}].mlp.fc2 expected a (B, N, hidden) activation with "
                    f"N > {P + R} tokens, got {tuple(h.shape)}"
                )
            idx = self._index(layer, h.device)
            h = h.clone()
            # per batch element and neuron: max over the extra tokens and the patch tokens (prefix tokens excluded)
            top = h[:, P:, idx].amax(dim=1, keepdim=True)  # (B, 1, k)
            h[:, P : P + R, idx] = top.expand(-1, R, -1)
            h[:, P + R :, idx] = 0
            return (h,) + tuple(args[1:])

        return edit


def apply_test_time_registers(model: nn.Module, neurons: NeuronSpec, num: int = 1) -> TestTimeRegisters:
    """Give ``model`` ``num`` test-time registers driven by the listed register neurons, in place (hooks only).

    ``num`` zero tokens are inserted right after the prefix tokens (CLS, trained registers) of the sequence entering
    the first block; ``model.num_prefix_tokens`` (and ``num_reg_tokens``), and the ``num_prefix_tokens`` of every
    module inside the blocks that has one (regkern and timm ``EvaAttention``/``AttentionRope``, so RoPE still
    rotates exactly the patches, and the original timm modules a patched model keeps for ``unpatch_timm``), grow by
    ``num`` while applied, so pooling, ``forward_head`` and ``forward_intermediates`` skip the extra tokens and the
    output shapes are unchanged.

    At each listed neuron (the hidden activation that ``blocks[layer].mlp.fc2`` consumes), per batch element: every
    extra token gets the neuron's maximum over the extra tokens and the patch tokens, and the patch tokens get 0.
    CLS and trained registers are left as they are. (The paper's code edits batch element 0 only and takes the max
    over all tokens; including the extra tokens themselves keeps a register's own activation where an earlier listed
    neuron already turned it into the outlier.)

    Args:
        model: a timm ``VisionTransformer``/``Eva``, patched by ``regkern.patch_timm`` or not. Patch (or unpatch)
            before applying: attention modules created while applied do not know about the extra tokens.
        neurons: ``RegisterNeurons`` from ``find_register_neurons``, ``{layer: [neuron, ...]}``, or (layer, neuron)
            pairs. May be empty (then the extra tokens are plain zero tokens).
        num: how many extra tokens (int >= 1).

    Returns:
        A ``TestTimeRegisters`` handle; ``handle.remove()`` (or ``with apply_test_time_registers(...):``) restores the
        model exactly. Forwards with an ``attn_mask`` raise while applied.

    Raises:
        ValueError: ``num`` or ``neurons`` invalid (out-of-range layer/neuron), or test-time registers already
            applied to ``model``.
    """
    blocks = check_model(model)
    check_int(num, "num", 1)
    spec = _normalise_neurons(neurons, blocks)
    current = model.__dict__.get(_APPLIED)
    if current is not None and current.active:
        raise ValueError("model: test-time registers are already applied; remove() them first")
    if get_monitor(model) is not None:
        warnings.warn(
            "regkern.apply_test_time_registers: the model's NormMonitor counts prefix tokens as they were "
            "when it was attached, so it reports the extra tokens as patches",
            stacklevel=2,
        )
    handle = TestTimeRegisters(model, spec, num)
    handle._install()
    return handle
