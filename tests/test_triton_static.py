"""`python -m bench static`: the compiled form of the kernels, checked with no GPU.

The gate compiles every production Triton configuration for sm_90a and fails on one that does
not compile, needs more shared memory than a block may have, or spills. It runs in a subprocess:
it compiles for a GPU, so it must not see this test session's TRITON_INTERPRET=1.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import static

ROOT = Path(__file__).resolve().parent.parent

PTXAS_LOG = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'attention_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for attention_fwd_kernel
    280 bytes stack frame, 428 bytes spill stores, 952 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 280 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4224 bytes smem, 360 bytes cmem[0]
"""


def test_parse_ptxas_log():
    stats = static.parse_ptxas_log(PTXAS_LOG)
    assert stats["attention_fwd_kernel"] == {"regs": 255, "spill_stores": 428, "spill_loads": 952,
                                             "stack": 280, "smem": 0}
    assert stats["_Z6kernelPf"] == {"regs": 40, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 4224}


@pytest.mark.parametrize("regs, smem, warps, arch, blocks", [
    (32, 0, 4, "sm_90a", 16),           # warps: 64 / 4
    (255, 0, 4, "sm_90a", 2),           # registers: 255 -> 8192 a warp, 8 warps
    (255, 131072, 4, "sm_90a", 1),      # shared memory: 228 KB / (128 + 1) KB
    (128, 49152, 8, "sm_80", 2),        # registers: 4096 a warp, 16 warps; smem allows 3
    (16, 0, 1, "sm_80", 32),            # the 32-blocks-per-SM limit
])
def test_occupancy(regs, smem, warps, arch, blocks):
    assert static.occupancy(regs, smem, warps, arch) == (blocks, blocks * warps)


def test_gate_flags_compile_errors_shared_memory_and_sm90a_spills():
    ok = {"kind": "triton", "kernel": "k", "production": True, "status": "ok", "regs": 64, "smem": 1024,
          "spill_stores": 0}
    rows = [
        dict(ok, arch="sm_90a"),
        dict(ok, arch="sm_80", spill_stores=64),                   # sm_80 spills: reported, not gated
        dict(ok, arch="sm_90a", production=False, spill_stores=64),  # not a production config
        dict(ok, arch="sm_90a", kernel="spills", spill_stores=64),
        dict(ok, arch="sm_80", kernel="smem", smem=200 * 1024),
        dict(ok, arch="sm_90a", kernel="broken", status="compile error: x"),
        dict(ok, arch="sm_90a", kind="cuda", spill_stores=64),     # CUDA: reported, not gated
    ]
    bad = static.gate_failures(rows)
    assert [b.split(" ")[0] for b in bad] == ["spills", "smem", "broken"]


@pytest.mark.slow
def test_triton_production_configs_compile_for_sm90a_without_spills(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench", "static", "--production", "--arch", "sm_90a", "--no-cuda",
           "--check", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "static.json").read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"layernorm_fwd_kernel", "layernorm_bwd_kernel", "cross_entropy_fwd_kernel", "attention_fwd_kernel",
            "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel", "adamw_step_kernel"} <= kernels
    assert all(r["status"] == "ok" and r["spill_stores"] == 0 for r in rows)
    # the attention matmuls run on tensor cores (mma.sync or wgmma)
    assert all({"HMMA", "HGMMA"} & set(r["sass"]) for r in rows
               if r["kernel"] in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"))
