"""``regkern bench --static``: the machine code of the Triton kernels the launchers run, compiled without a GPU.

Each launcher (attention forward with its variants, the ``received`` pass, the backward; LayerNorm forward and
backward) runs at the benchmark shapes on fake CUDA tensors (``FakeTensorMode``: no memory, no device) while every
kernel launch is recorded instead of run. Each recorded launch is then compiled for the target with exactly what
Triton's own launcher would do at run time: the kernel, its constexprs and options come from the launcher's code
path, and the signature and the alignment / divisibility specialization come from Triton's binder applied to the
recorded arguments (a tensor's address is its storage offset from a 256-byte aligned allocation, as the caching
allocator gives). So the report reads the kernel that would run, not a parallel list of configurations.

Per kernel it reports registers, stack (spill) and shared memory, blocks per SM, the MMA kind (wgmma or mma.sync)
and SASS instruction counts, in total and per inner loop (a loop is a backward branch in the SASS). These are
static figures, never speed: a GPU benchmark run is what measures time.

The LayerNorm backward's launcher sizes its grid by the SM count, which ``dispatch.compile_target`` sets per
architecture (132 SMs for sm_90, 108 for sm_80). Issued instructions per (batch, head) are reported for the
attention launches. ``extension_report`` adds the ``csrc/`` kernels of the built CUDA extension (registers, stack,
static shared memory and SASS counts from ``cuobjdump``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..ops.attention.op import triton_kernels as attention_kernels
from ..ops.dispatch import compile_target
from ..ops.layer_norm.op import NormAccumulators
from ..ops.layer_norm.op import triton_kernels as layer_norm_kernels
from .bench_results import git_commit

__all__ = [
    "Specialization",
    "specialize",
    "SHAPES",
    "Launch",
    "capture_launches",
    "compile_launch",
    "static_report",
    "issued_per_head",
    "issued_per_call",
    "built_extension",
    "parse_resource_usage",
    "split_sass_functions",
    "extension_report",
    "format_extension_markdown",
    "format_static_markdown",
    "add_static_arguments",
    "run_static",
]

#: (name, B, N, H, d): the benchmark shapes (ViT-S/16@224, ViT-B/14-reg4@224, ViT-L/14-reg4@518, ViT-g/14-reg4@518,
#: a d=128 case); P = 1 + 4 registers where the model has them
SHAPES = (
    ("vits16-224", 1, 197, 6, 64, 1),
    ("vitb14reg4-224", 1, 261, 12, 64, 5),
    ("vitl14reg4-518", 1, 1374, 16, 64, 5),
    ("vitg14reg4-518", 1, 1374, 24, 64, 5),
    ("d128-1025", 1, 1025, 8, 128, 1),
)

#: registers, shared memory, threads and blocks per SM by compute capability (sm_86/89: 100 KB, 1536 threads)
_SM_LIMITS = {
    90: (65536, 228 * 1024, 2048, 32),
    80: (65536, 164 * 1024, 2048, 32),
    86: (65536, 100 * 1024, 1536, 16),
    89: (65536, 100 * 1024, 1536, 24),
}


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its grid, its arguments (tensors as address/dtype stand-ins)
    and keyword arguments (constexprs and options), and what it was for."""

    kernel: object
    grid: tuple
    args: list
    kwargs: dict
    variant: str = ""
    shape: str = ""
    dtype: str = ""


