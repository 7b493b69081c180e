"""`python -m bench static`: the compiled form of the kernels, checked with no GPU.

The gate compiles every production Triton configuration for sm_90a and fails on one that does
not compile, needs more shared memory than a block may have, or spills. It runs in a subprocess:
it compiles for a GPU, so it must not see this test session's TRITON_INTERPRET=1.
"""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import static, verification_table
from nanolm import info
from nanolm.ops import OPS, attention, backends, functions
from nanolm.ops.backends import VERIFICATION

TRITON_KERNELS = VERIFICATION["triton"]  # op -> kernel -> {tests, gpu_run}

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


def _jit_functions():
    """{name: source of kernels/} for every @triton.jit function in kernels/."""
    found = {}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        text = path.read_text()
        found.update((name, text) for name in re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+)", text))
    return found


def test_kernel_table_lists_every_triton_kernel():
    """nanolm/verification.json (what nanolm.info reports) names every @triton.jit kernel in kernels/, and
    nothing else; the other @triton.jit functions are device functions, called, never launched.
    Each kernel's test files exist and name it or its op's backend functions."""
    jit = _jit_functions()
    listed = {k for kernels in TRITON_KERNELS.values() for k in kernels}
    assert listed == {name for name in jit if name.endswith("_kernel")}
    for name in set(jit) - listed:
        assert not re.search(rf"\b{name}\[", jit[name]), f"{name} is launched: list it in nanolm/verification.json"
        assert len(re.findall(rf"\b{name}\(", "\n".join(set(jit.values())))) >= 2, f"{name} is never called"
    assert set(TRITON_KERNELS) == {op for op in OPS if backends.implementation("triton", op)}
    for op, kernels in TRITON_KERNELS.items():
        for record in kernels.values():
            for test in record["tests"]:
                text = (ROOT / test).read_text()
                assert any(fn in text for fn in functions(op)) or op in text, f"{test} does not exercise {op}"


def test_info_reports_every_triton_kernel():
    text = info.triton_kernel_status()
    records = [(kernel, record) for kernels in TRITON_KERNELS.values() for kernel, record in kernels.items()]
    for kernel, record in records:
        assert re.search(rf"{kernel} +interpreted in CI \(fp32\): {re.escape(', '.join(record['tests']))}", text)
    assert text.count("run on a GPU: never") == sum(not record["gpu_run"] for _, record in records)


def test_compile_summaries_are_the_static_report():
    """The `compiled` records of nanolm/verification.json (what nanolm.info and the README say)
    are the committed static report's (python -m bench.verification_table --static <folder>)."""
    rebuilt = verification_table.with_static_report(copy.deepcopy(VERIFICATION), ROOT / VERIFICATION["static_report"])
    assert rebuilt == VERIFICATION


def test_static_summary():
    ok = {"kernel": "k", "status": "ok", "spill_stores": 0, "production": True}
    rows = [dict(ok, arch="sm_80", spill_stores=16), dict(ok, arch="sm_80", production=False, spill_stores=4),
            dict(ok, arch="sm_80", production=False), dict(ok, arch="sm_90a"),
            dict(ok, arch="sm_90a", status="compile error: x"), dict(ok, arch="sm_90a", kernel="other", spill_stores=8)]
    summary = verification_table.static_summary
    assert summary(rows, "k") == ("sm_80: 3 configs (1 production), spilling: 1 production, 1 other (up to 16 B); "
                                  "sm_90a: 2 configs (2 production), spilling: 0 production, 0 other, "
                                  "1 fail to compile")
    assert summary(rows, "missing") == "not in the report"


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
    # every Triton kernel has production configurations, dropout variants included
    assert {r["kernel"] for r in rows} == {k for kernels in TRITON_KERNELS.values() for k in kernels}
    dropout = {r["kernel"] for r in rows if "+dropout" in r["config"]}
    assert dropout == {"layernorm_fwd_kernel", "layernorm_bwd_kernel", "attention_fwd_kernel",
                       "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"}
    assert all(r["status"] == "ok" and r["spill_stores"] == 0 for r in rows)
    # the attention matmuls run on tensor cores (mma.sync or wgmma)
    assert all({"HMMA", "HGMMA"} & set(r["sass"]) for r in rows
               if r["kernel"] in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"))


# ----------------------------------------------------------------------------- attention's prune hooks

def _kept(kernel, hs, dropout, device):
    """(BLOCK_M, BLOCK_N, warps, stages) of the autotune configs kernel's prune hook keeps."""
    from nanolm.kernels import attention
    configs, hooks = {"fwd": (attention._FWD_CONFIGS, attention._FWD_PRUNE),
                      "dkdv": (attention._DKDV_CONFIGS, attention._DKDV_PRUNE),
                      "dq": (attention._DQ_CONFIGS, attention._DQ_PRUNE)}[kernel]
    q = SimpleNamespace(device=device)  # what the hook reads of the launch's first tensor
    kept = hooks["early_config_prune"](configs, {"Q": q, "HS": hs}, DROPOUT=dropout)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


@pytest.fixture
def capability(monkeypatch):
    """Pretends the CUDA devices have compute capability `capability.value`; records the devices asked."""
    state = SimpleNamespace(value=(9, 0), asked=[])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: state.asked.append(d) or state.value)
    return state


def test_attention_prune_reads_the_capability_of_the_tensors_device(capability):
    cpu = _kept("fwd", 64, False, torch.device("cpu"))
    assert capability.asked == []  # CPU tensors (static capture, never the interpreter): sm_90's lists
    capability.value = (8, 0)
    sm80 = _kept("fwd", 64, False, torch.device("cuda", 1))
    assert capability.asked == [torch.device("cuda", 1)]
    assert (128, 64, 4, 3) in cpu and (128, 64, 4, 3) not in sm80  # spills 16 B on sm_80 at hs = 64
    for value, same_as in (((8, 6), sm80), ((8, 9), sm80), ((9, 0), cpu), ((10, 0), cpu)):
        capability.value = value
        assert _kept("fwd", 64, False, torch.device("cuda")) == same_as


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("cc", [(8, 0), (9, 0)])
def test_attention_prune_leaves_a_config_for_every_head_size(kernel, dropout, cc, capability):
    capability.value = cc
    for hs in attention.TRITON.head_sizes:
        assert _kept(kernel, hs, dropout, torch.device("cuda")), (kernel, hs, dropout, cc)


def test_attention_prune_drops_what_spills(capability):
    """Examples from the static report: spills on sm_90a with dropout, and on sm_80 where a
    spill-free config is left."""
    assert (128, 128, 8, 2) in _kept("fwd", 128, False, torch.device("cuda"))
    assert (128, 128, 8, 2) not in _kept("fwd", 128, True, torch.device("cuda"))  # 360 B on sm_90a
    assert _kept("dkdv", 128, True, torch.device("cuda")) == [(16, 128, 8, 3)]
    capability.value = (8, 0)
    assert _kept("fwd", 128, True, torch.device("cuda")) == [(64, 64, 4, 3), (128, 32, 8, 3)]
    assert _kept("dkdv", 64, True, torch.device("cuda")) == [(16, 128, 8, 3)]  # the other four spill 8-108 B
    assert (32, 128, 8, 3) in _kept("dkdv", 32, True, torch.device("cuda"))  # no spill at hs = 32
