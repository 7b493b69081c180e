"""The op layer: one entry point per hot op, each calling a backend's plain functions.

Every function takes `backend`, a module from nanolm/backends/ (see torch_ref.py for the
contract), so the model and optimizer choose implementations once and never branch on them.
The autograd Functions here save what the backward needs and reshape; the math lives in the
backends. They are wrapped with torch.amp.custom_fwd/custom_bwd (for the device their inputs
are on, CPU or CUDA) so the backward runs under the same autocast state as the forward.
"""
import functools
import math
from typing import NamedTuple

import torch


def _device_type(args):
    return next(a.device.type for a in args if isinstance(a, torch.Tensor))


def _amp_fwd(forward):
    """torch.amp.custom_fwd for the device type of the first tensor argument (custom_fwd itself
    takes one device type, fixed when decorating)."""
    by_device = {d: torch.amp.custom_fwd(forward, device_type=d) for d in ("cpu", "cuda")}

    @functools.wraps(forward)
    def wrapper(ctx, *args):
        ctx.amp_device = _device_type(args)
        return by_device[ctx.amp_device](ctx, *args)
    return wrapper


def _amp_bwd(backward):
    """torch.amp.custom_bwd for the device type the forward recorded."""
    by_device = {d: torch.amp.custom_bwd(backward, device_type=d) for d in ("cpu", "cuda")}

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        return by_device[ctx.amp_device](ctx, *grads)
    return wrapper


# ----------------------------------------------------------------------------- dropout

class Dropout(NamedTuple):
    """Drop with probability p, the mask a function of (seed, offset, element index): the
    specification is the dropout section of nanolm/backends/torch_ref.py."""
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


def _check_dropout(backend, op, dropout):
    if dropout is not None and not backend.SUPPORT[op].dropout:
        raise ValueError(f"{op}: backend {backend.__name__.rsplit('.', 1)[-1]} has no dropout for {op} "
                         f"(its SUPPORT table says dropout=False)")


# ----------------------------------------------------------------------------- layernorm

class LayerNorm(torch.autograd.Function):
    @staticmethod
    @_amp_fwd
    def forward(ctx, x, weight, bias, eps, backend):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        y, mean, rstd = backend.layer_norm_fwd(x2d, weight, bias, eps)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.backend, ctx.has_bias = backend, bias is not None
        return y.view(x.shape)

    @staticmethod
    @_amp_bwd
    def backward(ctx, dy):
        x2d, weight, mean, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape).contiguous()
        dx, dweight, dbias = ctx.backend.layer_norm_bwd(dy2d, x2d, weight, mean, rstd, None)
        dbias = dbias.to(weight.dtype) if ctx.has_bias else None
        return dx.view(dy.shape), dweight.to(weight.dtype), dbias, None, None


class AddLayerNorm(torch.autograd.Function):
    """residual_out = dropout(x) + residual; y = layer_norm(residual_out): one read of the
    stream. The backward applies the same mask to the branch's gradient, in the same pass."""

    @staticmethod
    @_amp_fwd
    def forward(ctx, x, residual, weight, bias, eps, backend, dropout=None):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        r2d = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
        if dropout is None:  # the call without dropout, unchanged
            y, residual_out, mean, rstd = backend.add_layer_norm_fwd(x2d, r2d, weight, bias, eps)
        else:
            y, residual_out, mean, rstd = backend.add_layer_norm_fwd(x2d, r2d, weight, bias, eps, dropout)
        ctx.save_for_backward(residual_out, weight, mean, rstd)
        ctx.backend, ctx.has_bias, ctx.dropout = backend, bias is not None, dropout
        ctx.has_residual = residual is not None
        return y.view(shape), residual_out.view(shape)

    @staticmethod
    @_amp_bwd
    def backward(ctx, dy, dresidual_out):
        residual_out, weight, mean, rstd = ctx.saved_tensors
        dy2d = dy.reshape(residual_out.shape).contiguous()
        dres2d = None if dresidual_out is None else dresidual_out.reshape(residual_out.shape).contiguous()
        if ctx.dropout is None:
            dx, dweight, dbias = ctx.backend.layer_norm_bwd(dy2d, residual_out, weight, mean, rstd, dres2d)
            dx = dx.view(dy.shape)
            dbranch = dx
        else:
            dbranch = torch.empty_like(residual_out)
            dx, dweight, dbias = ctx.backend.layer_norm_bwd(dy2d, residual_out, weight, mean, rstd, dres2d,
                                                            ctx.dropout, dbranch)
            dx, dbranch = dx.view(dy.shape), dbranch.view(dy.shape)
        dbias = dbias.to(weight.dtype) if ctx.has_bias else None
        return dbranch, dx if ctx.has_residual else None, dweight.to(weight.dtype), dbias, None, None, None


