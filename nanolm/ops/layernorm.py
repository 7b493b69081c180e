"""LayerNorm and RMSNorm, each with the residual add (with dropout on the branch) fused before it:
one read of the residual stream per sub-block.

    LayerNorm  y = (h - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)  (biased variance, as GPT-2)
    RMSNorm    y = h * rstd * w,  rstd = 1 / sqrt(mean(h^2) + eps)  (no mean, no bias; w may be
               None: parameter-free, as nanochat)
    h = x (layer_norm, rms_norm), or dropout(x) + residual (add_layer_norm, add_rms_norm; residual
    may be None with dropout: the embedding sum)

RMSNorm runs on the LayerNorm kernels with a compile-time flag (a Triton constexpr, a C++/CUDA
template parameter, as flash-attention's ops/triton/layer_norm.py does), so the LayerNorm
instantiations are the code they were.

This module reads top to bottom: the specification in plain PyTorch (the tests hold every
kernel to it), the input checks, the registration with PyTorch (torch.library ops, their fake
tensors and autograd) with the entry points the model calls, then each backend's support row
and launchers. Kernels: kernels/layernorm.py (Triton), csrc/layernorm.cu (CUDA),
csrc/layernorm_cpu.cpp (CPU).
"""
from functools import partial
from typing import Callable, NamedTuple

import torch

from nanolm.kernels import layernorm as triton_layernorm
from nanolm.ops import dropout as dropout_spec
from nanolm.ops import library
from nanolm.ops.launch import CPU, CUDA, CUDA_SIM, ptr
from nanolm.ops.support import FLOATS, Support, accumulation_dtype, check_dropout, check_first, check_tensor

# ----------------------------------------------------------------------------- specification
# x (N, C) contiguous; weight, bias (C,) (bias may be None); mean, rstd (N,) float32, saved for
# the backward. Computed in float32 (float64 for float64 inputs), y cast back to x's dtype.


def layer_norm_fwd(x, weight, bias, eps):
    """-> (y, mean, rstd)"""
    xf = x.to(accumulation_dtype(x.dtype))
    mean = xf.mean(dim=1)
    rstd = torch.rsqrt((xf - mean[:, None]).square().mean(dim=1) + eps)
    y = (xf - mean[:, None]) * rstd[:, None] * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), mean, rstd


def add_layer_norm_fwd(x, residual, weight, bias, eps, dropout):
    """-> (y, residual_out, mean, rstd): residual_out = dropout(x) + residual, y = layer_norm(residual_out).
    dropout: None or a Dropout (nanolm/ops/dropout.py); residual may be None with dropout."""
    if dropout is None:
        residual_out = x + residual
    else:
        h = dropout_spec.dropped(x.to(accumulation_dtype(x.dtype)), x.shape, dropout)
        residual_out = (h if residual is None else h + residual.to(h.dtype)).to(x.dtype)
    y, mean, rstd = layer_norm_fwd(residual_out, weight, bias, eps)
    return y, residual_out, mean, rstd


def layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, dbranch, dropout):
    """-> (dx, dweight, dbias); dresidual (N, C) or None is added to dx; with dropout (the
    forward's), also writes dbranch = dropout(dx), the gradient of the branch dropped before the add."""
    # With xhat = (x - mean) * rstd and wdy = w * dy:
    #   dx = rstd * (wdy - (xhat * c1 + c2)),  c1 = mean(xhat * wdy),  c2 = mean(wdy)
    acc = accumulation_dtype(x.dtype)
    xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    dyf = dy.to(acc)
    wdy = weight.to(acc) * dyf
    c1 = (xhat * wdy).mean(dim=1, keepdim=True)
    c2 = wdy.mean(dim=1, keepdim=True)
    dx = (wdy - (xhat * c1 + c2)) * rstd[:, None]
    if dresidual is not None:
        dx = dx + dresidual.to(acc)
    if dropout is not None:
        dbranch.copy_(dropout_spec.dropped(dx, dx.shape, dropout))
    return dx.to(x.dtype), (dyf * xhat).sum(dim=0), dyf.sum(dim=0)


