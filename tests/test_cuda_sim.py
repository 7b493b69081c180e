"""The cuda_sim backend itself: its module loads beside nanolm._C, the CUDA kernel table is
complete, `auto` never picks it, and the emulation's launch checks fire as CUDA's would."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanolm.ops import OPS, backends

CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.mark.cuda_sim
def test_loads_beside_the_main_extension():
    """Both modules bind DType and AdamWScalars: without module_local the second import fails."""
    code = "from nanolm import _C, _C_sim; from nanolm import _C_sim as s; print(s.DType.bfloat16)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_kernel_table_lists_every_cuda_kernel():
    """The verification records (nanolm/verification.json: what nanolm.info reports and `auto`
    consults) name each __global__ kernel."""
    source = "\n".join(p.read_text() for p in CSRC.glob("*.cu"))
    defined = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s+)?(\w+)", source))
    listed = {k for kernels in backends.VERIFICATION["cuda"].values() for k in kernels}
    assert defined == listed
    assert set(backends.VERIFICATION["cuda"]) == {op for op in OPS if backends.implementation("cuda", op)}


def test_auto_never_picks_cuda_sim_nor_unverified_cuda():
    for device_type, order in backends.AUTO_ORDER.items():
        for op, names in order.items():
            assert "cuda_sim" not in names
            assert ("cuda" in names) == (device_type == "cuda" and backends.verified_on_gpu("cuda", op))
    assert backends.resolve("auto", torch.device("cpu"))["attention"] != "cuda_sim"


def test_rejects_cuda_tensors_and_names_the_device():
    reason = backends.unavailable_reason("cuda_sim", "attention", torch.device("cuda"))
    assert reason == "runs attention on cpu only"


@pytest.mark.cuda_sim
def test_launch_errors_surface_as_python_exceptions():
    """A launcher's own checks (std::invalid_argument) reach Python as ValueError."""
    from nanolm import _C_sim
    s = (17 * 2 * 96, 2 * 96, 96)
    with pytest.raises(ValueError, match="head size 96"):
        _C_sim.attention_fwd_cuda(0, s, 0, s, 0, s, 0, s, 0, 1, 17, 2, 96, 0.1, _C_sim.DType.bfloat16,
                                  _C_sim.DropoutParams(), 0)


@pytest.mark.cuda_sim
def test_bad_input_is_checked_before_the_kernel():
    q = torch.randn(1, 17, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head size 96"):
        backends.load("cuda_sim").attention_fwd(*[torch.randn(1, 17, 2, 96, dtype=torch.bfloat16)] * 3, 0.1, None)
    with pytest.raises(ValueError, match="dtype float32"):
        backends.load("cuda_sim").attention_fwd(q.float(), q.float(), q.float(), 0.1, None)
