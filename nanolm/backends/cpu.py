"""The `cpu` backend: C++ kernels from csrc/*_cpu.cpp (OpenMP over rows), through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers.
"""
OPS = ()


def unavailable_reason(device):
    if device.type != "cpu":
        return "the cpu backend runs on CPU tensors only"
    try:
        from nanolm import _C  # noqa: F401
    except ImportError as e:
        return f"nanolm._C is not built ({e})"
    return None
