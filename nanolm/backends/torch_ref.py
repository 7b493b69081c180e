"""The `torch` reference backend: the specification every other backend must match.

Each function is the explicit math of its op's forward or backward in plain PyTorch (no autograd
through F.*), computed in float32 (float64 when given float64) and cast back to the input dtype.
The tests check these against float64 autograd; the kernels are checked against these.

Backend contract. Every backend module (torch_ref, triton, cuda, cpu) has, in this order:
  SUPPORT = {op: Support(...)}    one entry per op it implements (common.Support): the devices
                                  and dtypes per device, head sizes, max row length, alignment it
                                  accepts; checks, --kernels, nanolm.info and the tests read it
  unavailable_reason(device)      None when the backend can run on device at all
and then, per op in SUPPORT, these functions with exactly these signatures, in this order:

  layernorm      layer_norm_fwd(x, weight, bias, eps) -> (y, mean, rstd)
                 add_layer_norm_fwd(x, residual, weight, bias, eps, dropout=None)
                                   -> (y, residual_out, mean, rstd)
                 layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, dropout=None, dbranch=None)
                                   -> (dx, dweight, dbias) (and writes dbranch with dropout)
  attention      attention_fwd(q, k, v, scale, dropout=None) -> (o, lse)
                 attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout=None)
                                   -> None (writes dq, dk, dv)
  cross_entropy  cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss,
                                   grad_scale, inplace) -> (losses, dlogits)
                 cross_entropy_stats(logits, targets, vocab_start, vocab_size) -> stats
                 cross_entropy_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index,
                                    z_loss, grad_scale) -> dlogits (in place over logits)
  adamw          adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps,
                            weight_decay, step, decay_numel, grad_scale) -> None (in place)
                 sum_of_squares(x) -> 0-d float32 tensor

Shapes: layernorm x, dy (N, C) contiguous; weight, bias (C,) (bias may be None); mean, rstd (N,)
float32. attention q, k, v (B, T, nh, hs) with stride(-1) == 1 (views into the fused qkv
projection are fine); o, do (B, T, nh, hs) contiguous; lse (B, nh, T) float32; dq, dk, dv
(B, T, nh, hs) views with stride(-1) == 1. cross_entropy logits (N, Vp) contiguous, columns >= vocab_size
are padding; targets (N,) int64; losses (N,) float32. The partial-statistics pair works on one
vocabulary shard: logits (N, Vp) hold the columns of vocab ids [vocab_start, vocab_start + Vp),
the first vocab_size (0 allowed) real; stats (N, 3) float32; lse (N,) float32. adamw: 1-D float32
buffers of equal length, the first decay_numel elements weight-decayed.

dropout: None (no dropout: exactly the path without it) or an object with p (0 < p < 1), seed
and offset (ops.Dropout); the mask is specified once, in the dropout section below. A backend's
functions take it where its SUPPORT entry says dropout=True.
"""
import math

import torch

from nanolm.backends.common import Support

# The specification runs everything, unchecked: any float dtype, on any device.
ANY = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SUPPORT = {
    "layernorm": Support(dtypes={"cpu": ANY, "cuda": ANY}, dropout=True),
    "attention": Support(dtypes={"cpu": ANY, "cuda": ANY}, dropout=True),
    "cross_entropy": Support(dtypes={"cpu": ANY, "cuda": ANY}),
    "adamw": Support(dtypes={"cpu": ANY, "cuda": ANY}),
}


def unavailable_reason(device):
    return None


def _acc(dtype):
    """Accumulation dtype: float32, or float64 when the inputs already are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- dropout
# The dropout mask, specified here once; every backend implements it bit for bit.
#
# Generator: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11;
# the generator of cuRAND and FlashAttention), counter-based: the random bits of an element are a
# pure function of (seed, offset, element index), so a backward or a recomputation regenerates
# the forward's mask instead of storing it, in any order, on any backend.
#   key     (k0, k1)         = (seed mod 2^32, seed >> 32)                0 <= seed < 2^63
#   counter (c0, c1, c2, c3) = (g mod 2^32, g >> 32, offset mod 2^32, offset >> 32),  g = i >> 2
#   10 rounds, all arithmetic mod 2^32, hi/lo the upper/lower 32 bits of a 64-bit product:
#     (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0,  lo(M1 c2),  hi(M0 c0) ^ c3 ^ k1,  lo(M0 c0))
#     (k0, k1)         <- (k0 + W0, k1 + W1)
#   M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85.
#   Element i takes the 32-bit word u = c[i mod 4] of its group's output (4 elements per call).
# The element index i is the flat row-major index in the tensor being dropped, int64:
#   residual branch / embedding sum (N, C):   i = row * C + col
#   attention probabilities (B, nh, T, T):   i = ((b * nh + h) * T + t_q) * T + t_k
# Decision: keep iff u >= t, t = floor(p * 2^32) (a uint32: 0 < p < 1), so P(keep) = 1 - t / 2^32;
# kept values are multiplied by scale = 1 / (1 - p) (rounded to float32 in float32 kernels),
# dropped ones are 0. Each call site gets its own offset (see GPT.dropout_sites), so no two
# masks of a training step share a counter.

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def dropout_threshold(p):
    """t = floor(p * 2^32): u < t is dropped."""
    return math.floor(p * 2.0 ** 32)


def _mulhilo(a, m):
    """(hi, lo) 32-bit halves of a * m for int64 tensors a of uint32 values and a uint32 m,
    through 16-bit halves of m so no int64 product overflows (a * m alone can reach 2^64)."""
    p_lo, p_hi = a * (m & 0xFFFF), a * (m >> 16)  # each < 2^48
    return (p_hi + (p_lo >> 16)) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & _U32


def philox4x32_10(c0, c1, c2, c3, seed):
    """Philox4x32-10 of the counters (int64 tensors of uint32 values) under key `seed`."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


