"""Input checks shared by the kernel backends (triton, cuda, cpu).

A kernel that receives pointers trusts nothing the Python layer did not check, so every
backend function validates its tensors here first and raises ValueError naming the op,
the argument and the bad value.
"""
import math

import torch

from nanolm.backends.torch_ref import dropout_threshold


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


def check_layer_norm(op, x, weight, *, dtypes, rows=(), vectors=(), stats=(), max_c=None):
    """LayerNorm arguments: x (N, C); `rows` more (N, C) tensors like x (None allowed),
    `vectors` (C,) tensors like x (None allowed), `stats` (N,) float32 tensors; all on x's device."""
    check_tensor(op, "x", x, dtypes=dtypes, ndim=2)
    N, C = x.shape
    if C < 1 or (max_c is not None and C > max_c):
        raise ValueError(f"{op}: row length C={C} outside the supported [1, {max_c}]")
    like_x = dict(dtypes=(x.dtype,), device=x.device)
    check_tensor(op, "weight", weight, shape=(C,), **like_x)
    for name, t in rows:
        if t is not None:
            check_tensor(op, name, t, shape=(N, C), **like_x)
    for name, t in vectors:
        if t is not None:
            check_tensor(op, name, t, shape=(C,), **like_x)
    for name, t in stats:
        check_tensor(op, name, t, dtypes=(torch.float32,), device=x.device, shape=(N,))
def check_cross_entropy(op, logits, targets, vocab_size, *, dtypes, device_type):
    """logits (N, Vp) contiguous with 1 <= vocab_size <= Vp, targets (N,) int64 on its device;
    device_type None accepts any device."""
    check_tensor(op, "logits", logits, dtypes=dtypes, ndim=2)
    if device_type is not None and logits.device.type != device_type:
        raise ValueError(f"{op}: logits are on {logits.device}, this backend needs {device_type}")
    check_tensor(op, "targets", targets, dtypes=(torch.int64,), device=logits.device,
                 shape=(logits.shape[0],))
    if not 1 <= vocab_size <= logits.shape[1]:
        raise ValueError(f"{op}: vocab_size={vocab_size} outside [1, {logits.shape[1]}] (logits columns)")
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
def check_attention_qkv(op, q, k, v, *, dtypes, head_dims):
    """q, k, v (B, T, nh, hs) of one dtype and device, equal shapes, stride(-1) == 1 (strided
    views into the fused qkv projection are accepted), hs in head_dims. Returns the shape."""
    check_tensor(op, "q", q, dtypes=dtypes, ndim=4, contiguous=False)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=dtypes, device=q.device, shape=q.shape, contiguous=False)
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have stride(-1) == 1, got strides {t.stride()}")
    check_same_dtype(op, q=q, k=k, v=v)
    B, T, nh, hs = q.shape
    if hs not in head_dims:
        raise ValueError(f"{op}: head size {hs} not supported; supported: {', '.join(map(str, head_dims))}")
    if T == 0 or B * nh == 0:
        raise ValueError(f"{op}: empty input, shape {tuple(q.shape)}")
    return B, T, nh, hs


def check_attention_bwd(op, do, q, o, lse, dq, dk, dv):
    """The backward's other tensors, against q (already checked with check_attention_qkv)."""
    B, T, nh, _ = q.shape
    for name, t in (("do", do), ("o", o)):
        check_tensor(op, name, t, dtypes=(q.dtype,), device=q.device, shape=q.shape)
    check_tensor(op, "lse", lse, dtypes=(torch.float32,), device=q.device, shape=(B, nh, T))
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        check_tensor(op, name, t, dtypes=(q.dtype,), device=q.device, shape=q.shape, contiguous=False)
        if t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have stride(-1) == 1, got strides {t.stride()}")


def dropout_scalars(dropout):
    """A kernel's dropout arguments (seed, offset, threshold, scale) from an ops.Dropout: the
    threshold floor(p * 2^32) and scale 1 / (1 - p) of torch_ref's specification."""
    return dropout.seed, dropout.offset, dropout_threshold(dropout.p), 1.0 / (1.0 - dropout.p)
