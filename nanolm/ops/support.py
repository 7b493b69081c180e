"""What every op module shares: the support row (`Support`) and the generic input checks.

Each op module (layernorm.py, attention.py, ...) lists, per backend, one `Support` row: the only
place a backend's limits for that op are written. The input checks below, `--kernels`
(nanolm/ops/backends.py), `python -m nanolm.info` and the test parametrization all read it.
A kernel that receives pointers trusts nothing the Python layer did not check, so every launch
wrapper validates its tensors here first and raises ValueError (TypeError for a non-tensor)
naming the op, the argument and the bad value.
"""
from dataclasses import dataclass, field

import torch

# The float dtypes a kernel may be asked for; float64 is the specification's (tests) only.
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
F32 = (torch.float32,)


@dataclass(frozen=True)
class Support:
    """What one backend's implementation of one op accepts."""
    dtypes: dict  # device type ("cpu", "cuda") -> element dtypes of the op's data tensors there
    head_sizes: tuple = ()  # attention: the hs values a kernel exists for; () = any
    max_row: int | None = None  # layernorm: the largest row length C; None = no limit
    align_bytes: int = 0  # attention: base address and (b, t, h) strides in multiples of this
    dropout: bool = False  # layernorm, attention: the kernels take a dropout argument
    gqa: bool = False  # attention: K/V heads shared by groups of query heads (n_kv_head < n_head)
    notes: dict = field(default_factory=dict)  # device type -> why its dtypes are limited

    def devices(self):
        return tuple(self.dtypes)

    def on_cpu(self):
        """This row with the CPU where it says CUDA: a CUDA kernel run by the CPU emulation."""
        return Support(**{**self.__dict__, "dtypes": {"cpu": self.dtypes["cuda"]}, "notes": {}})


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _names(dtypes):
    return ", ".join(map(dtype_name, dtypes))


def check_tensor(op, name, t, *, dtypes, device=None, ndim=None, shape=None, contiguous=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} has dtype {dtype_name(t.dtype)}; supported: {_names(dtypes)}"
                         + ("" if device is None else f" (on {device.type})"))
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()}, shape {tuple(t.shape)})")


def check_first(op, support, name, t, **kw):
    """The op's first data tensor: a tensor on a device the row lists, of a dtype listed for
    that device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = support.dtypes.get(t.device.type)
    if dtypes is None:
        wanted = " or ".join(support.devices())
        raise ValueError(f"{op}: {name} is on {t.device}, expected a {wanted} device "
                         f"(this backend needs {wanted.upper()} tensors)")
    check_tensor(op, name, t, dtypes=dtypes, device=t.device, **kw)


def check_dropout(op, support, backend, dropout):
    """dropout (None or a Dropout, or the trainer's p) only where backend's support row says its
    kernels take it: the one check of dropout support, by the ops and the trainer."""
    if dropout and not support.dropout:
        raise ValueError(f"{op}: backend {backend} has no dropout for {op} (its support row says dropout=False); "
                         f"choose another with --kernels (e.g. {op}=torch)")


def accumulation_dtype(dtype):
    """What a specification computes in: float32, or float64 when the inputs already are."""
    return torch.float64 if dtype == torch.float64 else torch.float32
