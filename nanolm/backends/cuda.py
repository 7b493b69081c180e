"""The `cuda` backend: hand-written CUDA kernels from csrc/*.cu, called through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers
and the current CUDA stream to the extension, which throws on any CUDA error.
"""
import torch

from nanolm.backends.checks import adamw_scalars, check_adamw_buffers, check_tensor

OPS = ("adamw",)


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


# ----------------------------------------------------------------------------- adamw

def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               decay_numel, grad_scale):
    from nanolm import _C
    check_adamw_buffers("adamw_step", param, grad, exp_avg, exp_avg_sq, decay_numel, step)
    w1, w2, decay_factor, step_size, bc2_sqrt = adamw_scalars(lr, beta1, beta2, weight_decay, step)
    scalars = _C.AdamWScalars(w1, beta2, w2, eps, decay_factor, step_size, bc2_sqrt, grad_scale)
    with torch.cuda.device(param.device):
        _C.adamw_step_cuda(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(),
                           exp_avg_sq.data_ptr(), param.numel(), decay_numel, scalars, _stream())


def sum_of_squares(x):
    from nanolm import _C
    check_tensor("sum_of_squares", "x", x, dtypes=(torch.float32,), ndim=1)
    partials = torch.empty(_C.sum_of_squares_partials_cuda(), dtype=torch.float32, device=x.device)
    out = torch.empty((), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _C.sum_of_squares_cuda(x.data_ptr(), x.numel(), partials.data_ptr(), out.data_ptr(), _stream())
    return out
