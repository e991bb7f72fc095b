"""Compile the Triton kernels ahead of time for a GPU target, without a GPU (run as a script, TRITON_INTERPRET=0).

The interpreter runs kernels as Python and so misses compile-time errors (loop-carried type changes, bad casts,
shared-memory overflow). This script lowers each kernel, in the configurations the launchers use, to a cubin for
the given compute capabilities. Usage: python tests/triton_aot_compile.py 90 80
"""

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget

from regkern import attention_triton as at

POINTERS_FP32 = {"LSE", "DELTA", "DRK", "DRV", "QNW", "QNB", "KNW", "KNB", "ROPE", "OUT_SQ", "PREFIX_S", "RECEIVED"}
POINTERS_DATA = {"Q", "K", "V", "RK", "RV", "O", "DO", "DQ", "DK", "DV"}
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


def configs():
    for dtype, precision in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
        for d in (64, 128):
            for N in (261, 1374):
                torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
                block_m, block_n, warps = at._config(N, d, torch_dtype, "cuda")
                for prologue in ((False, False, False), (True, True, True), (False, True, False)):
                    stages = at._forward_stages(prologue[0] or prologue[1])
                    flags = dict(QK_NORM=prologue[0], USE_ROPE=prologue[1], ROTATE_HALF=prologue[2])
                    for stats in (False, True):
                        yield at._attn_fwd_kernel, dtype, warps, stages, dict(
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=16, BLOCK_D=d, HAS_SMALL=True,
                            DOT_PRECISION=precision, STAT_OUT_SQ=stats, STAT_PREFIX=stats, **flags)
                    for small, keys in ((False, block_n), (True, 16)):
                        yield at._attn_received_kernel, dtype, warps, 3, dict(
                            BLOCK_M=block_m, BLOCK_KEYS=keys, BLOCK_D=d, SMALL_SEGMENT=small,
                            DOT_PRECISION=precision, **flags)
                for small, keys in ((False, block_n), (True, 16)):
                    yield at._attn_bwd_dkdv_kernel, dtype, warps, 3, dict(
                        BLOCK_M=block_m, BLOCK_KEYS=keys, BLOCK_D=d, SMALL_SEGMENT=small, DOT_PRECISION=precision)
                yield at._attn_bwd_dq_kernel, dtype, warps, 3, dict(
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=16, BLOCK_D=d, HAS_SMALL=True, DOT_PRECISION=precision)


def main(archs):
    assert not at.INTERPRETED, "run without TRITON_INTERPRET=1"
    seen = set()
    failures = []
    for arch in archs:
        for fn, dtype, warps, stages, constexprs in configs():
            key = (arch, fn.__name__, dtype, warps, stages, tuple(sorted(constexprs.items())))
            if key in seen:
                continue
            seen.add(key)
            src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, dtype, constexprs), constexprs=constexprs)
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": warps, "num_stages": stages})
            print(f"sm_{arch} {fn.__name__} {dtype} warps={warps} stages={stages} {constexprs} "
                  f"shared={kernel.metadata.shared}")
            limit = SHARED_MEMORY_LIMIT[arch]
            if kernel.metadata.shared > limit:
                failures.append(f"sm_{arch} {fn.__name__} {dtype} {constexprs}: {kernel.metadata.shared} bytes of "
                                f"shared memory > {limit}")
    print(f"compiled {len(seen)} kernel configurations")
    if failures:
        raise SystemExit("kernels that would not launch:\n" + "\n".join(failures))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90])