def rms_norm_fwd(x, weight, eps):
    """-> (y, rstd); weight (C,) or None (parameter-free: y = h * rstd)."""
    xf = x.to(accumulation_dtype(x.dtype))
    rstd = torch.rsqrt(xf.square().mean(dim=1) + eps)
    y = xf * rstd[:, None]
    if weight is not None:
        y = y * weight
    return y.to(x.dtype), rstd


def add_rms_norm_fwd(x, residual, weight, eps, dropout):
    """-> (y, residual_out, rstd): residual_out as add_layer_norm_fwd's, y = rms_norm(residual_out)."""
    if dropout is None:
        residual_out = x + residual
    else:
        h = dropout_spec.dropped(x.to(accumulation_dtype(x.dtype)), x.shape, dropout)
        residual_out = (h if residual is None else h + residual.to(h.dtype)).to(x.dtype)
    y, rstd = rms_norm_fwd(residual_out, weight, eps)
    return y, residual_out, rstd


def rms_norm_bwd(dy, x, weight, rstd, dresidual, dbranch, dropout):
    """-> (dx, dweight), dweight None without a weight; dresidual, dbranch, dropout as layer_norm_bwd's."""
    # With xhat = x * rstd and wdy = w * dy (dy without a weight): the LayerNorm gradient without
    # the mean's term c2,  dx = rstd * (wdy - xhat * c1),  c1 = mean(xhat * wdy)
    acc = accumulation_dtype(x.dtype)
    xhat = x.to(acc) * rstd[:, None]
    dyf = dy.to(acc)
    wdy = dyf if weight is None else weight.to(acc) * dyf
    c1 = (xhat * wdy).mean(dim=1, keepdim=True)
    dx = (wdy - xhat * c1) * rstd[:, None]
    if dresidual is not None:
        dx = dx + dresidual.to(acc)
    if dropout is not None:
        dbranch.copy_(dropout_spec.dropped(dx, dx.shape, dropout))
    return dx.to(x.dtype), None if weight is None else (dyf * xhat).sum(dim=0)


# ----------------------------------------------------------------------------- checks

def _check(op, support, x, weight, *, rows=(), vectors=(), stats=()):
    """x (N, C); weight (C,) like x (None only for the RMSNorm ops); `rows` more (N, C) tensors
    like x (None allowed), `vectors` (C,) tensors like x (None allowed), `stats` (N,) float32
    tensors; all on x's device."""
    check_first(op, support, "x", x, ndim=2)
    N, C = x.shape
    if C < 1 or (support.max_row is not None and C > support.max_row):
        raise ValueError(f"{op}: row length C={C} outside the supported [1, {support.max_row}]")
    like_x = dict(dtypes=(x.dtype,), device=x.device)
    if weight is not None or "rms" not in op:
        check_tensor(op, "weight", weight, shape=(C,), **like_x)
    for name, t in rows:
        if t is not None:
            check_tensor(op, name, t, shape=(N, C), **like_x)
    for name, t in vectors:
        if t is not None:
            check_tensor(op, name, t, shape=(C,), **like_x)
    for name, t in stats:
        check_tensor(op, name, t, dtypes=(torch.float32,), device=x.device, shape=(N,))


def check_fwd(op, support, x, residual, weight, bias, dropout):
    if residual is None and dropout is None and op.startswith("add_"):
        raise ValueError(f"{op}: residual may be None only with dropout")
    _check(op, support, x, weight, rows=[("residual", residual)], vectors=[("bias", bias)])


def check_bwd(op, support, dy, x, weight, mean, rstd, dresidual, dbranch, dropout):
    if (dropout is None) != (dbranch is None):
        raise ValueError(f"{op}: dropout and dbranch must be given together")
    _check(op, support, x, weight, rows=[("dy", dy), ("dresidual", dresidual), ("dbranch", dbranch)],
           stats=[("rstd", rstd)] if "rms" in op else [("mean", mean), ("rstd", rstd)])


