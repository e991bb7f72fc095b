"""Helpers shared by the benchmarks: device sync, environment facts, ceilings measured in the same run."""

import functools
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@functools.cache
def environment(device_type: str) -> dict:
    """Device and versions, recorded in every benchmark's extra_info."""
    import regkern

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        triton_version = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    cuda = device_type == "cuda"
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        # the dispatch table (regkern/ops/dispatch_table.py) keys its entries by compute capability
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "regkern": regkern.__version__,
        "commit": commit,
    }


def cuda_backend_unavailable(device: torch.device) -> Optional[str]:
    """Why regkern's CUDA backend cannot be benchmarked on ``device``; None when it can (loads the extension,
    building it just in time when it was not prebuilt)."""
    if device.type != "cuda":
        return "the regkern CUDA backend needs a CUDA GPU"
    from regkern import cuda_ext

    reasons = cuda_ext.not_loaded_reasons("cuda")
    return reasons[0] if reasons else None


def peak_memory_bytes(fn, device: torch.device) -> Optional[int]:
    """Peak CUDA memory one more call of ``fn`` allocates beyond what is live (None off the GPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def _median_seconds(fn, device, repeats):
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.cache
def ceilings(device_type: str) -> dict:
    """Copy bandwidth (bytes/s, read + write) and bf16 (GPU) / fp32 (CPU) matmul rate (FLOP/s), measured here."""
    device = torch.device(device_type)
    if device_type == "cuda":
        n_bytes, size, dtype, repeats = 1 << 30, 8192, torch.bfloat16, 20
    else:
        n_bytes, size, dtype, repeats = 1 << 26, 1024, torch.float32, 5
    src = torch.empty(n_bytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device, repeats)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_s = _median_seconds(lambda: a @ b, device, repeats)
    return {
        "copy_bytes_per_s": 2 * n_bytes / copy_s,
        "matmul_flops_per_s": 2 * size**3 / mm_s,
        "matmul_dtype": str(dtype),
    }


def record(benchmark, device: torch.device, flops: float, bytes_moved: float, **extra) -> None:
    """Attach environment, work done, and (when timed) rates and % of the measured ceilings to a benchmark."""
    info = dict(environment(device.type), flops=flops, bytes=bytes_moved, **extra)
    limits = ceilings(device.type)
    info.update(copy_bandwidth=limits["copy_bytes_per_s"], matmul_rate=limits["matmul_flops_per_s"])
    if benchmark.stats is not None:  # None under --benchmark-disable (CI just executes each case)
        median = benchmark.stats.stats.median
        info.update(
            median_s=median,
            tflops=flops / median / 1e12,
            gbps=bytes_moved / median / 1e9,
            pct_matmul=100 * flops / median / limits["matmul_flops_per_s"],
            pct_bandwidth=100 * bytes_moved / median / limits["copy_bytes_per_s"],
        )
    benchmark.extra_info.update(info)