def layer_norm(x, weight, bias, eps, backend):
    return LayerNorm.apply(x, weight, bias, eps, backend)


def add_layer_norm(x, residual, weight, bias, eps, backend, dropout=None):
    """Returns (layer_norm(dropout(x) + residual), dropout(x) + residual). residual may be None
    when dropout is given (dropout of the embedding sum, fused with the first LayerNorm)."""
    if residual is None and dropout is None:
        raise ValueError("add_layer_norm: residual may be None only with dropout")
    _check_dropout(backend, "layernorm", dropout)
    if residual is not None and x.dtype != residual.dtype:
        x, residual = x.to(residual.dtype), residual
    return AddLayerNorm.apply(x, residual, weight, bias, eps, backend, dropout)


# ----------------------------------------------------------------------------- attention

class CausalAttention(torch.autograd.Function):
    """Takes the fused qkv projection (B, T, 3*C) and returns (B, T, C): q, k and v are
    strided views into it, and the backward writes dq, dk, dv straight into one dqkv buffer,
    so no transposes or copies surround the kernel."""

    @staticmethod
    @_amp_fwd
    def forward(ctx, qkv, n_head, backend, dropout=None):
        B, T, C3 = qkv.shape
        hs = C3 // (3 * n_head)
        q, k, v = qkv.view(B, T, 3, n_head, hs).unbind(2)  # each (B, T, nh, hs)
        scale = 1.0 / math.sqrt(hs)
        extra = () if dropout is None else (dropout,)  # without dropout, the call unchanged
        o, lse = backend.attention_fwd(q, k, v, scale, *extra)
        ctx.save_for_backward(qkv, o, lse)
        ctx.backend, ctx.n_head, ctx.scale, ctx.extra = backend, n_head, scale, extra
        return o.view(B, T, C3 // 3)

    @staticmethod
    @_amp_bwd
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        B, T, C3 = qkv.shape
        shape = (B, T, 3, ctx.n_head, C3 // (3 * ctx.n_head))
        q, k, v = qkv.view(shape).unbind(2)
        dqkv = torch.empty(shape, dtype=qkv.dtype, device=qkv.device)
        dq, dk, dv = dqkv.unbind(2)
        ctx.backend.attention_bwd(do.reshape(o.shape).contiguous(), q, k, v, o, lse, ctx.scale, dq, dk, dv,
                                  *ctx.extra)
        return dqkv.view(B, T, C3), None, None, None


def causal_attention(qkv, n_head, backend, dropout=None):
    """qkv (B, T, 3*C) laid out [q | k | v], heads contiguous inside each -> (B, T, C), with
    dropout (None or a Dropout) on the attention probabilities."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * n_head) != 0:
        raise ValueError(f"causal_attention: qkv must be (B, T, 3*C) with C divisible by n_head={n_head}, "
                         f"got {tuple(qkv.shape)}")
    _check_dropout(backend, "attention", dropout)
    return CausalAttention.apply(qkv.contiguous(), n_head, backend, dropout)


# ----------------------------------------------------------------------------- cross-entropy

def _check_targets(targets, n_rows, vocab_size, ignore_index, op):
    if targets.dtype != torch.int64:
        raise ValueError(f"{op}: targets must be int64, got {targets.dtype}")
    if targets.shape != (n_rows,):
        raise ValueError(f"{op}: targets have shape {tuple(targets.shape)}, expected ({n_rows},)")
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab_size))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
    if n_bad:
        bad_value = targets[bad][0].item()
        raise ValueError(f"{op}: {n_bad} target(s) outside [0, {vocab_size}) and not ignore_index="
                         f"{ignore_index}, e.g. {bad_value}")
    return n_valid


def _scale_grad(grad, grad_output):
    """Gradients were computed for an upstream gradient of 1; rescale only if it is not."""
    return grad if bool(grad_output == 1) else grad * grad_output.to(grad.dtype)


class CrossEntropy(torch.autograd.Function):
    """Returns (loss, dlogits). With inplace, dlogits is the logits tensor itself, overwritten:
    it is marked dirty (its version counter bumped) so that autograd raises, as for any torch
    in-place op, if an earlier op saved those logits for its backward; the backends write
    through raw pointers, which autograd cannot see."""

    @staticmethod
    @_amp_fwd
    def forward(ctx, logits, targets, vocab_size, ignore_index, z_loss, inplace, backend):
        n_valid = _check_targets(targets, logits.shape[0], vocab_size, ignore_index, "cross_entropy")
        scale = 1.0 / max(n_valid, 1)  # mean over valid tokens; all ignored -> loss 0, grad 0
        losses, dlogits = backend.cross_entropy_fwd(logits.contiguous(), targets, vocab_size,
                                                    ignore_index, z_loss, scale, inplace)
        if dlogits is logits:
            ctx.mark_dirty(logits)
        ctx.mark_non_differentiable(dlogits)
        ctx.save_for_backward(dlogits)
        return losses.sum() * scale, dlogits

    @staticmethod
    @_amp_bwd
    def backward(ctx, grad_output, _):
        (dlogits,) = ctx.saved_tensors
        return _scale_grad(dlogits, grad_output), None, None, None, None, None, None


def cross_entropy(logits, targets, backend, vocab_size=None, ignore_index=-100, z_loss=0.0, inplace=False):
    """Mean cross-entropy over logits (N, Vp) whose first vocab_size columns are real.
    The gradient is computed in the forward (in place over logits if inplace=True)."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    loss, _ = CrossEntropy.apply(logits, targets, vocab_size, ignore_index, z_loss, inplace, backend)
    return loss


MIN_CHUNK_ROWS = 512


def default_chunk_rows(n_rows, hidden, vocab):
    """Rows per chunk so one chunk of logits holds about 8x as many values as the hidden states
    h (N, C): for GPT-2 (C=768, V=50304) and N=8k that is 1024 rows, 100 MB of bf16 logits
    instead of 824 MB for all rows. A power of two, at least MIN_CHUNK_ROWS: thinner chunks make
    the three matmuls skinny and add one read + write of the (V, C) fp32 dW accumulator per
    chunk. Measured on 2 CPU cores (fp32, forward + backward): N=512, C=256, V=8192 takes 69 ms
    in 128-row chunks and 56 ms in one 512-row chunk; N=1024, C=768, V=50304 takes 2.27 s in
    128-row chunks and 1.86 s in 512-row ones. So a batch this small is not chunked."""
    target = max(1, 8 * n_rows * hidden // vocab)
    return max(MIN_CHUNK_ROWS, 1 << (target - 1).bit_length())


def _accumulate_dweight(dweight, dlogits, h_chunk, first):
    """dweight (V, C) += dlogits^T @ h_chunk in dweight's precision (fp32, or fp64 in tests);
    the first chunk overwrites it (beta=0 ignores its uninitialised contents), which saves
    zero-filling V*C values. bf16/fp16 chunks go through one (V, C) temporary of their own dtype."""
    if dlogits.dtype == dweight.dtype:
        dweight.addmm_(dlogits.t(), h_chunk, beta=0.0 if first else 1.0)
    elif first:
        dweight.copy_(dlogits.t() @ h_chunk)
    else:
        dweight += (dlogits.t() @ h_chunk).to(dweight.dtype)


def _lm_head_buffers(h, weight, chunk_rows, need_grad):
    """What both chunked lm_head losses start from: h and weight in the autocast compute dtype
    (of h's device), dh and dW (fp32, or fp64 in tests; dW is written by the first chunk, so
    zeroed here only when there is none, N = 0), the loss accumulator, the chunk size, and the
    one logits buffer every chunk reuses."""
    N, C = h.shape
    device = h.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    h_c, w_c = h.to(compute_dtype), weight.to(compute_dtype)
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    dh, dweight = None, None
    if need_grad:
        dh = torch.empty_like(h_c)
        dweight = (torch.empty if N else torch.zeros)(weight.shape, dtype=acc, device=h.device)
    total = torch.zeros((), dtype=acc, device=h.device)
    chunk_rows = min(chunk_rows or default_chunk_rows(N, C, weight.shape[0]), max(N, 1))
    logits_buf = torch.empty(chunk_rows, weight.shape[0], dtype=compute_dtype, device=h.device)
    return h_c, w_c, dh, dweight, total, chunk_rows, logits_buf


def _chunk_grads(dlogits, w_c, h_chunk, dh, dweight, start):
    """One chunk's share of the gradients: its rows of dh = dlogits @ W, and dW += dlogits^T @ h."""
    torch.matmul(dlogits, w_c, out=dh[start:start + h_chunk.shape[0]])
    _accumulate_dweight(dweight, dlogits, h_chunk, first=start == 0)


def _save_lm_head_grads(ctx, dh, dweight, h, weight):
    ctx.save_for_backward(dh, dweight)
    ctx.dtypes = (h.dtype, weight.dtype)


def _lm_head_grads(ctx, grad_output):
    """The backward of both chunked lm_head losses: the forward's dh and dW, scaled."""
    dh, dweight = ctx.saved_tensors
    return _scale_grad(dh, grad_output).to(ctx.dtypes[0]), _scale_grad(dweight, grad_output).to(ctx.dtypes[1])


class LinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(h @ W^T, targets) without materialising the (N, V) logits: rows are
    processed in chunks whose logits are computed into one reused buffer, turned into dlogits by
    the backend kernel in place, and immediately contracted into dh and dW (fp32). Peak extra
    memory: one chunk of logits + dh + dW. The backward only rescales them. With need_grad
    False (evaluation) only the losses are computed."""

    @staticmethod
    @_amp_fwd
    def forward(ctx, h, weight, targets, vocab_size, ignore_index, z_loss, chunk_rows, need_grad, backend):
        N = h.shape[0]
        n_valid = _check_targets(targets, N, vocab_size, ignore_index, "linear_cross_entropy")
        scale = 1.0 / max(n_valid, 1)
        h_c, w_c, dh, dweight, total, chunk_rows, logits_buf = _lm_head_buffers(h, weight, chunk_rows, need_grad)
        for start in range(0, N, chunk_rows):
            end = min(start + chunk_rows, N)
            h_chunk, logits = h_c[start:end], logits_buf[: end - start]
            torch.matmul(h_chunk, w_c.t(), out=logits)  # (rows, Vp): the only logits ever alive
            losses, dlogits = backend.cross_entropy_fwd(logits, targets[start:end], vocab_size,
                                                        ignore_index, z_loss, scale, True)
            total += losses.sum()
            if need_grad:
                _chunk_grads(dlogits, w_c, h_chunk, dh, dweight, start)
        _save_lm_head_grads(ctx, dh, dweight, h, weight)
        return total * scale

    @staticmethod
    @_amp_bwd
    def backward(ctx, grad_output):
        return *_lm_head_grads(ctx, grad_output), None, None, None, None, None, None, None


def linear_cross_entropy(h, weight, targets, backend, vocab_size=None, ignore_index=-100,
                         z_loss=0.0, chunk_rows=None):
    """Mean cross-entropy of h (N, C) @ weight (Vp, C)^T against targets (N,), in chunks of
    chunk_rows rows (default: default_chunk_rows). Under torch.no_grad only the loss is computed."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} and weight {tuple(weight.shape)} "
                         "must be (N, C) and (V, C)")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(h, weight, targets, vocab_size, ignore_index, z_loss, chunk_rows,
                                    need_grad, backend)


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """LinearCrossEntropy with the vocabulary split over the ranks of `comm`: weight holds this
    rank's rows, vocab ids [vocab_start, vocab_start + rows), the first local_vocab real.
    Per chunk of rows, the backend's partial statistics of the local logits, per row
        m_r = max_j x_j,  s_r = sum_j exp(x_j - m_r),  x_t if this rank holds the target else 0,
    are all-gathered (3 floats per row and rank) and combined alike on every rank:
        M = max_r m_r,  lse = M + log sum_r s_r exp(m_r - M),  x_t = sum_r (x_t)_r,
        loss = lse - x_t + z_loss * lse^2;
    then the backend turns the local logits into their gradient with that lse. dh is this rank's
    part, dlogits_r @ W_r (the caller's copy_to_group sums it over the ranks in the backward);
    dW is local. The full (N, V) logits never exist anywhere."""

    @staticmethod
    @_amp_fwd
    def forward(ctx, h, weight, targets, comm, vocab_start, local_vocab, vocab_size, ignore_index, z_loss,
                chunk_rows, need_grad, backend):
        N = h.shape[0]
        n_valid = _check_targets(targets, N, vocab_size, ignore_index, "vocab_parallel_linear_cross_entropy")
        scale = 1.0 / max(n_valid, 1)
        h_c, w_c, dh, dweight, total, chunk_rows, logits_buf = _lm_head_buffers(h, weight, chunk_rows, need_grad)
        ranks = comm.env.world_size
        for start in range(0, N, chunk_rows):
            end = min(start + chunk_rows, N)
            h_chunk, logits, t = h_c[start:end], logits_buf[: end - start], targets[start:end]
            torch.matmul(h_chunk, w_c.t(), out=logits)
            stats = backend.cross_entropy_stats(logits, t, vocab_start, local_vocab)  # (rows, 3) fp32
            every = torch.empty((ranks, *stats.shape), dtype=stats.dtype, device=stats.device)
            comm.wait(comm.all_gather(every.view(-1), stats.view(-1)))
            m = every[..., 0].max(dim=0).values
            lse = m + (every[..., 1] * torch.exp(every[..., 0] - m)).sum(dim=0).log()
            losses = lse - every[..., 2].sum(dim=0) + z_loss * lse.square()
            total += torch.where(t != ignore_index, losses, 0.0).sum()
            if need_grad:
                dlogits = backend.cross_entropy_grad(logits, t, lse, vocab_start, local_vocab, ignore_index,
                                                     z_loss, scale)
                _chunk_grads(dlogits, w_c, h_chunk, dh, dweight, start)
        _save_lm_head_grads(ctx, dh, dweight, h, weight)
        return total * scale

    @staticmethod
    @_amp_bwd
    def backward(ctx, grad_output):
        return *_lm_head_grads(ctx, grad_output), None, None, None, None, None, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(h, weight, targets, comm, backend, vocab_start, local_vocab,
                                        vocab_size, ignore_index=-100, z_loss=0.0, chunk_rows=None):
    """Mean cross-entropy of h (N, C) against targets (N,) over a vocabulary of vocab_size ids
    whose rows are split over comm's ranks: weight (rows, C) holds ids [vocab_start,
    vocab_start + rows) here, of which the first local_vocab are real (0 <= local_vocab <= rows).
    Every rank of comm calls it with the same h and targets and gets the same loss."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"vocab_parallel_linear_cross_entropy: h {tuple(h.shape)} and weight "
                         f"{tuple(weight.shape)} must be (N, C) and (rows, C)")
    if not 0 <= local_vocab <= weight.shape[0]:
        raise ValueError(f"vocab_parallel_linear_cross_entropy: local_vocab={local_vocab} outside "
                         f"[0, {weight.shape[0]}] (weight rows)")
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return VocabParallelLinearCrossEntropy.apply(h, weight, targets, comm, vocab_start, local_vocab, vocab_size,
                                                 ignore_index, z_loss, chunk_rows, need_grad, backend)


# ----------------------------------------------------------------------------- adamw

def adamw_step(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
               decay_numel, grad_scale, backend):
    """One AdamW update over flat float32 buffers, in place (see torch_ref.adamw_step)."""
    backend.adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                       decay_numel, grad_scale)


def grad_norm(grad, backend):
    """L2 norm of a flat gradient buffer, by a deterministic reduction. The backends sum the
    squares in fp32, which overflows to inf once the norm passes ~1.8e19 although every gradient
    is finite; then the sum is taken again over grad / max|grad| (<= 1, so it cannot overflow)
    and scaled back in fp64. That costs a copy and two more passes, only in this rare case."""
    sumsq = backend.sum_of_squares(grad)
    if not torch.isinf(sumsq):
        return sumsq.sqrt()
    return scaled_norm(grad.abs().max(), lambda scale: backend.sum_of_squares(grad / scale))


def scaled_norm(scale, sum_of_squares):
    """scale * sqrt(sum_of_squares(scale)) in fp64, where sum_of_squares(scale) sums the squares
    of the gradients divided by scale (>= their max |value|); inf if scale is (a gradient is)."""
    if not torch.isfinite(scale):
        return scale.double().abs()
    return sum_of_squares(scale).double().sqrt() * scale.double()
