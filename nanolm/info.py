"""`python -m nanolm.info`: how nanolm._C (and nanolm._C_sim) was built, library versions,
devices, which kernel backend can run each op on each device (with the reason when one cannot),
and how each CUDA kernel has been verified."""
import torch

from nanolm import backends
from nanolm.backends import cuda


def build_info():
    try:
        from nanolm import _C
    except ImportError as e:
        return f"not built ({e})"
    return ", ".join(f"{k}={v}" for k, v in _C.build_info().items())


def sim_build_info():
    reason = backends.unavailable_reason("cuda_sim", "layernorm", torch.device("cpu"))
    if reason is not None:
        return reason
    from nanolm import _C_sim
    return ", ".join(f"{k}={v}" for k, v in _C_sim.build_info().items() if k in ("cxx", "march"))


def cuda_kernel_status():
    """One line per CUDA kernel: emulated / compiled / run on a GPU."""
    sim = backends.unavailable_reason("cuda_sim", "layernorm", torch.device("cpu"))
    emulated = "emulated: cuda_sim op tests + ASan + TSan in CI" + ("" if sim is None else " (not built here)")
    try:
        from nanolm import _C
        archs = _C.build_info()["cuda_archs"]
    except ImportError:
        archs = ""
    compiled = f"compiled here: {archs}" if archs else "not compiled here (no nvcc at install)"
    lines = []
    for op, kernels in cuda.KERNELS.items():
        for kernel in kernels:
            gpu = cuda.GPU_RUNS.get(kernel, "never")
            lines.append(f"  {kernel:<32} {emulated}; {compiled}; run on a GPU: {gpu}")
        auto = "in auto" if cuda.verified_on_gpu(op) else "not in auto (no GPU run yet)"
        lines.append(f"  {'':<32} -> cuda for {op}: {auto}")
    return "\n".join(lines)


def library_versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"torch {torch.__version__}, triton {triton_version}"


def devices():
    found = [torch.device("cpu")]
    found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main():
    print(f"nanolm._C: {build_info()}")
    print(f"nanolm._C_sim: {sim_build_info()}")
    print(f"libraries: {library_versions()}")
    for device in devices():
        print(f"\n{device} ({device_name(device)}):")
        for op in backends.OPS:
            cells = []
            for name in backends.BACKENDS:
                reason = backends.unavailable_reason(name, op, device)
                cells.append(f"{name}: yes" if reason is None else f"{name}: no ({reason})")
            print(f"  {op:<14} " + "; ".join(cells))
    print(f"\nCUDA kernels (csrc/*.cu), how each is verified:\n{cuda_kernel_status()}")


if __name__ == "__main__":
    main()
