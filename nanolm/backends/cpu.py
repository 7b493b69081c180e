"""The `cpu` backend: C++ kernels from csrc/*_cpu.cpp (OpenMP over rows), through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers.
"""
import torch

from nanolm.backends.checks import (adamw_scalars, check_adamw_buffers, check_attention_bwd,
                                   check_attention_qkv, check_cross_entropy, check_layer_norm,
                                   check_tensor, dropout_scalars)

OPS = ("layernorm", "attention", "cross_entropy", "adamw")
DROPOUT_OPS = ("layernorm", "attention")  # ops whose functions take a dropout argument (see torch_ref)


def unavailable_reason(device):
    if device.type != "cpu":
        return "the cpu backend runs on CPU tensors only"
    try:
        from nanolm import _C  # noqa: F401
    except ImportError as e:
        return f"nanolm._C is not built ({e})"
    return None


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _dropout_params(dropout):
    from nanolm import _C
    return _C.DropoutParams() if dropout is None else _C.DropoutParams(*dropout_scalars(dropout))


# ----------------------------------------------------------------------------- layernorm

def _check_cpu(op, x):
    if x.device.type != "cpu":
        raise ValueError(f"{op}: x is on {x.device}, the cpu backend needs CPU tensors")


def _layer_norm_fwd(op, x, residual, weight, bias, eps, dropout=None):
    from nanolm import _C
    check_layer_norm(op, x, weight, dtypes=(torch.float32,), rows=[("residual", residual)],
                     vectors=[("bias", bias)])
    _check_cpu(op, x)
    N, C = x.shape
    y = torch.empty_like(x)
    residual_out = None if residual is None and dropout is None else torch.empty_like(x)
    mean = torch.empty(N, dtype=torch.float32)
    rstd = torch.empty(N, dtype=torch.float32)
    _C.layernorm_fwd_cpu(x.data_ptr(), _ptr(residual), _ptr(residual_out), weight.data_ptr(), _ptr(bias),
                         y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), N, C, float(eps),
                         _dropout_params(dropout))
    return y, residual_out, mean, rstd


def layer_norm_fwd(x, weight, bias, eps):
    y, _, mean, rstd = _layer_norm_fwd("layer_norm_fwd", x, None, weight, bias, eps)
    return y, mean, rstd


def add_layer_norm_fwd(x, residual, weight, bias, eps, dropout=None):
    if residual is None and dropout is None:
        raise ValueError("add_layer_norm_fwd: residual may be None only with dropout")
    return _layer_norm_fwd("add_layer_norm_fwd", x, residual, weight, bias, eps, dropout)


def layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, dropout=None, dbranch=None):
    from nanolm import _C
    op = "layer_norm_bwd"
    if (dropout is None) != (dbranch is None):
        raise ValueError(f"{op}: dropout and dbranch must be given together")
    check_layer_norm(op, x, weight, dtypes=(torch.float32,),
                     rows=[("dy", dy), ("dresidual", dresidual), ("dbranch", dbranch)],
                     stats=[("mean", mean), ("rstd", rstd)])
    _check_cpu(op, x)
    N, C = x.shape
    dx = torch.empty_like(x)
    dweight = torch.empty(C, dtype=torch.float32)
    dbias = torch.empty(C, dtype=torch.float32)
    _C.layernorm_bwd_cpu(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                         _ptr(dresidual), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), N, C,
                         _ptr(dbranch), _dropout_params(dropout))
    return dx, dweight, dbias
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


# ----------------------------------------------------------------------------- attention

ATTENTION_HEAD_DIMS = tuple(range(16, 257, 16))  # the C++ matmul works in 16-column panels


def _bth(t):
    return t.stride(0), t.stride(1), t.stride(2)


def attention_fwd(q, k, v, scale, dropout=None):
    from nanolm import _C
    B, T, nh, hs = check_attention_qkv("attention_fwd", q, k, v, dtypes=(torch.float32,),
                                       head_dims=ATTENTION_HEAD_DIMS)
    o = torch.empty((B, T, nh, hs), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    _C.attention_fwd_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                         B, T, nh, hs, *_bth(q), *_bth(k), *_bth(v), float(scale), _dropout_params(dropout))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout=None):
    from nanolm import _C
    B, T, nh, hs = check_attention_qkv("attention_bwd", q, k, v, dtypes=(torch.float32,),
                                       head_dims=ATTENTION_HEAD_DIMS)
    check_attention_bwd("attention_bwd", do, q, o, lse, dq, dk, dv)
    _C.attention_bwd_cpu(do.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                         lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, T, nh, hs,
                         *_bth(q), *_bth(k), *_bth(v), *_bth(dq), *_bth(dk), *_bth(dv), float(scale),
                         _dropout_params(dropout))
