"""QK-norm and rotary position embedding (RoPE) of the packed qkv projection, in one pass that
writes the layout attention reads: the "fused qkv-split + QK-norm + RoPE" choice of issue 25.

Why one pass before attention rather than rotating inside the attention kernels' tile loads:
the attention kernels (four backends, forward and two backward passes) stay as they are and
read q and k once each, already rotated; the cost is one extra read and write of q and k
(2 * (H + Hkv) * D values per token), small beside attention's O(T) reads of every K/V tile.

For each token at position t = start + i and each q or k head x (D values; v is copied):
    n = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps)     (qk_norm: parameter-free RMSNorm, as
                                                          nanochat; without it rstd = 1)
    y = n * cos(t * f) + rotate_half(n) * sin(t * f)
where the pairs are (j, j + D/2): f_j = theta^(-2j/D) for j < D/2, repeated for j + D/2, and
rotate_half(n) = (-n[D/2:], n[:D/2]). This is the convention Hugging Face's Llama applies at run
time (its checkpoints are stored for it), so an imported checkpoint needs no q/k permutation.
Backward, with dy the gradient of y:
    dn = dy * cos + rotate_half^T(dy * sin),  rotate_half^T(g) = (g[D/2:], -g[:D/2])
    dx = rstd * (dn - n * mean(dn * n))           (dx = dn without qk_norm)

Cost per token: reads and writes (H + 2*Hkv) * D values, plus rstd (H + Hkv floats): memory-bound.

This module reads top to bottom: the specification in plain PyTorch, the input checks, the
registration with PyTorch and the entry point the model calls, then each backend's support row
and launcher. Kernels: csrc/rope_cpu.cpp (CPU); no Triton or CUDA kernel yet.
"""
from typing import Callable, NamedTuple

import torch

from nanolm.ops import library
from nanolm.ops.launch import CPU
from nanolm.ops.support import FLOATS, Support, accumulation_dtype, check_first, check_tensor

# qk_norm's eps: the per-head RMSNorm has no config field of its own (nanochat's F.rms_norm
# takes torch's default, the dtype's machine epsilon; Qwen3's q/k norm uses 1e-6)
QK_NORM_EPS = 1e-6

# ----------------------------------------------------------------------------- specification
# qkv (B, T, (H + 2*Hkv) * D) contiguous, laid out [q heads | k heads | v heads], each head's D
# values contiguous; rstd (B, T, H + Hkv) float32 (float64 for float64 inputs): the q and k
# heads' norm factors, saved for the backward (all ones without qk_norm).


def rope_angles(T, D, start, theta, dtype, device):
    """(cos, sin), each (T, D) in dtype: position start + i, pair (j, j + D/2) at angle
    (start + i) * f_j. The table is computed in float64 and rounded once: in float32 the angle
    t * f_j carries t * 2^-24 of rounding error (1e-4 rad at t = 1000), which would put every
    backend 1e-4 off the specification at long positions. (Hugging Face's Llama computes it in
    float32, so imported checkpoints agree with it to about that at T ~ 1000.)"""
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)  # (D/2,)
    angle = torch.arange(start, start + T, dtype=torch.float64, device=device)[:, None] * inv_freq  # (T, D/2)
    angle = torch.cat((angle, angle), dim=-1)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_transposed(g):
    half = g.shape[-1] // 2
    return torch.cat((g[..., half:], -g[..., :half]), dim=-1)


