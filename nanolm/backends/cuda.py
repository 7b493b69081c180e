"""The `cuda` backend: hand-written CUDA kernels from csrc/*.cu, called through nanolm._C.

Each function checks its tensors against SUPPORT (checks.py) and passes raw pointers and the
current CUDA stream to the extension, which throws on any CUDA error. Every launch runs under
`torch.cuda.device(...)` of its tensors: the kernels use the current device.

The cuda_sim backend (cuda_sim.py) runs a second instance of this module on the SIMT emulation
of csrc/sim/ (CPU tensors): it rebinds the names that tie this file to a GPU, `_C`, `c_dtype`,
`_device`, `_stream` and `SUPPORT`, so both backends share every check and every launch.
"""
import torch

from nanolm.backends.checks import (check_adamw, check_attention, check_attention_bwd, check_cross_entropy,
                                    check_cross_entropy_shard, check_dropout, check_layer_norm_bwd,
                                    check_layer_norm_fwd, check_sum_of_squares)
from nanolm.backends.common import (_C, Support, adamw_scalars, bth_strides, c_dtype, dropout_scalars,
                                    layer_norm_bwd_outputs, layer_norm_forwards, layer_norm_outputs, ptr)

SUPPORT = {
    # max_row: kLayerNormCudaMaxC (csrc/layernorm.h): each thread caches at most 16 values of a row
    "layernorm": Support(dtypes={"cuda": (torch.float32, torch.bfloat16)}, max_row=16384, dropout=True),
    # mma.sync takes bf16/fp16; 16-byte cp.async copies need the alignment (qkv views have it)
    "attention": Support(dtypes={"cuda": (torch.bfloat16, torch.float16)}, head_sizes=(64, 128), align_bytes=16,
                         dropout=True),
    "cross_entropy": Support(dtypes={"cuda": (torch.float32, torch.bfloat16)}),
    "adamw": Support(dtypes={"cuda": (torch.float32,)}),
}


# Every kernel of csrc/*.cu, by op, and how each has been verified:
#   emulated  the cuda_sim backend runs it in CI: the op tests against float64 references, and
#             the AddressSanitizer / ThreadSanitizer jobs (tests/test_cuda_sim_sanitizers.py);
#   compiled  nvcc builds it for sm_80 and sm_90a at every install that has a CUDA toolkit;
#   GPU       GPU_RUNS: the date and GPU of the last run where its gpu-marked tests passed
#             (bench/gpu_check.sh tests). `auto` picks cuda for an op only when every one of
#             its kernels has a GPU run (nanolm/backends/__init__.py).
KERNELS = {
    "layernorm": ("layernorm_fwd_kernel", "layernorm_bwd_kernel", "layernorm_bwd_reduce_kernel"),
    "attention": ("attention_fwd_kernel", "attention_bwd_delta_kernel", "attention_bwd_dkdv_kernel",
                  "attention_bwd_dq_kernel"),
    "cross_entropy": ("cross_entropy_fwd_kernel", "cross_entropy_stats_kernel", "cross_entropy_grad_kernel"),
    "adamw": ("adamw_scalar_kernel", "adamw_vec4_kernel", "sum_of_squares_partials_kernel",
              "sum_of_squares_final_kernel"),
}
GPU_RUNS = {}  # kernel -> "YYYY-MM-DD, GPU": none has run on a GPU yet


def verified_on_gpu(op):
    return all(kernel in GPU_RUNS for kernel in KERNELS[op])


def unavailable_reason(device):
    if _C is None:
        return "nanolm._C is not built"
    if not _C.build_info()["cuda"]:
        return "nanolm._C was built without CUDA (no nvcc at build time, or NANOLM_CUDA=off)"
    return None if torch.cuda.is_available() else "CUDA is not available"


def _stream():
    return torch.cuda.current_stream().cuda_stream


_device = torch.cuda.device  # the context a launch runs in


def _dropout_params(dropout):
    return _C.DropoutParams() if dropout is None else _C.DropoutParams(*dropout_scalars(dropout))


# ----------------------------------------------------------------------------- layernorm

def _layer_norm_fwd(op, x, residual, weight, bias, eps, dropout):
    check_layer_norm_fwd(op, SUPPORT["layernorm"], x, residual, weight, bias, dropout)
    y, residual_out, mean, rstd = layer_norm_outputs(x, residual, dropout)
    with _device(x.device):
        _C.layernorm_fwd_cuda(x.data_ptr(), ptr(residual), ptr(residual_out), weight.data_ptr(), ptr(bias),
                              y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), *x.shape, float(eps),
                              c_dtype(x), _dropout_params(dropout), _stream())
    return y, residual_out, mean, rstd


layer_norm_fwd, add_layer_norm_fwd = layer_norm_forwards(_layer_norm_fwd)


def layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, dropout=None, dbranch=None):
    check_layer_norm_bwd("layer_norm_bwd", SUPPORT["layernorm"], dy, x, weight, mean, rstd, dresidual,
                         dropout, dbranch)
    N, C = x.shape
    dx, dweight, dbias = layer_norm_bwd_outputs(x)
    with _device(x.device):
        workspace = torch.empty(2, _C.layernorm_bwd_workspace_rows_cuda(N, C), C, dtype=torch.float32,
                                device=x.device)
        _C.layernorm_bwd_cuda(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                              ptr(dresidual), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
                              workspace.data_ptr(), N, C, c_dtype(x), ptr(dbranch), _dropout_params(dropout),
                              _stream())
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- attention

def attention_fwd(q, k, v, scale, dropout=None):
    check_dropout("attention_fwd", SUPPORT["attention"], dropout)
    B, T, nh, hs = check_attention("attention_fwd", SUPPORT["attention"], q, k, v)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    with _device(q.device):
        _C.attention_fwd_cuda(q.data_ptr(), bth_strides(q), k.data_ptr(), bth_strides(k), v.data_ptr(),
                              bth_strides(v), o.data_ptr(), bth_strides(o), lse.data_ptr(), B, T, nh, hs,
                              float(scale), c_dtype(q), _stream(), _dropout_params(dropout))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout=None):
    check_dropout("attention_bwd", SUPPORT["attention"], dropout)
    B, T, nh, hs = check_attention_bwd("attention_bwd", SUPPORT["attention"], do, q, k, v, o, lse, dq, dk, dv)
    delta = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    with _device(q.device):
        _C.attention_bwd_cuda(do.data_ptr(), bth_strides(do), q.data_ptr(), bth_strides(q), k.data_ptr(),
                              bth_strides(k), v.data_ptr(), bth_strides(v), o.data_ptr(), bth_strides(o),
                              lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), bth_strides(dq), dk.data_ptr(),
                              bth_strides(dk), dv.data_ptr(), bth_strides(dv), B, T, nh, hs, float(scale),
                              c_dtype(q), _stream(), _dropout_params(dropout))


# ----------------------------------------------------------------------------- cross-entropy

def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    check_cross_entropy("cross_entropy", SUPPORT["cross_entropy"], logits, targets, vocab_size)
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    dlogits = logits if inplace else torch.empty_like(logits)
    with _device(logits.device):
        _C.cross_entropy_fwd_cuda(logits.data_ptr(), targets.data_ptr(), losses.data_ptr(),
                                  dlogits.data_ptr(), N, Vp, vocab_size, ignore_index, z_loss, grad_scale,
                                  c_dtype(logits), _stream())
    return losses, dlogits


def cross_entropy_stats(logits, targets, vocab_start, vocab_size):
    check_cross_entropy_shard("cross_entropy_stats", SUPPORT["cross_entropy"], logits, targets, vocab_size)
    N, Vp = logits.shape
    stats = torch.empty(N, 3, dtype=torch.float32, device=logits.device)
    with _device(logits.device):
        _C.cross_entropy_stats_cuda(logits.data_ptr(), targets.data_ptr(), stats.data_ptr(), N, Vp, vocab_size,
                                    vocab_start, c_dtype(logits), _stream())
    return stats


def cross_entropy_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index, z_loss, grad_scale):
    check_cross_entropy_shard("cross_entropy_grad", SUPPORT["cross_entropy"], logits, targets, vocab_size, lse)
    N, Vp = logits.shape
    with _device(logits.device):
        _C.cross_entropy_grad_cuda(logits.data_ptr(), targets.data_ptr(), lse.data_ptr(), N, Vp, vocab_size,
                                   vocab_start, ignore_index, z_loss, grad_scale, c_dtype(logits), _stream())
    return logits


# ----------------------------------------------------------------------------- adamw

def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               decay_numel, grad_scale):
    check_adamw("adamw_step", SUPPORT["adamw"], param, grad, exp_avg, exp_avg_sq, decay_numel, step)
    scalars = _C.AdamWScalars(*adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale))
    with _device(param.device):
        _C.adamw_step_cuda(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(),
                           exp_avg_sq.data_ptr(), param.numel(), decay_numel, scalars, c_dtype(param), _stream())


def sum_of_squares(x):
    check_sum_of_squares("sum_of_squares", SUPPORT["adamw"], x)
    partials = torch.empty(_C.sum_of_squares_partials_cuda(), dtype=torch.float32, device=x.device)
    out = torch.empty((), dtype=torch.float32, device=x.device)
    with _device(x.device):
        _C.sum_of_squares_cuda(x.data_ptr(), x.numel(), partials.data_ptr(), out.data_ptr(), c_dtype(x), _stream())
    return out