# ----------------------------------------------------------------------------- registration
# The ops take the backend by name and dropout as (p, seed, offset), p = 0 without: a schema
# holds tensors and scalars only (nanolm/ops/library.py registers them).

def _stats(x):
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


def _weight_grads(x):
    return x.new_empty(x.shape[1], dtype=torch.float32), x.new_empty(x.shape[1], dtype=torch.float32)


def _parameter_grads(ctx, dweight, dbias):
    """The kernels' float32 dweight, dbias in the parameters' dtype (None without a bias)."""
    return dweight.to(ctx.weight_dtype), None if not ctx.has_bias else dbias.to(ctx.weight_dtype)


@library.op("layer_norm_bwd", fake=lambda dy, x, *_: (torch.empty_like(x), *_weight_grads(x)))
def layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                      rstd: torch.Tensor, dresidual: torch.Tensor | None,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return BACKENDS[backend].layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, None, None)


@library.op("dropout_add_layer_norm_bwd",
            fake=lambda dy, x, *_: (torch.empty_like(x), *_weight_grads(x), torch.empty_like(x)))
def dropout_add_layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                                  rstd: torch.Tensor, dresidual: torch.Tensor | None, p: float, seed: int,
                                  offset: int, backend: str
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """layer_norm_bwd with the forward's dropout: (dx, dweight, dbias, dbranch)."""
    dbranch = torch.empty_like(x)
    dx, dweight, dbias = BACKENDS[backend].layer_norm_bwd(dy, x, weight, mean, rstd, dresidual, dbranch,
                                                          dropout_spec.Dropout(p, seed, offset))
    return dx, dweight, dbias, dbranch


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, _, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.backend, ctx.has_bias, ctx.weight_dtype = backend, bias is not None, weight.dtype


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_bwd_op(dy.contiguous(), x, weight, mean, rstd, None, ctx.backend)
    return dx, *_parameter_grads(ctx, dweight, dbias), None, None


@library.op("layer_norm_fwd", fake=lambda x, *_: (torch.empty_like(x), *_stats(x)),
            setup_context=_setup_layer_norm, backward=_layer_norm_backward)
def layer_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return BACKENDS[backend].layer_norm_fwd(x, weight, bias, eps)


def _setup_add_layer_norm(ctx, inputs, output):
    _, residual, weight, bias, _, p, seed, offset, backend = inputs
    _, residual_out, mean, rstd = output
    ctx.save_for_backward(residual_out, weight, mean, rstd)
    ctx.backend, ctx.has_bias, ctx.weight_dtype = backend, bias is not None, weight.dtype
    ctx.has_residual, ctx.dropout = residual is not None, (p, seed, offset)


def _add_layer_norm_backward(ctx, dy, dresidual_out, _dmean, _drstd):
    residual_out, weight, mean, rstd = ctx.saved_tensors
    dy = dy.contiguous()
    dresidual_out = None if dresidual_out is None else dresidual_out.contiguous()  # None: residual_out unused
    if ctx.dropout[0] == 0:  # no dropout: x and residual were simply added
        dx, dweight, dbias = layer_norm_bwd_op(dy, residual_out, weight, mean, rstd, dresidual_out, ctx.backend)
        dbranch = dx
    else:
        dx, dweight, dbias, dbranch = dropout_add_layer_norm_bwd_op(dy, residual_out, weight, mean, rstd,
                                                                    dresidual_out, *ctx.dropout, ctx.backend)
    dresidual = dx if ctx.has_residual else None
    return dbranch, dresidual, *_parameter_grads(ctx, dweight, dbias), None, None, None, None, None


@library.op("add_layer_norm_fwd", fake=lambda x, *_: (torch.empty_like(x), torch.empty_like(x), *_stats(x)),
            setup_context=_setup_add_layer_norm, backward=_add_layer_norm_backward)