def dropout_keep(index, dropout):
    """Keep mask (bool) of the elements with flat int64 indices `index` (any shape)."""
    g = index >> 2
    words = philox4x32_10(g & _U32, g >> 32, torch.full_like(g, dropout.offset & _U32),
                          torch.full_like(g, dropout.offset >> 32), dropout.seed)
    u = torch.stack(words, dim=-1).gather(-1, (index & 3).unsqueeze(-1)).squeeze(-1)
    return u >= dropout_threshold(dropout.p)


def _dropped(x, shape, dropout):
    """x * keep * scale in x's dtype (the accumulation dtype), with keep of a tensor of `shape`."""
    index = torch.arange(math.prod(shape), device=x.device).view(shape)
    return torch.where(dropout_keep(index, dropout), x * (1.0 / (1.0 - dropout.p)), 0.0)


# ----------------------------------------------------------------------------- layernorm
# y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)  (biased variance, as GPT-2)

def layer_norm_fwd(x, weight, bias, eps):
    xf = x.to(_acc(x.dtype))
    mean = xf.mean(dim=1)
    rstd = torch.rsqrt((xf - mean[:, None]).square().mean(dim=1) + eps)
    y = (xf - mean[:, None]) * rstd[:, None] * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), mean, rstd


def add_layer_norm_fwd(x, residual, weight, bias, eps, dropout=None):
    """residual_out = dropout(x) + residual (residual may be None with dropout: the embedding
    sum); y = layer_norm(residual_out)."""
    if dropout is None:
        residual_out = x + residual
    else:
        h = _dropped(x.to(_acc(x.dtype)), x.shape, dropout)
        residual_out = (h if residual is None else h + residual.to(h.dtype)).to(x.dtype)
    y, mean, rstd = layer_norm_fwd(residual_out, weight, bias, eps)
    return y, residual_out, mean, rstd


def layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, dropout=None, dbranch=None):
    # With xhat = (x - mean) * rstd and wdy = w * dy:
    #   dx = rstd * (wdy - (xhat * c1 + c2)),  c1 = mean(xhat * wdy),  c2 = mean(wdy)
    acc = _acc(x.dtype)
    xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    dyf = dy.to(acc)
    wdy = weight.to(acc) * dyf
    c1 = (xhat * wdy).mean(dim=1, keepdim=True)
    c2 = wdy.mean(dim=1, keepdim=True)
    dx = (wdy - (xhat * c1 + c2)) * rstd[:, None]
    if dresidual is not None:
        dx = dx + dresidual.to(acc)
    if dropout is not None:  # the gradient of the branch that was dropped before the add
        dbranch.copy_(_dropped(dx, dx.shape, dropout))
    return dx.to(x.dtype), (dyf * xhat).sum(dim=0), dyf.sum(dim=0)


# ----------------------------------------------------------------------------- attention
# Causal softmax attention per (batch, head): S = scale * Q K^T masked above the diagonal,
# P = softmax(S), O = P V; lse = logsumexp of each row of S is saved for the backward.
# With dropout, O = Pd V with Pd = dropout(P) (the softmax normalises the undropped P).

def _heads_first(t, acc):
    return t.transpose(1, 2).to(acc)  # (B, T, nh, hs) -> (B, nh, T, hs)


def _causal_scores(q, k, scale):
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(future, float("-inf"))


