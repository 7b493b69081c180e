"""Causal softmax attention (flash attention: the (T, T) scores never reach memory), with
dropout on the probabilities.

Per (batch, query head h): S = scale * Q_h K_g^T masked above the diagonal, P = softmax(S),
O = P V_g; lse = logsumexp of each row of S is saved for the backward. With dropout, O = Pd V_g
with Pd = dropout(P) (the softmax normalises the undropped P).

Grouped-query attention (GQA; MQA when n_kv_head = 1): n_head query heads share n_kv_head K/V
heads, query head h reading K/V head g = h // (n_head // n_kv_head) (consecutive query heads
form a group, as Llama's repeat_kv and SDPA's enable_gqa). dK, dV of head g are the sums over
its group's query heads. n_kv_head = n_head is multi-head attention (groups of one).

This module reads top to bottom: the specification in plain PyTorch, the input checks, the
registration with PyTorch with the entry point the model calls, then each backend's support
row and launchers. Kernels: kernels/attention.py (Triton), csrc/attention.cu (CUDA),
csrc/attention_cpu.cpp (CPU).
"""
from functools import partial
from typing import Callable, NamedTuple

import torch

from nanolm.kernels import attention as triton_attention
from nanolm.ops import dropout as dropout_spec
from nanolm.ops import library
from nanolm.ops.launch import CPU, CUDA, CUDA_SIM, bth_strides
from nanolm.ops.support import F32, FLOATS, Support, accumulation_dtype, check_dropout, check_first, check_tensor

# ----------------------------------------------------------------------------- specification
# q (B, T, nh, hs), k, v (B, T, nkv, hs), nkv dividing nh, all with stride(-1) == 1 (views into
# the fused qkv projection are fine); o, do (B, T, nh, hs) contiguous; lse (B, nh, T) float32;
# dq (B, T, nh, hs), dk, dv (B, T, nkv, hs) views with stride(-1) == 1, written by the backward.

