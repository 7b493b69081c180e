"""The "Add a fused op" checklist of README.md, enforced: every op of nanolm.ops.OPS has its
specification (the torch backend is the module's own reference functions), a support row per
backend, kernel files for each kernel backend, a test file exercising every backend that claims
it, a bench case, a static-compile launch for its Triton kernels, and a sanitizer-driver case for
each of its CUDA launchers. A missing piece fails with what is missing and where it goes."""
import re
import types
from pathlib import Path

import pytest

import bench.cases
from nanolm.ops import OPS, functions
from nanolm.ops.support import Support

ROOT = Path(__file__).resolve().parent.parent
# backend -> the kernel file (under the repository root) it needs for op
KERNEL_FILES = {"triton": "kernels/{op}.py", "cuda": "csrc/{op}.cu", "cpu": "csrc/{op}_cpu.cpp"}


def missing(op, module, root=ROOT, bench_ops=bench.cases.OPS):
    """What op (its module in nanolm/ops/) lacks of the checklist, one line per missing piece."""
    found = []
    impls = getattr(module, "BACKENDS", {})
    reference = impls.get("torch")
    if reference is None:
        found.append(f"{op}: no specification: BACKENDS['torch'] in nanolm/ops/{op}.py")
    else:
        for fn in reference._fields[1:]:
            if getattr(reference, fn) is not getattr(module, fn, None):
                found.append(f"{op}: the torch backend's {fn} is not the module's own reference function {fn}")
    for name, impl in impls.items():
        if not isinstance(getattr(impl, "support", None), Support):
            found.append(f"{op}: backend {name} has no support row (a Support as its first field)")
        kernel_file = KERNEL_FILES.get(name, "").format(op=op)
        if kernel_file and not (root / kernel_file).is_file():
            found.append(f"{op}: backend {name} has no kernel file {kernel_file}")
    tests = "\n".join(p.read_text() for p in sorted((root / "tests").glob(f"test_{op}*.py")))
    if not tests:
        found.append(f"{op}: no test file tests/test_{op}.py")
    for name in impls:
        if name != "torch" and f'"{name}"' not in tests and "BACKENDS" not in tests:
            found.append(f"{op}: tests/test_{op}*.py never run backend {name} (name it, or parametrize over BACKENDS)")
    if op not in bench_ops:
        found.append(f"{op}: no bench case: bench/op_{op}.py and a line in OPS of bench/cases.py")
    if "triton" in impls and f"def _{op}_launches(" not in (root / "bench/static.py").read_text():
        found.append(f"{op}: no static-compile launch of its Triton kernels: _{op}_launches in bench/static.py")
    header = root / "csrc" / f"{op}.h"
    if "cuda" in impls:
        driver = (root / "csrc/sim/sanitize_driver.cpp").read_text()
        launchers = re.findall(r"void (\w+_cuda)\(", header.read_text()) if header.is_file() else []
        if not launchers:
            found.append(f"{op}: no CUDA launcher declared in csrc/{op}.h")
        for launcher in launchers:
            if f"nanolm::{launcher}(" not in driver:
                found.append(f"{op}: no sanitizer-driver case calls {launcher} (csrc/sim/sanitize_driver.cpp)")
    return found


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_every_piece(op):
    assert not missing(op, OPS[op]), "\n".join(missing(op, OPS[op]))
    assert functions(op) == OPS[op].BACKENDS["torch"]._fields[1:]


def test_a_half_added_op_is_told_what_is_missing():
    """An op with a specification and nothing else (the state of a new op's first commit)."""
    def rms_norm_fwd(x, weight, eps):
        return x

    Row = types.SimpleNamespace  # stands in for the op's <Op>Backend NamedTuple
    reference = type("RMSNormBackend", (), {"_fields": ("support", "rms_norm_fwd")})()
    reference.support, reference.rms_norm_fwd = Support(dtypes={"cpu": ()}), rms_norm_fwd
    module = types.SimpleNamespace(rms_norm_fwd=rms_norm_fwd,
                                   BACKENDS={"torch": reference, "cuda": Row(support=None)})
    found = "\n".join(missing("rmsnorm", module))
    for piece in ("backend cuda has no support row", "no kernel file csrc/rmsnorm.cu", "no test file",
                  "no bench case", "no CUDA launcher declared in csrc/rmsnorm.h"):
        assert piece in found, (piece, found)
    assert "specification" not in found


def test_readme_verification_tables_are_generated():
    """README.md's per-kernel tables are nanolm/verification.json's (python -m bench.verification_table)."""
    from bench import verification_table
    from nanolm.ops.backends import VERIFICATION
    text = (ROOT / "README.md").read_text()
    section = text.split(verification_table.START, 1)[1].split(verification_table.END, 1)[0]
    assert section.strip() == verification_table.render(VERIFICATION), \
        "README.md's verification tables are stale: run python -m bench.verification_table"
