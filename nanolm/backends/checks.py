"""Input checks shared by the kernel backends (triton, cuda, cpu), driven by their tables.

A kernel that receives pointers trusts nothing the Python layer did not check, so every
backend function validates its tensors here first, against its `Support` entry, and raises
ValueError (TypeError for a non-tensor) naming the op, the argument and the bad value.
"""
import torch

from nanolm.backends.common import dtype_name


def _names(dtypes):
    return ", ".join(map(dtype_name, dtypes))


def check_tensor(op, name, t, *, dtypes, device=None, ndim=None, shape=None, contiguous=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} has dtype {dtype_name(t.dtype)}; supported: {_names(dtypes)}"
                         + ("" if device is None else f" (on {device.type})"))
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()}, shape {tuple(t.shape)})")


def check_first(op, support, name, t, **kw):
    """The op's first data tensor: a tensor on a device the table lists, of a dtype listed for
    that device. Returns the dtypes every other data tensor must match."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = support.dtypes.get(t.device.type)
    if dtypes is None:
        wanted = " or ".join(support.devices())
        raise ValueError(f"{op}: {name} is on {t.device}, expected a {wanted} device "
                         f"(this backend needs {wanted.upper()} tensors)")
    check_tensor(op, name, t, dtypes=dtypes, device=t.device, **kw)


def check_same_dtype(op, **tensors):
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{op}: dtypes differ: {dtypes}")


def check_layer_norm(op, support, x, weight, *, rows=(), vectors=(), stats=()):
    """LayerNorm arguments: x (N, C); `rows` more (N, C) tensors like x (None allowed),
    `vectors` (C,) tensors like x (None allowed), `stats` (N,) float32 tensors; all on x's device."""
    check_first(op, support, "x", x, ndim=2)
    N, C = x.shape
    if C < 1 or (support.max_row is not None and C > support.max_row):
        raise ValueError(f"{op}: row length C={C} outside the supported [1, {support.max_row}]")
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


def check_dropout(op, support, dropout):
    """dropout (None or an ops.Dropout) only where the table says the kernels take it."""
    if dropout is not None and not support.dropout:
        raise ValueError(f"{op}: this backend has no dropout here (its SUPPORT entry says dropout=False)")


def check_layer_norm_fwd(op, support, x, residual, weight, bias, dropout=None):
    check_dropout(op, support, dropout)
    if residual is None and dropout is None and op == "add_layer_norm_fwd":
        raise ValueError(f"{op}: residual may be None only with dropout")
    check_layer_norm(op, support, x, weight, rows=[("residual", residual)], vectors=[("bias", bias)])


def check_layer_norm_bwd(op, support, dy, x, weight, mean, rstd, dresidual, dropout=None, dbranch=None):
    check_dropout(op, support, dropout)
    if (dropout is None) != (dbranch is None):
        raise ValueError(f"{op}: dropout and dbranch must be given together")
    check_layer_norm(op, support, x, weight, rows=[("dy", dy), ("dresidual", dresidual), ("dbranch", dbranch)],
                     stats=[("mean", mean), ("rstd", rstd)])


def check_cross_entropy(op, support, logits, targets, vocab_size):
    """logits (N, Vp) contiguous with 1 <= vocab_size <= Vp, targets (N,) int64 on its device."""
    check_first(op, support, "logits", logits, ndim=2)
    check_tensor(op, "targets", targets, dtypes=(torch.int64,), device=logits.device,
                 shape=(logits.shape[0],))
    if not 1 <= vocab_size <= logits.shape[1]:
        raise ValueError(f"{op}: vocab_size={vocab_size} outside [1, {logits.shape[1]}] (logits columns)")


def check_cross_entropy_shard(op, support, logits, targets, vocab_size, lse=None):
    """The vocab-parallel pair (cross_entropy_stats / _grad): as check_cross_entropy, but a
    shard may hold no real column (0 <= vocab_size <= Vp); lse (N,) float32 when given."""
    check_first(op, support, "logits", logits, ndim=2)
    check_tensor(op, "targets", targets, dtypes=(torch.int64,), device=logits.device,
                 shape=(logits.shape[0],))
    if not 0 <= vocab_size <= logits.shape[1]:
        raise ValueError(f"{op}: vocab_size={vocab_size} outside [0, {logits.shape[1]}] (logits columns)")
    if lse is not None:
        check_tensor(op, "lse", lse, dtypes=(torch.float32,), device=logits.device, shape=(logits.shape[0],))


def check_adamw(op, support, param, grad, exp_avg, exp_avg_sq, decay_numel, step):
    """The four AdamW buffers: 1-D, contiguous, one dtype, one device, one length."""
    check_first(op, support, "param", param, ndim=1)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(op, name, t, dtypes=(param.dtype,), device=param.device, shape=param.shape)
    if not 0 <= decay_numel <= param.numel():
        raise ValueError(f"{op}: decay_numel {decay_numel} is outside [0, {param.numel()}]")
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1, got {step}")


def check_sum_of_squares(op, support, x):
    check_first(op, support, "x", x, ndim=1)


def _check_operand(op, support, name, t, like):
    """One (B, T, nh, hs) attention operand: like `like` in dtype, device and shape, unit stride
    on hs, and the table's alignment (for 16-byte vector copies)."""
    check_tensor(op, name, t, dtypes=(like.dtype,), device=like.device, shape=like.shape, contiguous=False)
    if t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride on hs (stride(-1) == 1), got strides {t.stride()}")
    if support.align_bytes:
        elems = support.align_bytes // t.element_size()
        if t.data_ptr() % support.align_bytes != 0 or any(s % elems != 0 for s in t.stride()[:3]):
            raise ValueError(f"{op}: {name} needs a {support.align_bytes}-byte aligned base and (batch, seq, "
                             f"head) strides that are multiples of {elems} elements, got strides {t.stride()}")


def check_attention(op, support, q, k, v):
    """q, k, v (B, T, nh, hs) of one dtype and device, equal shapes, unit stride on hs (strided
    views into the fused qkv projection are accepted), hs in the table. Returns the shape."""
    check_first(op, support, "q", q, ndim=4, contiguous=False)
    for name, t in (("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=support.dtypes[q.device.type], device=q.device, shape=q.shape,
                     contiguous=False)
    check_same_dtype(op, q=q, k=k, v=v)
    B, T, nh, hs = q.shape
    if support.head_sizes and hs not in support.head_sizes:
        raise ValueError(f"{op}: head size {hs} not supported; supported: {', '.join(map(str, support.head_sizes))}")
    if T == 0 or B * nh == 0:
        raise ValueError(f"{op}: empty input, shape {tuple(q.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_operand(op, support, name, t, q)
    return B, T, nh, hs


def check_attention_bwd(op, support, do, q, k, v, o, lse, dq, dk, dv):
    """The backward's tensors: q, k, v as check_attention; do, o contiguous like q; lse
    (B, nh, T) float32; dq, dk, dv views like q. Returns the shape."""
    B, T, nh, hs = check_attention(op, support, q, k, v)
    for name, t in (("do", do), ("o", o)):
        check_tensor(op, name, t, dtypes=(q.dtype,), device=q.device, shape=q.shape)
        _check_operand(op, support, name, t, q)
    check_tensor(op, "lse", lse, dtypes=(torch.float32,), device=q.device, shape=(B, nh, T))
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        _check_operand(op, support, name, t, q)
    return B, T, nh, hs
