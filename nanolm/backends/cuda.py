"""The `cuda` backend: hand-written CUDA kernels from csrc/*.cu, called through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers
and the current CUDA stream to the extension, which throws on any CUDA error.
"""
import torch

from nanolm.backends.checks import (adamw_scalars, check_adamw_buffers, check_cross_entropy,
                                   check_layer_norm, check_same_dtype, check_tensor, dropout_scalars)

OPS = ("layernorm", "attention", "cross_entropy", "adamw")
DROPOUT_OPS = ("layernorm", "attention")  # ops whose functions take a dropout argument (see torch_ref)


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


def _ptr(t):
    return 0 if t is None else t.data_ptr()


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}


def _dropout_params(_C, dropout):
    return _C.DropoutParams() if dropout is None else _C.DropoutParams(*dropout_scalars(dropout))


# ----------------------------------------------------------------------------- layernorm

def _check_layer_norm_cuda(op, x, weight, **groups):
    from nanolm import _C
    if not hasattr(_C, "layernorm_fwd_cuda"):
        raise ValueError(f"{op}: nanolm._C was built without CUDA")
    check_layer_norm(op, x, weight, dtypes=tuple(_DTYPE_CODE), max_c=_C.layernorm_cuda_max_c, **groups)
    if x.device.type != "cuda":
        raise ValueError(f"{op}: x is on {x.device}, the cuda backend needs CUDA tensors")
    return _C


def _layer_norm_fwd(op, x, residual, weight, bias, eps, dropout=None):
    _C = _check_layer_norm_cuda(op, x, weight, rows=[("residual", residual)], vectors=[("bias", bias)])
    N, C = x.shape
    y = torch.empty_like(x)
    residual_out = None if residual is None and dropout is None else torch.empty_like(x)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _C.layernorm_fwd_cuda(x.data_ptr(), _ptr(residual), _ptr(residual_out), weight.data_ptr(), _ptr(bias),
                              y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), N, C, float(eps),
                              _DTYPE_CODE[x.dtype], _dropout_params(_C, dropout), _stream())
    return y, residual_out, mean, rstd


def layer_norm_fwd(x, weight, bias, eps):
    y, _, mean, rstd = _layer_norm_fwd("layer_norm_fwd", x, None, weight, bias, eps)
    return y, mean, rstd


def add_layer_norm_fwd(x, residual, weight, bias, eps, dropout=None):
    if residual is None and dropout is None:
        raise ValueError("add_layer_norm_fwd: residual may be None only with dropout")
    return _layer_norm_fwd("add_layer_norm_fwd", x, residual, weight, bias, eps, dropout)


def layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, dropout=None, dbranch=None):
    op = "layer_norm_bwd"
    if (dropout is None) != (dbranch is None):
        raise ValueError(f"{op}: dropout and dbranch must be given together")
    _C = _check_layer_norm_cuda(op, x, weight, rows=[("dy", dy), ("dresidual", dresidual), ("dbranch", dbranch)],
                                stats=[("mean", mean), ("rstd", rstd)])
    N, C = x.shape
    dx = torch.empty_like(x)
    dweight = torch.empty(C, dtype=torch.float32, device=x.device)
    dbias = torch.empty(C, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        workspace = torch.empty(2, _C.layernorm_bwd_workspace_rows_cuda(N, C), C, dtype=torch.float32,
                                device=x.device)
        _C.layernorm_bwd_cuda(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                              _ptr(dresidual), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
                              workspace.data_ptr(), N, C, _DTYPE_CODE[x.dtype], _ptr(dbranch),
                              _dropout_params(_C, dropout), _stream())
    return dx, dweight, dbias
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    check_cross_entropy("cross_entropy", logits, targets, vocab_size, dtypes=tuple(_DTYPE_NAMES),
                        device_type="cuda")
    from nanolm import _C
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    dlogits = logits if inplace else torch.empty_like(logits)
    with torch.cuda.device(logits.device):
        _C.cross_entropy_fwd_cuda(logits.data_ptr(), targets.data_ptr(), losses.data_ptr(),
                                  dlogits.data_ptr(), N, Vp, vocab_size, ignore_index, z_loss, grad_scale,
                                  _DTYPE_NAMES[logits.dtype], _stream())
    return losses, dlogits


# ----------------------------------------------------------------------------- adamw

def _check_on_cuda(op, name, t):
    # A host pointer handed to a kernel faults on the GPU and poisons the whole CUDA context.
    if t.device.type != "cuda":
        raise ValueError(f"{op}: {name} is on {t.device}, the cuda backend needs CUDA tensors")


def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               decay_numel, grad_scale):
    check_adamw_buffers("adamw_step", param, grad, exp_avg, exp_avg_sq, decay_numel, step)
    _check_on_cuda("adamw_step", "param", param)
    from nanolm import _C
    w1, w2, decay_factor, step_size, bc2_sqrt = adamw_scalars(lr, beta1, beta2, weight_decay, step)
    scalars = _C.AdamWScalars(w1, beta2, w2, eps, decay_factor, step_size, bc2_sqrt, grad_scale)
    with torch.cuda.device(param.device):
        _C.adamw_step_cuda(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(),
                           exp_avg_sq.data_ptr(), param.numel(), decay_numel, scalars, _stream())


