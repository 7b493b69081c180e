"""The `cpu` backend: C++ kernels from csrc/*_cpu.cpp (OpenMP over rows), through nanolm._C.

Each function checks its tensors against SUPPORT (checks.py) and passes raw pointers.
Activations in float32, bfloat16 or float16 (the 16-bit kernels keep fp32 statistics and
accumulators); AdamW and sum_of_squares work on the optimizer's fp32 buffers only.
"""
import torch

from nanolm.backends.checks import (check_adamw, check_attention, check_attention_bwd, check_cross_entropy,
                                    check_cross_entropy_shard, check_dropout, check_layer_norm_bwd,
                                    check_layer_norm_fwd, check_sum_of_squares)
from nanolm.backends.common import (_C, Support, adamw_scalars, bth_strides, c_dtype, dropout_scalars,
                                    layer_norm_bwd_outputs, layer_norm_forwards, layer_norm_outputs, ptr)

F32 = (torch.float32,)
ACTIVATIONS = (torch.float32, torch.bfloat16, torch.float16)  # csrc/cpu_bf16.h
SUPPORT = {
    "layernorm": Support(dtypes={"cpu": ACTIVATIONS}, dropout=True),
    # head sizes: the matmuls work in 16-column panels
    "attention": Support(dtypes={"cpu": ACTIVATIONS}, head_sizes=tuple(range(16, 257, 16)), dropout=True),
    "cross_entropy": Support(dtypes={"cpu": ACTIVATIONS}),
    "adamw": Support(dtypes={"cpu": F32}),
}


def unavailable_reason(device):
    return None if _C is not None else "nanolm._C is not built"


def _dropout_params(dropout):
    return _C.DropoutParams() if dropout is None else _C.DropoutParams(*dropout_scalars(dropout))


# ----------------------------------------------------------------------------- layernorm

def _layer_norm_fwd(op, x, residual, weight, bias, eps, dropout):
    check_layer_norm_fwd(op, SUPPORT["layernorm"], x, residual, weight, bias, dropout)
    y, residual_out, mean, rstd = layer_norm_outputs(x, residual, dropout)
    _C.layernorm_fwd_cpu(x.data_ptr(), ptr(residual), ptr(residual_out), weight.data_ptr(), ptr(bias),
                         y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), *x.shape, float(eps), c_dtype(x),
                         _dropout_params(dropout))
    return y, residual_out, mean, rstd


layer_norm_fwd, add_layer_norm_fwd = layer_norm_forwards(_layer_norm_fwd)


def layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, dropout=None, dbranch=None):
    check_layer_norm_bwd("layer_norm_bwd", SUPPORT["layernorm"], dy, x, weight, mean, rstd, dresidual,
                         dropout, dbranch)
    N, C = x.shape
    dx, dweight, dbias = layer_norm_bwd_outputs(x)
    _C.layernorm_bwd_cpu(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                         ptr(dresidual), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), N, C, c_dtype(x),
                         ptr(dbranch), _dropout_params(dropout))
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- attention

def attention_fwd(q, k, v, scale, dropout=None):
    check_dropout("attention_fwd", SUPPORT["attention"], dropout)
    B, T, nh, hs = check_attention("attention_fwd", SUPPORT["attention"], q, k, v)
    o = torch.empty((B, T, nh, hs), dtype=q.dtype)
    lse = torch.empty((B, nh, T), dtype=torch.float32)
    _C.attention_fwd_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                         B, T, nh, hs, *bth_strides(q), *bth_strides(k), *bth_strides(v), float(scale),
                         c_dtype(q), _dropout_params(dropout))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout=None):
    check_dropout("attention_bwd", SUPPORT["attention"], dropout)
    B, T, nh, hs = check_attention_bwd("attention_bwd", SUPPORT["attention"], do, q, k, v, o, lse, dq, dk, dv)
    _C.attention_bwd_cpu(do.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                         lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, T, nh, hs,
                         *bth_strides(q), *bth_strides(k), *bth_strides(v),
                         *bth_strides(dq), *bth_strides(dk), *bth_strides(dv), float(scale), c_dtype(q),
                         _dropout_params(dropout))


# ----------------------------------------------------------------------------- cross-entropy

def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    check_cross_entropy("cross_entropy", SUPPORT["cross_entropy"], logits, targets, vocab_size)
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32)
    dlogits = logits if inplace else torch.empty_like(logits)
    _C.cross_entropy_fwd_cpu(logits.data_ptr(), targets.data_ptr(), losses.data_ptr(),
                             dlogits.data_ptr(), N, Vp, vocab_size, ignore_index, z_loss, grad_scale,
                             c_dtype(logits))
    return losses, dlogits


def cross_entropy_stats(logits, targets, vocab_start, vocab_size):
    check_cross_entropy_shard("cross_entropy_stats", SUPPORT["cross_entropy"], logits, targets, vocab_size)
    N, Vp = logits.shape
    stats = torch.empty(N, 3, dtype=torch.float32)
    _C.cross_entropy_stats_cpu(logits.data_ptr(), targets.data_ptr(), stats.data_ptr(), N, Vp, vocab_size,
                               vocab_start, c_dtype(logits))
    return stats


def cross_entropy_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index, z_loss, grad_scale):
    check_cross_entropy_shard("cross_entropy_grad", SUPPORT["cross_entropy"], logits, targets, vocab_size, lse)
    N, Vp = logits.shape
    _C.cross_entropy_grad_cpu(logits.data_ptr(), targets.data_ptr(), lse.data_ptr(), N, Vp, vocab_size,
                              vocab_start, ignore_index, z_loss, grad_scale, c_dtype(logits))
    return logits


# ----------------------------------------------------------------------------- adamw

def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               decay_numel, grad_scale):
    check_adamw("adamw_step", SUPPORT["adamw"], param, grad, exp_avg, exp_avg_sq, decay_numel, step)
    scalars = _C.AdamWScalars(*adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale))
    _C.adamw_step_cpu(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                      param.numel(), decay_numel, scalars, c_dtype(param))


def sum_of_squares(x):
    check_sum_of_squares("sum_of_squares", SUPPORT["adamw"], x)
    return torch.tensor(_C.sum_of_squares_cpu(x.data_ptr(), x.numel(), c_dtype(x)), dtype=torch.float32)