def add_layer_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                          bias: torch.Tensor | None, eps: float, p: float, seed: int, offset: int,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return BACKENDS[backend].add_layer_norm_fwd(x, residual, weight, bias, eps,
                                                dropout_spec.from_schema(p, seed, offset))


def layer_norm(x, weight, bias, eps, backend):
    """LayerNorm over the last dim of x (..., C), by backend (a name: "torch", "cpu", ...)."""
    y, _, _ = layer_norm_fwd_op(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias, eps, backend)
    return y.view(x.shape)


def _residual_rows(name, x, residual, backend, dropout):
    """The fused add's checks and its (N, C) rows: -> (x's shape, x rows, residual rows or None)."""
    if residual is None and dropout is None:
        raise ValueError(f"{name}: residual may be None only with dropout")
    check_dropout("layernorm", BACKENDS[backend].support, backend, dropout)
    if residual is not None and x.dtype != residual.dtype:  # a branch under autocast joins the fp32 stream
        x = x.to(residual.dtype)
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).contiguous()
    return shape, x2d, None if residual is None else residual.reshape(-1, shape[-1]).contiguous()


def add_layer_norm(x, residual, weight, bias, eps, backend, dropout):
    """(layer_norm(dropout(x) + residual), dropout(x) + residual) over the last dim of x (..., C).
    dropout: None or a Dropout; residual may be None with dropout (the embedding sum)."""
    shape, x2d, r2d = _residual_rows("add_layer_norm", x, residual, backend, dropout)
    y, residual_out, _, _ = add_layer_norm_fwd_op(x2d, r2d, weight, bias, eps, *dropout_spec.as_schema(dropout),
                                                  backend)
    return y.view(shape), residual_out.view(shape)


# RMSNorm: the same, with rstd the only statistic and the weight optional. A registered op
# returns tensors only, so the backward's dweight is a (0,) tensor without a weight.

def _rms_weight_grad(x, weight):
    return x.new_empty(0 if weight is None else x.shape[1], dtype=torch.float32)


def _rms_bwd(backend, dy, x, weight, rstd, dresidual, dbranch, dropout):
    dx, dweight = BACKENDS[backend].rms_norm_bwd(dy, x, weight, rstd, dresidual, dbranch, dropout)
    return dx, _rms_weight_grad(x, None) if dweight is None else dweight


@library.op("rms_norm_bwd", fake=lambda dy, x, weight, *_: (torch.empty_like(x), _rms_weight_grad(x, weight)))
def rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                    dresidual: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_bwd(backend, dy, x, weight, rstd, dresidual, None, None)


@library.op("dropout_add_rms_norm_bwd",
            fake=lambda dy, x, weight, *_: (torch.empty_like(x), _rms_weight_grad(x, weight), torch.empty_like(x)))
def dropout_add_rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                                dresidual: torch.Tensor | None, p: float, seed: int, offset: int, backend: str
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rms_norm_bwd with the forward's dropout: (dx, dweight, dbranch)."""
    dbranch = torch.empty_like(x)
    dx, dweight = _rms_bwd(backend, dy, x, weight, rstd, dresidual, dbranch, dropout_spec.Dropout(p, seed, offset))
    return dx, dweight, dbranch


def _rms_weight_grad_out(ctx, dweight):
    return None if ctx.weight_dtype is None else dweight.to(ctx.weight_dtype)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, _, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend, ctx.weight_dtype = backend, None if weight is None else weight.dtype


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = rms_norm_bwd_op(dy.contiguous(), x, weight, rstd, None, ctx.backend)
    return dx, _rms_weight_grad_out(ctx, dweight), None, None


@library.op("rms_norm_fwd", fake=lambda x, *_: (torch.empty_like(x), _stats(x)[1]),
            setup_context=_setup_rms_norm, backward=_rms_norm_backward)
def rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS[backend].rms_norm_fwd(x, weight, eps)


def _setup_add_rms_norm(ctx, inputs, output):
    _, residual, weight, _, p, seed, offset, backend = inputs
    _, residual_out, rstd = output
    ctx.save_for_backward(residual_out, weight, rstd)
    ctx.backend, ctx.weight_dtype = backend, None if weight is None else weight.dtype
    ctx.has_residual, ctx.dropout = residual is not None, (p, seed, offset)


