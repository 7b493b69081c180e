"""Input checks shared by the kernel backends (triton, cuda, cpu).

A kernel that receives pointers trusts nothing the Python layer did not check, so every
backend function validates its tensors here first and raises ValueError naming the op,
the argument and the bad value.
"""
import math

import torch


def check_tensor(op, name, t, *, dtypes, device=None, ndim=None, shape=None, contiguous=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {allowed}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()}, shape {tuple(t.shape)})")


def check_same_dtype(op, **tensors):
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{op}: dtypes differ: {dtypes}")


def check_adamw_buffers(op, param, grad, exp_avg, exp_avg_sq, decay_numel, step):
    """The four AdamW buffers: 1-D float32, contiguous, one device, one length."""
    check_tensor(op, "param", param, dtypes=(torch.float32,), ndim=1)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(op, name, t, dtypes=(torch.float32,), device=param.device, shape=param.shape)
    if not 0 <= decay_numel <= param.numel():
        raise ValueError(f"{op}: decay_numel {decay_numel} is outside [0, {param.numel()}]")
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1, got {step}")


def adamw_scalars(lr, beta1, beta2, weight_decay, step):
    """The per-step scalars of the fused update, computed once on the host in float64:
    (1 - beta1, 1 - beta2, decay_factor = 1 - lr*wd, step_size = lr / (1 - beta1^step),
    bc2_sqrt = sqrt(1 - beta2^step))."""
    return (1 - beta1, 1 - beta2, 1 - lr * weight_decay, lr / (1 - beta1 ** step),
            math.sqrt(1 - beta2 ** step))
