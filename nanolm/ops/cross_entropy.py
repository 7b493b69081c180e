"""Cross-entropy over the vocabulary, with its gradient computed in the same pass; the lm_head
matmul fused around it in row chunks (the (N, V) logits never exist at once); and its
vocabulary-parallel form (tensor parallel: each rank holds a shard of the vocabulary).

Per row with target t: lse = logsumexp(x[:V]); loss = lse - x[t] + z_loss * lse^2;
dlogits = grad_scale * (softmax(x) * (1 + 2 z_loss lse) - onehot(t)); padding columns and rows
whose target is ignore_index get zero loss and zero gradient.

This module reads top to bottom: the specification in plain PyTorch, the input checks, the
registration with PyTorch with the entry points the model calls, then each backend's support
row and launchers. Kernels: kernels/cross_entropy.py (Triton), csrc/cross_entropy.cu (CUDA),
csrc/cross_entropy_cpu.cpp (CPU).
"""
from functools import partial
from typing import Callable, NamedTuple

import torch

from nanolm.kernels import cross_entropy as triton_cross_entropy
from nanolm.ops import groups, library
from nanolm.ops.launch import CPU, CUDA, CUDA_SIM
from nanolm.ops.support import FLOATS, Support, accumulation_dtype, check_first, check_tensor

# ----------------------------------------------------------------------------- specification
# logits (N, Vp) contiguous, columns >= vocab_size are padding; targets (N,) int64; losses (N,)
# float32. dlogits is a new tensor, or logits itself, overwritten, with inplace.

def cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    """-> (losses, dlogits)"""
    acc = accumulation_dtype(logits.dtype)
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


# Vocab-parallel: logits (N, Vp) hold the columns of vocab ids [vocab_start, vocab_start + Vp),
# the first vocab_size (0 allowed) real. cross_entropy_stats gives, per row, the shard's partial
# softmax statistics (N, 3) float32: m = max_j x_j, s = sum_j exp(x_j - m), and x_t if the target
# t lies in the shard, else 0 (m = -inf and s = 0 for a shard of padding only); the ranks combine
# them into the global lse (N,) float32, and cross_entropy_grad writes the shard's dlogits in
# place over logits:  grad_scale * (exp(x_j - lse) * (1 + 2 z_loss lse) - [j == t - vocab_start]).
# lse is fp32: near |lse| ~ 1e4 it rounds by ~1e-3 (cross_entropy_fwd keeps m and log s apart
# for that case); training logits stay far below.

def _in_shard(targets, vocab_start, vocab_size):
    local = targets - vocab_start
    return local, (local >= 0) & (local < vocab_size)


def cross_entropy_stats(logits, targets, vocab_start, vocab_size):
    acc = accumulation_dtype(logits.dtype)
    x = logits[:, :vocab_size].to(acc)
    no_logit = torch.full((x.shape[0], 1), float("-inf"), dtype=acc, device=x.device)
    m = torch.cat([x, no_logit], dim=1).max(dim=1).values  # -inf when the shard has no real column
    s = torch.exp(x - m[:, None]).sum(dim=1)
    local, mine = _in_shard(targets, vocab_start, vocab_size)
    target_logit = x.gather(1, torch.where(mine, local, 0)[:, None]).squeeze(1) if vocab_size else m
    return torch.stack([m, s, torch.where(mine, target_logit, 0.0)], dim=1)


def cross_entropy_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index, z_loss, grad_scale):
    acc = accumulation_dtype(logits.dtype)
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


# ----------------------------------------------------------------------------- checks

def check_fwd(op, support, logits, targets, vocab_size):
    """logits (N, Vp) contiguous with 1 <= vocab_size <= Vp, targets (N,) int64 on its device."""
    check_first(op, support, "logits", logits, ndim=2)
    check_tensor(op, "targets", targets, dtypes=(torch.int64,), device=logits.device, shape=(logits.shape[0],))
    if not 1 <= vocab_size <= logits.shape[1]:
        raise ValueError(f"{op}: vocab_size={vocab_size} outside [1, {logits.shape[1]}] (logits columns)")