def _add_rms_norm_backward(ctx, dy, dresidual_out, _drstd):
    residual_out, weight, rstd = ctx.saved_tensors
    dy = dy.contiguous()
    dresidual_out = None if dresidual_out is None else dresidual_out.contiguous()  # None: residual_out unused
    if ctx.dropout[0] == 0:  # no dropout: x and residual were simply added
        dx, dweight = rms_norm_bwd_op(dy, residual_out, weight, rstd, dresidual_out, ctx.backend)
        dbranch = dx
    else:
        dx, dweight, dbranch = dropout_add_rms_norm_bwd_op(dy, residual_out, weight, rstd, dresidual_out,
                                                           *ctx.dropout, ctx.backend)
    dresidual = dx if ctx.has_residual else None
    return dbranch, dresidual, _rms_weight_grad_out(ctx, dweight), None, None, None, None, None


@library.op("add_rms_norm_fwd", fake=lambda x, *_: (torch.empty_like(x), torch.empty_like(x), _stats(x)[1]),
            setup_context=_setup_add_rms_norm, backward=_add_rms_norm_backward)
def add_rms_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                        p: float, seed: int, offset: int, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return BACKENDS[backend].add_rms_norm_fwd(x, residual, weight, eps, dropout_spec.from_schema(p, seed, offset))


def rms_norm(x, weight, eps, backend):
    """RMSNorm over the last dim of x (..., C); weight (C,) or None (parameter-free)."""
    y, _ = rms_norm_fwd_op(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps, backend)
    return y.view(x.shape)


def add_rms_norm(x, residual, weight, eps, backend, dropout):
    """(rms_norm(dropout(x) + residual), dropout(x) + residual) over the last dim of x (..., C);
    weight (C,) or None; dropout and residual as add_layer_norm's."""
    shape, x2d, r2d = _residual_rows("add_rms_norm", x, residual, backend, dropout)
    y, residual_out, _ = add_rms_norm_fwd_op(x2d, r2d, weight, eps, *dropout_spec.as_schema(dropout), backend)
    return y.view(shape), residual_out.view(shape)


# ----------------------------------------------------------------------------- backends
# Each backend implements the six functions of the specification, with its signatures; its
# support row says what it accepts (for LayerNorm and RMSNorm alike: they share the kernels).

class LayerNormBackend(NamedTuple):
    support: Support
    layer_norm_fwd: Callable
    add_layer_norm_fwd: Callable
    layer_norm_bwd: Callable
    rms_norm_fwd: Callable
    add_rms_norm_fwd: Callable
    rms_norm_bwd: Callable


def _forwards(fused, rms_fused):
    """The four forwards from two launchers: fused(op, x, residual, weight, bias, eps, dropout)
    -> (y, residual_out, mean, rstd) and rms_fused(op, x, residual, weight, eps, dropout) -> (y,
    residual_out, rstd)."""
    def fwd(x, weight, bias, eps):
        y, _, mean, rstd = fused("layer_norm_fwd", x, None, weight, bias, eps, None)
        return y, mean, rstd

    def add_fwd(x, residual, weight, bias, eps, dropout):
        return fused("add_layer_norm_fwd", x, residual, weight, bias, eps, dropout)

    def rms_fwd(x, weight, eps):
        y, _, rstd = rms_fused("rms_norm_fwd", x, None, weight, eps, None)
        return y, rstd

    def add_rms_fwd(x, residual, weight, eps, dropout):
        return rms_fused("add_rms_norm_fwd", x, residual, weight, eps, dropout)

    return fwd, add_fwd, rms_fwd, add_rms_fwd


def _outputs(x, residual, dropout):
    """Empty y, residual_out (None without a residual or dropout), mean, rstd for x (N, C)."""
    residual_out = None if residual is None and dropout is None else torch.empty_like(x)
    return torch.empty_like(x), residual_out, *_stats(x)