def _heads(qkv, n_head, n_kv_head):
    """qkv (B, T, (H + 2*Hkv) * D) -> (q and k heads (B, T, H + Hkv, D), v heads (B, T, Hkv, D))."""
    B, T, width = qkv.shape
    heads = qkv.view(B, T, n_head + 2 * n_kv_head, width // (n_head + 2 * n_kv_head))
    return heads[:, :, : n_head + n_kv_head], heads[:, :, n_head + n_kv_head:]


def qk_norm_rope_fwd(qkv, n_head, n_kv_head, start, theta, qk_norm):
    """-> (qkv', rstd): q and k heads normalised (qk_norm) and rotated, v copied."""
    acc = accumulation_dtype(qkv.dtype)
    qk, v = _heads(qkv, n_head, n_kv_head)
    x = qk.to(acc)
    rstd = torch.rsqrt(x.square().mean(dim=-1) + QK_NORM_EPS) if qk_norm else torch.ones(x.shape[:3], dtype=acc,
                                                                                           device=x.device)
    n = x * rstd[..., None]
    cos, sin = rope_angles(qkv.shape[1], qk.shape[-1], start, theta, acc, qkv.device)
    cos, sin = cos[:, None], sin[:, None]  # (T, 1, D): one angle per position, every head
    y = n * cos + _rotate_half(n) * sin
    out = torch.cat((y.to(qkv.dtype), v), dim=2)
    return out.view(qkv.shape), rstd


def qk_norm_rope_bwd(dout, qkv, rstd, n_head, n_kv_head, start, theta, qk_norm):
    """-> dqkv, the gradient of qk_norm_rope_fwd's input (rstd: the forward's)."""
    acc = accumulation_dtype(qkv.dtype)
    dy, dv = _heads(dout, n_head, n_kv_head)
    qk, _ = _heads(qkv, n_head, n_kv_head)
    cos, sin = rope_angles(qkv.shape[1], qk.shape[-1], start, theta, acc, qkv.device)
    dyf = dy.to(acc)
    dn = dyf * cos[:, None] + _rotate_half_transposed(dyf * sin[:, None])
    if qk_norm:
        n = qk.to(acc) * rstd[..., None]
        dn = rstd[..., None] * (dn - n * (dn * n).mean(dim=-1, keepdim=True))
    return torch.cat((dn.to(qkv.dtype), dv), dim=2).view(qkv.shape)


# ----------------------------------------------------------------------------- checks

def check_fwd(op, qkv, n_head, n_kv_head, start, theta):
    """The layout, before any backend runs (a kernel's launcher checks dtype and device against
    its row): qkv (B, T, (H + 2*Hkv) * D), D even, Hkv dividing H; start >= 0; theta > 0."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"{op}: qkv must be a (B, T, (n_head + 2*n_kv_head) * head_size) tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    if n_head < 1 or n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"{op}: n_kv_head={n_kv_head} must divide n_head={n_head} (both positive)")
    heads = n_head + 2 * n_kv_head
    if qkv.shape[-1] % heads or (qkv.shape[-1] // heads) % 2:
        raise ValueError(f"{op}: qkv's last dim {qkv.shape[-1]} is not (n_head + 2*n_kv_head) = {heads} heads "
                         f"of an even head size")
    if start < 0 or not theta > 0:
        raise ValueError(f"{op}: positions_start must be >= 0 and theta > 0, got {start} and {theta}")


# ----------------------------------------------------------------------------- registration

def _rstd_fake(qkv, n_head, n_kv_head):
    return qkv.new_empty(*qkv.shape[:2], n_head + n_kv_head, dtype=accumulation_dtype(qkv.dtype))


@library.op("qk_norm_rope_bwd", fake=lambda dout, *_: torch.empty_like(dout))
def qk_norm_rope_bwd_op(dout: torch.Tensor, qkv: torch.Tensor, rstd: torch.Tensor, n_head: int, n_kv_head: int,
                        start: int, theta: float, qk_norm: bool, backend: str) -> torch.Tensor:
    return BACKENDS[backend].qk_norm_rope_bwd(dout, qkv, rstd, n_head, n_kv_head, start, theta, qk_norm)


def _setup_context(ctx, inputs, output):
    qkv, *arguments, backend = inputs
    ctx.save_for_backward(qkv, output[1])
    ctx.arguments, ctx.backend = arguments, backend


def _backward(ctx, dout, _drstd):
    qkv, rstd = ctx.saved_tensors
    dqkv = qk_norm_rope_bwd_op(dout.contiguous(), qkv, rstd, *ctx.arguments, ctx.backend)
    return dqkv, None, None, None, None, None, None


@library.op("qk_norm_rope_fwd",
            fake=lambda qkv, n_head, n_kv_head, *_: (torch.empty_like(qkv), _rstd_fake(qkv, n_head, n_kv_head)),
            setup_context=_setup_context, backward=_backward)
def qk_norm_rope_fwd_op(qkv: torch.Tensor, n_head: int, n_kv_head: int, start: int, theta: float, qk_norm: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS[backend].qk_norm_rope_fwd(qkv, n_head, n_kv_head, start, theta, qk_norm)


def qk_norm_rope(qkv, n_head, n_kv_head, positions_start, theta, qk_norm, backend):
    """qkv (B, T, (H + 2*Hkv) * D), the tokens at positions [positions_start, positions_start + T),
    with its q and k heads normalised (qk_norm) and rotated, v unchanged; by backend (a name)."""
    check_fwd("qk_norm_rope", qkv, n_head, n_kv_head, positions_start, theta)
    out, _ = qk_norm_rope_fwd_op(qkv.contiguous(), n_head, n_kv_head, positions_start, theta, qk_norm, backend)
    return out


# ----------------------------------------------------------------------------- backends

class RopeBackend(NamedTuple):
    support: Support
    qk_norm_rope_fwd: Callable
    qk_norm_rope_bwd: Callable


# --- cpu: csrc/rope_cpu.cpp (nanolm/ops/launch.py); no Triton or CUDA kernel yet
CPU_ROW = Support(dtypes={"cpu": FLOATS})


def _check_kernel_inputs(op, qkv, n_head, n_kv_head, start, theta, tensors=()):
    """What a kernel trusts: qkv contiguous, of a dtype and device the row lists, in the packed
    layout; each (name, tensor, shape, dtypes) in `tensors` contiguous on qkv's device."""
    check_first(op, CPU_ROW, "qkv", qkv, ndim=3)
    check_fwd(op, qkv, n_head, n_kv_head, start, theta)
    for name, t, shape, dtypes in tensors:
        check_tensor(op, name, t, dtypes=dtypes, device=qkv.device, shape=shape)


def _angle_halves(qkv, n_head, n_kv_head, start, theta):
    """The (T, D/2) float32 cos and sin tables the kernel reads (the specification's, first half)."""
    D = qkv.shape[-1] // (n_head + 2 * n_kv_head)
    cos, sin = rope_angles(qkv.shape[1], D, start, theta, torch.float32, qkv.device)
    return cos[:, : D // 2].contiguous(), sin[:, : D // 2].contiguous()


def _cpu_fwd(qkv, n_head, n_kv_head, start, theta, qk_norm):
    _check_kernel_inputs("qk_norm_rope_fwd", qkv, n_head, n_kv_head, start, theta)
    B, T, width = qkv.shape
    out, rstd = torch.empty_like(qkv), torch.empty(B, T, n_head + n_kv_head, dtype=torch.float32, device=qkv.device)
    cos, sin = _angle_halves(qkv, n_head, n_kv_head, start, theta)
    CPU.launch("qk_norm_rope_fwd", qkv.device, qkv.data_ptr(), out.data_ptr(), rstd.data_ptr(), cos.data_ptr(),
               sin.data_ptr(), B, T, n_head, n_kv_head, width // (n_head + 2 * n_kv_head), bool(qk_norm),
               QK_NORM_EPS, CPU.dtype(qkv))
    return out, rstd


def _cpu_bwd(dout, qkv, rstd, n_head, n_kv_head, start, theta, qk_norm):
    B, T, _ = qkv.shape
    _check_kernel_inputs("qk_norm_rope_bwd", qkv, n_head, n_kv_head, start, theta,
                         [("dout", dout, qkv.shape, (qkv.dtype,)),
                          ("rstd", rstd, (B, T, n_head + n_kv_head), (torch.float32,))])
    dqkv = torch.empty_like(qkv)
    cos, sin = _angle_halves(qkv, n_head, n_kv_head, start, theta)
    CPU.launch("qk_norm_rope_bwd", qkv.device, dout.data_ptr(), qkv.data_ptr(), rstd.data_ptr(), cos.data_ptr(),
               sin.data_ptr(), dqkv.data_ptr(), B, T, n_head, n_kv_head, qkv.shape[-1] // (n_head + 2 * n_kv_head),
               bool(qk_norm), CPU.dtype(qkv))
    return dqkv


BACKENDS = {
    "torch": RopeBackend(Support(dtypes={"cpu": FLOATS, "cuda": FLOATS}), qk_norm_rope_fwd, qk_norm_rope_bwd),
    "cpu": RopeBackend(CPU_ROW, _cpu_fwd, _cpu_bwd),
}
