"""AdamW's update over flat fp32 buffers, in place, and the gradient norm (a sum of squares)
the clipping reads: the optimizer's two hot ops (nanolm/optim.py).

Decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW:
    g = grad * grad_scale;  p *= 1 - lr * wd (decayed range only)
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

This module reads top to bottom: the specification in plain PyTorch, the input checks, the
registration with PyTorch with the entry points the optimizer calls, then each backend's
support row and launchers. Kernels: kernels/adamw.py (Triton), csrc/adamw.cu (CUDA),
csrc/adamw_cpu.cpp (CPU).
"""
import math
from functools import partial
from typing import Callable, NamedTuple

import torch

from nanolm.kernels import adamw as triton_adamw
from nanolm.ops import library
from nanolm.ops.launch import CPU, CUDA, CUDA_SIM
from nanolm.ops.support import F32, FLOATS, Support, accumulation_dtype, check_first, check_tensor

# ----------------------------------------------------------------------------- specification
# param, grad, exp_avg, exp_avg_sq: 1-D buffers of equal length, the first decay_numel
# elements weight-decayed; sum_of_squares returns a 0-d float32 tensor.

def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, decay_numel,
               grad_scale):
    g = grad * grad_scale
    param[:decay_numel].mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def sum_of_squares(x):
    return x.to(accumulation_dtype(x.dtype)).square().sum()


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale):
    """The per-step scalars of the fused update, computed once on the host in float64, in the
    order of _C.AdamWScalars and kernels/adamw.py's launcher: (1 - beta1, beta2, 1 - beta2, eps,
    decay_factor = 1 - lr*wd, step_size = lr / (1 - beta1^step), bc2_sqrt = sqrt(1 - beta2^step),
    grad_scale)."""
    return (1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, lr / (1 - beta1 ** step),
            math.sqrt(1 - beta2 ** step), grad_scale)


# ----------------------------------------------------------------------------- checks

def check_step(op, support, param, grad, exp_avg, exp_avg_sq, decay_numel, step):
    """The four buffers: 1-D, contiguous, one dtype, one device, one length."""
    check_first(op, support, "param", param, ndim=1)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(op, name, t, dtypes=(param.dtype,), device=param.device, shape=param.shape)
    if not 0 <= decay_numel <= param.numel():
        raise ValueError(f"{op}: decay_numel {decay_numel} is outside [0, {param.numel()}]")
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1, got {step}")


def check_sum_of_squares(op, support, x):
    check_first(op, support, "x", x, ndim=1)


# ----------------------------------------------------------------------------- registration
# The optimizer runs outside the compiled model; registering its ops keeps every op of the
# library one kind of thing, callable (and opcheck-tested) as torch.ops.nanolm.<name>.

@library.op("adamw_step", fake=lambda *_: None, mutates_args=("param", "exp_avg", "exp_avg_sq"))
def adamw_step_op(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                  decay_numel: int, grad_scale: float, backend: str) -> None:
    BACKENDS[backend].adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                                 decay_numel, grad_scale)


@library.op("sum_of_squares", fake=lambda x, backend: x.new_empty((), dtype=accumulation_dtype(x.dtype)))
def sum_of_squares_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return BACKENDS[backend].sum_of_squares(x)


def adamw(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step, decay_numel, grad_scale,
          backend):
    """One AdamW update over flat float32 buffers, in place, by backend (a name)."""
    adamw_step_op(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, decay_numel,
                  grad_scale, backend)


def grad_norm(grad, backend):
    """L2 norm of a flat gradient buffer, by a deterministic reduction. The backends sum the
    squares in fp32, which overflows to inf once the norm passes ~1.8e19 although every gradient
    is finite; then the sum is taken again over grad / max|grad| (<= 1, so it cannot overflow)
    and scaled back in fp64. That costs a copy and two more passes, only in this rare case."""
    sumsq = sum_of_squares_op(grad, backend)
    if not torch.isinf(sumsq):
        return sumsq.sqrt()
    return scaled_norm(grad.abs().max(), lambda scale: sum_of_squares_op(grad / scale, backend))


def scaled_norm(scale, sum_of_squares):
    """scale * sqrt(sum_of_squares(scale)) in fp64, where sum_of_squares(scale) sums the squares
    of the gradients divided by scale (>= their max |value|); inf if scale is (a gradient is)."""
    if not torch.isfinite(scale):
        return scale.double().abs()
    return sum_of_squares(scale).double().sqrt() * scale.double()


# ----------------------------------------------------------------------------- backends
# Each backend implements the two functions of the specification, with its signatures.

class AdamWBackend(NamedTuple):
    support: Support
    adamw_step: Callable
    sum_of_squares: Callable


# --- triton: kernels/adamw.py
TRITON = Support(dtypes={"cpu": F32, "cuda": F32})


def _triton_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, decay_numel,
                 grad_scale):
    check_step("adamw_step", TRITON, param, grad, exp_avg, exp_avg_sq, decay_numel, step)
    triton_adamw.adamw_step(param, grad, exp_avg, exp_avg_sq, decay_numel,
                            adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale))


def _triton_sum_of_squares(x):
    check_sum_of_squares("sum_of_squares", TRITON, x)
    return triton_adamw.sum_of_squares(x)


# --- cpu, cuda, cuda_sim: csrc/adamw_cpu.cpp, csrc/adamw.cu; the optimizer's fp32 buffers only
CPU_ROW = Support(dtypes={"cpu": F32})
CUDA_ROW = Support(dtypes={"cuda": F32})


def _cxx_step(target, support, param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
              decay_numel, grad_scale):
    check_step("adamw_step", support, param, grad, exp_avg, exp_avg_sq, decay_numel, step)
    scalars = target.ext.AdamWScalars(*adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale))
    target.launch("adamw_step", param.device, param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(),
                  exp_avg_sq.data_ptr(), param.numel(), decay_numel, scalars, target.dtype(param))


def _cpu_sum_of_squares(x):
    """The cpu kernel returns the sum (a double, reduced in a fixed order) to the host."""
    check_sum_of_squares("sum_of_squares", CPU_ROW, x)
    return torch.tensor(CPU.launch("sum_of_squares", x.device, x.data_ptr(), x.numel(), CPU.dtype(x)),
                        dtype=torch.float32)


def _cuda_sum_of_squares(target, support, x):
    """The CUDA kernels reduce into per-block partials, then into out, on the device."""
    check_sum_of_squares("sum_of_squares", support, x)
    partials = torch.empty(target.ext.sum_of_squares_partials_cuda(), dtype=torch.float32, device=x.device)
    out = torch.empty((), dtype=torch.float32, device=x.device)
    target.launch("sum_of_squares", x.device, x.data_ptr(), x.numel(), partials.data_ptr(), out.data_ptr(),
                  target.dtype(x))
    return out


def _cuda_backend(target, support):
    return AdamWBackend(support, partial(_cxx_step, target, support), partial(_cuda_sum_of_squares, target, support))


BACKENDS = {
    "torch": AdamWBackend(Support(dtypes={"cpu": FLOATS, "cuda": FLOATS}), adamw_step, sum_of_squares),
    "triton": AdamWBackend(TRITON, _triton_step, _triton_sum_of_squares),
    "cuda": _cuda_backend(CUDA, CUDA_ROW),
    "cpu": AdamWBackend(CPU_ROW, partial(_cxx_step, CPU, CPU_ROW), _cpu_sum_of_squares),
    "cuda_sim": _cuda_backend(CUDA_SIM, CUDA_ROW.on_cpu()),
}
