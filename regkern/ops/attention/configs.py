"""Tile configurations of the Triton attention kernels: one table, read by the launchers and the static report.

A rule is keyed on (kernel role, architecture, dtype, head dim, N range); the first rule that matches a call wins.
The launchers ask ``tile_config`` with the device's compute capability at launch time (never at import);
``regkern bench --static`` compiles exactly the configurations this table gives at the benchmark shapes, for the
architecture it targets (``regkern.ops.dispatch.compile_target``). Under the Triton interpreter small fixed tiles
keep CPU tests fast.

Roles (what each config's fields mean):
    forward            query tile BLOCK_M, key tile BLOCK_N (attn_fwd_kernel)
    prologue           the qk_norm / RoPE pre-pass: BLOCK_M tokens per program (BLOCK_N unused)
    received           query tile BLOCK_M per step, BLOCK_N keys per program (attn_received_kernel; at most 64
                       with a key mask, whose bias would spill 128 keys' registers on Hopper)
    backward_dkdv      query tile BLOCK_M per step, BLOCK_N keys per program (attn_bwd_dkdv_kernel)
    backward_dq        query tile BLOCK_M, key tile BLOCK_N (attn_bwd_dq_kernel; it also computes the small
                       segment's dK, dV shares)

Besides these tiles, the launchers specialise on whether N (or N - P) leaves a ragged last tile and on its size
rounded up to a power of two (``HAS_TAIL``, ``TAIL_ROWS``; the received pass may split it in two power-of-two pieces,
``TAIL_SPLIT_ROWS``): Triton compiles one variant per such class of N, a handful per model.

The figures behind the choices are static (registers, spills, shared memory, issued instructions; see
``benchmarks/results/static``) until a GPU measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dispatch import device_capability

__all__ = ["ROLES", "TileConfig", "ConfigRule", "TABLE", "INTERPRETER_CONFIG", "tile_config"]

ROLES = ("forward", "prologue", "received", "backward_dkdv", "backward_dq")


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ConfigRule:
    """``config`` applies to ``role`` on compute capabilities ``arch`` (major * 10 + minor, inclusive range), input
    dtypes ``dtypes``, head dims up to ``max_head_dim`` and sequence lengths ``min_n <= N < max_n``."""

    role: str
    arch: tuple[int, int]
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    min_n: int
    max_n: int
    config: TileConfig

    def matches(self, role: str, arch: int, dtype: torch.dtype, head_dim: int, N: int) -> bool:
        return (
            role == self.role
            and self.arch[0] <= arch <= self.arch[1]
            and dtype in self.dtypes
            and head_dim <= self.max_head_dim
            and self.min_n <= N < self.max_n
        )


_HALF = (torch.bfloat16, torch.float16)
_FP32 = (torch.float32,)
_ALL = _HALF + _FP32
_HOPPER = (90, 99)
_AMPERE = (80, 89)
_ANY = (0, 999)
_INF = 1 << 62


def _rule(role, arch, dtypes, max_head_dim, n_range, block_m, block_n, num_warps, num_stages) -> ConfigRule:
    return ConfigRule(
        role, arch, dtypes, max_head_dim, n_range[0], n_range[1], TileConfig(block_m, block_n, num_warps, num_stages)
    )


#: First match wins; the last rule of each role matches everything.
TABLE: tuple[ConfigRule, ...] = (
    # forward: 64 query rows pad N = 197 / 261 to 256 / 320 (128 would pad to 384); 128-key tiles halve the per-tile
    # overhead where N - P is a multiple of 128 or large
    _rule("forward", _HOPPER, _HALF, 64, (0, 512), 64, 128, 4, 3),
    _rule("forward", _HOPPER, _HALF, 64, (512, _INF), 128, 128, 8, 3),
    _rule("forward", _HOPPER, _HALF, 128, (0, _INF), 128, 128, 8, 2),
    _rule("forward", _AMPERE, _HALF, 64, (0, 512), 64, 64, 4, 3),
    _rule("forward", _AMPERE, _HALF, 128, (0, _INF), 128, 64, 8, 3),
    # float32 (4-byte tiles, tf32/ieee MMA) and anything else: small tiles that fit every architecture's shared
    # memory without spills
    _rule("forward", _ANY, _FP32, 64, (0, _INF), 64, 32, 4, 2),
    _rule("forward", _ANY, _ALL, 1 << 30, (0, _INF), 32, 32, 4, 2),
    # the qk_norm / RoPE pre-pass: BLOCK_M tokens of one batch row per program, every head in turn; the warps
    # hold the per-program RoPE coefficients (12 [BLOCK_M, d / 2] float32 tiles) without spilling
    _rule("prologue", _ANY, _ALL, 64, (0, _INF), 16, 64, 2, 1),
    _rule("prologue", _ANY, _ALL, 1 << 30, (0, _INF), 16, 64, 4, 1),
    # received: BLOCK_N keys per program, BLOCK_M queries per step
    _rule("received", _HOPPER, _HALF, 64, (0, _INF), 128, 128, 4, 3),
    _rule("received", _ANY, _HALF, 128, (0, _INF), 128, 64, 4, 3),
    _rule("received", _ANY, _ALL, 1 << 30, (0, _INF), 32, 32, 4, 2),
    # backward dK/dV: on Hopper each warpgroup owns 64 keys (no warpgroup recomputes another's tile); Ampere's
    # mma.sync accumulators live in registers, so it takes 32-query steps
    _rule("backward_dkdv", _HOPPER, _HALF, 64, (0, 512), 64, 64, 4, 3),
    _rule("backward_dkdv", _HOPPER, _HALF, 64, (512, _INF), 64, 128, 8, 2),
    _rule("backward_dkdv", _HOPPER, _HALF, 128, (0, _INF), 32, 64, 4, 2),
    _rule("backward_dkdv", _AMPERE, _HALF, 64, (0, _INF), 32, 64, 4, 2),
    _rule("backward_dkdv", _AMPERE, _HALF, 128, (0, _INF), 64, 32, 8, 2),
    _rule("backward_dkdv", _ANY, _ALL, 1 << 30, (0, _INF), 32, 32, 4, 2),
    # backward dQ
    _rule("backward_dq", _HOPPER, _HALF, 64, (0, 512), 64, 64, 4, 3),
    _rule("backward_dq", _HOPPER, _HALF, 64, (512, _INF), 128, 128, 8, 2),
    _rule("backward_dq", _HOPPER, _HALF, 128, (0, _INF), 128, 64, 8, 2),
    _rule("backward_dq", _AMPERE, _HALF, 64, (0, _INF), 64, 64, 4, 2),
    _rule("backward_dq", _AMPERE, _HALF, 128, (0, _INF), 64, 64, 8, 2),
    _rule("backward_dq", _ANY, _ALL, 1 << 30, (0, _INF), 32, 32, 4, 2),
)

#: The interpreter's tiles: small, so that CPU tests stay fast.
INTERPRETER_CONFIG = TileConfig(16, 16, 1, 1)


def tile_config(role: str, device: torch.device, dtype: torch.dtype, head_dim: int, N: int) -> TileConfig:
    """The configuration of ``role`` for a call on ``device`` (CUDA; anything else gets the interpreter's)."""
    if role not in ROLES:
        raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    major, minor = device_capability(device)
    arch = major * 10 + minor
    for rule in TABLE:
        if rule.matches(role, arch, dtype, head_dim, N):
            return rule.config
    raise LookupError(f"no tile configuration for {role} on sm_{arch}, {dtype}, d={head_dim}, N={N}")
