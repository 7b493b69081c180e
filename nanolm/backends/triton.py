"""The `triton` backend: the Triton kernels of kernels/ (imported as nanolm.kernels).

Runs on CUDA devices, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported), which is how CI tests these kernels.
"""
import os

import torch

from nanolm.backends.checks import (check_adamw_buffers, check_attention_bwd, check_attention_qkv,
                                   check_cross_entropy, check_tensor)
from nanolm.kernels.layernorm import add_layer_norm_fwd, layer_norm_bwd, layer_norm_fwd  # noqa: F401

OPS = ("layernorm", "attention", "cross_entropy", "adamw")
DROPOUT_OPS = ("layernorm", "attention")  # ops whose functions take a dropout argument (see torch_ref)


def unavailable_reason(device):
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton runs on CUDA devices, or on CPU only under TRITON_INTERPRET=1"


def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    check_cross_entropy("cross_entropy", logits, targets, vocab_size,
                        dtypes=(torch.float32, torch.bfloat16, torch.float16),
                        device_type=None)
    from nanolm.kernels import cross_entropy
    return cross_entropy.cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss,
                                           grad_scale, inplace)


# ----------------------------------------------------------------------------- adamw

def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               decay_numel, grad_scale):
    from nanolm.kernels import adamw
    check_adamw_buffers("adamw_step", param, grad, exp_avg, exp_avg_sq, decay_numel, step)
    adamw.adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                     decay_numel, grad_scale)


def sum_of_squares(x):
    from nanolm.kernels import adamw
    check_tensor("sum_of_squares", "x", x, dtypes=(torch.float32,), ndim=1)
    return adamw.sum_of_squares(x)


# ----------------------------------------------------------------------------- attention

def _check_attention_qkv(op, q, k, v):
    from nanolm.kernels import attention
    check_tensor(op, "q", q, dtypes=(torch.float32, torch.bfloat16, torch.float16), contiguous=False)
    # fp32 only where tl.dot is exact fp32 (the interpreter); on a GPU it would silently be tf32
    dtypes = (torch.float32,) if q.device.type == "cpu" else (torch.bfloat16, torch.float16)
    check_attention_qkv(op, q, k, v, dtypes=dtypes, head_dims=attention.HEAD_DIMS)


def attention_fwd(q, k, v, scale, dropout=None):
    from nanolm.kernels import attention
    _check_attention_qkv("attention_fwd", q, k, v)
    return attention.attention_fwd(q, k, v, scale, dropout)


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout=None):
    from nanolm.kernels import attention
    _check_attention_qkv("attention_bwd", q, k, v)
    check_attention_bwd("attention_bwd", do, q, o, lse, dq, dk, dv)
    attention.attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout)