def _backend(support, fused, rms_fused, bwd, rms_bwd):
    fwd, add_fwd, rms_fwd, add_rms_fwd = _forwards(fused, rms_fused)
    return LayerNormBackend(support, fwd, add_fwd, bwd, rms_fwd, add_rms_fwd, rms_bwd)


# --- triton: kernels/layernorm.py; on CUDA, or on CPU tensors under TRITON_INTERPRET=1
TRITON = Support(dtypes={"cpu": FLOATS, "cuda": FLOATS}, max_row=triton_layernorm.MAX_C, dropout=True)


def _triton_fwd(op, x, residual, weight, bias, eps, dropout):
    check_fwd(op, TRITON, x, residual, weight, bias, dropout)
    return triton_layernorm.layernorm_fwd(x, residual, weight, bias, eps, dropout_spec.kernel_args(dropout))


def _triton_rms_fwd(op, x, residual, weight, eps, dropout):
    check_fwd(op, TRITON, x, residual, weight, None, dropout)
    y, residual_out, _, rstd = triton_layernorm.layernorm_fwd(x, residual, weight, None, eps,
                                                              dropout_spec.kernel_args(dropout), rms=True)
    return y, residual_out, rstd


def _triton_bwd(dy, x, weight, mean, rstd, dresidual, dbranch, dropout):
    check_bwd("layer_norm_bwd", TRITON, dy, x, weight, mean, rstd, dresidual, dbranch, dropout)
    return triton_layernorm.layernorm_bwd(dy, x, weight, mean, rstd, dresidual, dbranch,
                                          dropout_spec.kernel_args(dropout))


def _triton_rms_bwd(dy, x, weight, rstd, dresidual, dbranch, dropout):
    check_bwd("rms_norm_bwd", TRITON, dy, x, weight, None, rstd, dresidual, dbranch, dropout)
    dx, dweight, _ = triton_layernorm.layernorm_bwd(dy, x, weight, None, rstd, dresidual, dbranch,
                                                    dropout_spec.kernel_args(dropout), rms=True)
    return dx, dweight


# --- cpu, cuda, cuda_sim: csrc/layernorm_cpu.cpp, csrc/layernorm.cu (nanolm/ops/launch.py)
CPU_ROW = Support(dtypes={"cpu": FLOATS}, dropout=True)
# max_row: kLayerNormCudaMaxC (csrc/layernorm.h): each thread caches at most 16 values of a row
CUDA_ROW = Support(dtypes={"cuda": (torch.float32, torch.bfloat16)}, max_row=16384, dropout=True)


def _cxx_fwd(target, support, op, x, residual, weight, bias, eps, dropout):
    check_fwd(op, support, x, residual, weight, bias, dropout)
    y, residual_out, mean, rstd = _outputs(x, residual, dropout)
    target.launch("layernorm_fwd", x.device, x.data_ptr(), ptr(residual), ptr(residual_out), weight.data_ptr(),
                  ptr(bias), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), *x.shape, float(eps),
                  target.dtype(x), target.dropout(dropout))
    return y, residual_out, mean, rstd


def _cxx_rms_fwd(target, support, op, x, residual, weight, eps, dropout):
    check_fwd(op, support, x, residual, weight, None, dropout)
    residual_out = None if residual is None and dropout is None else torch.empty_like(x)
    y, rstd = torch.empty_like(x), _stats(x)[1]
    target.launch("rmsnorm_fwd", x.device, x.data_ptr(), ptr(residual), ptr(residual_out), ptr(weight),
                  y.data_ptr(), rstd.data_ptr(), *x.shape, float(eps), target.dtype(x), target.dropout(dropout))
    return y, residual_out, rstd