class _TensorArg:
    """What Triton's binder reads of a tensor argument: its dtype and its address (for the alignment check)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._address = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


def capture_launches(launcher: Callable[[], object]) -> list[Launch]:
    """Run ``launcher()`` (which builds its inputs on the "cuda" device) under ``FakeTensorMode`` and return the
    kernel launches it makes, without running any."""
    # lazy import of triton: the report is a developer tool, and importing regkern does not need triton
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        grid = grid(kwargs) if callable(grid) else grid
        stand_ins = [_TensorArg(a) if isinstance(a, torch.Tensor) else a for a in args]
        launches.append(Launch(self, tuple(int(g) for g in grid), stand_ins, dict(kwargs)))

    JITFunction.run = record
    try:
        with FakeTensorMode():
            launcher()
    finally:
        JITFunction.run = original
    return launches


def _tool(name: str) -> str:
    # lazy import of triton: see capture_launches
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_BRANCH = re.compile(r"\bBRA\b[^;]*?0x([0-9a-f]+)")
_CLASSES = {
    "mma": ("HGMMA", "HMMA"),
    "ex2": ("MUFU.EX2",),
    "async_load": ("LDGSTS", "UTMALDG", "UBLKCP", "LDGDEPBAR"),
    "global_load": ("LDG",),
    "barrier": ("BAR", "WARPGROUP.ARRIVE", "WARPSYNC", "SYNCS"),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FCHK"),
    "integer": ("IMAD", "IADD3", "LOP3", "ISETP", "SHF", "LEA", "IMNMX", "SEL", "IABS", "SGXT", "PRMT"),
}


def _classify(opcode: str) -> Optional[str]:
    for cls, prefixes in _CLASSES.items():
        if any(opcode == p or opcode.startswith(p + ".") for p in prefixes):
            return cls
    return None


def _counts(instructions: Sequence[str]) -> dict[str, int]:
    counts = {cls: 0 for cls in _CLASSES}
    for opcode in instructions:
        cls = _classify(opcode)
        if cls is not None:
            counts[cls] += 1
    counts["total"] = len(instructions)
    return counts


def sass_summary(sass: str) -> dict[str, object]:
    """Instruction counts of a kernel's SASS (``cuobjdump -sass``), in total and per inner loop (the body from a
    backward branch's target to the branch); NOPs are not counted."""
    rows = []  # (address, opcode, line)
    for line in sass.splitlines():
        found = _INSTRUCTION.search(line)
        if found and found.group(2) != "NOP":
            rows.append((int(found.group(1), 16), found.group(2), line))
    loops = []
    for address, opcode, line in rows:
        branch = _BRANCH.search(line) if opcode == "BRA" else None
        if branch is not None and int(branch.group(1), 16) < address:  # not the `BRA` to itself after EXIT
            start = int(branch.group(1), 16)
            body = [op for a, op, _ in rows if start <= a <= address]
            loops.append({"start": hex(start), "end": hex(address), **_counts(body)})
    inner = [
        loop
        for loop in loops
        if not any(o is not loop and loop["start"] <= o["start"] and o["end"] <= loop["end"] for o in loops)
    ]
    kind = (
        "wgmma"
        if any(op.startswith("HGMMA") for _, op, _ in rows)
        else ("mma.sync" if any(op.startswith("HMMA") for _, op, _ in rows) else "none")
    )
    return {"mma_kind": kind, "counts": _counts([op for _, op, _ in rows]), "inner_loops": inner}


def _resource_usage(cubin_path: str) -> dict[str, int]:
    out = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True, check=True
    ).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.search(rf"\b{key}:(\d+)", out)
        usage[key.lower()] = int(found.group(1)) if found else 0
    return usage


@dataclass
class Specialization:
    """What Triton's launcher derives from one launch for a target: the bound arguments, signature, constexprs,
    alignment/divisibility attributes and options. ``key`` identifies the compiled kernel (as Triton's cache does)."""

    target: object
    bound: dict
    signature: dict
    constexprs: dict
    attrs: dict
    options: object

    @property
    def key(self) -> str:
        return repr((self.target, self.signature, self.constexprs, self.attrs, self.options))


def specialize(launch: Launch, arch: int) -> Specialization:
    """Apply Triton's own binder to a recorded launch for ``sm_<arch>`` (what ``JITFunction.run`` does before it
    compiles)."""
    # lazy import of triton: see capture_launches
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Specialization(target, bound, signature, constexprs, attrs, options)


