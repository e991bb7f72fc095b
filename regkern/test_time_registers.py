"""Test-time registers (Jiang et al., 2025, "Vision Transformers Don't Need Trained Registers").

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
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .patching import get_monitor, prefix_counters

__all__ = ["RegisterNeurons", "TestTimeRegisters", "find_register_neurons", "apply_test_time_registers"]

_APPLIED = "_regkern_test_time_registers"

NeuronSpec = Union["RegisterNeurons", Mapping[int, Iterable[int]], Iterable[Tuple[int, int]]]


# ------------------------------------------------------------------------------------------------ model structure


def _check_model(model) -> List[nn.Module]:
    """The model's blocks, each checked to have ``mlp.fc2`` (ValueError/TypeError naming ``model`` otherwise)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a timm ViT), got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module) or not len(blocks):
        raise ValueError(f"model: {type(model).__name__} has no non-empty `blocks`; expected a timm ViT/Eva")
    for i, block in enumerate(blocks):
        fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
        if not isinstance(fc2, nn.Module):
            raise ValueError(f"model: blocks[{i}] has no `mlp.fc2` (supported MLPs: timm Mlp, GluMlp, SwiGLU)")
    return list(blocks)


def _hidden_size(block: nn.Module) -> Optional[int]:
    fc2 = block.mlp.fc2
    size = getattr(fc2, "in_features", None)
    if size is None and isinstance(getattr(fc2, "weight", None), torch.Tensor) and fc2.weight.dim() == 2:
        size = fc2.weight.shape[1]
    return int(size) if size is not None else None


def _prefix_tokens(model: nn.Module) -> int:
    value = getattr(model, "num_prefix_tokens", 0) or 0
    return int(value)


def _first_arg(args, kwargs, name: str = "x"):
    return args[0] if args else kwargs[name]


def _with_first_arg(args, kwargs, value, name: str = "x"):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs[name] = value
    return args, kwargs


def _prefix_counters(model: nn.Module) -> List[object]:
    """Everything inside ``model.blocks`` with an int ``num_prefix_tokens`` (regkern and timm attention modules: the
    layers that see the token sequence with the extra tokens), and the original timm modules that patched regkern
    modules keep for ``unpatch_timm`` (not submodules). Modules before the blocks (patch dropout) are left alone:
    the extra tokens are inserted after them."""
    return prefix_counters(model.blocks)


class _StopForward(Exception):
    """Raised by a hook to end a forward early once everything needed was captured."""


# ------------------------------------------------------------------------------------------------ detection


@dataclass
class RegisterNeurons:
    """What ``find_register_neurons`` returns.

    neurons: the top (layer, neuron) pairs, best first; ``neuron`` indexes the hidden activation that the block's
        ``mlp.fc2`` consumes.
    scores: their scores: mean |activation| over the outlier positions of an image, averaged over the images that
        have outliers.
    outlier_positions: every outlier found, as (image index, token index); token indices count the prefix tokens.
    outlier_factor, num_images, max_layer: the settings and how many images were run.
    images_with_outliers: how many images had at least one outlier; num_prefix_tokens: the model's prefix count.
    """

    neurons: List[Tuple[int, int]]
    scores: List[float]
    outlier_positions: List[Tuple[int, int]]
    outlier_factor: float
    num_images: int
    max_layer: int
    images_with_outliers: int = 0
    num_prefix_tokens: int = 0

    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self):
        return iter(self.neurons)

    def by_layer(self) -> Dict[int, List[int]]:
        """{layer: [neuron, ...]} (what ``apply_test_time_registers`` uses)."""
        out: Dict[int, List[int]] = {}
        for layer, neuron in self.neurons:
            out.setdefault(layer, []).append(neuron)
        return out

    def to_dict(self) -> Dict[str, object]:
        return {
            "neurons": [[int(l), int(n)] for l, n in self.neurons],
            "scores": [float(s) for s in self.scores],
            "outlier_positions": [[int(b), int(t)] for b, t in self.outlier_positions],
            "outlier_factor": float(self.outlier_factor),
            "num_images": int(self.num_images),
            "images_with_outliers": int(self.images_with_outliers),
            "max_layer": int(self.max_layer),
            "num_prefix_tokens": int(self.num_prefix_tokens),
        }

    def __str__(self) -> str:
        lines = [f"register neurons (outliers: patch norm > {self.outlier_factor:g} x median patch norm entering the "
                 f"last block; {len(self.outlier_positions)} in {self.images_with_outliers}/{self.num_images} images)"]
        lines += [f"  layer {l:>3}  neuron {n:>6}  score {s:.4g}" for (l, n), s in zip(self.neurons, self.scores)]
        return "\n".join(lines)