def check_shard(op, support, logits, targets, vocab_size, lse=None):
    """The vocab-parallel pair: as check_fwd, but a shard may hold no real column
    (0 <= vocab_size <= Vp); lse (N,) float32 when given."""
    check_first(op, support, "logits", logits, ndim=2)
    check_tensor(op, "targets", targets, dtypes=(torch.int64,), device=logits.device, shape=(logits.shape[0],))
    if not 0 <= vocab_size <= logits.shape[1]:
        raise ValueError(f"{op}: vocab_size={vocab_size} outside [0, {logits.shape[1]}] (logits columns)")
    if lse is not None:
        check_tensor(op, "lse", lse, dtypes=(torch.float32,), device=logits.device, shape=(logits.shape[0],))


def check_targets(op, targets, n_rows, vocab_size, ignore_index):
    """Every target in [0, vocab_size) or ignore_index; returns how many are not ignored."""
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


def _check_lm_head(op, h, weight):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: h {tuple(h.shape)} and weight {tuple(weight.shape)} must be (N, C) and (V, C)")


# ----------------------------------------------------------------------------- registration
# Each op returns the mean loss over the rows whose target is not ignore_index (0 if none is)
# and the gradients, computed in the forward: the backward only scales them by the upstream
# gradient. The lm_head losses compute in compute_dtype (the autocast dtype of the caller's
# device, read where the op is called: the op runs wherever the compiled graph puts it).

def _scaled(grad, grad_output):
    """Gradients were computed for an upstream gradient of 1; rescale unless it is (a test of
    the value that only eager can make: a traced graph always multiplies)."""
    if not library.tracing(grad_output) and bool(grad_output == 1):
        return grad
    return grad * grad_output.to(grad.dtype)


def _setup_cross_entropy(ctx, inputs, output):
    _, dlogits = output
    ctx.mark_non_differentiable(dlogits)
    ctx.save_for_backward(dlogits)


def _cross_entropy_backward(ctx, grad_output, _):
    (dlogits,) = ctx.saved_tensors
    return _scaled(dlogits, grad_output), None, None, None, None, None


@library.op("cross_entropy", fake=lambda logits, *_: (logits.new_empty((), dtype=torch.float32),
                                                      torch.empty_like(logits)),
            setup_context=_setup_cross_entropy, backward=_cross_entropy_backward)
def cross_entropy_op(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int,
                     z_loss: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss, dlogits)"""
    n_valid = check_targets("cross_entropy", targets, logits.shape[0], vocab_size, ignore_index)
    scale = 1.0 / max(n_valid, 1)
    losses, dlogits = BACKENDS[backend].cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss,
                                                          scale, False)
    return losses.sum() * scale, dlogits


def cross_entropy(logits, targets, backend, vocab_size=None, ignore_index=-100, z_loss=0.0):
    """Mean cross-entropy over logits (N, Vp) whose first vocab_size columns are real, by
    backend (a name). The gradient is computed in the forward."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    loss, _ = cross_entropy_op(logits.contiguous(), targets, vocab_size, ignore_index, z_loss, backend)
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