def compile_launch(launch: Launch, arch: int, spec: Optional[Specialization] = None) -> dict[str, object]:
    """Compile one recorded launch for ``sm_<arch>`` as Triton's launcher would, and summarise its machine code."""
    # lazy import of triton: see capture_launches
    import triton
    from triton.compiler import ASTSource

    fn = launch.kernel
    spec = spec or specialize(launch, arch)
    bound = spec.bound
    source = ASTSource(fn, spec.signature, spec.constexprs, spec.attrs)
    kernel = triton.compile(source, target=spec.target, options=spec.options.__dict__)
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        usage = _resource_usage(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    warps = int(kernel.metadata.num_warps)
    shared = int(kernel.metadata.shared) + usage["shared"]
    regs_per_sm, smem_per_sm, threads_per_sm, blocks_max = _SM_LIMITS[arch]
    threads = 32 * warps
    by_regs = regs_per_sm // max(1, usage["reg"] * threads)
    by_smem = smem_per_sm // shared if shared else blocks_max
    blocks = {name: value for name, value in bound.items() if name.startswith("BLOCK_")}
    return {
        "kernel": fn.__name__,
        "variant": launch.variant,
        "shape": launch.shape,
        "dtype": launch.dtype,
        "arch": f"sm_{arch}",
        "grid": list(launch.grid),
        "blocks": {k: int(v) for k, v in blocks.items()},
        "num_warps": warps,
        "num_stages": int(kernel.metadata.num_stages),
        "registers": usage["reg"],
        "stack_bytes": usage["stack"],
        "local_bytes": usage["local"],
        "shared_bytes": shared,
        "blocks_per_sm": max(0, min(by_regs, by_smem, threads_per_sm // threads, blocks_max)),
        **_with_per_score(sass_summary(sass), warps, blocks),
    }


def _with_per_score(summary: dict, warps: int, blocks: dict) -> dict:
    """Warp-instructions per score (query-key pair) of each inner loop that computes scores (MMA and EX2): the loop
    body times the warps, over the BLOCK_M x BLOCK_N (or BLOCK_KEYS) scores one iteration computes."""
    tile = blocks.get("BLOCK_M", 0) * blocks.get("BLOCK_N", blocks.get("BLOCK_KEYS", 0))
    for loop in summary["inner_loops"]:
        scores = loop["mma"] and loop["ex2"] and tile
        loop["per_score"] = round(loop["total"] * warps / tile, 3) if scores else None
    return summary


@dataclass
class _Case:
    variant: str
    launcher: Callable[[], object]
    shape: str
    dtype: str
    extra: dict = field(default_factory=dict)


def _attention_cases(name, B, N, H, d, P, dtype) -> list[_Case]:
    kernels = attention_kernels()
    dt = str(dtype).replace("torch.", "")

    def inputs(R=4):
        qkv = torch.empty(B, N, 3, H, d, dtype=dtype, device="cuda")
        q, k, v = qkv.unbind(2)
        reg = torch.empty(R, H, d, dtype=dtype, device="cuda") if R else None
        return q, k, v, reg, reg

    def packed():  # B sequences of N tokens packed as (B * N, H, d): the varlen kernels' view of the same shape
        qkv = torch.empty(B * N, 3, H, d, dtype=dtype, device="cuda")
        cu = torch.empty(B + 1, dtype=torch.int32, device="cuda")
        reg = torch.empty(4, H, d, dtype=dtype, device="cuda")
        return (*qkv.unbind(1), cu, reg)

    def varlen_forward():
        q, k, v, cu, reg = packed()
        kernels.attention_forward_varlen(q, k, v, cu, N, reg, reg, d**-0.5, P)

    def varlen_backward():
        q, k, v, cu, reg = packed()
        out = torch.empty(B * N, H, d, dtype=dtype, device="cuda")
        lse = torch.empty(H, B * N, dtype=torch.float32, device="cuda")
        kernels.attention_backward_varlen(out, q, k, v, cu, N, reg, reg, out, lse, d**-0.5, P)

    def key_bias(masked: bool):
        return torch.empty(B, N, dtype=torch.float32, device="cuda") if masked else None

    def forward(stats=(), prologue=False, masked=False, rope_heads=()):
        def run():
            q, k, v, rk, rv = inputs()
            norms = {}
            rope = None
            if prologue:
                w = torch.empty(d, dtype=dtype, device="cuda")
                norms = dict(qk_norm=True, q_norm_weight=w, q_norm_bias=w, k_norm_weight=w, k_norm_bias=w)
                rope = torch.empty(*rope_heads, N - P, 2 * d, dtype=torch.float32, device="cuda")
            kernels.attention_forward(
                q, k, v, rk, rv, d**-0.5, P, stats=stats, rope=rope, key_bias=key_bias(masked), **norms
            )

        return run

    def backward(masked=False):
        def run():
            q, k, v, rk, rv = inputs()
            out = torch.empty(B, N, H, d, dtype=dtype, device="cuda")
            lse = torch.empty(B, H, N, dtype=torch.float32, device="cuda")
            kernels.attention_backward(out, q, k, v, rk, rv, out, lse, d**-0.5, P, key_bias=key_bias(masked))

        return run

    return [
        _Case("forward", forward(), name, dt),
        _Case("forward+out_norm+prefix_rows", forward(("out_norm", "prefix_rows")), name, dt),
        _Case("forward+received", forward(("received",)), name, dt),
        _Case("forward+received_groups", forward(("received_groups",)), name, dt),  # what the norm monitor runs
        _Case("forward+qk_norm+rope", forward(prologue=True), name, dt),
        # a table per head (timm's mixed RoPE): the pre-pass loads each head's sin/cos and rotates in turn
        _Case("forward+qk_norm+rope_per_head", forward(prologue=True, rope_heads=(H,)), name, dt),
        _Case("forward+key_mask", forward(masked=True), name, dt),
        _Case("forward+key_mask+received_groups", forward(("received_groups",), masked=True), name, dt),
        _Case("forward+key_mask+received", forward(("received",), masked=True), name, dt),
        _Case("backward", backward(), name, dt),
        _Case("backward+key_mask", backward(masked=True), name, dt),
        _Case("varlen forward", varlen_forward, name, dt),
        _Case("varlen backward", varlen_backward, name, dt),
    ]


def _layer_norm_cases(dtype) -> list[_Case]:
    kernels = layer_norm_kernels()
    cases = []
    for C in (384, 768, 1024, 1536):

        def run(C=C):
            x = torch.empty(8, 261, C, dtype=dtype, device="cuda")
            w = torch.empty(C, dtype=dtype, device="cuda")
            kernels.layer_norm_forward(x, w, w, 1e-6)

        def backward(C=C):
            x = torch.empty(8, 261, C, dtype=dtype, device="cuda")
            w = torch.empty(C, dtype=dtype, device="cuda")
            stats = torch.empty(8, 261, dtype=torch.float32, device="cuda")
            kernels.layer_norm_backward(x, x, w, w, stats, stats)

        def monitored(C=C):
            x = torch.empty(8, 261, C, dtype=dtype, device="cuda")
            w = torch.empty(C, dtype=dtype, device="cuda")

            def buf(*shape, dtype):
                return torch.empty(shape, dtype=dtype, device="cuda")

            i64, f64 = torch.int64, torch.float64
            acc = NormAccumulators(
                1, 5, 150.0, buf(47, dtype=torch.float32), buf(3, dtype=i64), buf(3, dtype=f64), buf(3, dtype=f64),
                buf(3, dtype=torch.float32), buf(3, dtype=i64), buf(3, 48, dtype=i64),
            )  # fmt: skip
            kernels.layer_norm_forward_monitored(x, w, w, 1e-6, acc)

        dt = str(dtype).replace("torch.", "")
        cases += [
            _Case("layer_norm_forward", run, f"C{C}", dt),
            _Case("layer_norm_forward_monitored", monitored, f"C{C}", dt),
            _Case("layer_norm_backward", backward, f"C{C}", dt),
        ]
    return cases


def static_report(
    archs: Sequence[int] = (90,),
    dtype: torch.dtype = torch.bfloat16,
    shapes: Sequence[tuple] = SHAPES,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """One record per compiled kernel launch (see the module docstring); duplicates (the same kernel, constexprs
    and options at two shapes) are compiled once and reported per shape. Each launch's configuration is the one the
    launcher picks for that architecture (``dispatch.compile_target``: its capability and SM count)."""
    heads = {name: (B, H) for name, B, _, H, *_ in shapes}
    cases = [c for shape in shapes for c in _attention_cases(*shape, dtype)] + _layer_norm_cases(dtype)
    records, cache = [], {}
    for arch in archs:
        for case in cases:
            with compile_target(arch):
                launches = capture_launches(case.launcher)
            for launch in launches:
                launch.variant, launch.shape, launch.dtype = case.variant, case.shape, case.dtype
                spec = specialize(launch, arch)
                key = (launch.kernel.__name__, spec.key)
                if key not in cache:
                    cache[key] = compile_launch(launch, arch, spec)
                    progress(f"compiled sm_{arch} {launch.kernel.__name__} ({case.variant}, {case.shape})")
                record = dict(cache[key], variant=case.variant, shape=case.shape, grid=list(launch.grid))
                if case.shape in heads:
                    B, H = heads[case.shape]
                    trips = attention_kernels().loop_trip_counts(launch.kernel.__name__, spec.bound)
                    record.update(issued_per_head(record, trips, launch.grid[0] / (B * H)))
                records.append(record)
    return records


def issued_per_head(record: dict, trips: Sequence[int], programs: float) -> dict:
    """Issued warp-instructions per (batch, head) of one launch: (instructions outside loops + sum over loops of trip
    count x loop body) x warps x programs per (batch, head). Everything outside the loops counts once per program
    (code a program skips included), so the figure is an upper bound on straight-line code. ``programs`` is the
    grid over B * H, a fraction for kernels whose programs cover several heads (the qk_norm / RoPE pre-pass)."""
    shown = int(programs) if programs == int(programs) else round(programs, 3)
    loops = record["inner_loops"]
    if len(loops) != len(trips):
        return {"trips": list(trips), "programs_per_head": shown, "issued_per_head": None}
    inside = sum(loop["total"] for loop in loops)
    per_program = record["counts"]["total"] - inside + sum(t * loop["total"] for t, loop in zip(trips, loops))
    return {
        "trips": list(trips),
        "programs_per_head": shown,
        "issued_per_head": round(per_program * record["num_warps"] * programs),
    }


def issued_per_call(records: Sequence[dict]) -> dict[tuple[str, str, str], int]:
    """(arch, shape, variant) -> issued warp-instructions per (batch, head) summed over the call's launches."""
    totals: dict[tuple[str, str, str], int] = {}
    for r in records:
        if r.get("issued_per_head") is not None:
            key = (r["arch"], r["shape"], r["variant"])
            totals[key] = totals.get(key, 0) + r["issued_per_head"]
    return totals


def format_static_markdown(records: Sequence[dict], environment: dict) -> str:
    """A table per architecture: one row per launch (static figures, not speed)."""
    lines = [
        "# regkern static kernel report",
        "",
        f"Triton {environment.get('triton')}, torch {environment.get('torch')}, commit "
        f"{environment.get('commit')}; compiled without a GPU with the launchers' run-time specialization. "
        "Static figures (registers, spills, shared memory, SASS counts), not speed.",
        "",
    ]
    totals = issued_per_call(records)
    for arch in sorted({r["arch"] for r in records}):
        shapes = list(dict.fromkeys(s for a, s, _ in totals if a == arch))
        variants = list(dict.fromkeys(v for a, _, v in totals if a == arch))
        if shapes:
            lines += [
                f"## {arch}: issued warp-instructions per (batch, head), whole call (ratio to the plain forward)",
                "",
                "| shape | " + " | ".join(variants) + " |",
                "| --- |" + " ---: |" * len(variants),
            ]
            for shape in shapes:
                plain = totals.get((arch, shape, "forward"))
                cells = []
                for variant in variants:
                    value = totals.get((arch, shape, variant))
                    ratio = f" ({value / plain:.2f}x)" if value and plain and variant != "forward" else ""
                    cells.append("" if value is None else f"{value:,}{ratio}")
                lines.append(f"| {shape} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [
            f"## {arch}",
            "",
            "| shape | variant | kernel | blocks | warps | stages | regs | stack B | shared B | blocks/SM | MMA "
            "| SASS total | inner loops: total (MMA, EX2, FP32, int), warp-instructions per score "
            "| programs x trips | issued per (b, h) |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- | ---: |",
        ]
        for r in (r for r in records if r["arch"] == arch):
            loops = "; ".join(
                f"{lp['total']} ({lp['mma']}, {lp['ex2']}, {lp['fp32']}, {lp['integer']})"
                + (f", {lp['per_score']}/score" if lp.get("per_score") else "")
                for lp in r["inner_loops"]
            )
            blocks = " ".join(f"{k[6:]}={v}" for k, v in r["blocks"].items())
            lines.append(
                f"| {r['shape']} | {r['variant']} | {r['kernel']} | {blocks} | {r['num_warps']} | "
                f"{r['num_stages']} | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} | "
                f"{r['blocks_per_sm']} | {r['mma_kind']} | {r['counts']['total']} | {loops} | "
                f"{r.get('programs_per_head', '')} x {r.get('trips', '')} | {r.get('issued_per_head') or ''} |"
            )
        lines.append("")
    return "\n".join(lines)


def add_static_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--static",
        action="store_true",
        help="instead of timing: compile every Triton kernel the launchers run at the benchmark shapes "
        "for --arch without a GPU and report registers, spills, shared memory and SASS counts",
    )
    p.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=[90],
        metavar="CC",
        help="with --static: compute capabilities to compile for (default: %(default)s)",
    )


def built_extension() -> Optional[Path]:
    """The built CUDA extension (``regkern._C``) if there is one, else None."""
    spec = importlib.util.find_spec("regkern._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def _demangle(names: Sequence[str]) -> list[str]:
    """Kernel names as ``name<template args>`` (c++filt when present, else the mangled names)."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return list(names)
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = []
    for line in out.splitlines():
        line = re.sub(r"regkern::(\(anonymous namespace\)::)?", "", re.sub(r"^void ", "", line))
        short.append(re.sub(r"\([^()]*\)$", "", line))  # the parameter list
    return short


def parse_resource_usage(text: str) -> dict[tuple[int, str], tuple]:
    """``cuobjdump -res-usage`` of a fat binary -> {(arch, mangled kernel): (source file, registers, stack, static
    shared, local)}."""
    resources, arch, source, name = {}, None, "", None
    for line in text.splitlines():
        if found := re.match(r"\s*arch = sm_(\d+)", line):
            arch = int(found.group(1))
        elif found := re.match(r"\s*identifier = (.+)", line):
            source = Path(found.group(1).strip()).name
        elif found := re.match(r"\s*Function (\S+):", line):
            name = found.group(1)
        elif (found := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)) and name:
            resources[(arch, name)] = (source, *(int(g) for g in found.groups()))
    return resources


def split_sass_functions(text: str) -> dict[tuple[int, str], str]:
    """``cuobjdump -sass`` of a fat binary -> {(arch, mangled kernel): its SASS}."""
    bodies, arch, name = {}, None, None
    for line in text.splitlines():
        if found := re.match(r"\s*arch = sm_(\d+)", line):
            arch, name = int(found.group(1)), None
        elif found := re.match(r"\s*Function : (\S+)", line):
            name = found.group(1)
            bodies[(arch, name)] = []
        elif name is not None:
            bodies[(arch, name)].append(line)
    return {key: "\n".join(lines) for key, lines in bodies.items()}


def extension_report(path: Optional[Path] = None, archs: Sequence[int] = (90, 80)) -> list[dict]:
    """One record per ``csrc/`` kernel and architecture in the built extension (``cuobjdump -res-usage`` and
    ``-sass``): registers, stack, static shared memory (the kernels' dynamic shared memory is sized at launch), the MMA
    kind and SASS counts. [] when no extension is built."""
    path = path or built_extension()
    if path is None or not path.exists():
        return []
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True)
    resources, bodies = parse_resource_usage(usage.stdout), split_sass_functions(sass.stdout)
    keys = [key for key in resources if key[0] in archs]
    records = []
    for (arch, name), short in zip(keys, _demangle([name for _, name in keys])):
        source, regs, stack, shared, local = resources[(arch, name)]
        summary = sass_summary(bodies.get((arch, name), ""))
        records.append(
            {
                "kernel": short,
                "source": source,
                "arch": f"sm_{arch}",
                "registers": regs,
                "stack_bytes": stack,
                "local_bytes": local,
                "static_shared_bytes": shared,
                **summary,
            }
        )
    return records


def format_extension_markdown(records: Sequence[dict]) -> str:
    """The csrc/ kernels' table (static figures)."""
    lines = [
        "## csrc/ kernels (the built extension)",
        "",
        "| arch | source | kernel | regs | stack B | static shared B | MMA | SASS total (MMA, EX2) "
        "| innermost loops: total (MMA, EX2) |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in records:
        loops = "; ".join(f"{lp['total']} ({lp['mma']}, {lp['ex2']})" for lp in r["inner_loops"])
        lines.append(
            f"| {r['arch']} | {r['source']} | `{r['kernel']}` | {r['registers']} | {r['stack_bytes']} | "
            f"{r['static_shared_bytes']} | {r['mma_kind']} | {r['counts']['total']} ({r['counts']['mma']}, "
            f"{r['counts']['ex2']}) | {loops} |"
        )
    return "\n".join(lines + [""])


def run_static(out_dir: Path, archs: Sequence[int], out: Callable[[str], None] = print) -> list[dict]:
    """Write ``static.json`` and ``static.md`` under ``out_dir``; returns the records."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("--static: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    # lazy import of triton: see capture_launches
    import triton

    records = static_report(archs, progress=out)
    extension = extension_report(archs=archs)
    environment = {"triton": triton.__version__, "torch": torch.__version__, "commit": git_commit()}
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {"environment": environment, "records": records, "extension": extension}
    (out_dir / "static.json").write_text(json.dumps(document, indent=2))
    markdown = (
        format_static_markdown(records, environment)
        + "\n"
        + (
            format_extension_markdown(extension)
            if extension
            else "## csrc/ kernels\n\nNo built extension "
            "(build it: `REGKERN_BUILD_CUDA=1 pip install --no-build-isolation -e .`).\n"
        )
    )
    (out_dir / "static.md").write_text(markdown)
    out(markdown)
    out(f"written: {out_dir / 'static.json'}, {out_dir / 'static.md'}")
    return records
