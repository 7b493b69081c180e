"""LayerNorm and RMSNorm forward and backward in Triton, with the residual add fused (llm.c style).

    forward   h = x (+ residual);  mean = sum(h)/C;  rstd = 1/sqrt(sum((h-mean)^2)/C + eps)
              y = (h - mean) * rstd * w + b
    backward  xhat = (x - mean) * rstd;  wdy = w * dy
              c1 = sum(xhat * wdy)/C;  c2 = sum(wdy)/C
              dx = (wdy - (xhat * c1 + c2)) * rstd (+ dresidual)
              dw = sum_rows(dy * xhat);  db = sum_rows(dy)
RMSNorm (RMS, a constexpr: the LayerNorm instantiations are unchanged, as in flash-attention's
ops/triton/layer_norm.py): mean = 0 (not stored), so rstd = 1/sqrt(sum(h^2)/C + eps), no bias,
c2 = 0 and no db; without a weight (HAS_WEIGHT = False, parameter-free) w reads as ones and dw
is not computed.
With dropout of the branch (DROPOUT, kernels/dropout.py): h = x * factor (+ residual, which may
be absent: the embedding sum), always stored to residual_out; the backward regenerates the
factors and also writes dbranch = dx * factor. No extra memory traffic beyond dbranch (N*C*s):
the mask is recomputed, never stored.

Memory traffic, s bytes per element of x (4 fp32, 2 bf16):
    forward   reads N*C*s (+ N*C*s residual) + 2*C*s, writes N*C*s (+ N*C*s residual_out) + 8N
    backward  reads 2*N*C*s (+ N*C*s dresidual) + C*s + 8N, writes N*C*s + 8C,
              plus 2*P*C*4 bytes of partial dw/db written and read back (P programs)
RMSNorm: 4N instead of 8N statistics bytes, no bias, no db (and no dw without a weight).
Memory-bound: a handful of FLOPs per byte.

Forward: one program per ROWS rows (several rows for short C so a program moves enough bytes).
Backward: P programs, each over a fixed contiguous range of rows, accumulate dw/db in
registers and store them as one row of a (P, C) fp32 buffer; a second kernel adds those rows
per column in a fixed order. No atomics, so dw/db are bit-identical run to run.
"""
import torch
import triton
import triton.language as tl

from .dropout import DROPOUT_SCALARS, NO_DROPOUT, dropout_factor