def _lm_head_loss(op, h, weight, targets, vocab_size, ignore_index, chunk_rows, need_grad, compute_dtype,
                  chunk_losses):
    """What both lm_head losses do: rows in chunks whose logits h_chunk @ W^T (compute_dtype) go
    into one reused buffer, which chunk_losses(logits, targets, grad_scale) -> (losses, dlogits)
    turns into the chunk's losses and, with need_grad, its dlogits (in place), contracted at once
    into dh (compute_dtype) and dW (fp32, or fp64 in tests). Peak extra memory: one chunk of
    logits + dh + dW. Returns (mean loss, dh, dW); without need_grad dh, dW are empty."""
    N, C = h.shape
    scale = 1.0 / max(check_targets(op, targets, N, vocab_size, ignore_index), 1)
    h_c, w_c = h.to(compute_dtype), weight.to(compute_dtype)
    acc = accumulation_dtype(compute_dtype)
    dh, dweight = h_c.new_empty(0), h_c.new_empty(0, dtype=acc)
    if need_grad:  # dW is written by the first chunk, so zeroed only when there is none (N = 0)
        dh = torch.empty_like(h_c)
        dweight = (torch.empty if N else torch.zeros)(weight.shape, dtype=acc, device=h.device)
    total = torch.zeros((), dtype=acc, device=h.device)
    chunk_rows = min(chunk_rows or default_chunk_rows(N, C, weight.shape[0]), max(N, 1))
    logits_buf = torch.empty(chunk_rows, weight.shape[0], dtype=compute_dtype, device=h.device)
    for start in range(0, N, chunk_rows):
        end = min(start + chunk_rows, N)
        h_chunk, logits = h_c[start:end], logits_buf[: end - start]
        torch.matmul(h_chunk, w_c.t(), out=logits)  # (rows, Vp): the only logits ever alive
        losses, dlogits = chunk_losses(logits, targets[start:end], scale)
        total += losses.sum()
        if need_grad:
            torch.matmul(dlogits, w_c, out=dh[start:end])
            _accumulate_dweight(dweight, dlogits, h_chunk, first=start == 0)
    return total * scale, dh, dweight


def _lm_head_fake(h, weight, *arguments):
    """Both lm_head ops' arguments end with (need_grad, compute_dtype, backend)."""
    need_grad, compute_dtype, _ = arguments[-3:]
    acc = accumulation_dtype(compute_dtype)
    loss = h.new_empty((), dtype=acc)
    if not need_grad:
        return loss, h.new_empty(0, dtype=compute_dtype), h.new_empty(0, dtype=acc)
    return loss, h.new_empty(h.shape, dtype=compute_dtype), weight.new_empty(weight.shape, dtype=acc)


def _setup_lm_head(ctx, inputs, output):
    h, weight = inputs[:2]
    _, dh, dweight = output
    ctx.mark_non_differentiable(dh, dweight)
    ctx.save_for_backward(dh, dweight)
    ctx.dtypes = h.dtype, weight.dtype


def _lm_head_grads(ctx, grad_output):
    """The forward's dh and dW, scaled, in the dtypes of h and weight."""
    dh, dweight = ctx.saved_tensors
    return _scaled(dh, grad_output).to(ctx.dtypes[0]), _scaled(dweight, grad_output).to(ctx.dtypes[1])


def _linear_cross_entropy_backward(ctx, grad_output, _dh, _dweight):
    return *_lm_head_grads(ctx, grad_output), *(None,) * 8


def _vocab_parallel_backward(ctx, grad_output, _dh, _dweight):
    return *_lm_head_grads(ctx, grad_output), *(None,) * 11


@library.op("linear_cross_entropy", fake=_lm_head_fake, setup_context=_setup_lm_head,
            backward=_linear_cross_entropy_backward)
