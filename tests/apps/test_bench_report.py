"""``regkern bench``: the summary's arithmetic on synthetic results, and one end-to-end run on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from regkern.apps.bench import format_markdown, plot_speedups, run_bench, summarize
from regkern.apps.cli import build_parser
from regkern.ops.dispatch_table import load_table

ENV = {
    "device": "NVIDIA H100 80GB HBM3",
    "capability": [9, 0],
    "torch": "2.11",
    "triton": "3.6.0",
    "cuda": "12.8",
    "cudnn": 91000,
    "regkern": "0.1.0",
    "commit": "abc1234",
    "copy_bandwidth": 3.0e12,
    "matmul_rate": 8.0e14,
}


def case(shape, mode, contender, median_s, **extra):
    info = dict(
        ENV,
        shape=shape,
        mode=mode,
        contender=contender,
        bytes=extra.pop("bytes", 2.0e8),
        dtype=extra.pop("dtype", "torch.bfloat16"),
        **extra,
    )
    return {"name": f"test_attention_op[{shape}-{contender}-{mode}]", "stats": {"median": median_s}, "extra_info": info}


def synthetic():
    b, large = "vitb14reg4-224", "vitl14reg4-518"
    return {
        "datetime": "2026-11-25T12:00:00",
        "benchmarks": [
            case(b, "fwd", "timm", 300e-6),
            case(b, "fwd", "sdpa-flash", 250e-6),
            case(b, "fwd", "regkern-triton", 100e-6, bytes=2.4e8, op="attention", N=261, d=64),  # floor 80 us -> 1.25x
            case(b, "fwd", "regkern-triton-R16", 102e-6),
            case(b, "fwd", "regkern-triton-outnorm", 104e-6),
            case(b, "fwd", "regkern-triton-monitor", 112e-6),
            case(b, "fwd", "regkern-triton-monitor-received", 160e-6),
            case(b, "fwd+bwd", "sdpa-flash", 900e-6),
            case(b, "fwd+bwd", "regkern-triton", 950e-6),
            case(large, "fwd", "regkern-triton", 1e-3, tflops=420.0),
            case(large, "fwd", "timm-maps", 4e-3),
            case(large, "fwd", "regkern-triton-monitor-received", 1e-3),
            # the CUDA backend beside its Triton twins, and the small ops
            case(b, "fwd", "regkern-cuda", 80e-6, op="attention", N=261, d=64),
            case(b, "fwd", "regkern-triton-R4", 101e-6),
            case(b, "fwd", "regkern-cuda-R4", 202e-6),
            case(b, "fwd+bwd", "regkern-cuda", 950e-6),
            case("ln-vitb14reg4-224", "fwd", "torch", 40e-6, op="layer_norm", N=261, C=768),
            case("ln-vitb14reg4-224", "fwd", "regkern-triton", 20e-6, op="layer_norm", N=261, C=768),
            case("ln-vitb14reg4-224", "fwd", "regkern-cuda", 25e-6, op="layer_norm", N=261, C=768),
            case("embed-vitb14reg4-224", "fwd", "regkern-reference", 30e-6, op="embed_tokens", N=261, C=768),
            case("embed-vitb14reg4-224", "fwd", "regkern-cuda", 10e-6, op="embed_tokens", N=261, C=768),
            {
                "name": "test_model_inference[vitb-patched-eager]",
                "stats": {"median": 0.5},
                "extra_info": dict(ENV, model="vit_base_patch14_reg4_dinov2", variant="patched-eager", batch=256),
            },
        ],
    }


def test_summary_speedups_and_target_verdicts(tmp_path):
    summary = summarize(synthetic())
    assert summary["gpu"] is True
    fwd = next(t for t in summary["tables"] if t["shape"] == "vitb14reg4-224" and t["mode"] == "fwd")
    assert fwd["best_peer"] == "sdpa-flash"  # regkern rows are never the peer
    triton = next(r for r in fwd["rows"] if r["contender"] == "regkern-triton")
    assert triton["speedup_vs_best_peer"] == pytest.approx(2.5)
    status = {t["target"]: (t["status"], t["value"]) for t in summary["targets"]}
    assert status["ViT-B/14-reg4 224px fwd: time / memory floor <= 1.4"] == ("met", 1.25)
    assert status["ViT-B/14-reg4 224px fwd: speedup over timm's path >= 1.5"] == ("met", 3.0)
    assert status["ViT-L/14-reg4 518px fwd: >= 400 TFLOP/s"] == ("met", 420.0)
    assert status["KV registers R=16 cost <= 3% (time ratio <= 1.03)"] == ("met", 1.02)
    assert status["fwd+bwd time <= SDPA flash fwd+bwd"][0] == "not met"
    assert status["out_norm epilogue <= 5% (time ratio <= 1.05)"] == ("met", 1.04)
    assert status["out_norm + prefix_rows <= 10% (time ratio <= 1.10)"][0] == "not met"
    assert status["+ received <= 1.7x"] == ("met", 1.6)
    assert status["N=1374: monitored fused path >= 5x faster than timm unfused + reductions"] == ("not met", 4.0)
    assert status[CUDA_GOAL] == ("met", 1.25)
    assert summary["models"][0]["images_per_s"] == pytest.approx(512.0)
    md = format_markdown(summary)
    assert "NVIDIA H100 80GB HBM3" in md and "triton 3.6.0" in md and "abc1234" in md and "2026-11-25" in md
    assert "| regkern-triton | 0.100 |" in md
    assert "NVIDIA H100 80GB HBM3 (sm_90)" in md and "## CUDA backend vs Triton" in md
    assert "| vitb14reg4-224 | fwd | plain | regkern-triton | 0.080 | 0.100 | 1.25x |" in md
    plot_speedups(summary, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


CUDA_GOAL = "CUDA forward at least Triton's speed at ViT-B/14-reg4 224 px (speedup over triton >= 1.0)"


def test_cuda_vs_triton_rows_per_shape_pass_and_variant():
    rows = {(r["shape"], r["mode"], r["variant"]): r for r in summarize(synthetic())["cuda_vs_triton"]}
    assert set(rows) == {
        ("vitb14reg4-224", "fwd", "plain"),
        ("vitb14reg4-224", "fwd", "R4"),
        ("vitb14reg4-224", "fwd+bwd", "plain"),
        ("ln-vitb14reg4-224", "fwd", "plain"),
        ("embed-vitb14reg4-224", "fwd", "plain"),
    }
    assert rows["vitb14reg4-224", "fwd", "plain"]["speedup"] == pytest.approx(1.25)
    assert rows["vitb14reg4-224", "fwd", "R4"]["speedup"] == pytest.approx(0.5)  # cuda slower: < 1
    assert rows["vitb14reg4-224", "fwd+bwd", "plain"]["speedup"] == pytest.approx(1.0)
    assert rows["ln-vitb14reg4-224", "fwd", "plain"]["speedup"] == pytest.approx(0.8)
    embed = rows["embed-vitb14reg4-224", "fwd", "plain"]
    assert embed["baseline"] == "regkern-reference" and embed["speedup"] == pytest.approx(3.0)


def test_cuda_goal_verdicts():
    results = synthetic()
    slow = next(b for b in results["benchmarks"] if b["extra_info"]["contender"] == "regkern-cuda")
    slow["stats"]["median"] = 120e-6
    status = {t["target"]: t for t in summarize(results)["targets"]}[CUDA_GOAL]
    assert (status["status"], status["value"]) == ("not met", round(100 / 120, 4))
    results["benchmarks"] = [b for b in results["benchmarks"] if b["extra_info"].get("contender") != "regkern-cuda"]
    summary = summarize(results)
    assert {t["target"]: t["status"] for t in summary["targets"]}[CUDA_GOAL] == "not measured"
    assert [r["variant"] for r in summary["cuda_vs_triton"]] == ["R4"]
    results["benchmarks"] = [
        b for b in results["benchmarks"] if not b["extra_info"].get("contender", "").startswith("regkern-cuda")
    ]
    assert "Not measured (no regkern-cuda case" in format_markdown(summarize(results))


def test_bench_dispatch_table_option(tmp_path, monkeypatch):
    # pytest.main stands in for the suite: it writes the synthetic GPU results where --benchmark-json points
    def fake_main(args):
        raw = next(a.split("=", 1)[1] for a in args if a.startswith("--benchmark-json="))
        Path(raw).write_text(json.dumps(synthetic()))
        return 0

    monkeypatch.setattr(pytest, "main", fake_main)
    table = tmp_path / "sub" / "table.json"
    args = build_parser().parse_args(["bench", "--out", str(tmp_path / "out"), "--dispatch-table", str(table)])
    printed = []
    run_bench(args, out=printed.append)
    entries = {e.op: e for e in load_table(table)}
    assert set(entries) == {"attention", "layer_norm", "embed_tokens"}
    assert (entries["attention"].backend, entries["attention"].speedup) == ("cuda", pytest.approx(1.25))
    assert entries["layer_norm"].backend == "triton" and entries["embed_tokens"].backend == "cuda"
    assert str(tmp_path / "out" / "results.json") in entries["attention"].source
    assert any("dispatch table: 3 measured entries (2 choose cuda)" in line for line in printed)


def test_targets_are_not_measured_without_a_gpu():
    results = synthetic()
    for b in results["benchmarks"]:
        b["extra_info"]["device"] = "cpu"
    assert {t["status"] for t in summarize(results)["targets"]} == {"not measured"}


def test_bench_cli_end_to_end_on_cpu(tmp_path):
    root = Path(__file__).resolve().parents[2]  # the repository root
    cmd = [
        sys.executable,
        "-m",
        "regkern",
        "bench",
        "--out",
        str(tmp_path),
        "--dispatch-table",
        str(tmp_path / "dispatch.json"),
        "-k",
        "tiny-cpu and (timm-fwd or regkern-torch-fwd) and not bwd",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("results.json", "report.json", "report.md", "speedup.png"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "report.json").read_text())
    contenders = {r["contender"] for t in report["tables"] for r in t["rows"]}
    assert {"timm", "regkern-torch"} <= contenders
    assert "No GPU" in (tmp_path / "report.md").read_text()
    assert load_table(tmp_path / "dispatch.json") == ()  # nothing measured both backends on the CPU
