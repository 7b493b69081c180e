"""Causal flash attention (FlashAttention-2), forward and backward, in Triton.

Math, per (batch b, query head h), K and V being those of K/V head g = h // group (grouped-query
attention: nh query heads share nkv = nh / group K/V heads; group 1 is multi-head attention),
with S = scale * Q K^T masked above the diagonal:
    P = softmax(S),  O = P V,  lse = logsumexp(S, rows)              (forward; lse is saved)
    delta = rowsum(dO * O),  dV_g = sum over g's group of P^T dO,  dP = dO V^T,
    dS = P * (dP - delta),  dQ = scale * dS K,  dK_g = scale * sum over g's group of dS^T Q
The T x T matrices S and P are never stored: they are recomputed block by block.
With dropout (DROPOUT, kernels/dropout.py) P is dropped after the softmax's sums: O = Pd V,
Pd = P * factor; the backward regenerates the factors of each block (never stored):
dV = Pd^T dO, dS = P * (dO V^T * factor - delta). The factor of P[b, h, i, j] is that of
element ((b * nh + h) * T + i) * T + j.

Algorithm.
  Forward: one program per (query block of BLOCK_M rows, b * nh). It streams key/value blocks
  with an online softmax in base 2 (scores prescaled by scale * log2(e), so exp2 is one
  instruction): running max m, running sum l, rescaled accumulator. The key blocks left of the
  diagonal need no mask; only the BLOCK_M / BLOCK_N blocks on the diagonal are masked (the
  causal mask there also hides keys >= T). Query blocks are scheduled longest first. With
  groups, each query head's program reads its K/V head's blocks (the group's programs of one
  query block are neighbours in the grid, so after the first they mostly come from L2).
  Backward: (1) delta = rowsum(dO * O); (2) one program per (key block, K/V head) loads its K, V
  block once and accumulates dK, dV over its group's query heads in order, each over the query
  blocks at or below the key block (diagonal blocks masked, the rest not); (3) one program per
  (query block, query head) accumulates dQ over the key blocks at or left of it. Every output
  element is written by exactly one program in a fixed order: deterministic, no atomics; the
  price is computing Q K^T and dO V^T twice (7 matmuls of T x T x hs / 2 instead of 5).

Layouts accepted: q (B, T, nh, hs), k, v (B, T, nkv, hs) with any strides as long as
stride(-1) == 1, e.g. the model's views into the fused qkv projection (B, T, nh + 2*nkv, hs);
dq, dk, dv likewise (views into one dqkv buffer); o, do contiguous (B, T, nh, hs); lse and
delta (B, nh, T) float32. hs a power of two in 16..128. bf16/fp16 on GPU with fp32
accumulation, fp32 under the interpreter (TRITON_INTERPRET=1).

Cost (causal, counting the multiply-adds of the T^2/2 unmasked scores as 2 FLOPs each):
  forward  4 * B * nh * T^2 * hs / 2 FLOPs; reads q, k, v, writes o: 4 * B*T*nh*hs elements
           plus lse B*nh*T floats (k, v are re-read once per query block, from L2 mostly).
  backward 2.5x the forward FLOPs by convention (5 matmuls; this kernel issues 7); reads
           q, k, v, o, do, lse, writes dq, dk, dv, delta: 8 * B*T*nh*hs elements + 2*B*nh*T.
Compute-bound for T >~ 256: report TFLOP/s against these counts.
"""
import os

import torch
import triton
import triton.language as tl

