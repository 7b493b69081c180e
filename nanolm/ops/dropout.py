"""Dropout inside the fused kernels: the argument the ops take (`Dropout`), and the mask, specified
here once in plain PyTorch; every backend implements it bit for bit.
"""
import math
from typing import NamedTuple

import torch


class Dropout(NamedTuple):
    """Drop with probability p, the mask a function of (seed, offset, element index)."""
    p: float
    seed: int  # 0 <= seed < 2^63: the Philox key
    offset: int  # 0 <= offset < 2^63: one per call site and step (the counter's upper half)


def dropout(p, seed, offset):
    """The dropout argument of the fused ops: None when p == 0, so that case runs the very
    code path it runs without dropout."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    for name, value in (("seed", seed), ("offset", offset)):
        if not 0 <= value < 2 ** 63:
            raise ValueError(f"dropout: {name} must be in [0, 2^63), got {value}")
    return Dropout(float(p), int(seed), int(offset)) if p > 0 else None


def as_schema(dropout):
    """(p, seed, offset) as a registered op takes them: p = 0 without dropout."""
    return (0.0, 0, 0) if dropout is None else dropout


def from_schema(p, seed, offset):
    return None if p == 0 else Dropout(p, seed, offset)


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
# dropped ones are 0. Each call site gets its own offset (DropoutStream.next_forward in
# nanolm/model.py numbers the sites of every training forward), so no two masks of a training
# step share a counter.

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


def dropped(x, shape, dropout):
    """x * keep * scale in x's dtype (the accumulation dtype), with keep of a tensor of `shape`."""
    index = torch.arange(math.prod(shape), device=x.device).view(shape)
    return torch.where(dropout_keep(index, dropout), x * (1.0 / (1.0 - dropout.p)), 0.0)


def kernel_args(dropout):
    """A kernel's dropout arguments (seed, offset, threshold, scale), the threshold floor(p * 2^32)
    and scale 1 / (1 - p) of the specification above; None without dropout."""
    if dropout is None:
        return None
    return dropout.seed, dropout.offset, dropout_threshold(dropout.p), 1.0 / (1.0 - dropout.p)
