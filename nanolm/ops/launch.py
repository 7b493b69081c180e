"""How Python calls a C++ launcher of csrc/: one calling convention for every op and target.

    <op>_<step>_<cpu|cuda>(buffers and sizes..., scalars..., dtype[, dropout][, stream])

Pointers are integers (tensor.data_ptr(), 0 for an absent optional tensor); a (b, t, h) stride
triple follows each strided pointer; the buffers' DType is always passed (raw pointers carry no
type, so C++ refuses a dtype it has no kernel for); dropout is one DropoutParams (disabled: no
dropout) where the kernel drops; the CUDA launchers take the stream last. A `Target` binds that
convention to one extension module and device:
  CPU       nanolm._C's *_cpu launchers (OpenMP over rows), CPU tensors;
  CUDA      nanolm._C's *_cuda launchers on a GPU, under the tensors' device, on its current stream;
  CUDA_SIM  nanolm._C_sim's *_cuda launchers: the same .cu sources on the SIMT emulation of
            csrc/sim/, CPU tensors, one stream (0).
The cuda and cuda_sim backends are the same launch code given CUDA or CUDA_SIM.
"""
import contextlib
from dataclasses import dataclass

import torch

from nanolm.ops.dropout import kernel_args
from nanolm.ops.support import dtype_name

try:
    from nanolm import _C  # the C++/CUDA extension; None when not built (backends.py says so)
except ImportError:
    _C = None
try:
    from nanolm import _C_sim  # the CUDA launchers on the emulation; None when not built
    C_SIM_ERROR = None
except ImportError as e:
    _C_sim, C_SIM_ERROR = None, e


def ptr(t):
    """A tensor's address for a launcher; 0 for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def bth_strides(t):
    """The (batch, seq, head) strides of a (B, T, nh, hs) tensor, in elements."""
    return t.stride(0), t.stride(1), t.stride(2)


def _cuda_stream(device):
    return torch.cuda.current_stream(device).cuda_stream


@dataclass(frozen=True)
class Target:
    """One extension module's launchers for one kind of device."""
    ext: object  # nanolm._C or nanolm._C_sim
    suffix: str  # launcher names end with it: "_cpu" or "_cuda"
    stream: object = None  # device -> the stream handle a CUDA launcher takes last; None: no stream
    device_scope: object = contextlib.nullcontext  # device -> the context a launch runs in

    def dtype(self, t):
        return getattr(self.ext.DType, dtype_name(t.dtype))

    def dropout(self, dropout):
        """One DropoutParams, disabled without dropout."""
        return self.ext.DropoutParams() if dropout is None else self.ext.DropoutParams(*kernel_args(dropout))

    def launch(self, name, device, *args):
        """Call launcher name + suffix with args (and the stream, for CUDA) on device."""
        launcher = getattr(self.ext, name + self.suffix)
        if self.stream is None:
            return launcher(*args)
        with self.device_scope(device):
            return launcher(*args, self.stream(device))


CPU = Target(_C, "_cpu")
CUDA = Target(_C, "_cuda", stream=_cuda_stream, device_scope=torch.cuda.device)
CUDA_SIM = Target(_C_sim, "_cuda", stream=lambda device: 0)  # host memory: there is one stream
