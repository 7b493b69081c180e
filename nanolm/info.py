"""`python -m nanolm.info`: how nanolm._C (and nanolm._C_sim) was built, library versions,
devices, the support matrix: per device, for each op and backend, which dtypes it runs, with the
reason where not (every cell is read from the support rows of the op modules, nanolm/ops/), and
how each CUDA and Triton kernel has been verified (nanolm/verification.json); and the CPU with
the precision --dtype=auto takes on it."""
import torch

from nanolm import precision
from nanolm.ops import OPS, backends
from nanolm.ops.launch import _C_sim
from nanolm.ops.support import dtype_name

VERIFICATION = backends.VERIFICATION

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build_info():
    try:
        from nanolm import _C
    except ImportError as e:
        return f"not built ({e})"
    return ", ".join(f"{k}={v}" for k, v in _C.build_info().items())


def sim_build_info():
    reason = backends.RUNS["cuda_sim"](torch.device("cpu"))
    if reason is not None:
        return reason
    return ", ".join(f"{k}={v}" for k, v in _C_sim.build_info().items() if k in ("cxx", "march"))


def cuda_kernel_status():
    """One line per CUDA kernel: emulated / compiled / run on a GPU; then whether auto takes cuda."""
    emulated = "emulated: cuda_sim op tests + ASan + TSan in CI"
    if backends.RUNS["cuda_sim"](torch.device("cpu")) is not None:
        emulated += " (cuda_sim not built here)"
    try:
        from nanolm import _C
        archs = _C.build_info()["cuda_archs"]
    except ImportError:
        archs = ""
    compiled = f"compiled here: {archs}" if archs else "not compiled here (no nvcc at install)"
    lines = []
    for op, kernels in VERIFICATION["cuda"].items():
        for kernel, record in kernels.items():
            lines.append(f"  {kernel:<32} {emulated}; {compiled}; run on a GPU: {record['gpu_run'] or 'never'}")
        auto = "in auto on CUDA" if backends.verified_on_gpu("cuda", op) else "not in auto (no GPU run yet)"
        lines.append(f"  {'':<32} -> cuda for {op}: {auto}")
    return "\n".join(lines)


def triton_kernel_status():
    """Three lines per Triton kernel: the tests that interpret it in CI, its compiled form (the CI
    gate, and the summary of the last full `python -m bench static` report), and its GPU runs."""
    lines = [f"  gate in CI: every production config compiles for sm_90a, fits shared memory, no spills "
             f"(tests/test_triton_static.py); full report: {VERIFICATION['static_report']}"]
    for kernels in VERIFICATION["triton"].values():
        for kernel, record in kernels.items():
            lines.append(f"  {kernel:<32} interpreted in CI (fp32): {', '.join(record['tests'])}")
            lines.append(f"  {'':<32} compiled: {record['compiled']}")
            lines.append(f"  {'':<32} run on a GPU: {record['gpu_run'] or 'never'}")
    return "\n".join(lines)


def cpu_precision():
    """This CPU as /proc/cpuinfo names it, and what --dtype=auto takes on it (nanolm/precision.py)."""
    cpu = precision.this_cpu()
    dtype, why = precision.cpu_dtype(cpu, precision.amx_tiles_permitted)
    return f"{cpu.model} ({cpu.vendor or 'no vendor listed'}); --dtype=auto trains in {dtype} ({why})"


def library_versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"torch {torch.__version__}, triton {triton_version}"


def devices():
    """CPU, each visible GPU, and a cuda device even without one (its column says why not)."""
    found = [torch.device("cpu")]
    found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cuda")]
    return found


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "none present"
    return "cpu"


def support_rows(device):
    """(op, backend, cell per dtype, why) for every op and backend on device. A cell is "yes"
    (runs here), "no" (not in the backend's table) or "(yes)" (in the table, but the backend
    cannot run here now: not built, no GPU, ...)."""
    rows = []
    for op in OPS:
        for name in backends.BACKENDS:
            table = [backends.support_reason(name, op, device, dtype) for dtype in DTYPES]
            here = None if all(table) else backends.RUNS[name](device)
            cells = ["no" if t else "(yes)" if here else "yes" for t in table]
            why = [here] + list(dict.fromkeys(table))
            rows.append((op, name, cells, "; ".join(r for r in why if r)))
    return rows


def main():
    print(f"nanolm._C: {build_info()}")
    print(f"nanolm._C_sim: {sim_build_info()}")
    print(f"libraries: {library_versions()}")
    print(f"cpu: {cpu_precision()}")
    header = ["op", "backend"] + [dtype_name(d) for d in DTYPES] + ["why not"]
    for device in devices():
        print(f"\n{device} ({device_name(device)}):")
        print("  " + "  ".join(f"{h:<14}" if i < 2 else f"{h:<9}" for i, h in enumerate(header)))
        for op, name, cells, why in support_rows(device):  # 14: the longest op name, mlp_activation
            print(f"  {op:<14}  {name:<14}  " + "  ".join(f"{c:<9}" for c in cells) + f"  {why}")
    print(f"\nCUDA kernels (csrc/*.cu), how each is verified:\n{cuda_kernel_status()}")
    print(f"\nTriton kernels (kernels/*.py), how each is verified:\n{triton_kernel_status()}")


if __name__ == "__main__":
    main()
