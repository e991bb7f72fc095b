"""The Triton kernel configurations the launchers ship, compiled without a GPU with the run-time specialization
(``regkern bench --static``'s records):

- bf16 at every benchmark shape for sm_90 and sm_80 (the report), and the d = 128 shape for sm_86 (100 KB of shared
  memory): no spills, shared memory within the limit, at least one block per SM, wgmma on sm_90 wherever the MMA's
  M dimension allows it;
- float32 at d = 64 and d = 128 for sm_90, sm_80 and sm_86: launchable (shared memory within the limit, a block per
  SM). Float32 keeps exact (ieee) products, which Triton computes with FMAs rather than tensor cores; those kernels
  are register-bound and spill, and are not a speed path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

#: opt-in shared memory per block (bytes)
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024, "sm_86": 99 * 1024}


def mma_rows(record: dict) -> int:
    """The M dimension of the kernel's score MMA: query rows, or keys in the key-major passes."""
    blocks = record["blocks"]
    return blocks["BLOCK_KEYS"] if "BLOCK_KEYS" in blocks else blocks.get("BLOCK_M", 0)


def compiled(code: str) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=2400)
    assert out.returncode == 0, out.stderr[-6000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def records():
    return compiled(
        "import json, sys\n"
        "from regkern.apps.static_report import SHAPES, static_report\n"
        "records = static_report((90, 80), progress=lambda s: None)\n"
        "records += static_report((86,), shapes=[s for s in SHAPES if s[4] == 128], progress=lambda s: None)\n"
        "json.dump(records, sys.stdout)\n"
    )


@pytest.fixture(scope="module")
def float32_records():
    return compiled(
        "import json, sys, torch\n"
        "from regkern.apps.static_report import SHAPES, static_report\n"
        "shapes = [s for s in SHAPES if s[0] in ('vitb14reg4-224', 'd128-1025')]\n"
        "records = static_report((90, 80, 86), dtype=torch.float32, shapes=shapes, progress=lambda s: None)\n"
        "json.dump(records, sys.stdout)\n"
    )


@pytest.mark.slow
def test_every_shipped_configuration_compiles_without_spills_within_shared_memory(records):
    assert {r["arch"] for r in records} == {"sm_90", "sm_80", "sm_86"}
    assert {r["kernel"] for r in records} >= {
        "attn_fwd_kernel",
        "attn_received_kernel",
        "attn_bwd_dkdv_kernel",
        "attn_bwd_dq_kernel",
        "attn_prologue_kernel",
        "ln_fwd_kernel",
        "ln_bwd_kernel",
    }
    problems = [
        f"{r['arch']} {r['shape']} {r['variant']} {r['kernel']} {r['blocks']}: stack {r['stack_bytes']} B, "
        f"shared {r['shared_bytes']} B, {r['blocks_per_sm']} blocks/SM"
        for r in records
        if r["stack_bytes"] or r["local_bytes"] or r["shared_bytes"] > SHARED_LIMIT[r["arch"]] or r["blocks_per_sm"] < 1
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_attention_kernels_use_wgmma_on_hopper_where_the_tile_allows(records):
    # wgmma needs M = 64 rows per warpgroup; the 16-row launches (the small segment's keys in the received pass, the
    # prefix-row queries) run mma.sync by shape, and are the only ones allowed to (the prologue pre-pass has no MMA)
    hopper = [
        r
        for r in records
        if r["arch"] == "sm_90" and r["kernel"].startswith("attn_") and r["kernel"] != "attn_prologue_kernel"
    ]
    assert hopper
    lost = [
        f"{r['shape']} {r['variant']} {r['kernel']} {r['blocks']} {r['num_warps']} warps: {r['mma_kind']}"
        for r in hopper
        if (mma_rows(r) >= 64 and r["mma_kind"] != "wgmma") or r["mma_kind"] == "none"
    ]
    assert not lost, "\n".join(lost)


@pytest.mark.slow
def test_float32_configurations_launch_on_every_architecture(float32_records):
    assert {r["arch"] for r in float32_records} == {"sm_90", "sm_80", "sm_86"}
    too_big = [
        f"{r['arch']} {r['shape']} {r['variant']} {r['kernel']} {r['blocks']}: shared {r['shared_bytes']} B"
        for r in float32_records
        if r["shared_bytes"] > SHARED_LIMIT[r["arch"]] or r["blocks_per_sm"] < 1
    ]
    assert not too_big, "\n".join(too_big)
