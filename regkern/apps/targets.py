"""The performance targets of the project's issues, judged from one ``regkern bench`` run.

They belong to the benchmark app, not to the runtime library: ``regkern bench`` marks each met / not met / not
measured (a CPU run measures none of them: speed is claimed only from GPU runs).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["evaluate_targets"]


def _target(description: str, value: Optional[float], ok: Optional[bool], unit: str = "") -> dict[str, object]:
    status = "not measured" if ok is None else ("met" if ok else "not met")
    return {"target": description, "value": None if value is None else round(value, 4), "unit": unit, "status": status}


def evaluate_targets(ops: list[dict], gpu: bool) -> list[dict[str, object]]:
    """The targets with their values from ``ops`` (benchmark cases with a contender, shape and mode); every verdict
    is "not measured" unless ``gpu`` (the run was on a GPU)."""

    def find(shape, mode, contender):
        for c in ops:
            if (c["shape"], c["mode"], c["contender"]) == (shape, mode, contender):
                return c
        return None

    def ratio(a, b):
        return a["median_s"] / b["median_s"] if a and b else None

    def verdict(value, good):
        return None if value is None or not gpu else good(value)

    b = "vitb14reg4-224"
    triton_b = find(b, "fwd", "regkern-triton")
    floor = (triton_b["bytes"] / triton_b["copy_bandwidth"]) if triton_b else None
    to_floor = (triton_b["median_s"] / floor) if triton_b and floor else None
    vs_timm = ratio(find(b, "fwd", "timm"), triton_b)
    l_tflops = (find("vitl14reg4-518", "fwd", "regkern-triton") or {}).get("tflops")
    kv_cost = ratio(find(b, "fwd", "regkern-triton-R16"), triton_b)
    bwd = ratio(find(b, "fwd+bwd", "regkern-triton"), find(b, "fwd+bwd", "sdpa-flash"))
    out_norm = ratio(find(b, "fwd", "regkern-triton-outnorm"), triton_b)
    prefix = ratio(find(b, "fwd", "regkern-triton-monitor"), triton_b)
    received = ratio(find(b, "fwd", "regkern-triton-monitor-received"), triton_b)
    large = "vitl14reg4-518"
    maps_speedup = ratio(find(large, "fwd", "timm-maps"), find(large, "fwd", "regkern-triton-monitor-received"))
    cuda_b = ratio(triton_b, find(b, "fwd", "regkern-cuda"))  # speedup of cuda over triton
    targets = [
        _target("ViT-B/14-reg4 224px fwd: time / memory floor <= 1.4", to_floor, verdict(to_floor, lambda v: v <= 1.4)),
        _target(
            "ViT-B/14-reg4 224px fwd: speedup over timm's path >= 1.5",
            vs_timm,
            verdict(vs_timm, lambda v: v >= 1.5),
            "x",
        ),
        _target("ViT-L/14-reg4 518px fwd: >= 400 TFLOP/s", l_tflops, verdict(l_tflops, lambda v: v >= 400), "TFLOP/s"),
        _target("KV registers R=16 cost <= 3% (time ratio <= 1.03)", kv_cost, verdict(kv_cost, lambda v: v <= 1.03)),
        _target("fwd+bwd time <= SDPA flash fwd+bwd", bwd, verdict(bwd, lambda v: v <= 1.0)),
        _target("out_norm epilogue <= 5% (time ratio <= 1.05)", out_norm, verdict(out_norm, lambda v: v <= 1.05)),
        _target("out_norm + prefix_rows <= 10% (time ratio <= 1.10)", prefix, verdict(prefix, lambda v: v <= 1.10)),
        _target("+ received <= 1.7x", received, verdict(received, lambda v: v <= 1.7)),
        _target(
            "N=1374: monitored fused path >= 5x faster than timm unfused + reductions",
            maps_speedup,
            verdict(maps_speedup, lambda v: v >= 5),
            "x",
        ),
        _target(
            "CUDA forward at least Triton's speed at ViT-B/14-reg4 224 px (speedup over triton >= 1.0)",
            cuda_b,
            verdict(cuda_b, lambda v: v >= 1.0),
            "x",
        ),
    ]
    return targets
