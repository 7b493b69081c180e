"""The `cuda_sim` backend: the CUDA kernels of csrc/*.cu run on CPU tensors by the SIMT
emulation in csrc/sim/ (nanolm._C_sim: the same sources compiled by the host C++ compiler).

It is the cuda backend on another target: a second instance of cuda.py whose `_C`, `c_dtype`,
`_device`, `_stream` and `SUPPORT` point at nanolm._C_sim and the CPU, so both backends share
every check and every launch. Every CUDA thread is a fiber, so it is slow (a 64 x 64 attention
tile takes milliseconds): it exists to test the CUDA code paths without a GPU and to study them
(a breakpoint in attention.cu stops one emulated CUDA thread). `auto` never picks it.
"""
import contextlib
import dataclasses
import importlib.util

from nanolm.backends import OPS, cuda
from nanolm.backends.common import dtype_name

try:
    from nanolm import _C_sim
    _IMPORT_ERROR = None
except ImportError as e:
    _C_sim, _IMPORT_ERROR = None, e

# cuda's table, with the CPU where it says CUDA
SUPPORT = {op: dataclasses.replace(s, dtypes={"cpu": s.dtypes["cuda"]}, notes={}) for op, s in cuda.SUPPORT.items()}


def unavailable_reason(device):
    if isinstance(_IMPORT_ERROR, ModuleNotFoundError):
        return ("nanolm._C_sim is not built: the install found no CUDA headers (cuda_bf16.h; set "
                "CUDA_HOME and reinstall) or had NANOLM_CUDA_SIM=off")
    if _IMPORT_ERROR is not None:
        return f"nanolm._C_sim does not load ({_IMPORT_ERROR})"
    return None


def _cuda_backend_on_the_emulation():
    spec = importlib.util.find_spec("nanolm.backends.cuda")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._C = _C_sim
    module.c_dtype = lambda t: getattr(_C_sim.DType, dtype_name(t.dtype))
    module._device = lambda device: contextlib.nullcontext()
    module._stream = lambda: 0  # host memory: there is one stream
    module.SUPPORT = SUPPORT
    return module


_sim = _cuda_backend_on_the_emulation()
globals().update({name: getattr(_sim, name) for op in SUPPORT for name in OPS[op]})