MAX_C = 16384  # the whole row lives in registers: BLOCK_C = next_power_of_2(C)


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
def layernorm_fwd_kernel(
    X,             # (N, C)
    R,             # (N, C) residual, read when HAS_RESIDUAL
    RO,            # (N, C) residual_out = dropout(x) + residual, written when HAS_RESIDUAL or DROPOUT
    W,             # (C,), read when HAS_WEIGHT
    B,             # (C,), read when HAS_BIAS
    Y,             # (N, C)
    Mean,          # (N,) float32, written unless RMS
    Rstd,          # (N,) float32
    N, C, eps,
    seed, offset, threshold, keep_scale,  # dropout of x, read when DROPOUT (kernels/dropout.py)
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]  # int64: N*C can pass 2^31
    # 1. h = x (+ residual): the stream is normalized as stored (rounded), as the backward sees it
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:  # offs is the element index of the spec: row * C + col
        h = h * dropout_factor(offs, seed, offset, threshold, keep_scale)
    if HAS_RESIDUAL:
        h += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL or DROPOUT:
        h_stored = h.to(RO.dtype.element_ty)
        tl.store(RO + offs, h_stored, mask=mask)
        h = h_stored.to(tl.float32)
    # 2. statistics in fp32, variance from centered values (no cancellation); RMS: no centering
    if RMS:
        d = h  # masked columns loaded as 0
    else:
        mean = tl.sum(h, axis=1) / C
        d = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    # 3. normalize, scale, shift
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=DROPOUT_SCALARS)
def layernorm_bwd_kernel(
    DY,            # (N, C)
    X,             # (N, C)
    W,             # (C,), read when HAS_WEIGHT
    Mean,          # (N,) float32, read unless RMS
    Rstd,          # (N,) float32
    DRES,          # (N, C) dresidual, read when HAS_DRESIDUAL
    DX,            # (N, C)
    DBR,           # (N, C) dbranch = dropout(dx), written when DROPOUT
    DW_partial,    # (P, C) float32, row p = this program's sum of dy * xhat, written when HAS_WEIGHT
    DB_partial,    # (P, C) float32, row p = this program's sum of dy, written unless RMS
    N, C,
    rows_per_program,
    seed, offset, threshold, keep_scale,  # the forward's dropout, read when DROPOUT
    HAS_DRESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    DROPOUT: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    # `while`, not `range`: the interpreter cannot range over a runtime scalar with numpy >= 2.4
    row = pid * rows_per_program
    # the last program's range may run past N: stop there. (Masking those rows instead, with
    # `col_ok & (row < N)`, broke under triton 3.9's interpreter: a scalar comparison keeps
    # its operands' int32 type there, and the int32 mask it splats to is refused by tl.load.)
    row_end = tl.minimum(row + rows_per_program, N)
    while row < row_end:
        offs = row.to(tl.int64) * C + cols
        x = tl.load(X + offs, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=col_ok, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        # 1. the row sums c1, c2 (masked columns are 0 in xhat and wdy); RMS: no mean, no c2
        if RMS:
            xhat = x * rstd  # masked columns loaded as 0
        else:
            mean = tl.load(Mean + row)
            xhat = tl.where(col_ok, (x - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            wdy = w * dy
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=0) / C
        # 2. dx, and this row's share of dw, db
        if RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / C
            dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DRESIDUAL:
            dx += tl.load(DRES + offs, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=col_ok)
        if DROPOUT:
            factor = dropout_factor(offs, seed, offset, threshold, keep_scale)
            tl.store(DBR + offs, (dx * factor).to(DBR.dtype.element_ty), mask=col_ok)
        if HAS_WEIGHT:
            dw += dy * xhat
        if not RMS:
            db += dy
        row += 1
    if HAS_WEIGHT:
        tl.store(DW_partial + pid * C + cols, dw, mask=col_ok)
    if not RMS:
        tl.store(DB_partial + pid * C + cols, db, mask=col_ok)


@triton.jit
def layernorm_bwd_reduce_kernel(
    DW_partial,    # (P, C) float32
    DB_partial,    # (P, C) float32
    DW,            # (C,) float32
    DB,            # (C,) float32, written when HAS_DB
    P, C,
    HAS_DB: tl.constexpr,  # False for RMSNorm: dw only
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Columns split over programs; each adds the P partial rows in a fixed order.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    dw = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    p0 = tl.program_id(0) * 0  # a runtime int32 scalar: `while` needs a typed loop variable
    while p0 < P:
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & col_ok[None, :]
        offs = ps[:, None] * C + cols[None, :]
        dw += tl.load(DW_partial + offs, mask=mask, other=0.0)
        if HAS_DB:
            db += tl.load(DB_partial + offs, mask=mask, other=0.0)
        p0 += BLOCK_P
    tl.store(DW + cols, tl.sum(dw, axis=0), mask=col_ok)
    if HAS_DB:
        tl.store(DB + cols, tl.sum(db, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------- launchers

def _num_warps(elements):
    return min(max(elements // 256, 1), 16)


def layernorm_fwd(x, residual, weight, bias, eps, dropout_args, rms=False):
    """x, residual (N, C) (residual may be None) -> y, residual_out (None without residual or
    dropout), mean (None with rms), rstd. dropout_args: None or (seed, offset, threshold,
    keep_scale) of x's dropout. rms: RMSNorm (bias None; weight may be None)."""
    N, C = x.shape
    y = torch.empty_like(x)
    residual_out = None if residual is None and dropout_args is None else torch.empty_like(x)
    mean = None if rms else torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, residual_out, mean, rstd
    BLOCK_C = triton.next_power_of_2(C)
    ROWS = max(1, min(16, 2048 // BLOCK_C))  # short rows: several per program
    layernorm_fwd_kernel[(triton.cdiv(N, ROWS),)](
        x, residual if residual is not None else x, residual_out if residual_out is not None else y,
        weight if weight is not None else x, bias if bias is not None else x, y, mean if mean is not None else rstd,
        rstd, N, C, eps, *(dropout_args or NO_DROPOUT),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        DROPOUT=dropout_args is not None, RMS=rms, BLOCK_C=BLOCK_C, ROWS=ROWS, num_warps=_num_warps(BLOCK_C * ROWS))
    return y, residual_out, mean, rstd


def _bwd_programs(N, device):
    """P: a few programs per SM on a GPU (a fixed 8 under the interpreter); fixed for a given
    N and device, which is what makes dw/db bit-reproducible."""
    if device.type == "cuda":
        per_device = torch.cuda.get_device_properties(device).multi_processor_count * 4
    else:
        per_device = 8
    return max(1, min(N, per_device))


def layernorm_bwd(dy, x, weight, mean, rstd, dresidual, dbranch, dropout_args, rms=False):
    """-> dx (N, C), dweight, dbias (C,) float32; dresidual (N, C) is added to dx when given.
    With dropout_args (the forward's), also writes dbranch (N, C) = dropout(dx). rms: RMSNorm
    (mean None; dbias None, and dweight None without a weight)."""
    N, C = x.shape
    dx = torch.empty_like(x)
    rows_per_program = triton.cdiv(max(N, 1), _bwd_programs(N, x.device))
    P = triton.cdiv(N, rows_per_program)
    partial = torch.empty(2, P, C, dtype=torch.float32, device=x.device)
    dweight = None if weight is None else torch.empty(C, dtype=torch.float32, device=x.device)
    dbias = None if rms else torch.empty(C, dtype=torch.float32, device=x.device)
    BLOCK_C = triton.next_power_of_2(C)
    if P > 0:
        layernorm_bwd_kernel[(P,)](
            dy, x, weight if weight is not None else x, mean if mean is not None else rstd, rstd,
            dresidual if dresidual is not None else dy, dx,
            dbranch if dbranch is not None else dx, partial[0], partial[1], N, C, rows_per_program,
            *(dropout_args or NO_DROPOUT), HAS_DRESIDUAL=dresidual is not None, HAS_WEIGHT=weight is not None,
            DROPOUT=dropout_args is not None, RMS=rms, BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_C))
    if dweight is not None:
        BLOCK_R = 64
        layernorm_bwd_reduce_kernel[(triton.cdiv(C, BLOCK_R),)](
            partial[0], partial[1], dweight, dbias if dbias is not None else dweight, P, C, HAS_DB=not rms,
            BLOCK_P=32, BLOCK_C=BLOCK_R)
    return dx, dweight, dbias