def linear_cross_entropy_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                            ignore_index: int, z_loss: float, chunk_rows: int, need_grad: bool,
                            compute_dtype: torch.dtype, backend: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, dh, dweight)"""
    def chunk_losses(logits, targets, grad_scale):
        return BACKENDS[backend].cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale,
                                                   True)
    return _lm_head_loss("linear_cross_entropy", h, weight, targets, vocab_size, ignore_index, chunk_rows,
                         need_grad, compute_dtype, chunk_losses)


@library.op("vocab_parallel_linear_cross_entropy", fake=_lm_head_fake, setup_context=_setup_lm_head,
            backward=_vocab_parallel_backward)
def vocab_parallel_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group: str, vocab_start: int,
                      local_vocab: int, vocab_size: int, ignore_index: int, z_loss: float, chunk_rows: int,
                      need_grad: bool, compute_dtype: torch.dtype, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear cross-entropy with the vocabulary split over the ranks of `group`: weight holds
    this rank's rows, vocab ids [vocab_start, vocab_start + rows), the first local_vocab real.
    Per chunk of rows, the backend's partial statistics of the local logits are all-gathered
    (3 floats per row and rank) and combined alike on every rank:
        M = max_r m_r,  lse = M + log sum_r s_r exp(m_r - M),  x_t = sum_r (x_t)_r,
        loss = lse - x_t + z_loss * lse^2;
    then the backend turns the local logits into their gradient with that lse. dh is this rank's
    part, dlogits_r @ W_r (the caller's copy_to_group sums it over the ranks in the backward);
    dW is local. The full (N, V) logits never exist anywhere."""
    comm, impl = groups.communicator(group), BACKENDS[backend]

    def chunk_losses(logits, targets, grad_scale):
        stats = impl.cross_entropy_stats(logits, targets, vocab_start, local_vocab)  # (rows, 3) fp32
        every = torch.empty((comm.env.world_size, *stats.shape), dtype=stats.dtype, device=stats.device)
        comm.wait(comm.all_gather(every.view(-1), stats.view(-1)))
        m = every[..., 0].max(dim=0).values
        lse = m + (every[..., 1] * torch.exp(every[..., 0] - m)).sum(dim=0).log()
        losses = torch.where(targets != ignore_index, lse - every[..., 2].sum(dim=0) + z_loss * lse.square(), 0.0)
        dlogits = None
        if need_grad:
            dlogits = impl.cross_entropy_grad(logits, targets, lse, vocab_start, local_vocab, ignore_index, z_loss,
                                              grad_scale)
        return losses, dlogits
    return _lm_head_loss("vocab_parallel_linear_cross_entropy", h, weight, targets, vocab_size, ignore_index,
                         chunk_rows, need_grad, compute_dtype, chunk_losses)