def sum_of_squares(x):
    check_tensor("sum_of_squares", "x", x, dtypes=(torch.float32,), ndim=1)
    _check_on_cuda("sum_of_squares", "x", x)
    from nanolm import _C
    partials = torch.empty(_C.sum_of_squares_partials_cuda(), dtype=torch.float32, device=x.device)
    out = torch.empty((), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _C.sum_of_squares_cuda(x.data_ptr(), x.numel(), partials.data_ptr(), out.data_ptr(), _stream())
    return out


# ----------------------------------------------------------------------------- attention
# csrc/attention.cu reads every (B, T, nh, hs) operand through its (batch, seq, head) strides
# with 16-byte cp.async copies: hs must be contiguous, the base 16-byte aligned and the strides
# multiples of 8 elements, which views of the fused (B, T, 3, nh, hs) qkv buffer satisfy.

_ATTENTION_DTYPES = (torch.bfloat16, torch.float16)
_ATTENTION_HEAD_SIZES = (64, 128)


def _check_attention_operand(op, name, t, like):
    check_tensor(op, name, t, dtypes=_ATTENTION_DTYPES, device=like.device, shape=like.shape, contiguous=False)
    if t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride on hs, got strides {t.stride()}")
    if t.data_ptr() % 16 != 0 or any(s % 8 != 0 for s in t.stride()[:3]):
        raise ValueError(f"{op}: {name} needs a 16-byte aligned base and (batch, seq, head) strides "
                         f"that are multiples of 8 elements, got strides {t.stride()}")


def _check_attention_inputs(op, q, k, v):
    check_tensor(op, "q", q, dtypes=_ATTENTION_DTYPES, ndim=4, contiguous=False)
    if q.device.type != "cuda":
        raise ValueError(f"{op}: q is on {q.device}, expected a cuda device")
    hs = q.shape[-1]
    if hs not in _ATTENTION_HEAD_SIZES:
        raise ValueError(f"{op}: head size {hs} is not supported; supported: {_ATTENTION_HEAD_SIZES}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_attention_operand(op, name, t, q)
    check_same_dtype(op, q=q, k=k, v=v)


def _strides(t):
    return tuple(t.stride()[:3])


def attention_fwd(q, k, v, scale, dropout=None):
    op = "attention_fwd"
    _check_attention_inputs(op, q, k, v)
    from nanolm import _C
    B, T, nh, hs = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        _C.attention_fwd_cuda(q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
                              o.data_ptr(), _strides(o), lse.data_ptr(), B, T, nh, hs, float(scale),
                              q.dtype == torch.bfloat16, _stream(), _dropout_params(_C, dropout))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout=None):
    op = "attention_bwd"
    _check_attention_inputs(op, q, k, v)
    B, T, nh, hs = q.shape
    for name, t in (("do", do), ("o", o)):
        check_tensor(op, name, t, dtypes=(q.dtype,), device=q.device, shape=q.shape)
        _check_attention_operand(op, name, t, q)
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        _check_attention_operand(op, name, t, q)
    check_same_dtype(op, q=q, dq=dq, dk=dk, dv=dv)
    check_tensor(op, "lse", lse, dtypes=(torch.float32,), device=q.device, shape=(B, nh, T))
    from nanolm import _C
    delta = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        _C.attention_bwd_cuda(do.data_ptr(), _strides(do), q.data_ptr(), _strides(q), k.data_ptr(), _strides(k),
                              v.data_ptr(), _strides(v), o.data_ptr(), _strides(o), lse.data_ptr(),
                              delta.data_ptr(), dq.data_ptr(), _strides(dq), dk.data_ptr(), _strides(dk),
                              dv.data_ptr(), _strides(dv), B, T, nh, hs, float(scale),
                              q.dtype == torch.bfloat16, _stream(), _dropout_params(_C, dropout))
