"""Cross-entropy forward with its gradient, one program per row of logits (N, Vp).

Per row with target t (columns >= V are padding, excluded from the softmax):
    lse    = m + log(s),  m = max_j x_j,  s = sum_j exp(x_j - m)       (j < V)
    loss   = lse - x_t + z_loss * lse^2                   (0 if t == ignore_index)
    dx_j   = grad_scale * (exp(x_j - lse) * (1 + 2 z_loss lse) - [j == t])   (0 for j >= V
             and for ignored rows)
Algorithm: sweep 1 reads the row block by block and keeps a per-lane online (max, sum) in fp32
(s_lane <- s_lane * exp(m_old - m_new) + exp(x - m_new)), merged across lanes at the end, so
logits of +-1e4 never overflow; sweep 2 reads the row again and writes dx (in place if asked).
Memory traffic: reads N*Vp logits twice (the second read mostly hits L2: one row is 100 KB in
bf16) + N targets, writes N*Vp gradients + N losses; 3 exp per logit; memory-bound.
The bench counts 3 * N * Vp * elt + 12 * N bytes.

The vocab-parallel pair (logits: one shard of the vocabulary, ids [vocab_start, vocab_start + Vp),
its first V real, V = 0 allowed; see nanolm/ops/cross_entropy.py for the specification):
    cross_entropy_stats_kernel  per row  m, s (as sweep 1 above) and x_t if t is in the shard
                                else 0 -> stats (N, 3) fp32 (m = -inf, s = 0 when V = 0);
                                reads N*Vp logits + N targets, writes 3N floats.
    cross_entropy_grad_kernel   dx_j = grad_scale * (exp(x_j - lse) (1 + 2 z_loss lse)
                                - [j == t - vocab_start]) with the global lse; reads N*Vp + 2N,
                                writes N*Vp (in place).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _row_max_and_sum_exp(x_row, Vp: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr):
    """Sweep 1 (and the stats kernel): m = max_j x_j and s = sum_j exp(x_j - m) over the row's
    first V columns, from a per-lane online (max, sum) merged across lanes at the end."""
    cols = tl.arange(0, BLOCK)
    # the finite initial max keeps exp(m_old - m_new) away from NaN
    m = tl.full([BLOCK], -3.0e38, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    # loads are masked by j < Vp, not j < V: Vp % 16 == 0 keeps them vectorized, V = 50257 would not
    for start in range(0, V, BLOCK):
        j = start + cols
        x = tl.load(x_row + j, mask=j < Vp).to(tl.float32)
        x = tl.where(j < V, x, float("-inf"))
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    return m_row, tl.sum(s * tl.exp(m - m_row), axis=0)


@triton.jit
def _write_row_grad(x_row, dx_row, shift, log_s, target_col, valid, row_scale, coef,
                    Vp: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr):
    """dx_j = exp((x_j - shift) - log_s) * coef - [j == target_col] * row_scale over every column
    of the row, padding (j >= V) included as 0; an ignored row (not valid) gets zeros."""
    cols = tl.arange(0, BLOCK)
    for start in range(0, Vp, BLOCK):
        j = start + cols
        x = tl.load(x_row + j, mask=j < Vp).to(tl.float32)
        x = tl.where(j < V, x, float("-inf"))  # padding may hold anything, NaN included
        dx = tl.exp((x - shift) - log_s) * coef - tl.where(j == target_col, row_scale, 0.0)
        dx = tl.where(valid, dx, 0.0)  # an ignored row's logits may be inf or NaN
        tl.store(dx_row + j, dx.to(dx_row.dtype.element_ty), mask=j < Vp)


@triton.jit
def cross_entropy_fwd_kernel(
    logits_ptr,   # (N, Vp) fp32 or bf16, row-contiguous
    dlogits_ptr,  # (N, Vp) same dtype; may equal logits_ptr (in place)
    targets_ptr,  # (N,) int64
    losses_ptr,   # (N,) fp32
    ignore_index,
    z_loss,
    grad_scale,
    Vp: tl.constexpr,  # row stride: padded vocabulary (constexpr: loop bounds; fixed per model)
    V: tl.constexpr,   # real vocabulary: columns >= V are padding
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * Vp overflows int32 past 42k rows of 50304
    x_row = logits_ptr + row * Vp
    dx_row = dlogits_ptr + row * Vp

    # 1. the row's max and sum of exponentials
    m_row, s_row = _row_max_and_sum_exp(x_row, Vp, V, BLOCK)
    log_s = tl.log(s_row)
    lse = m_row + log_s  # used only where its rounding (1e-3 at 1e4) is harmless; else m_row, log_s

    # 2. loss; the target is clamped so that no value of it can address outside the row
    t = tl.load(targets_ptr + row)
    valid = t != ignore_index
    t_safe = tl.minimum(tl.maximum(t, 0), V - 1)
    x_t = tl.load(x_row + t_safe).to(tl.float32)  # before step 3 may overwrite it in place
    loss = (m_row - x_t) + log_s + z_loss * lse * lse
    tl.store(losses_ptr + row, tl.where(valid, loss, 0.0))

    # 3. gradient over every column, padding included
    row_scale = tl.where(valid, grad_scale, 0.0)
    coef = row_scale * (1.0 + 2.0 * z_loss * lse)
    _write_row_grad(x_row, dx_row, m_row, log_s, t_safe, valid, row_scale, coef, Vp, V, BLOCK)


def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    dlogits = logits if inplace else torch.empty_like(logits)
    if N == 0:
        return losses, dlogits
    cross_entropy_fwd_kernel[(N,)](
        logits, dlogits, targets, losses, ignore_index, float(z_loss), float(grad_scale),
        Vp=Vp, V=vocab_size, BLOCK=_block(logits), num_warps=8)
    return losses, dlogits


@triton.jit
def cross_entropy_stats_kernel(
    logits_ptr,   # (N, Vp) fp32 or bf16, row-contiguous: one vocabulary shard
    targets_ptr,  # (N,) int64 global vocab ids (or ignore_index)
    stats_ptr,    # (N, 3) fp32: max, sum exp(x - max), target logit or 0
    vocab_start,  # global id of column 0
    Vp: tl.constexpr,
    V: tl.constexpr,  # real columns of this shard, 0 <= V <= Vp
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * Vp
    m_row, s_row = _row_max_and_sum_exp(x_row, Vp, V, BLOCK)
    local = tl.load(targets_ptr + row) - vocab_start
    mine = (local >= 0) & (local < V)
    x_t = tl.load(x_row + tl.where(mine, local, 0), mask=mine, other=0.0).to(tl.float32)
    tl.store(stats_ptr + row * 3, tl.where(V > 0, m_row, float("-inf")))
    tl.store(stats_ptr + row * 3 + 1, s_row)
    tl.store(stats_ptr + row * 3 + 2, tl.where(mine, x_t, 0.0))


@triton.jit
def cross_entropy_grad_kernel(
    logits_ptr,   # (N, Vp) fp32 or bf16: one vocabulary shard, overwritten by its gradient
    targets_ptr,  # (N,) int64
    lse_ptr,      # (N,) fp32 logsumexp over the whole vocabulary
    vocab_start,
    ignore_index,
    z_loss,
    grad_scale,
    Vp: tl.constexpr,
    V: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * Vp
    t = tl.load(targets_ptr + row)
    valid = t != ignore_index
    local = t - vocab_start
    target_col = tl.where((local >= 0) & (local < V), local, -1)  # -1: another shard's target
    lse = tl.load(lse_ptr + row)
    row_scale = tl.where(valid, grad_scale, 0.0)
    coef = row_scale * (1.0 + 2.0 * z_loss * lse)
    _write_row_grad(x_row, x_row, lse, 0.0, target_col, valid, row_scale, coef, Vp, V, BLOCK)


def _block(logits):
    return min(triton.next_power_of_2(logits.shape[1]), 4096 if logits.element_size() == 2 else 2048)


def cross_entropy_stats(logits, targets, vocab_start, vocab_size):
    N, Vp = logits.shape
    stats = torch.empty(N, 3, dtype=torch.float32, device=logits.device)
    if N:
        cross_entropy_stats_kernel[(N,)](logits, targets, stats, vocab_start, Vp=Vp, V=vocab_size,
                                         BLOCK=_block(logits), num_warps=8)
    return stats


def cross_entropy_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index, z_loss, grad_scale):
    N, Vp = logits.shape
    if N:
        cross_entropy_grad_kernel[(N,)](logits, targets, lse, vocab_start, ignore_index, float(z_loss),
                                        float(grad_scale), Vp=Vp, V=vocab_size, BLOCK=_block(logits),
                                        num_warps=8)
    return logits
