"""Every Triton kernel configuration the launchers ship, compiled without a GPU for sm_90 and sm_80 with the run-time
specialization (``regkern bench --static``'s records): no spills, shared memory within the SM's limit, at least one
block per SM, and wgmma on sm_90 wherever the MMA's M dimension allows it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

#: opt-in shared memory per block (bytes)
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}


def mma_rows(record: dict) -> int:
    """The M dimension of the kernel's score MMA: query rows, or keys in the key-major passes."""
    blocks = record["blocks"]
    return blocks["BLOCK_KEYS"] if "BLOCK_KEYS" in blocks else blocks.get("BLOCK_M", 0)


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json, sys\n"
        "from regkern.apps.static_report import static_report\n"
        "json.dump(static_report((90, 80), progress=lambda s: None), sys.stdout)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=2400)
    assert out.returncode == 0, out.stderr[-6000:]
    return json.loads(out.stdout)


@pytest.mark.slow
def test_every_shipped_configuration_compiles_without_spills_within_shared_memory(records):
    assert {r["arch"] for r in records} == {"sm_90", "sm_80"}
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
