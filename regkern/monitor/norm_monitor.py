"""``regkern.NormMonitor``: residual-norm and attention statistics of a patched timm ViT, accumulated on the device.

Per layer (block) and token group (CLS, registers, patches) it accumulates, from the fused kernels' side outputs:
the L2 norms of the residual-stream tokens entering the block (captured by ``MonitoredLayerNorm`` in place of the
block's ``norm1``: the quantity the registers paper thresholds, > 150 in DINOv2-g), their count, mean, max, sum of
squares, a log-spaced histogram, the number above an outlier threshold and the positions of the largest patch norms
of the last batch; and from the attention kernels the share of attention each key group receives and the last
attention rows of the prefix queries (the CLS/register attention maps).

Everything stays on the device in preallocated buffers, with no host synchronisation inside forward (CUDA-graph
capture of a monitored model works); ``report()`` copies once to the host.

Per monitored layer and batch: the LayerNorm kernel (Triton, or its CUDA twin) reduces the norms into the
accumulators in the pass that normalises (count, sum, sum of squares, max, outliers, histogram; atomics) and hands out
per-program top-k candidates (packed norm and position keys), and one ``topk`` over them keeps the largest: 2 launches,
and no per-token norms leave the kernel unless norm maps (or a relative threshold) ask for them. The PyTorch reduction
``reference.norm_statistics`` is the reference (and the path of the "reference" LayerNorm backend). With a relative
threshold the outliers need the batch's median patch norm, so they are counted after the kernel, from its norms (a
few small ops, exact).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import reference
from ..nn import MonitoredLayerNorm, RegisterAttentionBase
from ..ops.layer_norm import NormAccumulators
from ..timm.patching import attach_monitor, detach_monitor, get_monitor, patch_attention

__all__ = ["NormMonitor", "NormReport", "GROUPS", "ATTENTION_GROUPS"]

#: token groups of the residual stream
GROUPS = ("cls", "registers", "patches")
#: key groups of the attention (KV-only registers are keys without a token)
ATTENTION_GROUPS = ("kv_registers", "cls", "registers", "patches")

#: timm blocks whose norm1 normalises the attention output (post-norm), not the residual stream entering the block
_POST_NORM_BLOCKS = ("ResPostBlock", "EvaBlockPostNorm")


def _is_post_norm(block: nn.Module) -> bool:
    name = type(block).__name__
    return name in _POST_NORM_BLOCKS or "PostNorm" in name or name.endswith("PostBlock")


@dataclass
class NormReport:
    """What ``NormMonitor.report()`` returns: prints as a table, converts with ``to_dict()`` / ``to_json()``.

    rows: one dict per (layer, group) with count, mean, std, max, outliers, outlier_fraction, histogram.
    bin_edges: the histogram's log-spaced edges (len = bins + 1; the first and last bins also hold values beyond).
    top_patches: per layer, the largest patch norms as (norm, image, token index): by default those of the last batch,
        ``image`` being the index in that batch; with ``NormMonitor.track_samples`` those since ``reset()`` over all
        batches (and, after ``all_reduce``, all ranks), ``image`` being the sample id the caller gave.
    top_patches_scope: "last batch" or "since reset" (which of the two ``top_patches`` holds).
    attention_share: per layer, the mean share of attention each key group receives (rows sum to 1); None for a
        layer whose attention was not measured (printed as n/a).
    """

    threshold: str
    bin_edges: list[float]
    rows: list[dict[str, object]]
    top_patches: list[list[tuple[float, int, int]]]
    attention_share: list[dict[str, float]] = field(default_factory=list)
    top_patches_scope: str = "last batch"

    def to_dict(self) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "bin_edges": self.bin_edges,
            "rows": self.rows,
            "top_patches": self.top_patches,
            "top_patches_scope": self.top_patches_scope,
            "attention_share": self.attention_share,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        head = f"{'layer':>5} | {'group':>9} | {'tokens':>8} | {'mean':>8} | {'std':>8} | {'max':>8} | {'outliers':>8}"
        has_share = bool(self.attention_share)
        if has_share:
            head += " | attention share"
        lines = [f"residual-stream token norms entering each block (outlier: {self.threshold})", head, "-" * len(head)]
        for row in self.rows:
            if not row["count"]:
                continue
            line = (
                f"{row['layer']:>5} | {row['group']:>9} | {row['count']:>8} | {row['mean']:8.2f} | "
                f"{row['std']:8.2f} | {row['max']:8.2f} | {row['outliers']:>8}"
            )
            if has_share:
                line += f" | {_share_text(self.attention_share[row['layer']][row['group']])}"
            lines.append(line)
        outlier_layers = sorted({r["layer"] for r in self.rows if r["outliers"]})
        for layer in (layer for layer in outlier_layers if self.top_patches[layer]):
            top = ", ".join(f"{v:.1f} (image {b}, token {t})" for v, b, t in self.top_patches[layer][:3])
            lines.append(f"layer {layer}: largest patch norms ({self.top_patches_scope}): {top}")
        if has_share and any(s.get("kv_registers") for s in self.attention_share):
            lines.append(
                "attention share of KV-only registers per layer: "
                + ", ".join(_share_text(s["kv_registers"]) for s in self.attention_share)
            )
        return "\n".join(lines)


def _share_text(value: Optional[float]) -> str:
    # None: the layer's attention was not measured (no forward reached it while enabled), which is not a share of 0
    return "n/a" if value is None else f"{value:.3f}"


class NormMonitor:
    """Monitor a timm ViT (``model.blocks``, each with ``norm1`` and ``attn``), patching it first if needed.

    Args:
        model: a timm VisionTransformer / Eva (patched by ``regkern.patch_timm`` or not).
        threshold: absolute outlier threshold on token norms (default 150, the registers paper's DINOv2-g value).
        relative: if given, a token is an outlier above ``relative`` x the median patch norm of its layer and batch
            (instead of the absolute threshold).
        bins: histogram bins, log-spaced over ``norm_range``.
        top_k: how many of the largest patch norms of the last batch to keep per layer.
        attention_share: also accumulate the share of attention each key group receives (4 numbers per (image,
            head), ``received_groups``: the Triton kernels go over the register and prefix keys only, with the
            forward's lse, and give the patches the rest of each query's probability).
        attention_maps: keep the last attention rows of the prefix queries (needs CLS or registers).
        enabled: start collecting now (else call ``enable()``).
        norm_maps: keep the last batch's per-token norms for ``norm_maps()`` (the kernel then writes them; off, no
            per-token norms leave the kernel).
        norm_backend: LayerNorm backend of the ``MonitoredLayerNorm``s that replace each block's ``norm1`` (None /
            "auto": "triton" on CUDA, where the reduction runs inside the kernel; "reference" elsewhere; "triton"
            on CPU tensors runs the interpreter under TRITON_INTERPRET=1).

    Shapes: norms are taken per token (B, N); ``attention_maps()`` returns (B, H, P, grid_h, grid_w), on the grid
    of the last input (``dynamic_img_size`` models included).

    The monitor attaches itself to the model: ``regkern.get_monitor(model)`` finds it (one per model), and
    ``monitor.remove()`` or ``regkern.unpatch_timm(model)`` puts the original ``norm1`` modules back. Pre-norm blocks
    only: on a post-norm block (timm ``ResPostBlock``, ``EvaBlockPostNorm``) ``norm1`` sees the attention output,
    not the residual stream, and the monitor refuses the model. Every block's attention must be regkern's (the
    model is patched first when none is): a block whose attention class regkern does not support is refused with
    its class named.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float = 150.0,
        relative: Optional[float] = None,
        bins: int = 48,
        norm_range: tuple[float, float] = (1e-2, 1e4),
        top_k: int = 8,
        attention_share: bool = True,
        attention_maps: bool = True,
        enabled: bool = True,
        norm_backend: Optional[str] = None,
        norm_maps: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        blocks = getattr(model, "blocks", None)
        if blocks is None or not len(blocks):
            raise ValueError(f"model: {type(model).__name__} has no .blocks; NormMonitor needs a timm ViT")
        if not threshold > 0 or (relative is not None and not relative > 0):
            raise ValueError(f"threshold/relative: expected positive numbers, got {threshold!r}, {relative!r}")
        lo, hi = norm_range
        if not 0 < lo < hi:
            raise ValueError(f"norm_range: expected 0 < low < high, got {norm_range!r}")
        if bins < 2 or top_k < 1:
            raise ValueError(f"bins/top_k: expected bins >= 2 and top_k >= 1, got {bins}, {top_k}")
        if get_monitor(model) is not None:
            raise ValueError("model: it already has a NormMonitor (regkern.get_monitor(model)); remove() it first")
        post = sorted({type(b).__name__ for b in blocks if _is_post_norm(b)})
        if post:
            raise ValueError(
                f"model: {', '.join(post)} blocks are post-norm (norm1 normalises the attention output, not the "
                f"residual stream entering the block); NormMonitor measures pre-norm blocks only"
            )
        if not any(isinstance(m, RegisterAttentionBase) for m in model.modules()):
            with warnings.catch_warnings():  # the refusal below names the unsupported classes
                warnings.simplefilter("ignore")
                patch_attention(model)
        self.model = model
        self.blocks = list(blocks)
        self.threshold, self.relative = float(threshold), relative
        self.top_k = top_k
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.has_cls = 1 if getattr(model, "cls_token", None) is not None else 0
        self.num_registers = self.num_prefix - self.has_cls
        self.grid_size = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()) or ())

        for i, block in enumerate(self.blocks):  # every check before anything is replaced
            attn = getattr(block, "attn", None)
            if isinstance(block, RegisterAttentionBase):  # timm's parallel blocks: no norm1 -> attn of their own
                raise ValueError(
                    f"model.blocks[{i}]: {type(block).__name__} feeds attention and MLP from one in_norm in parallel; "
                    f"NormMonitor measures blocks with norm1 -> attn (timm Block, EvaBlock) only"
                )
            if not isinstance(attn, RegisterAttentionBase):
                cls = f"{type(attn).__module__}.{type(attn).__qualname__}"
                raise ValueError(
                    f"model.blocks[{i}].attn: {cls} is not an attention class regkern supports "
                    f"(regkern.timm.supported_attention_classes()), so its statistics cannot be monitored; "
                    f"NormMonitor needs regkern attention in every block"
                )
            norm = getattr(block, "norm1", None)
            if not isinstance(norm, MonitoredLayerNorm):
                MonitoredLayerNorm.check_convertible(norm, f"model.blocks[{i}].norm1")
        self._original_norms: list[nn.Module] = [block.norm1 for block in self.blocks]
        self.attentions: list[RegisterAttentionBase] = [block.attn for block in self.blocks]
        for block, norm in zip(self.blocks, self._original_norms):
            if isinstance(norm, MonitoredLayerNorm):
                if norm_backend is not None:
                    norm.set_backend(norm_backend)
            else:
                block.norm1 = MonitoredLayerNorm.from_layer_norm(norm, backend=norm_backend)
        stats = []
        if attention_share:
            stats.append("received_groups")
        if attention_maps and self.num_prefix:
            stats.append("prefix_rows")
        self.attention_stats = tuple(stats)

        device = next(model.parameters()).device
        L, G = len(self.blocks), len(GROUPS)
        self.bin_edges = torch.logspace(math.log10(lo), math.log10(hi), bins + 1, dtype=torch.float64)
        self._inner_edges = self.bin_edges[1:-1].float().to(device)
        self.count = torch.zeros(L, G, dtype=torch.int64, device=device)
        self.sum = torch.zeros(L, G, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(L, G, dtype=torch.float64, device=device)
        self.max = torch.zeros(L, G, dtype=torch.float32, device=device)
        self.outliers = torch.zeros(L, G, dtype=torch.int64, device=device)
        self.histogram = torch.zeros(L, G, bins, dtype=torch.int64, device=device)
        #: the last batch's largest patch norms per layer as packed keys (``reference.patch_norm_keys``: norm bits and
        #: flat (B, N - P) index; -1 = none); decoded by ``report()``
        self.top_keys = torch.full((L, top_k), -1, dtype=torch.int64, device=device)
        self._top_positions_scratch = torch.empty((L, top_k), dtype=torch.int64, device=device)  # topk's indices
        #: with ``track_samples``: the largest patch norms since reset per layer, as norm, sample id and token index
        #: (-inf / -1 = none)
        self.tracked_norms = torch.full((L, top_k), -math.inf, dtype=torch.float32, device=device)
        self.tracked_samples = torch.full((L, top_k), -1, dtype=torch.int64, device=device)
        self.tracked_tokens = torch.full((L, top_k), -1, dtype=torch.int64, device=device)
        self._sample_ids: Optional[torch.Tensor] = None
        #: another rank tracked samples (seen by all_reduce): this rank reports the gathered top patches too, even if
        #: it never called track_samples (e.g. a rank whose shard held no readable image)
        self._tracked_by_peers = False
        #: what all_reduce added from the other ranks to the summed accumulators (subtracted again by the next call,
        #: so that repeated calls never count a rank twice); None before the first call or after reset()
        self._from_other_ranks: Optional[list[torch.Tensor]] = None
        self._patches_per_image: dict[int, int] = {}
        self.share_sum = torch.zeros(L, len(ATTENTION_GROUPS), dtype=torch.float64, device=device)
        self.share_count = torch.zeros(L, dtype=torch.int64, device=device)
        # received_groups [KV registers, prefix token 0, prefix tokens 1.., patches] -> ATTENTION_GROUPS: prefix
        # token 0 is the CLS token when the model has one, else a register
        group_map = torch.eye(4, dtype=torch.float64)
        if not self.has_cls:
            group_map[1] = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
        self._group_map = group_map.to(device)
        self.last_prefix_rows: dict[int, torch.Tensor] = {}
        #: the last batch's patch-token norms (B, N - P) entering each block (the kernel's output, no copies); only
        #: with ``norm_maps=True``
        self.last_patch_norms: dict[int, torch.Tensor] = {}
        self.collect_norm_maps = bool(norm_maps)
        threshold = self.threshold if self.relative is None else math.inf  # relative: counted after the kernel
        write_norms = self.collect_norm_maps or self.relative is not None
        self._accumulators = [
            NormAccumulators(
                self.has_cls,
                self.num_prefix,
                threshold,
                self._inner_edges,
                self.count[i],
                self.sum[i],
                self.sum_sq[i],
                self.max[i],
                self.outliers[i],
                self.histogram[i],
                top_k,
                write_norms,
            )  # fmt: skip
            for i in range(L)
        ]
        # the patch grid of the last input (dynamic_img_size models see many); python ints, no device sync
        self._last_grid: Optional[tuple[int, int]] = None
        patch_embed = getattr(model, "patch_embed", None)
        self._grid_hook = (
            patch_embed.register_forward_hook(self._record_grid) if isinstance(patch_embed, nn.Module) else None
        )
        self.enabled = False
        attach_monitor(model, self)
        if enabled:
            self.enable()

    def _record_grid(self, module: nn.Module, args, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:  # (B, H, W, C): timm's NHWC dynamic output
            self._last_grid = (int(output.shape[1]), int(output.shape[2]))
        elif args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            feat = getattr(module, "dynamic_feat_size", None)
            size = feat(tuple(args[0].shape[-2:])) if callable(feat) else None
            self._last_grid = tuple(int(v) for v in size) if size is not None else None

    # ------------------------------------------------------------------ collection (inside forward, no sync)

    def _group_slices(self, n: int) -> Sequence[slice]:
        return (slice(0, self.has_cls), slice(self.has_cls, self.num_prefix), slice(self.num_prefix, n))

    @torch.no_grad()
    def _record_norms(
        self,
        layer: int,
        candidates: torch.Tensor,
        prefix_norms: torch.Tensor,
        patch_norms: torch.Tensor,
        tokens: int,
        batch: int,
    ) -> None:
        # the kernel has already added count, sum, sum_sq, max, histogram (and absolute-threshold outliers)
        self._patches_per_image[layer] = tokens - self.num_prefix
        if self.collect_norm_maps:
            self.last_patch_norms[layer] = patch_norms
        if self.relative is not None and patch_norms.numel():
            threshold = self.relative * patch_norms.median()
            parts = (prefix_norms[:, : self.has_cls], prefix_norms[:, self.has_cls :], patch_norms)
            self.outliers[layer] += torch.stack([(part > threshold).sum() for part in parts])
        k = min(self.top_k, candidates.numel())
        if k < self.top_k:
            self.top_keys[layer].fill_(-1)
        if k:
            torch.topk(candidates, k, out=(self.top_keys[layer, :k], self._top_positions_scratch[layer, :k]))
        if self._sample_ids is not None:
            self._merge_tracked(layer, tokens - self.num_prefix, batch)

    def _merge_tracked(self, layer: int, patches: int, batch: int) -> None:
        # this batch's top keys -> (norm, sample id, token), merged with the running top-k: a few small ops, no sync
        ids = self._sample_ids
        if ids.shape[0] != batch:
            raise ValueError(f"track_samples: {ids.shape[0]} sample ids were given for a batch of {batch} images")
        keys = self.top_keys[layer]
        valid = keys >= 0
        norms, flat = reference.unpack_norm_keys(keys.clamp_min(0))
        image = (flat // max(patches, 1)).clamp_max(batch - 1)
        norms = torch.cat((self.tracked_norms[layer], torch.where(valid, norms, -math.inf)))
        samples = torch.cat((self.tracked_samples[layer], torch.where(valid, ids[image], -1)))
        tokens = torch.cat(
            (self.tracked_tokens[layer], torch.where(valid, flat % max(patches, 1) + self.num_prefix, -1))
        )
        best, order = torch.topk(norms, self.top_k)
        self.tracked_norms[layer].copy_(best)
        self.tracked_samples[layer].copy_(samples[order])
        self.tracked_tokens[layer].copy_(tokens[order])

    @torch.no_grad()
    def _record_attention(self, layer: int, stats) -> None:
        if "received_groups" in stats:
            # (B, H, 4) over [KV registers, prefix token 0, prefix tokens 1.., patches], each (b, h) summing to N,
            # reduced per group inside the attention kernel; mapped onto ATTENTION_GROUPS
            groups = stats["received_groups"].double()
            share = groups / groups.sum(-1, keepdim=True)
            self.share_sum[layer] += share.mean(1).sum(0) @ self._group_map
            self.share_count[layer] += groups.shape[0]
        if "prefix_rows" in stats:
            self.last_prefix_rows[layer] = stats["prefix_rows"]

    # ------------------------------------------------------------------ control

    def enable(self) -> None:
        """Start collecting (sinks attached; attention backends re-chosen once for the statistics)."""
        for i, (block, attn) in enumerate(zip(self.blocks, self.attentions)):
            block.norm1.norm_accumulators = self._accumulators[i]
            block.norm1.group_norm_sink = _LayerSink(self._record_norms, i)
            if self.attention_stats and attn.supports_statistics:  # others: their shares print as n/a
                attn.set_monitoring(self.attention_stats, _LayerSink(self._record_attention, i))
        self.enabled = True

    def disable(self) -> None:
        """Stop collecting; the model runs exactly as unmonitored (accumulated values are kept)."""
        for block, attn in zip(self.blocks, self.attentions):
            block.norm1.norm_accumulators = None
            block.norm1.group_norm_sink = None
            attn.set_monitoring()
        self.enabled = False

    def track_samples(self, sample_ids: Optional[torch.Tensor]) -> None:
        """Name the images of the next forward(s): ``sample_ids`` (B,) int64, e.g. dataset indices, one per image of
        the batch. While set, ``report().top_patches`` are the largest patch norms since ``reset()`` over every batch
        (as (norm, sample id, token)), not only the last batch's; give each batch its ids before its forward (a
        mismatched batch size raises). None stops tracking: ``report()`` then gives the last batch's top patches
        again (what was tracked is kept until ``reset()``).

        The ids are copied to the model's device without a host synchronisation; what is tracked survives
        ``all_reduce`` (the largest over all ranks, each patch once; a rank that tracked nothing reports them too).
        Not for CUDA graphs: a captured forward keeps reading the ids tensor of its capture."""
        if sample_ids is None:
            self._sample_ids = None
            return
        if not isinstance(sample_ids, torch.Tensor):
            raise TypeError(f"sample_ids: expected a 1-D int64 tensor, got {type(sample_ids).__name__}")
        if sample_ids.dim() != 1 or sample_ids.dtype != torch.int64:
            raise ValueError(
                f"sample_ids: expected a 1-D int64 tensor (one id per image), got {sample_ids.dtype} of shape "
                f"{tuple(sample_ids.shape)}"
            )
        self._sample_ids = sample_ids.to(self.count.device, non_blocking=True)

    def _summed_accumulators(self) -> list[torch.Tensor]:
        return [self.count, self.sum, self.sum_sq, self.outliers, self.histogram, self.share_sum, self.share_count]

    @torch.no_grad()
    def all_reduce(self, group=None) -> None:
        """Combine the accumulators of every rank of ``group`` (None: the default process group of
        ``torch.distributed``) in place, so that ``report()`` on any rank gives the statistics of all ranks' data.

        Counts, sums, sums of squares, outliers, histograms and attention shares are summed, maxima take the maximum,
        and the tracked top patches (``track_samples``) are gathered and the ``top_k`` largest kept, each (sample id,
        token) once. Safe to call repeatedly, with or without forwards in between: each call first takes back what
        the previous one added from the other ranks, so nothing is counted twice. Every rank of the group must call
        it (a collective; on NCCL the accumulators' device must be the rank's current CUDA device). Without
        ``track_samples`` (on any rank) the top patches stay this rank's last batch (their batch indices are local).
        ``reset()`` starts over on this rank only. The float64 sums may move by rounding (about 1e-16 relative) from
        one call to the next, as the previous call's share of the other ranks is subtracted again."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "all_reduce: torch.distributed is not initialised (call torch.distributed.init_process_group, or "
                "launch with torchrun)"
            )
        summed = self._summed_accumulators()
        previous = self._from_other_ranks or [torch.zeros_like(t) for t in summed]
        local = [t - p for t, p in zip(summed, previous)]
        # two collectives for the sums: every integer accumulator in one int64 buffer, every float one in a float64 one
        totals = []
        for dtype in (torch.int64, torch.float64):
            parts = [t for t in local if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in parts])
            dist.all_reduce(flat, group=group)
            totals += list(torch.split(flat, [t.numel() for t in parts]))
        by_dtype = iter(totals[: sum(t.dtype == torch.int64 for t in local)])
        by_float = iter(totals[sum(t.dtype == torch.int64 for t in local) :])
        self._from_other_ranks = []
        for t, mine in zip(summed, local):
            total = next(by_dtype if t.dtype == torch.int64 else by_float).reshape(t.shape)
            self._from_other_ranks.append(total - mine)
            t.copy_(total)
        dist.all_reduce(self.max, op=dist.ReduceOp.MAX, group=group)
        tracking = torch.tensor([int(self._sample_ids is not None or self._tracked_by_peers)], device=self.max.device)
        dist.all_reduce(tracking, op=dist.ReduceOp.MAX, group=group)
        self._tracked_by_peers = bool(tracking.item())
        self._all_gather_tracked(group)

    def _all_gather_tracked(self, group) -> None:
        world = dist.get_world_size(group)
        mine = torch.stack((self.tracked_norms.double(), self.tracked_samples.double(), self.tracked_tokens.double()))
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=group)
        every = torch.cat(gathered, dim=-1).cpu()  # (3, L, world * top_k): small, merged on the host
        for layer in range(every.shape[1]):
            best: dict[tuple[int, int], float] = {}
            for norm, sample, token in every[:, layer].T.tolist():
                if sample >= 0:  # the same patch from several ranks (after an earlier all_reduce) counts once
                    best[(int(sample), int(token))] = norm
            ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))[: self.top_k]
            self.tracked_norms[layer].fill_(-math.inf)
            self.tracked_samples[layer].fill_(-1)
            self.tracked_tokens[layer].fill_(-1)
            if ranked:
                n = len(ranked)
                self.tracked_norms[layer, :n].copy_(torch.tensor([v for _, v in ranked], dtype=torch.float32))
                self.tracked_samples[layer, :n].copy_(torch.tensor([k[0] for k, _ in ranked], dtype=torch.int64))
                self.tracked_tokens[layer, :n].copy_(torch.tensor([k[1] for k, _ in ranked], dtype=torch.int64))

    def reset(self) -> None:
        """Zero every accumulator (in place: buffers keep their addresses for CUDA graphs)."""
        for t in (
            self.count,
            self.sum,
            self.sum_sq,
            self.max,
            self.outliers,
            self.histogram,
            self.share_sum,
            self.share_count,
        ):
            t.zero_()
        self.top_keys.fill_(-1)
        self.tracked_norms.fill_(-math.inf)
        self.tracked_samples.fill_(-1)
        self.tracked_tokens.fill_(-1)
        self._from_other_ranks = None
        self._tracked_by_peers = False
        # last_prefix_rows are the latest observations, not accumulators: kept (a captured CUDA graph refills them)

    def remove(self) -> None:
        """Disable, put the original ``norm1`` modules back and detach from the model (``get_monitor`` then returns
        None). Idempotent."""
        self.disable()
        for block, norm in zip(self.blocks, self._original_norms):
            block.norm1 = norm
        if self._grid_hook is not None:
            self._grid_hook.remove()
            self._grid_hook = None
        if get_monitor(self.model) is self:
            detach_monitor(self.model)

    # ------------------------------------------------------------------ results

    def report(self) -> NormReport:
        """Copy the accumulators to the host (one synchronisation) and summarise them."""
        names = (
            "count",
            "sum",
            "sum_sq",
            "max",
            "outliers",
            "histogram",
            "top_keys_high",
            "top_keys_low",
            "share_sum",
            "share_count",
        )
        tracking = self._sample_ids is not None or self._tracked_by_peers
        if tracking:  # sample ids travel as float64: exact below 2**53
            names += ("tracked_norms", "tracked_samples", "tracked_tokens")
        # the int64 keys travel as two exact halves (a float64 holds 53 bits)
        parts = {"top_keys_high": self.top_keys >> 32, "top_keys_low": self.top_keys & 0xFFFFFFFF}
        tensors = [parts[n] if n in parts else getattr(self, n) for n in names]
        flat = torch.cat([t.reshape(-1).double() for t in tensors]).cpu()
        host, offset = {}, 0
        for n, t in zip(names, tensors):
            host[n] = flat[offset : offset + t.numel()].reshape(t.shape)
            offset += t.numel()
        rows = []
        for layer in range(len(self.blocks)):
            for g, group in enumerate(GROUPS):
                count = int(host["count"][layer, g])
                mean = float(host["sum"][layer, g]) / count if count else 0.0
                var = float(host["sum_sq"][layer, g]) / count - mean * mean if count else 0.0
                rows.append(
                    {
                        "layer": layer,
                        "group": group,
                        "count": count,
                        "mean": mean,
                        "std": math.sqrt(max(var, 0.0)),
                        "max": float(host["max"][layer, g]),
                        "outliers": int(host["outliers"][layer, g]),
                        "outlier_fraction": int(host["outliers"][layer, g]) / count if count else 0.0,
                        "histogram": [int(c) for c in host["histogram"][layer, g]],
                    }
                )
        top = []
        if tracking:
            for layer in range(len(self.blocks)):
                rows_of_layer = zip(
                    host["tracked_norms"][layer].tolist(),
                    host["tracked_samples"][layer].long().tolist(),
                    host["tracked_tokens"][layer].long().tolist(),
                )
                # ties in one order on every rank and at any scale: larger norm, then sample id, then token
                top.append(
                    sorted(((v, i, t) for v, i, t in rows_of_layer if i >= 0), key=lambda e: (-e[0], e[1], e[2]))
                )
        for layer in range(0 if tracking else len(self.blocks)):
            M = max(self._patches_per_image.get(layer, 1), 1)
            keys = (host["top_keys_high"][layer].long() << 32) | host["top_keys_low"][layer].long()
            values, flat = reference.unpack_norm_keys(keys[keys >= 0])
            top.append([(v, i // M, i % M + self.num_prefix) for v, i in zip(values.tolist(), flat.tolist())])
        share = []
        if "received_groups" in self.attention_stats:
            for layer in range(len(self.blocks)):
                n = int(host["share_count"][layer])
                share.append(
                    {
                        grp: float(host["share_sum"][layer, i]) / n if n else None
                        for i, grp in enumerate(ATTENTION_GROUPS)
                    }
                )
        threshold = f"> {self.relative:g} x median patch norm" if self.relative is not None else f"> {self.threshold:g}"
        scope = "since reset" if tracking else "last batch"
        return NormReport(threshold, [float(e) for e in self.bin_edges], rows, top, share, scope)

    def _grid(self, num_patches: int) -> tuple[int, int]:
        # the last input's grid first (dynamic_img_size), then the configured one, then a square
        last = self._last_grid
        if last is not None and last[0] * last[1] == num_patches:
            return last
        if len(self.grid_size) == 2 and self.grid_size[0] * self.grid_size[1] == num_patches:
            return tuple(self.grid_size)
        side = int(round(math.sqrt(num_patches)))
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patch tokens do not form the model's grid {self.grid_size}")
        return side, side

    def norm_maps(self, layer: int = -1) -> torch.Tensor:
        """The last batch's patch-token norms entering block ``layer`` on the patch grid: (B, grid_h, grid_w)."""
        layer = range(len(self.blocks))[layer]
        if not self.collect_norm_maps:
            raise ValueError("norm_maps: not collected (create the monitor with norm_maps=True)")
        if layer not in self.last_patch_norms:
            raise ValueError(f"layer: no norms recorded for layer {layer} yet (run a forward while enabled)")
        patches = self.last_patch_norms[layer]
        return patches.reshape(patches.shape[0], *self._grid(patches.shape[1]))

    def has_attention_maps(self, layer: int = -1) -> bool:
        """Whether ``attention_maps(layer)`` is collected: maps requested, the model has prefix tokens, and the layer's
        attention can report them (differential attention cannot)."""
        layer = range(len(self.blocks))[layer]
        return "prefix_rows" in self.attention_stats and self.attentions[layer].supports_statistics

    def attention_maps(self, layer: int = -1) -> torch.Tensor:
        """The last batch's attention of the prefix queries (CLS, registers) over the patch tokens of ``layer``,
        reshaped to the patch grid: (B, H, P, grid_h, grid_w) float32."""
        if "prefix_rows" not in self.attention_stats:
            raise ValueError("attention_maps: not collected (attention_maps=False, or the model has no prefix tokens)")
        layer = range(len(self.blocks))[layer]
        attention = self.attentions[layer]
        if not attention.supports_statistics:
            raise ValueError(f"layer: {type(attention).__name__} has no attention maps ({attention.limits_reason})")
        if layer not in self.last_prefix_rows:
            raise ValueError(f"layer: no attention rows recorded for layer {layer} yet (run a forward while enabled)")
        rows = self.last_prefix_rows[layer]
        R = self.attentions[layer].num_kv_registers
        patches = rows[..., R + self.num_prefix :]
        return patches.reshape(*patches.shape[:-1], *self._grid(patches.shape[-1]))


class _LayerSink:
    """A picklable, deep-copyable callable that forwards a layer's side outputs to the monitor."""

    def __init__(self, record, layer: int):
        self.record, self.layer = record, layer

    def __call__(self, *values) -> None:
        self.record(self.layer, *values)
