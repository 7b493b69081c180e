"""The `cpu` backend: C++ kernels from csrc/*_cpu.cpp (OpenMP over rows), through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers.
"""
import torch

from nanolm.backends.checks import adamw_scalars, check_adamw_buffers, check_tensor

OPS = ("adamw",)


def unavailable_reason(device):
    if device.type != "cpu":
        return "the cpu backend runs on CPU tensors only"
    try:
        from nanolm import _C  # noqa: F401
    except ImportError as e:
        return f"nanolm._C is not built ({e})"
    return None


# ----------------------------------------------------------------------------- adamw

def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               decay_numel, grad_scale):
    from nanolm import _C
    check_adamw_buffers("adamw_step", param, grad, exp_avg, exp_avg_sq, decay_numel, step)
    w1, w2, decay_factor, step_size, bc2_sqrt = adamw_scalars(lr, beta1, beta2, weight_decay, step)
    scalars = _C.AdamWScalars(w1, beta2, w2, eps, decay_factor, step_size, bc2_sqrt, grad_scale)
    _C.adamw_step_cpu(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                      param.numel(), decay_numel, scalars)


def sum_of_squares(x):
    from nanolm import _C
    check_tensor("sum_of_squares", "x", x, dtypes=(torch.float32,), ndim=1)
    return torch.tensor(_C.sum_of_squares_cpu(x.data_ptr(), x.numel()), dtype=torch.float32)
