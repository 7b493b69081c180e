"""The `cuda` backend: hand-written CUDA kernels from csrc/*.cu, called through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers
and the current CUDA stream to the extension, which throws on any CUDA error.
"""
import torch

from nanolm.backends.checks import check_same_dtype, check_tensor

OPS = ("attention",)


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


def attention_fwd(q, k, v, scale):
    op = "attention_fwd"
    _check_attention_inputs(op, q, k, v)
    from nanolm import _C
    B, T, nh, hs = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        _C.attention_fwd_cuda(q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
                              o.data_ptr(), _strides(o), lse.data_ptr(), B, T, nh, hs, float(scale),
                              q.dtype == torch.bfloat16, _stream())
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv):
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
                              q.dtype == torch.bfloat16, _stream())
