"""The MLP's activations that replace GPT-2's GELU: SwiGLU (Llama) and ReLU² (modded-nanogpt,
nanochat), forward and backward, each reading the up-projection once.

    swiglu:  a = silu(g) * u,  silu(g) = g * sigmoid(g),  for gate_up = [g | u] (N, 2F) -> a (N, F)
             dg = da * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  du = da * silu(g)
    relu2:   a = relu(x)^2                               x (N, F) -> a (N, F)
             dx = 2 * relu(x) * da

The gate and up halves are one (N, 2F) tensor because c_fc computes them in one matmul (its
weight rows [gate | up]); the backward writes dgate_up in the same layout, so c_fc's backward is
one matmul too. Cost: swiglu reads 2F and writes F values per row forward, reads 3F and writes
2F backward; relu2 reads F, writes F forward, reads 2F, writes F backward: memory-bound.

This module reads top to bottom: the specification in plain PyTorch (float32 math, cast back),
the input checks, the registration with PyTorch and the entry points the model calls, then each
backend's support row and launchers. Kernels: csrc/mlp_activation_cpu.cpp (CPU); no Triton or
CUDA kernel yet.
"""
from typing import Callable, NamedTuple

import torch

from nanolm.ops import library
from nanolm.ops.launch import CPU
from nanolm.ops.support import FLOATS, Support, accumulation_dtype, check_first, check_tensor

# ----------------------------------------------------------------------------- specification
# gate_up (N, 2F), x (N, F), da (N, F) contiguous; outputs contiguous in the input's dtype.


def swiglu_fwd(gate_up):
    g, u = gate_up.to(accumulation_dtype(gate_up.dtype)).chunk(2, dim=-1)
    return (g * torch.sigmoid(g) * u).to(gate_up.dtype)


def swiglu_bwd(da, gate_up):
    """-> dgate_up (N, 2F): [dgate | dup]."""
    acc = accumulation_dtype(gate_up.dtype)
    g, u = gate_up.to(acc).chunk(2, dim=-1)
    daf, sig = da.to(acc), torch.sigmoid(g)
    dg = daf * u * sig * (1 + g * (1 - sig))
    du = daf * g * sig
    return torch.cat((dg, du), dim=-1).to(gate_up.dtype)


def relu2_fwd(x):
    return torch.relu(x.to(accumulation_dtype(x.dtype))).square().to(x.dtype)


def relu2_bwd(da, x):
    acc = accumulation_dtype(x.dtype)
    return (2 * torch.relu(x.to(acc)) * da.to(acc)).to(x.dtype)


# ----------------------------------------------------------------------------- checks