def _check_int(value, name: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an int {bound}, got {value!r}")
    return value


def _set_eval(model: nn.Module) -> Dict[nn.Module, bool]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    return modes


def _restore_modes(modes: Dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


@torch.no_grad()
def find_register_neurons(
    model: nn.Module,
    images: torch.Tensor,
    *,
    top_k: int = 10,
    max_layer: Optional[int] = None,
    outlier_factor: float = 10.0,
    batch_size: Optional[int] = None,
) -> RegisterNeurons:
    """Find the MLP neurons that create the high-norm outlier tokens of a ViT.

    Outliers are patch tokens whose residual-stream norm entering the last block exceeds ``outlier_factor`` x the
    median patch-token norm of their image. Every neuron of blocks ``0 .. max_layer`` (the hidden activation that
    ``mlp.fc2`` consumes) is scored by its mean |activation| over an image's outlier positions, averaged over the
    images that have outliers (as the paper's code does); the ``top_k`` best (layer, neuron) pairs are returned.

    Args:
        model: a timm ``VisionTransformer``/``Eva`` (patched by ``regkern.patch_timm`` or not). Run in eval mode
            (dropout off) whatever its mode; the modes are restored afterwards.
        images: (B, C, H, W) images, preprocessed as the model expects; moved to the model's device and dtype.
        top_k: how many (layer, neuron) pairs to return (fewer if the model has fewer neurons).
        max_layer: last block whose neurons are scored (inclusive; negative counts from the end); default all.
        outlier_factor: a patch token is an outlier above this multiple of its image's median patch norm (> 1).
        batch_size: run the images in chunks of this many (default: all at once).

    Two forward passes per chunk: one up to the last block to find the outliers, one up to ``max_layer``'s MLP
    to score the neurons there (only the activations at outlier positions are kept).

    Raises:
        ValueError: bad arguments (the message names the argument), or no outlier in any image (lower
            ``outlier_factor`` or give more images).
    """
    blocks = _check_model(model)
    depth = len(blocks)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a (B, C, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images: expected at least one image, got an empty batch")
    _check_int(top_k, "top_k", 1)
    if max_layer is None:
        max_layer = depth - 1
    else:
        _check_int(max_layer, "max_layer", -depth, depth - 1)
        max_layer %= depth
    if isinstance(outlier_factor, bool) or not isinstance(outlier_factor, (int, float)) or not outlier_factor > 1:
        raise ValueError(f"outlier_factor: expected a number > 1, got {outlier_factor!r}")
    if batch_size is not None:
        _check_int(batch_size, "batch_size", 1)
    hidden = [_hidden_size(b) for b in blocks[: max_layer + 1]]

    ref = next(iter(model.parameters()), None)
    num_prefix = _prefix_tokens(model)
    chunk = batch_size or images.shape[0]
    score_sums: List[Optional[torch.Tensor]] = [None] * (max_layer + 1)
    positions: List[Tuple[int, int]] = []
    images_with_outliers = 0

    modes = _set_eval(model)
    try:
        for start in range(0, images.shape[0], chunk):
            x = images[start:start + chunk]
            if ref is not None:
                x = x.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
            b_idx, t_idx = _find_outliers(model, blocks[-1], x, num_prefix, float(outlier_factor))
            if b_idx.numel() == 0:
                continue
            positions += [(start + int(b), int(t)) for b, t in zip(b_idx.tolist(), t_idx.tolist())]
            per_image = _score_neurons(model, blocks[: max_layer + 1], x, b_idx, t_idx)
            images_with_outliers += per_image[0][0]
            for layer, (_, sums) in enumerate(per_image):
                score_sums[layer] = sums if score_sums[layer] is None else score_sums[layer] + sums
    finally:
        _restore_modes(modes)

    if not positions:
        raise ValueError(
            f"outlier_factor: no patch token of the {images.shape[0]} images has a norm above {outlier_factor:g} x "
            f"its image's median patch norm (entering the last block); lower outlier_factor or give more images"
        )
    for layer, (sums, size) in enumerate(zip(score_sums, hidden)):
        if sums is None or (size is not None and sums.numel() != size):
            raise ValueError(f"model: blocks[{layer}].mlp.fc2 did not receive a (B, N, hidden) activation")
    scores = torch.cat([s.double().cpu() / images_with_outliers for s in score_sums])
    offsets = [0]
    for s in score_sums:
        offsets.append(offsets[-1] + s.numel())
    k = min(top_k, scores.numel())
    values, flat = scores.topk(k)
    pairs = []
    for f in flat.tolist():
        layer = next(l for l in range(len(score_sums)) if offsets[l] <= f < offsets[l + 1])
        pairs.append((layer, f - offsets[layer]))
    return RegisterNeurons(
        neurons=pairs, scores=[float(v) for v in values], outlier_positions=positions,
        outlier_factor=float(outlier_factor), num_images=int(images.shape[0]), max_layer=max_layer,
        images_with_outliers=images_with_outliers, num_prefix_tokens=num_prefix,
    )


def _find_outliers(model, last_block, x, num_prefix, factor):
    """(image indices, token indices) of the outlier patch tokens entering ``last_block``."""
    captured = {}

    def grab(module, args, kwargs):
        captured["x"] = _first_arg(args, kwargs)
        raise _StopForward

    handle = last_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "x" not in captured:
        raise ValueError("model: its forward never called the last block (model.blocks[-1])")
    tokens = captured["x"]
    if tokens.dim() != 3 or tokens.shape[1] <= num_prefix:
        raise ValueError(f"model: expected (B, N, C) tokens with N > num_prefix_tokens={num_prefix} entering the "
                         f"last block, got {tuple(tokens.shape)}")
    norms = tokens.float().norm(dim=-1)[:, num_prefix:]  # (B, M) patch norms
    median = norms.median(dim=1, keepdim=True).values
    b_idx, p_idx = torch.nonzero(norms > factor * median, as_tuple=True)
    return b_idx, p_idx + num_prefix


def _score_neurons(model, blocks, x, b_idx, t_idx):
    """Per scored block: (number of images with outliers, sum over those images of the mean |activation| at their
    outlier positions), a (hidden,) float64 tensor."""
    B = x.shape[0]
    counts = torch.zeros(B, dtype=torch.float64, device=b_idx.device).index_add_(
        0, b_idx, torch.ones_like(b_idx, dtype=torch.float64))
    has = counts > 0
    results: List[Optional[Tuple[int, torch.Tensor]]] = [None] * len(blocks)

    def make_hook(layer):
        def hook(module, args):
            h = args[0]
            if h.dim() != 3 or h.shape[0] != B:
                raise ValueError(f"model: blocks[{layer}].mlp.fc2 expected a (B, N, hidden) activation, got "
                                 f"{tuple(h.shape)}")
            acts = h[b_idx.to(h.device), t_idx.to(h.device)].abs().double()  # (K, hidden)
            sums = torch.zeros(B, acts.shape[1], dtype=torch.float64, device=acts.device).index_add_(
                0, b_idx.to(h.device), acts)
            per_image = sums[has.to(h.device)] / counts[has].to(h.device).unsqueeze(1)
            results[layer] = (int(has.sum()), per_image.sum(0))
            if layer == len(blocks) - 1:
                raise _StopForward
        return hook

    handles = [b.mlp.fc2.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(blocks)]
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise ValueError(f"model: blocks[{missing[0]}].mlp.fc2 was never called in the forward")
    return results


# ------------------------------------------------------------------------------------------------ application


def _normalise_neurons(neurons, blocks: Sequence[nn.Module]) -> Dict[int, Tuple[int, ...]]:
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
        raise ValueError(f"neurons: expected RegisterNeurons, {{layer: [neuron, ...]}} or (layer, neuron) pairs, "
                         f"got {type(neurons).__name__}")
    else:
        items = list(neurons)
    depth = len(blocks)
    out: Dict[int, List[int]] = {}
    for item in items:
        try:
            layer, neuron = item
        except (TypeError, ValueError):
            raise ValueError(f"neurons: expected (layer, neuron) pairs, got {item!r}") from None
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, neuron))
        if not ok or not 0 <= layer < depth:
            raise ValueError(f"neurons: ({layer!r}, {neuron!r}): layer must be an int in [0, {depth - 1}]")
        size = _hidden_size(blocks[layer])
        if neuron < 0 or (size is not None and neuron >= size):
            raise ValueError(f"neurons: ({layer}, {neuron}): neuron must be an int in [0, {size - 1 if size else '?'}]"
                             f" (blocks[{layer}].mlp.fc2 consumes {size} hidden activations)")
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

    def __init__(self, model: nn.Module, neurons: Dict[int, Tuple[int, ...]], num: int):
        self.model = model
        self.neurons = neurons
        self.num = num
        self.base_prefix_tokens = _prefix_tokens(model)
        self.active = False
        self._handles = []
        self._counters: List[Tuple[object, int]] = []
        self._index_cache: Dict[Tuple[int, torch.device], torch.Tensor] = {}
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

    def __enter__(self) -> "TestTimeRegisters":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        listed = ", ".join(f"{layer}: {list(idx)}" for layer, idx in self.neurons.items())
        return (f"TestTimeRegisters(num={self.num}, tokens {self.base_prefix_tokens}..."
                f"{self.base_prefix_tokens + self.num - 1}, neurons={{{listed}}}, active={self.active})")

    # -------------------------------------------------------------------- hooks

    def _insert_tokens(self, module, args, kwargs):
        x = _first_arg(args, kwargs)
        if self._masked(args, kwargs, "attn_mask") is not None or self._masked(args, kwargs, "is_causal"):
            raise ValueError("attn_mask: test-time registers do not support attention masks or causal attention "
                             "(the mask does not cover the extra tokens)")
        if x.dim() != 3:
            raise ValueError(f"model: expected (B, N, C) tokens entering the first block, got {tuple(x.shape)}")
        P = self.base_prefix_tokens
        extra = x.new_zeros(x.shape[0], self.num, x.shape[2])
        return _with_first_arg(args, kwargs, torch.cat([x[:, :P], extra, x[:, P:]], dim=1))

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
                raise ValueError(f"model: blocks[{layer}].mlp.fc2 expected a (B, N, hidden) activation with "
                                 f"N > {P + R} tokens, got {tuple(h.shape)}")
            idx = self._index(layer, h.device)
            h = h.clone()
            # per batch element and neuron: max over the extra tokens and the patch tokens (prefix tokens excluded)
            top = h[:, P:, idx].amax(dim=1, keepdim=True)  # (B, 1, k)
            h[:, P:P + R, idx] = top.expand(-1, R, -1)
            h[:, P + R:, idx] = 0
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
    blocks = _check_model(model)
    _check_int(num, "num", 1)
    spec = _normalise_neurons(neurons, blocks)
    current = model.__dict__.get(_APPLIED)
    if current is not None and current.active:
        raise ValueError("model: test-time registers are already applied; remove() them first")
    if get_monitor(model) is not None:
        warnings.warn("regkern.apply_test_time_registers: the model's NormMonitor counts prefix tokens as they were "
                      "when it was attached, so it reports the extra tokens as patches", stacklevel=2)
    handle = TestTimeRegisters(model, spec, num)
    handle._install()
    return handle
