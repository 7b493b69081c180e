"""AdamW update and deterministic sum of squares over flat float32 buffers (Triton).

Update, per element i (the math of adamw_step, the specification in nanolm/ops/adamw.py):
    g = grad[i] * grad_scale                   (the clip coefficient: no separate pass)
    p = param[i] * decay_factor                (1 - lr*wd for i < decay_numel, else 1)
    m = m + (1 - beta1) (g - m);   v = beta2 v + (1 - beta2) g^2
    p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
The bias corrections (step_size = lr / (1 - beta1^step), bc2_sqrt = sqrt(1 - beta2^step)) are
computed once on the host. Memory traffic: reads p, g, m, v, writes p, m, v: 28 bytes per
parameter; one program per BLOCK elements.

Sum of squares (4 bytes read per element), deterministic: stage 1 runs a fixed number of
programs (a function of numel only), each summing a fixed strided set of BLOCK-sized tiles into
a vector accumulator and reducing it with tl.sum (a fixed tree); stage 2, one program, sums the
partials with tl.sum. No atomics, so the bits never depend on scheduling.
"""
import torch
import triton
import triton.language as tl

ADAMW_BLOCK = 4096
SUMSQ_BLOCK = 4096
MAX_PARTIALS = 1024


@triton.jit
def adamw_step_kernel(
    p_ptr,           # (n,) float32, updated in place
    g_ptr,           # (n,) float32
    m_ptr,           # (n,) float32, updated in place
    v_ptr,           # (n,) float32, updated in place
    n, decay_numel,  # elements; the first decay_numel are weight-decayed
    one_minus_beta1, beta2, one_minus_beta2, eps,
    decay_factor, step_size, bc2_sqrt, grad_scale,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask, eviction_policy="evict_first") * grad_scale
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps  # _rn: IEEE, as torch (not approx)
    p = tl.where(offs < decay_numel, p * decay_factor, p) - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def sum_of_squares_partials_kernel(
    x_ptr,         # (n,) float32
    partials_ptr,  # (num_programs,) float32
    n,
    BLOCK: tl.constexpr,
    # cdiv(cdiv(n, BLOCK), num_programs); constexpr because the interpreter (numpy 2) cannot
    # loop to a runtime scalar. One compile per buffer size, and training has one.
    TILES_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(TILES_PER_PROGRAM):  # program pid sums tiles pid, pid + P, pid + 2P, ...
        tile = pid + i * tl.num_programs(0)
        offs = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        acc += x * x
    tl.store(partials_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def sum_of_squares_final_kernel(
    partials_ptr,  # (count,) float32
    out_ptr,       # () float32
    count,
    BLOCK: tl.constexpr,  # >= count
):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr, tl.sum(tl.load(partials_ptr + offs, mask=offs < count, other=0.0), axis=0))


def adamw_step(param, grad, exp_avg, exp_avg_sq, decay_numel, scalars):
    """In place over the flat buffers; scalars = (1 - beta1, beta2, 1 - beta2, eps, decay_factor,
    step_size, bc2_sqrt, grad_scale), the host-side values of the update above."""
    n = param.numel()
    if n == 0:
        return
    adamw_step_kernel[(triton.cdiv(n, ADAMW_BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, n, decay_numel, *scalars, BLOCK=ADAMW_BLOCK, num_warps=8)


def sum_of_squares(x):
    n = x.numel()
    tiles = triton.cdiv(n, SUMSQ_BLOCK)
    count = max(1, min(MAX_PARTIALS, tiles))  # a function of n only
    partials = torch.empty(count, dtype=torch.float32, device=x.device)
    out = torch.empty((), dtype=torch.float32, device=x.device)
    sum_of_squares_partials_kernel[(count,)](
        x, partials, n, BLOCK=SUMSQ_BLOCK, TILES_PER_PROGRAM=triton.cdiv(tiles, count), num_warps=8)
    sum_of_squares_final_kernel[(1,)](partials, out, count, BLOCK=MAX_PARTIALS)
    return out