def check(op, x, *, halves):
    """The layout, before any backend runs (a kernel's launcher checks dtype and device against
    its row): x (..., F), or (..., 2F) with halves: [gate | up]."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: expected a tensor of at least 1 dim, got {x!r}")
    if halves and x.shape[-1] % 2:
        raise ValueError(f"{op}: gate_up must hold [gate | up] halves of equal width, got an odd width {x.shape[1]}")


# ----------------------------------------------------------------------------- registration

@library.op("swiglu_bwd", fake=lambda da, gate_up, backend: torch.empty_like(gate_up))
def swiglu_bwd_op(da: torch.Tensor, gate_up: torch.Tensor, backend: str) -> torch.Tensor:
    return BACKENDS[backend].swiglu_bwd(da, gate_up)


def _setup_saving_input(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x)
    ctx.backend = backend


def _swiglu_backward(ctx, da):
    gate_up, = ctx.saved_tensors
    return swiglu_bwd_op(da.contiguous(), gate_up, ctx.backend), None


def _halved(gate_up, backend):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@library.op("swiglu_fwd", fake=_halved, setup_context=_setup_saving_input, backward=_swiglu_backward)
def swiglu_fwd_op(gate_up: torch.Tensor, backend: str) -> torch.Tensor:
    return BACKENDS[backend].swiglu_fwd(gate_up)


@library.op("relu2_bwd", fake=lambda da, x, backend: torch.empty_like(x))
def relu2_bwd_op(da: torch.Tensor, x: torch.Tensor, backend: str) -> torch.Tensor:
    return BACKENDS[backend].relu2_bwd(da, x)


def _relu2_backward(ctx, da):
    x, = ctx.saved_tensors
    return relu2_bwd_op(da.contiguous(), x, ctx.backend), None


@library.op("relu2_fwd", fake=lambda x, backend: torch.empty_like(x), setup_context=_setup_saving_input,
            backward=_relu2_backward)
def relu2_fwd_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return BACKENDS[backend].relu2_fwd(x)


def swiglu(gate_up, backend):
    """silu(gate) * up over the last dim of gate_up (..., 2F) = [gate | up] -> (..., F)."""
    check("swiglu", gate_up, halves=True)
    x2d = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    return swiglu_fwd_op(x2d, backend).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def relu2(x, backend):
    """relu(x)^2, elementwise, x (..., F)."""
    check("relu2", x, halves=False)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    return relu2_fwd_op(x2d, backend).view(x.shape)


# ----------------------------------------------------------------------------- backends

class MlpActivationBackend(NamedTuple):
    support: Support
    swiglu_fwd: Callable
    swiglu_bwd: Callable
    relu2_fwd: Callable
    relu2_bwd: Callable


# --- cpu: csrc/mlp_activation_cpu.cpp (nanolm/ops/launch.py); no Triton or CUDA kernel yet
CPU_ROW = Support(dtypes={"cpu": FLOATS})


def _check_rows(op, name, x, others=()):
    """What a kernel trusts: x 2-D contiguous, of a dtype and device the row lists; each (name,
    tensor, shape) of others contiguous, of x's dtype and device, in that shape."""
    check_first(op, CPU_ROW, name, x, ndim=2)
    for other, t, shape in others:
        check_tensor(op, other, t, dtypes=(x.dtype,), device=x.device, shape=shape)


def _cpu_swiglu_fwd(gate_up):
    check("swiglu_fwd", gate_up, halves=True)
    _check_rows("swiglu_fwd", "gate_up", gate_up)
    N, F = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(N, F)
    CPU.launch("swiglu_fwd", gate_up.device, gate_up.data_ptr(), out.data_ptr(), N, F, CPU.dtype(gate_up))
    return out


def _cpu_swiglu_bwd(da, gate_up):
    check("swiglu_bwd", gate_up, halves=True)
    N, F = gate_up.shape[0], gate_up.shape[1] // 2
    _check_rows("swiglu_bwd", "gate_up", gate_up, [("da", da, (N, F))])
    dgate_up = torch.empty_like(gate_up)
    CPU.launch("swiglu_bwd", gate_up.device, da.data_ptr(), gate_up.data_ptr(), dgate_up.data_ptr(), N, F,
               CPU.dtype(gate_up))
    return dgate_up


def _cpu_relu2_fwd(x):
    _check_rows("relu2_fwd", "x", x)
    out = torch.empty_like(x)
    CPU.launch("relu2_fwd", x.device, x.data_ptr(), out.data_ptr(), *x.shape, CPU.dtype(x))
    return out


def _cpu_relu2_bwd(da, x):
    _check_rows("relu2_bwd", "x", x, [("da", da, x.shape)])
    dx = torch.empty_like(x)
    CPU.launch("relu2_bwd", x.device, da.data_ptr(), x.data_ptr(), dx.data_ptr(), *x.shape, CPU.dtype(x))
    return dx


BACKENDS = {
    "torch": MlpActivationBackend(Support(dtypes={"cpu": FLOATS, "cuda": FLOATS}), swiglu_fwd, swiglu_bwd,
                                  relu2_fwd, relu2_bwd),
    "cpu": MlpActivationBackend(CPU_ROW, _cpu_swiglu_fwd, _cpu_swiglu_bwd, _cpu_relu2_fwd, _cpu_relu2_bwd),
}