def _compute_dtype(h):
    """The dtype the lm_head matmuls run in: the autocast dtype of h's device, if enabled."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def linear_cross_entropy(h, weight, targets, backend, vocab_size=None, ignore_index=-100, z_loss=0.0,
                         chunk_rows=None):
    """Mean cross-entropy of h (N, C) @ weight (Vp, C)^T against targets (N,), in chunks of
    chunk_rows rows (default: default_chunk_rows), by backend (a name). Under torch.no_grad only
    the loss is computed."""
    _check_lm_head("linear_cross_entropy", h, weight)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, _, _ = linear_cross_entropy_op(h, weight, targets, vocab_size, ignore_index, z_loss, chunk_rows or 0,
                                         need_grad, _compute_dtype(h), backend)
    return loss


def vocab_parallel_linear_cross_entropy(h, weight, targets, group, backend, vocab_start, local_vocab, vocab_size,
                                        ignore_index=-100, z_loss=0.0, chunk_rows=None):
    """Mean cross-entropy of h (N, C) against targets (N,) over a vocabulary of vocab_size ids
    whose rows are split over the ranks of `group` (a communicator's name, nanolm/ops/groups.py):
    weight (rows, C) holds ids [vocab_start, vocab_start + rows) here, of which the first
    local_vocab are real (0 <= local_vocab <= rows). Every rank of the group calls it with the
    same h and targets and gets the same loss."""
    _check_lm_head("vocab_parallel_linear_cross_entropy", h, weight)
    if not 0 <= local_vocab <= weight.shape[0]:
        raise ValueError(f"vocab_parallel_linear_cross_entropy: local_vocab={local_vocab} outside "
                         f"[0, {weight.shape[0]}] (weight rows)")
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, _, _ = vocab_parallel_op(
        h, weight, targets, group, vocab_start, local_vocab, vocab_size, ignore_index, z_loss, chunk_rows or 0,
        need_grad, _compute_dtype(h), backend)
    return loss


# ----------------------------------------------------------------------------- backends
# Each backend implements the three functions of the specification, with its signatures.

class CrossEntropyBackend(NamedTuple):
    support: Support
    cross_entropy_fwd: Callable
    cross_entropy_stats: Callable
    cross_entropy_grad: Callable


# --- triton: kernels/cross_entropy.py
TRITON = Support(dtypes={"cpu": FLOATS, "cuda": FLOATS})


def _triton_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    check_fwd("cross_entropy", TRITON, logits, targets, vocab_size)
    return triton_cross_entropy.cross_entropy_fwd(logits, targets, vocab_size, ignore_index, z_loss, grad_scale,
                                                  inplace)


def _triton_stats(logits, targets, vocab_start, vocab_size):
    check_shard("cross_entropy_stats", TRITON, logits, targets, vocab_size)
    return triton_cross_entropy.cross_entropy_stats(logits, targets, vocab_start, vocab_size)


def _triton_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index, z_loss, grad_scale):
    check_shard("cross_entropy_grad", TRITON, logits, targets, vocab_size, lse)
    return triton_cross_entropy.cross_entropy_grad(logits, targets, lse, vocab_start, vocab_size, ignore_index,
                                                   z_loss, grad_scale)


# --- cpu, cuda, cuda_sim: csrc/cross_entropy_cpu.cpp, csrc/cross_entropy.cu (one launch code)
CPU_ROW = Support(dtypes={"cpu": FLOATS})
CUDA_ROW = Support(dtypes={"cuda": (torch.float32, torch.bfloat16)})


def _cxx_fwd(target, support, logits, targets, vocab_size, ignore_index, z_loss, grad_scale, inplace):
    check_fwd("cross_entropy", support, logits, targets, vocab_size)
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    dlogits = logits if inplace else torch.empty_like(logits)
    target.launch("cross_entropy_fwd", logits.device, logits.data_ptr(), targets.data_ptr(), losses.data_ptr(),
                  dlogits.data_ptr(), N, Vp, vocab_size, ignore_index, z_loss, grad_scale, target.dtype(logits))
    return losses, dlogits


def _cxx_stats(target, support, logits, targets, vocab_start, vocab_size):
    check_shard("cross_entropy_stats", support, logits, targets, vocab_size)
    N, Vp = logits.shape
    stats = torch.empty(N, 3, dtype=torch.float32, device=logits.device)
    target.launch("cross_entropy_stats", logits.device, logits.data_ptr(), targets.data_ptr(), stats.data_ptr(), N,
                  Vp, vocab_size, vocab_start, target.dtype(logits))
    return stats


def _cxx_grad(target, support, logits, targets, lse, vocab_start, vocab_size, ignore_index, z_loss, grad_scale):
    check_shard("cross_entropy_grad", support, logits, targets, vocab_size, lse)
    N, Vp = logits.shape
    target.launch("cross_entropy_grad", logits.device, logits.data_ptr(), targets.data_ptr(), lse.data_ptr(), N, Vp,
                  vocab_size, vocab_start, ignore_index, z_loss, grad_scale, target.dtype(logits))
    return logits


def _cxx_backend(target, support):
    return CrossEntropyBackend(support, *(partial(fn, target, support) for fn in (_cxx_fwd, _cxx_stats, _cxx_grad)))


BACKENDS = {
    "torch": CrossEntropyBackend(Support(dtypes={"cpu": FLOATS, "cuda": FLOATS}),
                                 cross_entropy_fwd, cross_entropy_stats, cross_entropy_grad),
    "triton": CrossEntropyBackend(TRITON, _triton_fwd, _triton_stats, _triton_grad),
    "cuda": _cxx_backend(CUDA, CUDA_ROW),
    "cpu": _cxx_backend(CPU, CPU_ROW),
    "cuda_sim": _cxx_backend(CUDA_SIM, CUDA_ROW.on_cpu()),
}
