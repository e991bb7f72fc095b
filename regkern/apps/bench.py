"""``regkern bench``: run the benchmark suite (``benchmarks/``, pytest-benchmark) and summarise it.

Writes, under ``--out``: ``results.json`` (pytest-benchmark's raw results, every case's ``extra_info``),
``report.json`` and ``report.md`` (a table per shape and pass: median, TFLOP/s, % of the matmul and copy ceilings
measured in the same run, speedup against the best peer, peak memory; the CUDA backend's speedup over Triton per
shape; the performance targets of the Triton-attention, monitoring and CUDA-backend issues marked met / not met / not
measured), and ``speedup.png``; with ``--dispatch-table PATH`` also the measured triton-vs-cuda dispatch table
(``regkern.apps.dispatch_table_writer``); the targets are in ``regkern.apps.targets``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

from .bench_results import bench_cases
from .dispatch_table_writer import entries_from_bench, write_table
from .plotting import pyplot
from .static_report import add_static_arguments, run_static
from .targets import evaluate_targets

__all__ = ["add_bench_arguments", "run_bench", "summarize", "cuda_vs_triton", "format_markdown", "PEERS"]

#: contenders that count as "the best peer" (the other non-regkern ones are feature baselines); "torch" is the
#: plain-PyTorch baseline of the small ops (LayerNorm + norms, token embedding); "sdpa-padded" the packed sequences' one
PEERS = ("timm", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "xformers", "flex", "torch", "sdpa-padded")
CUDA_PREFIX = "regkern-cuda"


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default: %(default)s)")
    p.add_argument("-k", dest="select", default=None, help="pytest -k expression selecting benchmark cases")
    p.add_argument(
        "--benchmarks",
        type=Path,
        default=None,
        help="the suite's folder (default: benchmarks/ of this checkout or the current directory)",
    )
    p.add_argument(
        "--dispatch-table",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the triton-vs-cuda dispatch table measured by this run to PATH "
        "(regkern/ops/dispatch_table.json is the one backend='auto' reads)",
    )
    add_static_arguments(p)


def _locate_suite(given: Optional[Path]) -> Path:
    checkout = Path(__file__).resolve().parents[2] / "benchmarks"  # regkern/apps/bench.py -> <checkout>/benchmarks
    candidates = [given] if given else [checkout, Path.cwd() / "benchmarks"]
    for c in candidates:
        if c is not None and (c / "conftest.py").is_file():
            return c
    raise FileNotFoundError("--benchmarks: no benchmark suite found (run from a regkern checkout or pass --benchmarks)")


def cuda_vs_triton(ops: list[dict]) -> list[dict[str, object]]:
    """Per shape, pass and variant: the CUDA backend's time against its Triton twin (regkern-cuda-R4 against
    regkern-triton-R4, ...; against regkern-reference for ops without a Triton kernel). speedup > 1: CUDA faster."""
    by_key = {(c["shape"], c["mode"], c["contender"]): c for c in ops}
    rows = []
    for (shape, mode, name), cuda in sorted(by_key.items()):
        if not name.startswith(CUDA_PREFIX):
            continue
        suffix = name[len(CUDA_PREFIX) :]
        base = by_key.get((shape, mode, "regkern-triton" + suffix)) or by_key.get(
            (shape, mode, "regkern-reference" + suffix)
        )
        if base is None or not cuda.get("median_s") or not base.get("median_s"):
            continue
        rows.append(
            {
                "shape": shape,
                "mode": mode,
                "variant": suffix.lstrip("-") or "plain",
                "baseline": base["contender"],
                "cuda_ms": 1e3 * cuda["median_s"],
                "baseline_ms": 1e3 * base["median_s"],
                "speedup": base["median_s"] / cuda["median_s"],
            }
        )
    return rows


def summarize(results: dict) -> dict[str, object]:
    """Turn pytest-benchmark JSON into tables (speedups vs the best peer, % of ceilings) and target verdicts."""
    cases = bench_cases(results)
    ops = [c for c in cases if "contender" in c]
    groups: dict[tuple, list[dict]] = {}
    for c in ops:
        groups.setdefault((c["shape"], c["mode"]), []).append(c)
    tables = []
    for (shape, mode), entries in sorted(groups.items()):
        peers = [e for e in entries if e["contender"] in PEERS]
        best = min(peers, key=lambda e: e["median_s"]) if peers else None
        rows = []
        for e in sorted(entries, key=lambda e: e["median_s"]):
            rows.append(
                {
                    "contender": e["contender"],
                    "median_ms": 1e3 * e["median_s"],
                    "tflops": e.get("tflops"),
                    "pct_matmul": e.get("pct_matmul"),
                    "pct_bandwidth": e.get("pct_bandwidth"),
                    "speedup_vs_best_peer": (best["median_s"] / e["median_s"]) if best else None,
                    "peak_memory_mb": (e["peak_memory_bytes"] / 2**20) if e.get("peak_memory_bytes") else None,
                }
            )
        tables.append({"shape": shape, "mode": mode, "best_peer": best["contender"] if best else None, "rows": rows})
    models = [
        {
            "model": c.get("model"),
            "variant": c.get("variant"),
            "test": c["name"].split("[")[0],
            "images_per_s": (c["batch"] / c["median_s"]) if c.get("batch") and c.get("median_s") else None,
        }
        for c in cases
        if "model" in c
    ]

    gpu = any(c.get("device") not in (None, "cpu") for c in cases)
    targets = evaluate_targets(ops, gpu)
    env = next((c for c in cases if "device" in c), {})
    environment = {
        k: env.get(k) for k in ("device", "capability", "torch", "triton", "cuda", "cudnn", "regkern", "commit")
    }
    environment["date"] = results.get("datetime") or datetime.datetime.now(datetime.timezone.utc).isoformat()
    return {
        "environment": environment,
        "gpu": gpu,
        "tables": tables,
        "models": models,
        "cuda_vs_triton": cuda_vs_triton(ops),
        "targets": targets,
    }


def _fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def _sm(capability) -> str:
    return f" (sm_{capability[0]}{capability[1]})" if capability else ""


def format_markdown(summary: dict[str, object]) -> str:
    env = summary["environment"]
    lines = [
        f"# regkern benchmark results ({env.get('device')})",
        "",
        f"device {env.get('device')}{_sm(env.get('capability'))}; torch {env.get('torch')}, "
        f"triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; "
        f"regkern {env.get('regkern')} at commit {env.get('commit')}; {env.get('date')}.",
        "",
    ]
    if not summary["gpu"]:
        lines += ["No GPU: tiny CPU shapes that only show the suite runs; no speed claims.", ""]
    for table in summary["tables"]:
        lines += [
            f"## {table['shape']}, {table['mode']} (best peer: {table['best_peer']})",
            "",
            "| contender | median ms | TFLOP/s | % matmul | % copy bw | vs best peer | peak MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in table["rows"]:
            lines.append(
                f"| {r['contender']} | {_fmt(r['median_ms'], '.3f')} | {_fmt(r['tflops'], '.1f')} | "
                f"{_fmt(r['pct_matmul'], '.1f')} | {_fmt(r['pct_bandwidth'], '.1f')} | "
                f"{_fmt(r['speedup_vs_best_peer'])}x | {_fmt(r['peak_memory_mb'], '.0f')} |"
            )
        lines.append("")
    if summary["models"]:
        lines += ["## Models", "", "| test | model | variant | images/s |", "| --- | --- | --- | ---: |"]
        for m in summary["models"]:
            lines.append(f"| {m['test']} | {m['model']} | {m['variant']} | {_fmt(m['images_per_s'], '.1f')} |")
        lines.append("")
    lines += ["## CUDA backend vs Triton", ""]
    if summary.get("cuda_vs_triton"):
        lines += [
            "| shape | pass | variant | baseline | cuda ms | baseline ms | cuda speedup |",
            "| --- | --- | --- | --- | ---: | ---: | ---: |",
        ]
        for r in summary["cuda_vs_triton"]:
            lines.append(
                f"| {r['shape']} | {r['mode']} | {r['variant']} | {r['baseline']} | "
                f"{_fmt(r['cuda_ms'], '.3f')} | {_fmt(r['baseline_ms'], '.3f')} | {_fmt(r['speedup'])}x |"
            )
    else:
        lines.append("Not measured (no regkern-cuda case beside its Triton twin in this run).")
    lines.append("")
    lines += ["## Targets", "", "| target | value | status |", "| --- | ---: | --- |"]
    for t in summary["targets"]:
        lines.append(f"| {t['target']} | {_fmt(t['value'], '.3f')} {t['unit']} | {t['status']} |")
    return "\n".join(lines) + "\n"


def plot_speedups(summary: dict[str, object], path: Path) -> None:
    """Bar chart: each contender's speedup over the best peer, per shape and pass."""
    plt = pyplot()

    tables = summary["tables"]
    fig, axes = plt.subplots(1, max(1, len(tables)), figsize=(4 * max(1, len(tables)), 3.6), squeeze=False)
    for ax, table in zip(axes[0], tables):
        rows = [r for r in table["rows"] if r["speedup_vs_best_peer"] is not None]
        ax.barh(
            [r["contender"] for r in rows],
            [r["speedup_vs_best_peer"] for r in rows],
            color=["tab:orange" if r["contender"].startswith("regkern") else "tab:gray" for r in rows],
        )
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(f"{table['shape']} {table['mode']}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("speedup vs best peer", fontsize=8)
    fig.suptitle(f"regkern benchmarks on {summary['environment'].get('device')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(args: argparse.Namespace, out: Callable[[str], None] = print) -> dict[str, object]:
    if getattr(args, "static", False):
        return {"static": run_static(args.out, args.arch, out)}
    # lazy import of pytest: an optional dependency (the "test" extra), needed by this command only
    import pytest

    suite = _locate_suite(args.benchmarks)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "results.json"
    pytest_args = [
        str(suite),
        "--benchmark-only",
        f"--benchmark-json={raw}",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--rootdir={suite.parent}",
    ]
    if args.select:
        pytest_args += ["-k", args.select]
    code = pytest.main(pytest_args)
    if code not in (0, 5) or not raw.is_file():
        raise ValueError(f"the benchmark suite failed (pytest exit code {int(code)})")
    summary = summarize(json.loads(raw.read_text()))
    (args.out / "report.json").write_text(json.dumps(summary, indent=2))
    markdown = format_markdown(summary)
    (args.out / "report.md").write_text(markdown)
    plot_speedups(summary, args.out / "speedup.png")
    out(markdown)
    written = [raw, args.out / "report.json", args.out / "report.md", args.out / "speedup.png"]
    if getattr(args, "dispatch_table", None) is not None:
        entries = entries_from_bench(json.loads(raw.read_text()), source=str(raw))
        written.append(write_table(entries, args.dispatch_table))
        cuda = sum(e.backend == "cuda" for e in entries)
        out(
            f"dispatch table: {len(entries)} measured entries ({cuda} choose cuda)"
            + ("" if entries else "; none: no forward case ran both regkern-triton and regkern-cuda")
        )
    out("written: " + ", ".join(str(w) for w in written))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="regkern bench")
    add_bench_arguments(parser)
    run_bench(parser.parse_args(argv))
    return 0
