"""The `cuda` backend: hand-written CUDA kernels from csrc/*.cu, called through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers
and the current CUDA stream to the extension, which throws on any CUDA error.
"""
import torch

OPS = ()


def unavailable_reason(device):
    if device.type != "cuda":
        return "the cuda backend needs a CUDA device"
    try:
        from nanolm import _C
    except ImportError as e:
        return f"nanolm._C is not built ({e})"
    if not _C.build_info()["cuda"]:
        return "nanolm._C was built without CUDA (no nvcc at build time, or NANOLM_CUDA=off)"
    return None if torch.cuda.is_available() else "CUDA is not available"


def _stream():
    return torch.cuda.current_stream().cuda_stream