from .dropout import DROPOUT_SCALARS, NO_DROPOUT, dropout_factor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# exp(x) = exp2(x * LOG2E): exp2 is one instruction. A tl.constexpr value: the compiler (unlike
# the interpreter) lets kernels read no other globals; the launchers use LOG2E.value.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lo, hi, T,
                    qk_scale, row_base, seed, offset, threshold, keep_scale,
                    BLOCK_N: tl.constexpr,
                    DIAGONAL: tl.constexpr,
                    DROPOUT: tl.constexpr):
    """Online softmax over key blocks [lo, hi): masked (DIAGONAL) or not."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        if DIAGONAL:
            kT = tl.load(k_ptrs + start_n * stride_kt, mask=keys[None, :] < T, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=keys[:, None] < T, other=0.0)
        else:
            kT = tl.load(k_ptrs + start_n * stride_kt)
            v = tl.load(v_ptrs + start_n * stride_vt)
        s = tl.dot(q, kT) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if DIAGONAL:
            s = tl.where(offs_m[:, None] >= keys[None, :], s, float("-inf"))
        # 1. new running max; every row already holds one unmasked key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # 2. rescale what was accumulated under the old max, add this block
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # after the sum: the softmax normalises the undropped P
            index = (row_base + offs_m[:, None]) * T + keys[None, :]
            p = p * dropout_factor(index, seed, offset, threshold, keep_scale)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
def attention_fwd_kernel(
    Q, K, V,                            # (B, T, nh, hs), stride(-1) == 1
    O,                                  # (B, T, nh, hs) contiguous
    LSE,                                # (B, nh, T) float32
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    nh, group, T, T_BUCKET,             # group: query heads per K/V head; T_BUCKET: the autotune
    qk_scale,                           # key (next power of two of T); qk_scale = scale * log2(e)
    seed, offset, threshold, keep_scale,  # dropout of P, read when DROPOUT
    HS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # longest rows first: the last query blocks have the most keys
    start_m = (tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // nh).to(tl.int64), bh % nh  # int64: B * T * 3C can pass 2^31
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HS)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HS], tl.float32)
    row_base = bh.to(tl.int64) * T  # the first row of this head in the (B*nh*T, T) probabilities
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                                    0, start_m, T, qk_scale, row_base, seed, offset, threshold, keep_scale,
                                    BLOCK_N, False, DROPOUT)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                                    start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, row_base,
                                    seed, offset, threshold, keep_scale, BLOCK_N, True, DROPOUT)

    rows = offs_m < T
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=rows[:, None])
    lse = (m_i + tl.math.log2(l_i)) / LOG2E  # back to natural log
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=rows)


@triton.jit
def attention_bwd_delta_kernel(
    O, DO,                              # (B, T, nh, hs) contiguous
    DELTA,                              # (B, nh, T) float32 out: rowsum(dO * O)
    nh, T,
    HS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // nh).to(tl.int64), bh % nh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HS)
    offs = b * T * nh * HS + h * HS + offs_m[:, None] * (nh * HS) + offs_d[None, :]
    rows = offs_m < T
    o = tl.load(O + offs, mask=rows[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=rows[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=rows)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot,
                         offs_n, lo, hi, T, qk_scale, row_base, seed, offset, threshold, keep_scale,
                         BLOCK_M: tl.constexpr,
                         DIAGONAL: tl.constexpr,
                         DROPOUT: tl.constexpr):
    """Adds the query blocks [lo, hi) to this key block's dK, dV (transposed scores: the key
    block is the M side of every dot, so dK, dV stay in registers)."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        in_t = rows < T  # padded query rows load as zeros and so contribute nothing
        qT = tl.load(q_ptrs + start_m * stride_qt, mask=in_t[None, :], other=0.0)      # (HS, BLOCK_M)
        do = tl.load(do_ptrs + start_m * stride_dot, mask=in_t[:, None], other=0.0)    # (BLOCK_M, HS)
        lse2 = tl.load(lse_ptr + rows, mask=in_t, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + rows, mask=in_t, other=0.0)
        pT = tl.math.exp2(tl.dot(k, qT) * qk_scale - lse2[None, :])                   # (BLOCK_N, BLOCK_M)
        if DIAGONAL:
            pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
        dpT = tl.dot(v, tl.trans(do))
        if DROPOUT:  # the forward's factors, transposed: key j along rows, query i along columns
            factor = dropout_factor((row_base + rows[None, :]) * T + offs_n[:, None], seed, offset, threshold,
                                    keep_scale)
            dv = tl.dot((pT * factor).to(do.dtype), do, dv)
            dpT = dpT * factor
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
def attention_bwd_dkdv_kernel(
    Q, K, V,                            # q (B, T, nh, hs), k, v (B, T, nkv, hs), stride(-1) == 1
    DO,                                 # (B, T, nh, hs) contiguous
    LSE, DELTA,                         # (B, nh, T) float32
    DK, DV,                             # (B, T, nkv, hs) out, stride(-1) == 1
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    nh, group, T, T_BUCKET,             # group: query heads per K/V head
    scale, qk_scale,
    seed, offset, threshold, keep_scale,  # the forward's dropout, read when DROPOUT
    HS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,              # query rows per step
    BLOCK_N: tl.constexpr,              # keys owned by this program; a multiple of BLOCK_M
):
    start_n = tl.program_id(0) * BLOCK_N  # in order: the first key blocks see the most queries
    bk = tl.program_id(1)  # b * nkv + K/V head
    nkv = nh // group
    b, hk = (bk // nkv).to(tl.int64), bk % nkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HS)
    keys = offs_n[:, None] < T
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=keys, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=keys, other=0.0)
    stride_dot = nh * HS
    dk = tl.zeros([BLOCK_N, HS], tl.float32)
    dv = tl.zeros([BLOCK_N, HS], tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    for g in tl.range(0, group):  # the group's query heads in order: a fixed summation order
        h = hk * group + g
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None]
        do_ptrs = DO + b * T * stride_dot + h * HS + offs_m[:, None] * stride_dot + offs_d[None, :]
        row_base = (b * nh + h) * T  # this query head's first row in the (B*nh*T, T) probabilities
        lse_ptr = LSE + row_base
        delta_ptr = DELTA + row_base
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt,
                                      stride_dot, offs_n, start_n, diag_end, T, qk_scale, row_base, seed,
                                      offset, threshold, keep_scale, BLOCK_M, True, DROPOUT)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt,
                                      stride_dot, offs_n, start_n + BLOCK_N, T, T, qk_scale, row_base, seed,
                                      offset, threshold, keep_scale, BLOCK_M, False, DROPOUT)

    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=keys)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=keys)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, lo, hi,
                       T, qk_scale, row_base, seed, offset, threshold, keep_scale,
                       BLOCK_N: tl.constexpr,
                       DIAGONAL: tl.constexpr,
                       DROPOUT: tl.constexpr):
    """Adds the key blocks [lo, hi) to this query block's dQ."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        if DIAGONAL:
            kT = tl.load(k_ptrs + start_n * stride_kt, mask=keys[None, :] < T, other=0.0)  # (HS, BLOCK_N)
            vT = tl.load(v_ptrs + start_n * stride_vt, mask=keys[None, :] < T, other=0.0)
        else:
            kT = tl.load(k_ptrs + start_n * stride_kt)
            vT = tl.load(v_ptrs + start_n * stride_vt)
        p = tl.math.exp2(tl.dot(q, kT) * qk_scale - lse2[:, None])                       # (BLOCK_M, BLOCK_N)
        if DIAGONAL:
            p = tl.where(offs_m[:, None] >= keys[None, :], p, 0.0)
        dp = tl.dot(do, vT)
        if DROPOUT:
            index = (row_base + offs_m[:, None]) * T + keys[None, :]
            dp = dp * dropout_factor(index, seed, offset, threshold, keep_scale)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    return dq


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
def attention_bwd_dq_kernel(
    Q, K, V,                            # q (B, T, nh, hs), k, v (B, T, nkv, hs), stride(-1) == 1
    DO,                                 # (B, T, nh, hs) contiguous
    LSE, DELTA,                         # (B, nh, T) float32
    DQ,                                 # (B, T, nh, hs) out, stride(-1) == 1
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dqb, stride_dqt, stride_dqh,
    nh, group, T, T_BUCKET,             # group: query heads per K/V head
    scale, qk_scale,
    seed, offset, threshold, keep_scale,  # the forward's dropout, read when DROPOUT
    HS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,              # query rows owned by this program; a multiple of BLOCK_N
    BLOCK_N: tl.constexpr,              # keys per step
):
    start_m = (tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // nh).to(tl.int64), bh % nh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HS)
    rows = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=rows[:, None], other=0.0)
    stride_dot = nh * HS
    do = tl.load(DO + b * T * stride_dot + h * HS + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=rows[:, None], other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0)
    hk = h // group
    k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[None, :] * stride_vt + offs_d[:, None]

    dq = tl.zeros([BLOCK_M, HS], tl.float32)
    row_base = bh.to(tl.int64) * T
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                            start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, row_base, seed, offset,
                            threshold, keep_scale, BLOCK_N, True, DROPOUT)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m,
                            0, start_m, T, qk_scale, row_base, seed, offset, threshold, keep_scale,
                            BLOCK_N, False, DROPOUT)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None])


# ----------------------------------------------------------------------------- launchers

def _configs(rows):
    """rows of (BLOCK_M, BLOCK_N, warps, stages, then the largest head size the config is tried
    at: on sm_90 and later without dropout, with dropout, on sm_8x without, with) -> the autotune
    configs and the prune hook that keeps those a launch's head size, dropout and device allow."""
    configs = [(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s), max_hs)
               for m, n, w, s, *max_hs in rows]

    def prune(candidates, named_args, **kwargs):
        args = {**named_args, **kwargs}  # positional or keyword, as the launcher passed it
        column = 2 * (device_capability(args["Q"].device) < (9, 0)) + bool(args["DROPOUT"])
        return [c for c, max_hs in configs if args["HS"] <= max_hs[column] and c in candidates]
    return [c for c, _ in configs], {"early_config_prune": prune}


