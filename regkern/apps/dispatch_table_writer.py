"""Writing the measured dispatch table from a benchmark run (``regkern bench --dispatch-table PATH``).

The runtime library only reads tables (``regkern.ops.dispatch_table``); this app turns ``regkern bench``'s
results.json into entries (``entries_from_bench``) and writes them (``write_table``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from ..ops.dispatch_table import (
    VERSION,
    DispatchEntry,
    clear_cache,
    is_int,
    parse_capability,
    parse_dtype_name,
)
from .bench_results import bench_cases

__all__ = ["entries_from_bench", "write_table", "COMMENT"]

COMMENT = (
    "Measured triton-vs-cuda choices of backend='auto' (regkern.ops.dispatch_table); no matching entry means "
    "triton. Regenerate on a GPU: python -m regkern bench --out DIR --dispatch-table "
    "regkern/ops/dispatch_table.json"
)

#: benchmark contenders compared per op: (the default's contender, the CUDA backend's contender); the attention
#: variants with KV registers or statistics are reported by ``regkern bench`` but not used for dispatch
_BENCH_PAIRS = {
    "attention": ("regkern-triton", "regkern-cuda"),
    "layer_norm": ("regkern-triton", "regkern-cuda"),
    "embed_tokens": ("regkern-reference", "regkern-cuda"),  # no Triton kernel: the default path is PyTorch
}


def _bench_cases(results: dict) -> list[dict]:
    if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), list):
        raise ValueError("results: expected pytest-benchmark JSON (a dict with a 'benchmarks' list)")
    return bench_cases(results)


def _case_op(case: dict) -> Optional[str]:
    # attention cases recorded before "op" existed are recognised by their head dim
    return case.get("op", "attention" if "d" in case and "contender" in case else None)


def entries_from_bench(results: dict, margin: float = 1.03, source: Optional[str] = None) -> list[DispatchEntry]:
    """Dispatch entries from one benchmark run (``python -m regkern bench``'s results.json).

    For every op, GPU, dtype, dim and N measured in forward mode by both the default's contender and the CUDA
    backend's (``regkern-triton`` and ``regkern-cuda``; ``regkern-reference`` for embed_tokens), one entry for
    exactly that N (for layer_norm, whose modules choose without knowing N: one entry for every length, pooled): "cuda"
    when it is at least ``margin`` times faster, else "triton". Shapes sharing a key (e.g.
    two batch sizes at the same N) are pooled: the ratio of their summed median times.

    Args:
        results: pytest-benchmark JSON as a dict.
        margin: how much faster cuda must be to be chosen (>= 1; noise should not flip the default).
        source: named in each entry (e.g. the results file); the run's date and commit are added."""
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not margin >= 1.0:
        raise ValueError(f"margin: expected a number >= 1.0, got {margin!r}")
    cases = _bench_cases(results)
    # (op, shape id) -> {contender: case}, forward only: the table serves inference dispatch
    runs: dict[tuple[str, str], dict[str, dict]] = {}
    for c in cases:
        op = _case_op(c)
        if op in _BENCH_PAIRS and c.get("mode") == "fwd" and c.get("median_s") is not None:
            runs.setdefault((op, c.get("shape")), {})[c["contender"]] = c
    pooled: dict[tuple, dict] = {}
    for (op, shape), by_name in sorted(runs.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        default_name, cuda_name = _BENCH_PAIRS[op]
        base, cuda = by_name.get(default_name), by_name.get(cuda_name)
        if base is None or cuda is None:
            continue
        if cuda.get("capability") is None:
            raise ValueError(
                f"results: case {cuda.get('name')!r} records no 'capability' (benchmarks older than "
                "the dispatch table; re-run the suite)"
            )
        dim = cuda.get("d") if op == "attention" else cuda.get("C")
        try:
            if not is_int(dim) or not is_int(cuda.get("N")):
                raise ValueError(
                    f"{'d' if op == 'attention' else 'C'}, N: expected ints, got {dim!r}, {cuda.get('N')!r}"
                )
            # LayerNorm modules choose once, without knowing N: their entries cover every length (pooled over N)
            length = None if op == "layer_norm" else cuda["N"]
            key = (
                op,
                parse_capability(cuda["capability"], "capability"),
                parse_dtype_name(cuda.get("dtype"), "dtype"),
                dim,
                length,
            )
        except ValueError as err:
            raise ValueError(f"results: case {cuda.get('name')!r}: {err}") from None
        slot = pooled.setdefault(
            key,
            {"gpu": cuda.get("device"), "base_s": 0.0, "cuda_s": 0.0, "shapes": [], "names": (default_name, cuda_name)},
        )
        slot["base_s"] += base["median_s"]
        slot["cuda_s"] += cuda["median_s"]
        slot["shapes"].append(str(shape))
    commit = next((c.get("commit") for c in cases if c.get("commit")), None)
    run = ", ".join(
        str(x) for x in (source or "regkern bench run", results.get("datetime"), commit and f"commit {commit}") if x
    )
    entries = []
    for (op, cap, dtype, dim, n), slot in sorted(pooled.items(), key=lambda kv: (*kv[0][:4], kv[0][4] or 0)):
        ratio = slot["base_s"] / slot["cuda_s"]  # > 1: cuda faster
        backend = "cuda" if ratio >= margin else "triton"
        default_name, cuda_name = slot["names"]
        source_text = (
            f"{run}: {cuda_name} {1e6 * slot['cuda_s']:.1f} us vs {default_name} "
            f"{1e6 * slot['base_s']:.1f} us, fwd median, {'+'.join(slot['shapes'])}"
        )
        entries.append(
            DispatchEntry(
                op=op,
                capability=cap,
                gpu=slot["gpu"] or "unknown GPU",
                dtype=dtype,
                dim=dim,
                min_len=n or 0,
                max_len=n,
                backend=backend,
                speedup=ratio if backend == "cuda" else 1 / ratio,
                source=source_text,
            )
        )
    return entries


def write_table(entries: Sequence[DispatchEntry], path: Union[str, os.PathLike]) -> Path:
    """Write ``entries`` as a version-1 table to ``path`` (parents created) and forget cached tables."""
    entries = list(entries)
    for i, e in enumerate(entries):
        if not isinstance(e, DispatchEntry):
            raise ValueError(f"entries: entry {i} is a {type(e).__name__}, expected a DispatchEntry")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": VERSION, "comment": COMMENT, "entries": [e.to_dict() for e in entries]}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)  # a lookup never sees a half-written table
    clear_cache()
    return p
