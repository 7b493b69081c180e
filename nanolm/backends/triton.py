"""The `triton` backend: the Triton kernels of kernels/ (imported as nanolm.kernels).

Runs on CUDA devices, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set before triton is imported), which is how CI tests these kernels. Each function checks its
tensors against SUPPORT (checks.py) and calls the kernel file's launcher.
"""
import os

import torch

from nanolm.backends.checks import (check_adamw, check_attention, check_attention_bwd, check_cross_entropy,
                                    check_cross_entropy_shard, check_dropout, check_layer_norm_bwd,
                                    check_layer_norm_fwd, check_sum_of_squares)
from nanolm.backends.common import Support, adamw_scalars, dropout_scalars, layer_norm_forwards
from nanolm.kernels import adamw, attention, cross_entropy, layernorm

ANY = (torch.float32, torch.bfloat16, torch.float16)
F32 = (torch.float32,)
SUPPORT = {
    "layernorm": Support(dtypes={"cpu": ANY, "cuda": ANY}, max_row=layernorm.MAX_C, dropout=True),
    "attention": Support(
        dtypes={"cpu": F32, "cuda": (torch.bfloat16, torch.float16)},
        head_sizes=(16, 32, 64, 128),  # tl.arange needs a power of two; tl.dot a K of 16 or more
        notes={"cpu": "the interpreter's tl.dot returns garbage on bf16/fp16",
               "cuda": "no float32: tl.dot would silently compute in tf32"},
        dropout=True),
    "cross_entropy": Support(dtypes={"cpu": ANY, "cuda": ANY}),
    "adamw": Support(dtypes={"cpu": F32, "cuda": F32}),
}


# Every @triton.jit kernel of kernels/ (not the device functions they call), by op, with the test
# files that run it in CI, and how each has been verified:
#   interpreted  those tests run it under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors,
#                fp32: the interpreter's bf16 tl.dot is wrong) against the float64 references;
#   compiled     tests/test_triton_static.py compiles each of its production configurations
#                (bench/static.py: bf16, GPT-2 widths, head size 64 and 128, every autotune config,
#                with and without dropout, the --tp=2 vocabulary shards) for sm_90a and fails on a
#                compile error, too much shared memory or a register spill; `python -m bench static`
#                reports every configuration for sm_80 and sm_90a (STATIC_REPORT: the last full run);
#   GPU          GPU_RUNS: the date and GPU of the last run where its gpu-marked tests passed
#                (bench/gpu_check.sh tests), as cuda.GPU_RUNS.
KERNELS = {
    "layernorm": {"layernorm_fwd_kernel": ("tests/test_layernorm.py", "tests/test_dropout.py"),
                  "layernorm_bwd_kernel": ("tests/test_layernorm.py", "tests/test_dropout.py"),
                  "layernorm_bwd_reduce_kernel": ("tests/test_layernorm.py",)},
    "attention": {"attention_fwd_kernel": ("tests/test_attention.py", "tests/test_dropout.py"),
                  "attention_bwd_delta_kernel": ("tests/test_attention.py",),
                  "attention_bwd_dkdv_kernel": ("tests/test_attention.py", "tests/test_dropout.py"),
                  "attention_bwd_dq_kernel": ("tests/test_attention.py", "tests/test_dropout.py")},
    "cross_entropy": {"cross_entropy_fwd_kernel": ("tests/test_cross_entropy.py",),
                      "cross_entropy_stats_kernel": ("tests/test_cross_entropy_shard.py",),
                      "cross_entropy_grad_kernel": ("tests/test_cross_entropy_shard.py",)},
    "adamw": {"adamw_step_kernel": ("tests/test_adamw.py",),
              "sum_of_squares_partials_kernel": ("tests/test_adamw.py",),
              "sum_of_squares_final_kernel": ("tests/test_adamw.py",)},
}
STATIC_REPORT = "bench/results/2026-11-29-static"  # static.json of the last full `python -m bench static`
GPU_RUNS = {}  # kernel -> "YYYY-MM-DD, GPU": no run of the gpu-marked tests is recorded yet


def unavailable_reason(device):
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton runs on CUDA devices, or on CPU only under TRITON_INTERPRET=1"


def _dropout_args(dropout):
    """The kernels' (seed, offset, threshold, keep_scale), or None without dropout."""
    return None if dropout is None else dropout_scalars(dropout)


# ----------------------------------------------------------------------------- layernorm

def _layer_norm_fwd(op, x, residual, weight, bias, eps, dropout):
    check_layer_norm_fwd(op, SUPPORT["layernorm"], x, residual, weight, bias, dropout)
    return layernorm.layernorm_fwd(x, residual, weight, bias, eps, _dropout_args(dropout))


layer_norm_fwd, add_layer_norm_fwd = layer_norm_forwards(_layer_norm_fwd)


def layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, dropout=None, dbranch=None):
    check_layer_norm_bwd("layer_norm_bwd", SUPPORT["layernorm"], dy, x, weight, mean, rstd, dresidual,
                         dropout, dbranch)
    return layernorm.layernorm_bwd(dy, x, weight, mean, rstd, dresidual, _dropout_args(dropout), dbranch)


# ----------------------------------------------------------------------------- attention

def attention_fwd(q, k, v, scale, dropout=None):
    check_dropout("attention_fwd", SUPPORT["attention"], dropout)
    check_attention("attention_fwd", SUPPORT["attention"], q, k, v)
    return attention.attention_fwd(q, k, v, scale, _dropout_args(dropout))


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout=None):
    check_dropout("attention_bwd", SUPPORT["attention"], dropout)
    check_attention_bwd("attention_bwd", SUPPORT["attention"], do, q, k, v, o, lse, dq, dk, dv)
    attention.attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, _dropout_args(dropout))


# ----------------------------------------------------------------------------- cross-entropy

def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    check_cross_entropy("cross_entropy", SUPPORT["cross_entropy"], logits, targets, vocab_size)
    return cross_entropy.cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss,
                                                   grad_scale, inplace)


def cross_entropy_stats(logits, targets, vocab_start, vocab_size):
    check_cross_entropy_shard("cross_entropy_stats", SUPPORT["cross_entropy"], logits, targets, vocab_size)
    return cross_entropy.cross_entropy_stats(logits, targets, vocab_start, vocab_size)


def cross_entropy_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index, z_loss, grad_scale):
    check_cross_entropy_shard("cross_entropy_grad", SUPPORT["cross_entropy"], logits, targets, vocab_size, lse)
    return cross_entropy.cross_entropy_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index, z_loss,
                                            grad_scale)


# ----------------------------------------------------------------------------- adamw

def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               decay_numel, grad_scale):
    check_adamw("adamw_step", SUPPORT["adamw"], param, grad, exp_avg, exp_avg_sq, decay_numel, step)
    adamw.adamw_step(param, grad, exp_avg, exp_avg_sq, decay_numel,
                             adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale))


def sum_of_squares(x):
    check_sum_of_squares("sum_of_squares", SUPPORT["adamw"], x)
    return adamw.sum_of_squares(x)
