"""Compile the Triton kernels ahead of time for a GPU target, without a GPU (run as a script, TRITON_INTERPRET=0).

The interpreter runs kernels as Python and so misses compile-time errors (loop-carried type changes, bad casts,
shared-memory overflow). This script lowers each kernel, in the configurations the launchers use, to a cubin for
the given compute capabilities. Usage: python tests/ops/triton_aot_compile.py 90 80
"""

import multiprocessing
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget

from regkern.ops.attention import triton_kernels as at
from regkern.ops.layer_norm import triton_kernels as lnt

POINTERS_FP32 = {"LSE", "DELTA", "DRK", "DRV", "QNW", "QNB", "KNW", "KNB", "ROPE", "OUT_SQ", "PREFIX_S", "RECEIVED"}
POINTERS_DATA = {"Q", "K", "V", "RK", "RV", "Out", "DO", "DQ", "DK", "DV"}
FLOATS = {"qk_scale_log2", "scale", "norm_eps"}
# opt-in shared memory per block (bytes): H100/H200 227 KiB, A100 163 KiB
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}


def signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS_FP32:
            sig[name] = "*fp32"
        elif name in POINTERS_DATA:
            sig[name] = f"*{dtype}"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def configs(arch):
    """The attention launchers' configurations. sm_90 gets all; sm_80 (smaller shared memory) the prologue and
    statistics variants, where shared memory is tightest."""
    for dtype, precision in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        for d in (64, 128):
            for N in (261, 1374):
                block_m, block_n, warps = at.launch_config(N, d, torch_dtype, "cuda")
                # (qk_norm, rope, rotate_half, statistics)
                variants = [
                    (False, False, False, False),
                    (False, False, False, True),
                    (True, True, True, True),
                    (False, True, False, False),
                ]
                for qk_norm, rope, half, stats in variants[1 if arch == 80 else 0 :]:
                    stages = at.forward_stages(qk_norm or rope)
                    flags = dict(QK_NORM=qk_norm, USE_ROPE=rope, ROTATE_HALF=half)
                    yield (
                        at.attn_fwd_kernel,
                        dtype,
                        warps,
                        stages,
                        dict(
                            BLOCK_M=block_m,
                            BLOCK_N=block_n,
                            BLOCK_S=16,
                            BLOCK_D=d,
                            HAS_SMALL=True,
                            DOT_PRECISION=precision,
                            STAT_OUT_SQ=stats,
                            STAT_PREFIX=stats,
                            **flags,
                        ),
                    )
                    if stats:
                        for small, keys in ((False, block_n), (True, 16)):
                            yield (
                                at.attn_received_kernel,
                                dtype,
                                warps,
                                at.received_stages(qk_norm or rope),
                                dict(
                                    BLOCK_M=block_m,
                                    BLOCK_KEYS=keys,
                                    BLOCK_D=d,
                                    SMALL_SEGMENT=small,
                                    DOT_PRECISION=precision,
                                    **flags,
                                ),
                            )
                for small, keys in ((False, block_n), (True, 16)):
                    yield (
                        at.attn_bwd_dkdv_kernel,
                        dtype,
                        warps,
                        3,
                        dict(BLOCK_M=block_m, BLOCK_KEYS=keys, BLOCK_D=d, SMALL_SEGMENT=small, DOT_PRECISION=precision),
                    )
                yield (
                    at.attn_bwd_dq_kernel,
                    dtype,
                    warps,
                    3,
                    dict(
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=16, BLOCK_D=d, HAS_SMALL=True, DOT_PRECISION=precision
                    ),
                )


# LayerNorm with norm capture (regkern.ops.layer_norm.triton_kernels): its pointer and float argument names
POINTERS_FP32 |= {"NORMS", "MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL"}
POINTERS_DATA |= {"X", "Y", "W", "BIAS", "DY", "DX"}
FLOATS |= {"eps"}


def layer_norm_configs():
    """Forward and backward LayerNorm kernels at ViT widths, with and without the affine parameters."""
    for dtype in ("bf16", "fp16", "fp32"):
        for C in (384, 768, 1024, 1536):
            block_r, block_c, warps = lnt.launch_config(C, "cuda")
            for affine in (True, False):
                flags = dict(BLOCK_R=block_r, BLOCK_C=block_c, HAS_W=affine, HAS_B=affine)
                yield lnt.ln_fwd_kernel, dtype, warps, 3, flags  # the launchers leave num_stages at its default
                yield lnt.ln_bwd_kernel, dtype, warps, 3, flags


def _compile(job):
    arch, module_name, fn_name, dtype, warps, stages, constexprs = job
    fn = getattr(sys.modules[module_name], fn_name)
    src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, dtype, constexprs), constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    return job, kernel.metadata.shared


def main(archs):
    assert not at.INTERPRETED, "run without TRITON_INTERPRET=1"
    jobs = {}
    for arch in archs:
        for fn, dtype, warps, stages, constexprs in [*configs(arch), *layer_norm_configs()]:
            key = (arch, fn.__name__, dtype, warps, stages, tuple(sorted(constexprs.items())))
            jobs.setdefault(key, (arch, fn.__module__, fn.__name__, dtype, warps, stages, constexprs))
    failures = []
    # compiling is CPU-bound and independent per configuration: use every core
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for (arch, _, name, dtype, warps, stages, constexprs), shared in pool.imap_unordered(_compile, jobs.values()):
            print(f"sm_{arch} {name} {dtype} warps={warps} stages={stages} {constexprs} shared={shared}", flush=True)
            if shared > SHARED_MEMORY_LIMIT[arch]:
                failures.append(
                    f"sm_{arch} {name} {dtype} {constexprs}: {shared} bytes of shared memory > "
                    f"{SHARED_MEMORY_LIMIT[arch]}"
                )
    print(f"compiled {len(jobs)} kernel configurations")
    if failures:
        raise SystemExit("kernels that would not launch:\n" + "\n".join(failures))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90])
