"""The `cpu` backend: C++ kernels from csrc/*_cpu.cpp (OpenMP over rows), through nanolm._C.

Each function checks its tensors (dtype, device, shape, contiguity) and passes raw pointers.
"""
import torch

from nanolm.backends.checks import check_attention_bwd, check_attention_qkv

OPS = ("attention",)


def unavailable_reason(device):
    if device.type != "cpu":
        return "the cpu backend runs on CPU tensors only"
    try:
        from nanolm import _C  # noqa: F401
    except ImportError as e:
        return f"nanolm._C is not built ({e})"
    return None


# ----------------------------------------------------------------------------- attention

ATTENTION_HEAD_DIMS = tuple(range(16, 257, 16))  # the C++ matmul works in 16-column panels


def _bth(t):
    return t.stride(0), t.stride(1), t.stride(2)


def attention_fwd(q, k, v, scale):
    from nanolm import _C
    B, T, nh, hs = check_attention_qkv("attention_fwd", q, k, v, dtypes=(torch.float32,),
                                       head_dims=ATTENTION_HEAD_DIMS)
    o = torch.empty((B, T, nh, hs), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    _C.attention_fwd_cpu(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                         B, T, nh, hs, *_bth(q), *_bth(k), *_bth(v), float(scale))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv):
    from nanolm import _C
    B, T, nh, hs = check_attention_qkv("attention_bwd", q, k, v, dtypes=(torch.float32,),
                                       head_dims=ATTENTION_HEAD_DIMS)
    check_attention_bwd("attention_bwd", do, q, o, lse, dq, dk, dv)
    _C.attention_bwd_cpu(do.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                         lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, T, nh, hs,
                         *_bth(q), *_bth(k), *_bth(v), *_bth(dq), *_bth(dk), *_bth(dv), float(scale))