def _heads_first(t, acc, nh=None):
    """(B, T, heads, hs) -> (B, nh, T, hs) in acc; K/V heads repeated over their groups."""
    t = t.transpose(1, 2).to(acc)
    return t if nh is None else t.repeat_interleave(nh // t.shape[1], dim=1)


def _group_sum(g, nkv):
    """(B, nh, T, hs) gradients of the repeated K/V heads -> (B, T, nkv, hs): each head's group summed."""
    B, nh, T, hs = g.shape
    return g.view(B, nkv, nh // nkv, T, hs).sum(2).transpose(1, 2)


def _causal_scores(q, k, scale):
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(future, float("-inf"))


def attention_fwd(q, k, v, scale, dropout):
    """-> (o, lse); dropout: None or a Dropout of P."""
    acc, nh = accumulation_dtype(q.dtype), q.shape[2]
    qh, kh, vh = _heads_first(q, acc), _heads_first(k, acc, nh), _heads_first(v, acc, nh)
    s = _causal_scores(qh, kh, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    if dropout is not None:
        p = dropout_spec.dropped(p, p.shape, dropout)
    o = p @ vh
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout):
    """Writes dq, dk, dv; dropout: the forward's."""
    # dV = Pd^T dO;  dPd = dO V^T, dP = dropout(dPd) (same mask);  dS = P * (dP - delta),
    # delta = rowsum(dO * O) = rowsum(P * dP);  dQ = scale * dS K;  dK = scale * dS^T Q
    acc, nh, nkv = accumulation_dtype(q.dtype), q.shape[2], k.shape[2]
    qh, doh, oh = (_heads_first(t, acc) for t in (q, do, o))
    kh, vh = _heads_first(k, acc, nh), _heads_first(v, acc, nh)
    p = torch.exp(_causal_scores(qh, kh, scale) - lse[..., None])
    delta = (doh * oh).sum(dim=-1, keepdim=True)
    dp = doh @ vh.transpose(-1, -2)
    pd = p
    if dropout is not None:
        pd, dp = dropout_spec.dropped(p, p.shape, dropout), dropout_spec.dropped(dp, dp.shape, dropout)
    ds = p * (dp - delta)
    dq.copy_((ds @ kh * scale).transpose(1, 2))
    dk.copy_(_group_sum(ds.transpose(-1, -2) @ qh * scale, nkv))
    dv.copy_(_group_sum(pd.transpose(-1, -2) @ doh, nkv))


# ----------------------------------------------------------------------------- checks

def _check_operand(op, support, name, t, like, heads=None):
    """One (B, T, heads, hs) operand (heads: like's when None): like `like` in dtype, device
    and shape, unit stride on hs, and the row's alignment (for 16-byte vector copies)."""
    shape = like.shape if heads is None else (*like.shape[:2], heads, like.shape[3])
    check_tensor(op, name, t, dtypes=(like.dtype,), device=like.device, shape=shape, contiguous=False)
    if t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride on hs (stride(-1) == 1), got strides {t.stride()}")
    if support.align_bytes:
        elems = support.align_bytes // t.element_size()
        if t.data_ptr() % support.align_bytes != 0 or any(s % elems != 0 for s in t.stride()[:3]):
            raise ValueError(f"{op}: {name} needs a {support.align_bytes}-byte aligned base and (batch, seq, "
                             f"head) strides that are multiples of {elems} elements, got strides {t.stride()}")


def check_gqa(op, support, backend, n_head, n_kv_head):
    """n_kv_head divides n_head, and K/V heads shared by groups (n_kv_head < n_head) only where
    backend's support row says gqa=True: one line naming the problem."""
    if n_kv_head < 1 or n_head % n_kv_head != 0:
        raise ValueError(f"{op}: n_kv_head={n_kv_head} must be positive and divide n_head={n_head}")
    if n_kv_head != n_head and not support.gqa:
        raise ValueError(f"{op}: backend {backend} has no grouped-query attention (n_kv_head={n_kv_head} < "
                         f"n_head={n_head}; its support row says gqa=False); choose another with --kernels "
                         f"(e.g. {op}=torch)")


def check_fwd(op, support, q, k, v):
    """q (B, T, nh, hs), k, v (B, T, nkv, hs) with nkv dividing nh (below nh only where the row
    says gqa), of one dtype and device, unit stride on hs (strided views into the fused qkv
    projection are accepted), hs in the row. Returns the shape (B, T, nh, nkv, hs)."""
    check_first(op, support, "q", q, ndim=4, contiguous=False)
    check_tensor(op, "k", k, dtypes=support.dtypes[q.device.type], device=q.device, ndim=4, contiguous=False)
    check_tensor(op, "v", v, dtypes=support.dtypes[q.device.type], device=q.device, shape=k.shape,
                 contiguous=False)
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise ValueError(f"{op}: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    B, T, nh, hs = q.shape
    nkv = k.shape[2]
    if k.shape[:2] != q.shape[:2] or k.shape[3] != hs:
        raise ValueError(f"{op}: k has shape {tuple(k.shape)}, expected ({B}, {T}, nkv, {hs}) for q {tuple(q.shape)}")
    if support.head_sizes and hs not in support.head_sizes:
        raise ValueError(f"{op}: head size {hs} not supported; supported: {', '.join(map(str, support.head_sizes))}")
    if T == 0 or B * nh == 0 or nkv == 0:
        raise ValueError(f"{op}: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_gqa(op, support, "this backend", nh, nkv)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_operand(op, support, name, t, q, t.shape[2])
    return B, T, nh, nkv, hs


def check_bwd(op, support, do, q, k, v, o, lse, dq, dk, dv):
    """q, k, v as check_fwd; do, o contiguous like q; lse (B, nh, T) float32; dq views like q,
    dk, dv like k. Returns the shape (B, T, nh, nkv, hs)."""
    B, T, nh, nkv, hs = check_fwd(op, support, q, k, v)
    for name, t in (("do", do), ("o", o)):
        check_tensor(op, name, t, dtypes=(q.dtype,), device=q.device, shape=q.shape)
        _check_operand(op, support, name, t, q)
    check_tensor(op, "lse", lse, dtypes=(torch.float32,), device=q.device, shape=(B, nh, T))
    for name, t, heads in (("dq", dq, nh), ("dk", dk, nkv), ("dv", dv, nkv)):
        _check_operand(op, support, name, t, q, heads)
    return B, T, nh, nkv, hs


# ----------------------------------------------------------------------------- registration
# The ops take the fused qkv projection (B, T, (nh + 2*nkv) * hs), laid out [q heads | k heads |
# v heads], heads contiguous inside each: q, k, v are strided views into it, and the backward
# writes dq, dk, dv straight into one dqkv buffer, so no transposes or copies surround the kernels.

def _split(qkv, n_head, n_kv_head):
    """(q, k, v) views (B, T, nh or nkv, hs) into qkv (B, T, (nh + 2*nkv) * hs), and the scale
    1/sqrt(hs)."""
    B, T, width = qkv.shape
    hs = width // (n_head + 2 * n_kv_head)
    heads = qkv.view(B, T, n_head + 2 * n_kv_head, hs)
    return heads.split((n_head, n_kv_head, n_kv_head), dim=2), hs ** -0.5


def _fwd_fake(qkv, n_head, n_kv_head, *_):
    B, T, width = qkv.shape
    o = qkv.new_empty(B, T, n_head, width // (n_head + 2 * n_kv_head))
    return o, qkv.new_empty(B, n_head, T, dtype=torch.float32)


@library.op("attention_bwd", fake=lambda do, qkv, *_: torch.empty_like(qkv))
def attention_bwd_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, n_head: int,
                     n_kv_head: int, p: float, seed: int, offset: int, backend: str) -> torch.Tensor:
    """-> dqkv (B, T, (nh + 2*nkv) * hs)"""
    (q, k, v), scale = _split(qkv, n_head, n_kv_head)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = _split(dqkv, n_head, n_kv_head)[0]
    BACKENDS[backend].attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout_spec.from_schema(p, seed, offset))
    return dqkv


def _setup_context(ctx, inputs, output):
    qkv, n_head, n_kv_head, p, seed, offset, backend = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.arguments = n_head, n_kv_head, p, seed, offset, backend


def _backward(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    return attention_bwd_op(do.contiguous(), qkv, o, lse, *ctx.arguments), None, None, None, None, None, None


@library.op("attention_fwd", fake=_fwd_fake, setup_context=_setup_context, backward=_backward)
def attention_fwd_op(qkv: torch.Tensor, n_head: int, n_kv_head: int, p: float, seed: int, offset: int,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> o (B, T, nh, hs), lse (B, nh, T)"""
    (q, k, v), scale = _split(qkv, n_head, n_kv_head)
    return BACKENDS[backend].attention_fwd(q, k, v, scale, dropout_spec.from_schema(p, seed, offset))


def causal_attention(qkv, n_head, n_kv_head, backend, dropout):
    """qkv (B, T, (n_head + 2*n_kv_head) * hs) laid out [q heads | k heads | v heads], heads
    contiguous inside each -> (B, T, n_head * hs), by backend (a name), with dropout (None or a
    Dropout) on the attention probabilities. Query head h reads K/V head h // (n_head // n_kv_head)."""
    support = BACKENDS[backend].support
    check_gqa("attention", support, backend, n_head, n_kv_head)
    if qkv.dim() != 3 or qkv.shape[-1] % (n_head + 2 * n_kv_head) != 0:
        raise ValueError(f"causal_attention: qkv must be (B, T, (n_head + 2*n_kv_head) * hs) with n_head={n_head}, "
                         f"n_kv_head={n_kv_head}, got {tuple(qkv.shape)}")
    check_dropout("attention", support, backend, dropout)
    B, T, width = qkv.shape
    o, _ = attention_fwd_op(qkv.contiguous(), n_head, n_kv_head, *dropout_spec.as_schema(dropout), backend)
    return o.view(B, T, n_head * (width // (n_head + 2 * n_kv_head)))


# ----------------------------------------------------------------------------- backends
# Each backend implements the two functions of the specification, with its signatures.

class AttentionBackend(NamedTuple):
    support: Support
    attention_fwd: Callable
    attention_bwd: Callable


def _outputs(q):
    B, T, nh, hs = q.shape
    return torch.empty((B, T, nh, hs), dtype=q.dtype, device=q.device), \
        torch.empty((B, nh, T), dtype=torch.float32, device=q.device)


# --- triton: kernels/attention.py
TRITON = Support(
    dtypes={"cpu": F32, "cuda": (torch.bfloat16, torch.float16)},
    head_sizes=(16, 32, 64, 128),  # tl.arange needs a power of two; tl.dot a K of 16 or more
    notes={"cpu": "the interpreter's tl.dot returns garbage on bf16/fp16",
           "cuda": "no float32: tl.dot would silently compute in tf32"},
    dropout=True, gqa=True)


def _triton_fwd(q, k, v, scale, dropout):
    check_fwd("attention_fwd", TRITON, q, k, v)
    return triton_attention.attention_fwd(q, k, v, scale, dropout_spec.kernel_args(dropout))


def _triton_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout):
    check_bwd("attention_bwd", TRITON, do, q, k, v, o, lse, dq, dk, dv)
    triton_attention.attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout_spec.kernel_args(dropout))


# --- cpu: csrc/attention_cpu.cpp; head sizes: the matmuls work in 16-column panels
CPU_ROW = Support(dtypes={"cpu": FLOATS}, head_sizes=tuple(range(16, 257, 16)), dropout=True, gqa=True)


def _cpu_fwd(q, k, v, scale, dropout):
    B, T, nh, nkv, hs = check_fwd("attention_fwd", CPU_ROW, q, k, v)
    o, lse = _outputs(q)
    CPU.launch("attention_fwd", q.device, q.data_ptr(), bth_strides(q), k.data_ptr(), bth_strides(k), v.data_ptr(),
               bth_strides(v), o.data_ptr(), lse.data_ptr(), B, T, nh, nkv, hs, float(scale), CPU.dtype(q),
               CPU.dropout(dropout))
    return o, lse


def _cpu_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout):
    B, T, nh, nkv, hs = check_bwd("attention_bwd", CPU_ROW, do, q, k, v, o, lse, dq, dk, dv)
    CPU.launch("attention_bwd", q.device, do.data_ptr(), q.data_ptr(), bth_strides(q), k.data_ptr(),
               bth_strides(k), v.data_ptr(), bth_strides(v), o.data_ptr(), lse.data_ptr(), dq.data_ptr(),
               bth_strides(dq), dk.data_ptr(), bth_strides(dk), dv.data_ptr(), bth_strides(dv), B, T, nh, nkv,
               hs, float(scale), CPU.dtype(q), CPU.dropout(dropout))


# --- cuda, cuda_sim: csrc/attention.cu. mma.sync takes bf16/fp16; 16-byte cp.async copies
# need the alignment (qkv views have it). Unlike the cpu kernels they take o's strides, and the
# backward a (B, nh, T) fp32 scratch buffer for delta = rowsum(dO * O).
CUDA_ROW = Support(dtypes={"cuda": (torch.bfloat16, torch.float16)}, head_sizes=(64, 128), align_bytes=16,
                   dropout=True, gqa=True)


def _cuda_fwd(target, support, q, k, v, scale, dropout):
    B, T, nh, nkv, hs = check_fwd("attention_fwd", support, q, k, v)
    o, lse = _outputs(q)
    target.launch("attention_fwd", q.device, q.data_ptr(), bth_strides(q), k.data_ptr(), bth_strides(k),
                  v.data_ptr(), bth_strides(v), o.data_ptr(), bth_strides(o), lse.data_ptr(), B, T, nh, nkv, hs,
                  float(scale), target.dtype(q), target.dropout(dropout))
    return o, lse


def _cuda_bwd(target, support, do, q, k, v, o, lse, scale, dq, dk, dv, dropout):
    B, T, nh, nkv, hs = check_bwd("attention_bwd", support, do, q, k, v, o, lse, dq, dk, dv)
    delta = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    target.launch("attention_bwd", q.device, do.data_ptr(), bth_strides(do), q.data_ptr(), bth_strides(q),
                  k.data_ptr(), bth_strides(k), v.data_ptr(), bth_strides(v), o.data_ptr(), bth_strides(o),
                  lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), bth_strides(dq), dk.data_ptr(), bth_strides(dk),
                  dv.data_ptr(), bth_strides(dv), B, T, nh, nkv, hs, float(scale), target.dtype(q),
                  target.dropout(dropout))


def _cuda_backend(target, support):
    return AttentionBackend(support, partial(_cuda_fwd, target, support), partial(_cuda_bwd, target, support))


BACKENDS = {
    "torch": AttentionBackend(Support(dtypes={"cpu": FLOATS, "cuda": FLOATS}, dropout=True, gqa=True),
                              attention_fwd, attention_bwd),
    "triton": AttentionBackend(TRITON, _triton_fwd, _triton_bwd),
    "cuda": _cuda_backend(CUDA, CUDA_ROW),
    "cpu": AttentionBackend(CPU_ROW, _cpu_fwd, _cpu_bwd),
    "cuda_sim": _cuda_backend(CUDA_SIM, CUDA_ROW.on_cpu()),
}
