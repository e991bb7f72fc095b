"""regkern bench --static: launches recorded from the launchers' own code path, compiled without a GPU with Triton's
run-time specialization, and the SASS summary."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regkern.apps.static_report import issued_per_head, sass_summary

ROOT = Path(__file__).resolve().parents[2]

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0030*/                   MUFU.EX2 R3, R3 ;
        /*0040*/                   FFMA R4, R3, R5, R6 ;
        /*0050*/                   IADD3 R7, R7, 0x40, RZ ;
        /*0060*/                   ISETP.GE.AND P0, PT, R7, R8, PT ;
        /*0070*/               @!P0 BRA 0x20 ;
        /*0080*/                   LDG.E R9, desc[UR4][R10.64] ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
        /*00b0*/                   NOP;
"""


def test_sass_summary_counts_inner_loops_and_the_mma_kind():
    summary = sass_summary(SASS)
    assert summary["mma_kind"] == "wgmma"
    assert summary["counts"]["total"] == 11 and summary["counts"]["global_load"] == 1
    (loop,) = summary["inner_loops"]  # the BRA to itself after EXIT is not a loop
    assert (loop["start"], loop["end"]) == ("0x20", "0x70")
    assert (loop["total"], loop["mma"], loop["ex2"], loop["fp32"], loop["integer"]) == (6, 1, 1, 1, 2)
    assert sass_summary(SASS.replace("HGMMA.64x64x16.F32.BF16", "HMMA.16816.F32.BF16"))["mma_kind"] == "mma.sync"


def run_compiled(code: str, timeout: int) -> str:
    """stdout of ``code`` in a Python without TRITON_INTERPRET (this test session runs the kernels under the
    interpreter, whose kernels record no launches and compile nothing)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_static_report_compiles_the_launched_kernels_with_the_run_time_specialization(tmp_path):
    code = (
        "import json, sys\n"
        "from regkern.apps.static_report import SHAPES, static_report\n"
        "records = static_report((90,), shapes=SHAPES[1:2], progress=lambda s: None)\n"
        "json.dump(records, sys.stdout)\n"
    )
    records = json.loads(run_compiled(code, timeout=900))
    forward = next(r for r in records if r["variant"] == "forward" and r["kernel"] == "attn_fwd_kernel")
    # the tile table's configuration for ViT-B/14-reg4 at 224 px, bf16, sm_90, and the run-time specialization
    assert forward["blocks"] == {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_S": 16, "BLOCK_D": 64}
    assert forward["programs_per_head"] == 5 and forward["trips"] == [2] and forward["issued_per_head"] > 0
    assert forward["num_warps"] == 4 and forward["arch"] == "sm_90" and forward["mma_kind"] == "wgmma"
    assert forward["registers"] > 0 and forward["shared_bytes"] > 32 * 1024 and forward["blocks_per_sm"] >= 1
    (score_loop,) = [lp for lp in forward["inner_loops"] if lp["per_score"]]
    assert 0.05 < score_loop["per_score"] < 2.0
    variants = {(r["variant"], r["kernel"]) for r in records}
    assert ("backward", "attn_bwd_dq_kernel") in variants and ("forward+received", "attn_received_kernel") in variants
    assert any(r["kernel"] == "ln_fwd_kernel" for r in records)
    assert any(r["kernel"] == "ln_bwd_kernel" and r["variant"] == "layer_norm_backward" for r in records)


def test_issued_per_head_counts_programs_that_cover_several_heads_as_a_fraction():
    """The qk_norm / RoPE pre-pass has one program per 16 tokens of a batch row, every head in turn: at N = 261 and
    H = 12, 17 programs per row are 17/12 per (batch, head), not 1."""
    record = {"inner_loops": [{"total": 10}], "counts": {"total": 30}, "num_warps": 2}
    got = issued_per_head(record, [12], 17 / 12)
    assert got == {"trips": [12], "programs_per_head": 1.417, "issued_per_head": round((20 + 12 * 10) * 2 * 17 / 12)}
    assert issued_per_head(record, [12], 5.0)["programs_per_head"] == 5


def test_launches_with_different_run_time_specializations_are_compiled_apart():
    """Two shapes whose launches differ only in which integers are divisible by 16 (H = 16 vs 24, N = 197 vs 1374)
    get different Triton specializations, so the report compiles (and reports) them separately."""
    code = (
        "import torch\n"
        "from regkern.apps.static_report import SHAPES, _attention_cases, capture_launches, specialize\n"
        "from regkern.ops.dispatch import compile_target\n"
        "for name, B, N, H, d, P in SHAPES[:4]:\n"
        "    (case,) = [c for c in _attention_cases(name, B, N, H, d, P, torch.bfloat16) if c.variant == 'forward']\n"
        "    with compile_target(90):\n"
        "        (launch,) = capture_launches(case.launcher)\n"
        "    print(name, hash(specialize(launch, 90).key))\n"
    )
    keys = dict(line.split() for line in run_compiled(code, timeout=300).splitlines())
    assert len(keys) == 4 and keys["vitl14reg4-518"] != keys["vitg14reg4-518"] != keys["vits16-224"]


RES_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
identifier = /src/csrc/attention.cu

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN7regkern6kernelILi64EEEvv:
  REG:131 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS_FAT = """
Fatbin elf code:
================
arch = sm_90
	code for sm_90
		Function : _ZN7regkern6kernelILi64EEEvv
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   EXIT ;
"""


def test_extension_report_parses_resource_usage_and_splits_sass_per_kernel():
    from regkern.apps.static_report import parse_resource_usage, split_sass_functions

    key = (90, "_ZN7regkern6kernelILi64EEEvv")
    assert parse_resource_usage(RES_USAGE) == {key: ("attention.cu", 131, 8, 1024, 0)}
    (body,) = split_sass_functions(SASS_FAT).values()
    assert list(split_sass_functions(SASS_FAT)) == [key]
    assert sass_summary(body)["mma_kind"] == "mma.sync" and sass_summary(body)["counts"]["total"] == 2


def test_extension_report_reads_the_built_extension():
    from regkern.apps.static_report import built_extension, extension_report

    path = built_extension()
    if path is None:
        pytest.skip("no built CUDA extension (REGKERN_BUILD_CUDA=1 pip install --no-build-isolation -e .)")
    records = extension_report(path)
    assert {r["arch"] for r in records} and {r["arch"] for r in records} <= {"sm_90", "sm_80"}
    assert {r["source"] for r in records} == {"attention.cu", "layer_norm.cu", "embed_tokens.cu"}
    attention = [r for r in records if r["kernel"].startswith("register_attention_fwd_kernel")]
    assert attention and all(r["registers"] > 0 and r["counts"]["mma"] > 0 for r in attention)
