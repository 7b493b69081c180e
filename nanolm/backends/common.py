"""What every backend shares: the support table entry (`Support`), and the few helpers that
turn tensors into what a kernel launcher takes.

Each backend module declares one table, `SUPPORT = {op: Support(...)}`, in the op order of the
contract in torch_ref.py. It is the only place a backend's limits are written: the input checks
(checks.py), the selection of `--kernels` (backends/__init__.py), `python -m nanolm.info` and
the test parametrization all read it. Adding a dtype or a head size to a backend is an edit of
its table plus the kernel that handles it.
"""
import math
from dataclasses import dataclass, field

import torch

try:
    from nanolm import _C  # the C++/CUDA extension; None when not built (the cpu, cuda backends say so)
except ImportError:
    _C = None


@dataclass(frozen=True)
class Support:
    """What one backend's implementation of one op accepts."""
    dtypes: dict  # device type ("cpu", "cuda") -> element dtypes of the op's data tensors there
    head_sizes: tuple = ()  # attention: the hs values a kernel exists for; () = any
    max_row: int | None = None  # layernorm: the largest row length C; None = no limit
    align_bytes: int = 0  # attention: base address and (b, t, h) strides in multiples of this
    dropout: bool = False  # layernorm, attention: the functions take a dropout argument (torch_ref)
    notes: dict = field(default_factory=dict)  # device type -> why its dtypes are limited

    def devices(self):
        return tuple(self.dtypes)


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def ptr(t):
    """A tensor's address for a launcher; 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def bth_strides(t):
    """The (batch, seq, head) strides of a (B, T, nh, hs) tensor, in elements."""
    return t.stride(0), t.stride(1), t.stride(2)


_C_DTYPES = {} if _C is None else {getattr(torch, name): value for name, value in _C.DType.__members__.items()}


def c_dtype(t):
    """t's dtype as nanolm._C.DType: the one way every launcher takes an element type."""
    return _C_DTYPES[t.dtype]


def layer_norm_forwards(fused):
    """The contract's two layernorm forwards from one launcher
    fused(op, x, residual, weight, bias, eps, dropout) -> (y, residual_out, mean, rstd)."""
    def layer_norm_fwd(x, weight, bias, eps):
        y, _, mean, rstd = fused("layer_norm_fwd", x, None, weight, bias, eps, None)
        return y, mean, rstd

    def add_layer_norm_fwd(x, residual, weight, bias, eps, dropout=None):
        return fused("add_layer_norm_fwd", x, residual, weight, bias, eps, dropout)

    return layer_norm_fwd, add_layer_norm_fwd


def layer_norm_outputs(x, residual, dropout=None):
    """Empty y, residual_out (None without a residual or dropout), mean, rstd for a forward over x (N, C)."""
    N = x.shape[0]
    residual_out = None if residual is None and dropout is None else torch.empty_like(x)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    return torch.empty_like(x), residual_out, mean, rstd


def layer_norm_bwd_outputs(x):
    """Empty dx (like x), dweight, dbias (C,) float32 for a backward over x (N, C)."""
    C = x.shape[1]
    dweight = torch.empty(C, dtype=torch.float32, device=x.device)
    dbias = torch.empty(C, dtype=torch.float32, device=x.device)
    return torch.empty_like(x), dweight, dbias


def adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, grad_scale):
    """The per-step scalars of the fused update, computed once on the host in float64, in the
    order of _C.AdamWScalars and kernels/adamw.py's launcher: (1 - beta1, beta2, 1 - beta2, eps,
    decay_factor = 1 - lr*wd, step_size = lr / (1 - beta1^step), bc2_sqrt = sqrt(1 - beta2^step),
    grad_scale)."""
    return (1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay, lr / (1 - beta1 ** step),
            math.sqrt(1 - beta2 ** step), grad_scale)


def dropout_scalars(dropout):
    """A kernel's dropout arguments (seed, offset, threshold, scale) from an ops.Dropout: the
    threshold floor(p * 2^32) and scale 1 / (1 - p) of torch_ref's specification."""
    from nanolm.backends.torch_ref import dropout_threshold  # torch_ref imports this module
    return dropout.seed, dropout.offset, dropout_threshold(dropout.p), 1.0 / (1.0 - dropout.p)
