"""Input checks shared by the kernel backends (triton, cuda, cpu).

A kernel that receives pointers trusts nothing the Python layer did not check, so every
backend function validates its tensors here first and raises ValueError naming the op,
the argument and the bad value.
"""
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