def device_capability(device):
    """(major, minor) of a CUDA device, read when the autotuner first meets a launch; (9, 0) for
    any other (`python -m bench static` swaps this to capture the configs of each arch)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


# Candidates for Hopper (H100): 128-row tiles with 4-8 warps, 2-4 pipeline stages. The block
# on the "owned" side (M for forward and dQ, N for dK/dV) is a multiple of the streamed one.
# No config may spill registers on sm_90a (`python -m bench static`, gated by
# tests/test_triton_static.py; measured with triton 3.6.0 and 3.9.0, bf16). A 4-warp program
# whose fp32 accumulators hold a 128-row tile at hs = 128 (the forward's and dQ's 128 x 128,
# dK and dV of 128 x 128 or 64 x 128 together) has 255 registers and spills, so those
# configs stop at hs = 64; 8-warp configs take their place at hs = 128 (but not dK/dV's
# (64, 64, 8, 2), which spills there too: a warpgroup's wgmma tile is 64 rows, so 8 warps do not
# split a 64-key block). Dropped: dK/dV (32, 128, 4, 3) and (64, 64, 4, 2), which spill at
# hs = 64 already (4-28 bytes), replaced by (32, 128, 8, 3) and (64, 64, 8, 2); and dK/dV
# (64, 128, 8, 2), which spills 20 bytes at hs = 64 under triton 3.9 once the kernel carries the
# (constexpr-disabled) dropout path.
# With dropout each score also runs a Philox call (about 40 more live registers), so the
# dropout column stops earlier where sm_90a spills (triton 3.6.0 / 3.9.0): forward (128, 64, 4, 3)
# (172 B at hs = 32, 672 B at 64), (128, 32, 4, 4) (16 B at 64), (128, 128, 8, 2) (1320 B at 64
# under 3.9), (64, 64, 4, 3) (88 B at 128 under 3.9); dK/dV (16, 128, 4, 4) (84 B at 64),
# (32, 64, 4, 3) (80 B at 128), (32, 128, 8, 3) (60 B at 128 under 3.9); dQ (128, 32, 4, 3) (8 B
# at 32, 140 B at 64). Added for head size 128 with dropout, spill-free on both archs and both
# Triton versions: forward (128, 32, 8, 3) and dK/dV (16, 128, 8, 3).
# sm_8x (A100: the same register file, no wgmma) spills in other configs; its columns drop each
# config at the head sizes where sm_80 spills (triton 3.6.0), wherever another config of the
# same kernel, head size and dropout compiles without spilling (bench/results/2026-11-29-static).
# That cannot cost sm_90 anything: its columns are the first two. Each column keeps a config up
# to a largest head size, so where sm_80 spills at hs = 32 but not at 64, the config is kept at
# 32 (dQ (128, 32, 8, 3): 8 B, not a production head size).
#                               largest head size: sm_90  +dropout  sm_8x  +dropout
_FWD_CONFIGS, _FWD_PRUNE = _configs([(128, 64, 4, 3,   64, 16, 32, 16),
                                     (128, 64, 8, 3,   128, 128, 128, 64),
                                     (128, 128, 8, 2,  128, 32, 32, 16),
                                     (64, 64, 4, 3,    128, 64, 128, 128),
                                     (128, 32, 4, 4,   64, 32, 64, 32),
                                     (128, 32, 8, 3,   128, 128, 128, 128)])
_DKDV_CONFIGS, _DKDV_PRUNE = _configs([(32, 128, 8, 3,  128, 64, 64, 32),
                                       (32, 64, 4, 3,   128, 64, 64, 16),
                                       (64, 64, 8, 2,   64, 64, 32, 32),
                                       (16, 128, 4, 4,  64, 32, 64, 32),
                                       (16, 128, 8, 3,  128, 128, 128, 128)])
_DQ_CONFIGS, _DQ_PRUNE = _configs([(128, 32, 4, 3,  64, 16, 32, 32),
                                   (128, 64, 8, 2,  128, 128, 32, 32),
                                   (64, 32, 4, 3,   128, 128, 128, 128),
                                   (64, 64, 4, 2,   64, 64, 32, 32),
                                   (128, 16, 4, 4,  64, 64, 64, 64),
                                   (128, 32, 8, 3,  128, 128, 64, 64)])
# The interpreter runs one small fixed config: no autotuning on a CPU emulation.
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}
# Autotune also keys on the argument dtypes. DROPOUT is in the key: without it, a dropout launch
# reused the config tuned (and pruned) without dropout.
_KEY = ["HS", "T_BUCKET", "DROPOUT"]

if INTERPRET:
    _fwd_kernel, _dkdv_kernel, _dq_kernel = (attention_fwd_kernel, attention_bwd_dkdv_kernel,
                                             attention_bwd_dq_kernel)
else:
    _fwd_kernel = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by=_FWD_PRUNE)(attention_fwd_kernel)
    _dkdv_kernel = triton.autotune(_DKDV_CONFIGS, key=_KEY, prune_configs_by=_DKDV_PRUNE)(attention_bwd_dkdv_kernel)
    _dq_kernel = triton.autotune(_DQ_CONFIGS, key=_KEY, prune_configs_by=_DQ_PRUNE)(attention_bwd_dq_kernel)


def _launch(kernel, rows_meta, B, heads, T, *args, hs, dropout_args):
    """Grid: (blocks of `rows_meta` rows over T, B * heads). The dropout arguments follow args."""
    def grid(meta):
        return (triton.cdiv(T, meta[rows_meta]), B * heads)
    meta = _INTERPRET_META if INTERPRET else {}
    kernel[grid](*args, *(dropout_args or NO_DROPOUT), HS=hs, DROPOUT=dropout_args is not None, **meta)


def _bth(t):
    """The (b, t, h) strides of a (B, T, nh, hs) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def attention_fwd(q, k, v, scale, dropout_args):
    """q (B, T, nh, hs), k, v (B, T, nkv, hs) (nkv dividing nh), stride(-1) == 1 -> o (B, T, nh, hs)
    contiguous, lse (B, nh, T) fp32. dropout_args: None or (seed, offset, threshold, keep_scale)
    of P's dropout."""
    B, T, nh, hs = q.shape
    group = nh // k.shape[2]
    o = torch.empty((B, T, nh, hs), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    t_bucket = triton.next_power_of_2(T)
    _launch(_fwd_kernel, "BLOCK_M", B, nh, T, q, k, v, o, lse, *_bth(q), *_bth(k), *_bth(v), *_bth(o),
            nh, group, T, t_bucket, scale * LOG2E.value, hs=hs, dropout_args=dropout_args)
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, dropout_args):
    """Writes dq (B, T, nh, hs), dk, dv (B, T, nkv, hs), stride(-1) == 1; do, o contiguous; lse
    (B, nh, T)."""
    B, T, nh, hs = q.shape
    nkv = k.shape[2]
    delta = torch.empty((B, nh, T), dtype=torch.float32, device=q.device)
    block = 16 if INTERPRET else 64
    attention_bwd_delta_kernel[(triton.cdiv(T, block), B * nh)](o, do, delta, nh, T, HS=hs, BLOCK_M=block)
    t_bucket = triton.next_power_of_2(T)
    _launch(_dkdv_kernel, "BLOCK_N", B, nkv, T, q, k, v, do, lse, delta, dk, dv,
            *_bth(q), *_bth(k), *_bth(v), *_bth(dk), *_bth(dv), nh, nh // nkv, T, t_bucket, scale,
            scale * LOG2E.value, hs=hs, dropout_args=dropout_args)
    _launch(_dq_kernel, "BLOCK_M", B, nh, T, q, k, v, do, lse, delta, dq,
            *_bth(q), *_bth(k), *_bth(v), *_bth(dq), nh, nh // nkv, T, t_bucket, scale, scale * LOG2E.value,
            hs=hs, dropout_args=dropout_args)
