"""The `cpu` backend: C++ kernels from csrc/*_cpu.cpp (OpenMP over rows), through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers.
"""
import torch

from nanolm.backends.checks import check_cross_entropy

OPS = ("cross_entropy",)


def unavailable_reason(device):
    if device.type != "cpu":
        return "the cpu backend runs on CPU tensors only"
    try:
        from nanolm import _C  # noqa: F401
    except ImportError as e:
        return f"nanolm._C is not built ({e})"
    return None


def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    check_cross_entropy("cross_entropy", logits, targets, vocab_size, dtypes=(torch.float32,),
                        device_type="cpu")
    from nanolm import _C
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32)
    dlogits = logits if inplace else torch.empty_like(logits)
    _C.cross_entropy_fwd_cpu(logits.data_ptr(), targets.data_ptr(), losses.data_ptr(),
                             dlogits.data_ptr(), N, Vp, vocab_size, ignore_index, z_loss, grad_scale)
    return losses, dlogits