def attention_fwd(q, k, v, scale, dropout=None):
    acc = _acc(q.dtype)
    qh, kh, vh = (_heads_first(t, acc) for t in (q, k, v))
    s = _causal_scores(qh, kh, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    if dropout is not None:
        p = _dropped(p, p.shape, dropout)
    o = p @ vh
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout=None):
    # dV = Pd^T dO;  dPd = dO V^T, dP = dropout(dPd) (same mask);  dS = P * (dP - delta),
    # delta = rowsum(dO * O) = rowsum(P * dP);  dQ = scale * dS K;  dK = scale * dS^T Q
    acc = _acc(q.dtype)
    qh, kh, vh, doh, oh = (_heads_first(t, acc) for t in (q, k, v, do, o))
    p = torch.exp(_causal_scores(qh, kh, scale) - lse[..., None])
    delta = (doh * oh).sum(dim=-1, keepdim=True)
    dp = doh @ vh.transpose(-1, -2)
    pd = p
    if dropout is not None:
        pd, dp = _dropped(p, p.shape, dropout), _dropped(dp, dp.shape, dropout)
    ds = p * (dp - delta)
    dq.copy_((ds @ kh * scale).transpose(1, 2))
    dk.copy_((ds.transpose(-1, -2) @ qh * scale).transpose(1, 2))
    dv.copy_((pd.transpose(-1, -2) @ doh).transpose(1, 2))


# ----------------------------------------------------------------------------- cross-entropy
# Per row with target t: lse = logsumexp(x[:V]); loss = lse - x[t] + z_loss * lse^2;
# dlogits = grad_scale * (softmax(x) * (1 + 2 z_loss lse) - onehot(t)); padding columns and
# rows whose target is ignore_index get zero loss and zero gradient.

def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    acc = _acc(logits.dtype)
    x = logits[:, :vocab_size].to(acc)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=1)
    target_logit = x.gather(1, safe_targets[:, None]).squeeze(1)
    losses = torch.where(valid, lse - target_logit + z_loss * lse.square(), 0.0)
    grad = torch.exp(x - lse[:, None]) * (1 + 2 * z_loss * lse)[:, None]
    grad.scatter_add_(1, safe_targets[:, None], torch.full_like(grad[:, :1], -1.0))
    grad = torch.where(valid[:, None], grad * grad_scale, 0.0)
    dlogits = logits if inplace else torch.empty_like(logits)
    dlogits[:, :vocab_size] = grad.to(logits.dtype)
    dlogits[:, vocab_size:] = 0
    return losses, dlogits


# Vocab-parallel cross-entropy (ops.vocab_parallel_linear_cross_entropy): each rank holds a
# shard of the vocabulary. cross_entropy_stats gives, per row, the shard's partial softmax
# statistics (m = max_j x_j, s = sum_j exp(x_j - m), and x_t if the target t lies in the shard,
# else 0), with m = -inf and s = 0 for a shard of padding only; the op layer combines them into
# the global lse, and cross_entropy_grad writes the shard's dlogits with it:
#   grad_scale * (exp(x_j - lse) * (1 + 2 z_loss lse) - [j == t - vocab_start]).
# lse is fp32: near |lse| ~ 1e4 it rounds by ~1e-3 (cross_entropy_fwd keeps m and log s apart
# for that case); training logits stay far below.

def _in_shard(targets, vocab_start, vocab_size):
    local = targets - vocab_start
    return local, (local >= 0) & (local < vocab_size)


def cross_entropy_stats(logits, targets, vocab_start, vocab_size):
    acc = _acc(logits.dtype)
    x = logits[:, :vocab_size].to(acc)
    no_logit = torch.full((x.shape[0], 1), float("-inf"), dtype=acc, device=x.device)
    m = torch.cat([x, no_logit], dim=1).max(dim=1).values  # -inf when the shard has no real column
    s = torch.exp(x - m[:, None]).sum(dim=1)
    local, mine = _in_shard(targets, vocab_start, vocab_size)
    target_logit = x.gather(1, torch.where(mine, local, 0)[:, None]).squeeze(1) if vocab_size else m
    return torch.stack([m, s, torch.where(mine, target_logit, 0.0)], dim=1)


def cross_entropy_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index, z_loss, grad_scale):
    acc = _acc(logits.dtype)
    x = logits[:, :vocab_size].to(acc)
    lse = lse.to(acc)
    grad = torch.exp(x - lse[:, None]) * (1 + 2 * z_loss * lse)[:, None]
    local, mine = _in_shard(targets, vocab_start, vocab_size)
    rows = mine.nonzero().squeeze(1)
    grad[rows, local[rows]] -= 1
    grad = torch.where((targets != ignore_index)[:, None], grad * grad_scale, 0.0)
    logits[:, :vocab_size] = grad.to(logits.dtype)
    logits[:, vocab_size:] = 0
    return logits


# ----------------------------------------------------------------------------- adamw
# Decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW:
#   g = grad * grad_scale;  p *= 1 - lr * wd (decayed range only)
#   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
#   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
               decay_numel, grad_scale):
    g = grad * grad_scale
    param[:decay_numel].mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def sum_of_squares(x):
    return x.to(_acc(x.dtype)).square().sum()