def _cpu_bwd(dy, x, weight, mean, rstd, dresidual, dbranch, dropout):
    check_bwd("layer_norm_bwd", CPU_ROW, dy, x, weight, mean, rstd, dresidual, dbranch, dropout)
    dx, (dweight, dbias) = torch.empty_like(x), _weight_grads(x)
    CPU.launch("layernorm_bwd", x.device, dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(),
               rstd.data_ptr(), ptr(dresidual), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), *x.shape,
               CPU.dtype(x), ptr(dbranch), CPU.dropout(dropout))
    return dx, dweight, dbias


def _cpu_rms_bwd(dy, x, weight, rstd, dresidual, dbranch, dropout):
    check_bwd("rms_norm_bwd", CPU_ROW, dy, x, weight, None, rstd, dresidual, dbranch, dropout)
    dx, dweight = torch.empty_like(x), None if weight is None else _weight_grads(x)[0]
    CPU.launch("rmsnorm_bwd", x.device, dy.data_ptr(), x.data_ptr(), ptr(weight), rstd.data_ptr(), ptr(dresidual),
               dx.data_ptr(), ptr(dweight), *x.shape, CPU.dtype(x), ptr(dbranch), CPU.dropout(dropout))
    return dx, dweight


def _cuda_bwd(target, support, dy, x, weight, mean, rstd, dresidual, dbranch, dropout):
    """As the cpu launcher, plus the (2, P, C) fp32 workspace of per-block partial dweight, dbias."""
    check_bwd("layer_norm_bwd", support, dy, x, weight, mean, rstd, dresidual, dbranch, dropout)
    N, C = x.shape
    dx, (dweight, dbias) = torch.empty_like(x), _weight_grads(x)
    workspace = torch.empty(2, target.ext.layernorm_bwd_workspace_rows_cuda(N, C), C, dtype=torch.float32,
                            device=x.device)
    target.launch("layernorm_bwd", x.device, dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(),
                  rstd.data_ptr(), ptr(dresidual), dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
                  workspace.data_ptr(), N, C, target.dtype(x), ptr(dbranch), target.dropout(dropout))
    return dx, dweight, dbias


def _cuda_rms_bwd(target, support, dy, x, weight, rstd, dresidual, dbranch, dropout):
    """As the cpu launcher, plus the (P, C) fp32 workspace of per-block partial dweight (none
    without a weight)."""
    check_bwd("rms_norm_bwd", support, dy, x, weight, None, rstd, dresidual, dbranch, dropout)
    N, C = x.shape
    dx, dweight, workspace = torch.empty_like(x), None, None
    if weight is not None:
        dweight = _weight_grads(x)[0]
        workspace = torch.empty(target.ext.layernorm_bwd_workspace_rows_cuda(N, C), C, dtype=torch.float32,
                                device=x.device)
    target.launch("rmsnorm_bwd", x.device, dy.data_ptr(), x.data_ptr(), ptr(weight), rstd.data_ptr(),
                  ptr(dresidual), dx.data_ptr(), ptr(dweight), ptr(workspace), N, C, target.dtype(x), ptr(dbranch),
                  target.dropout(dropout))
    return dx, dweight


def _cuda_backend(target, support):
    return _backend(support, partial(_cxx_fwd, target, support), partial(_cxx_rms_fwd, target, support),
                    partial(_cuda_bwd, target, support), partial(_cuda_rms_bwd, target, support))


BACKENDS = {
    "torch": LayerNormBackend(Support(dtypes={"cpu": FLOATS, "cuda": FLOATS}, dropout=True),
                              layer_norm_fwd, add_layer_norm_fwd, layer_norm_bwd,
                              rms_norm_fwd, add_rms_norm_fwd, rms_norm_bwd),
    "triton": _backend(TRITON, _triton_fwd, _triton_rms_fwd, _triton_bwd, _triton_rms_bwd),
    "cuda": _cuda_backend(CUDA, CUDA_ROW),
    "cpu": _backend(CPU_ROW, partial(_cxx_fwd, CPU, CPU_ROW), partial(_cxx_rms_fwd, CPU, CPU_ROW), _cpu_bwd,
                    _cpu_rms_bwd),
    "cuda_sim": _cuda_backend(CUDA_SIM, CUDA_ROW.on_cpu()),
}
