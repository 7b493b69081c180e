"""Dropout masks in Triton: Philox4x32-10 exactly as specified in the dropout section of
nanolm/ops/dropout.py (and csrc/dropout.h), so masks match the other backends bit for bit.

    key (seed mod 2^32, seed >> 32); counter (g mod 2^32, g >> 32, offset mod 2^32, offset >> 32),
    g = i >> 2; element i takes word i mod 4 and is kept iff it is >= threshold = floor(p * 2^32);
    its factor is keep_scale = 1 / (1 - p) if kept, else 0.

Cost: each element runs its group's Philox call itself (10 rounds of 2 umulhi, 2 mul, 4 xor,
2 add on 32-bit integers) and keeps one of the 4 words: 4x the minimum work, in exchange for
working on any tile shape. No memory traffic: the mask is never stored.
"""
import triton
import triton.language as tl

# tl.constexpr(...) values, not annotations: the compiler (unlike the interpreter) reads only those
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)

# Kernels taking dropout arguments list these in do_not_specialize: on a GPU, Triton would
# otherwise turn an integer argument equal to 1 (a seed, an offset) into a constexpr int.
DROPOUT_SCALARS = ["seed", "offset", "threshold"]
# (seed, offset, threshold, keep_scale) of a launch without dropout: DROPOUT=False never reads them
NO_DROPOUT = (0, 0, 0, 1.0)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the uint32 counters (c0, c1, c2, c3) under the uint32 key (k0, k1)."""
    for _ in tl.static_range(10):
        hi0, lo0 = tl.umulhi(c0, PHILOX_M0), c0 * PHILOX_M0
        hi1, lo1 = tl.umulhi(c2, PHILOX_M1), c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = k0 + PHILOX_W0, k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def dropout_factor(index, seed, offset, threshold, keep_scale):
    """float32 factors (keep_scale or 0) of the elements with flat int64 indices `index`."""
    # scalar arguments arrive as int32 or int64 depending on their value: widen, then split
    seed, offset, threshold = seed.to(tl.int64), offset.to(tl.int64), threshold.to(tl.int64)
    g = index >> 2
    zero = (g * 0).to(tl.uint32)
    c0, c1, c2, c3 = philox4x32_10(g.to(tl.uint32), (g >> 32).to(tl.uint32), zero + offset.to(tl.uint32),
                                   zero + (offset >> 32).to(tl.uint32), seed.to(tl.uint32),
                                   (seed >> 32).to(tl.uint32))
    word = index & 3
    u = tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))
    return tl.where(u.to(tl.int64) >= threshold, keep_scale, 0.0)
