"""The `cuda` backend: hand-written CUDA kernels from csrc/*.cu, called through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers
and the current CUDA stream to the extension, which throws on any CUDA error.
"""
import torch

from nanolm.backends.checks import check_cross_entropy

OPS = ("cross_entropy",)


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


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    check_cross_entropy("cross_entropy", logits, targets, vocab_size, dtypes=tuple(_DTYPE_NAMES),
                        device_type="cuda")
    from nanolm import _C
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    dlogits = logits if inplace else torch.empty_like(logits)
    _C.cross_entropy_fwd_cuda(logits.data_ptr(), targets.data_ptr(), losses.data_ptr(),
                              dlogits.data_ptr(), N, Vp, vocab_size, ignore_index, z_loss, grad_scale,
                              _DTYPE_NAMES[logits.dtype], _stream())
    return losses, dlogits
